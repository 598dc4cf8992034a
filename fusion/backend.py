"""Choice of array module (NumPy or CuPy) and hand-off between host, CuPy and torch.

Every numerical function in ``fusion`` is written once against an array module
``xp`` taken from its input (``array_module(x)``), so the same code runs on the
CPU with NumPy/SciPy and on the GPU with CuPy/cupyx.  Callers decide where the
data lives; this module only answers "which library handles this array" and
moves arrays without copies where the hardware allows it (DLPack on the GPU).

``FUSION_DEVICE`` (``auto`` | ``cpu`` | ``cuda``, ``fusion.environment``) is
the default; an explicit ``device=`` argument always wins over it.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any, Literal

import numpy as np

from fusion import environment
from fusion.errors import FusionError

Device = Literal["cpu", "cuda"]
DEVICE_CHOICES = ("auto", "cpu", "cuda")
ENV_DEVICE = "FUSION_DEVICE"


class DeviceUnavailableError(FusionError):
    """Raised when ``cuda`` is asked for explicitly but no usable GPU/CuPy is present."""


@functools.lru_cache(maxsize=1)
def _cupy() -> ModuleType | None:
    """Import CuPy once; ``None`` when it is missing or sees no GPU."""
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
        return cupy
    except Exception:  # noqa: BLE001 - ImportError, CUDA driver errors: both mean "no GPU path"
        return None


def cuda_available() -> bool:
    """True when CuPy imports and at least one CUDA device answers."""
    return _cupy() is not None


def resolve_device(device: str | None = None) -> Device:
    """Turn ``auto``/``cpu``/``cuda`` (or ``None`` = the environment) into a concrete device."""
    choice = (device or environment.device() or "auto").lower()
    if choice not in DEVICE_CHOICES:
        raise ValueError(f"device must be one of {DEVICE_CHOICES}, got {choice!r}")
    if choice == "auto":
        return "cuda" if cuda_available() else "cpu"
    if choice == "cuda":
        if not cuda_available():
            raise DeviceUnavailableError(
                "device 'cuda' requested but CuPy with a CUDA GPU is not available; "
                "install the extra `pip install dicom-fusion-node[gpu]` on a GPU machine "
                "or use device 'cpu'/'auto'"
            )
        return "cuda"
    return "cpu"


def xp_for(device: str | None = None) -> ModuleType:
    """The array module for a device: NumPy for ``cpu``, CuPy for ``cuda``."""
    if resolve_device(device) == "cuda":
        cp = _cupy()
        assert cp is not None  # resolve_device says "cuda" only after _cupy() (cached) found a GPU
        return cp
    return np


def array_module(x: Any) -> ModuleType:
    """NumPy or CuPy, whichever owns ``x``."""
    cp = _cupy()
    if cp is not None and isinstance(x, cp.ndarray):
        return cp
    return np


def ndimage_for(xp: ModuleType) -> ModuleType:
    """``scipy.ndimage`` for NumPy, ``cupyx.scipy.ndimage`` for CuPy (same API)."""
    if xp is np:
        import scipy.ndimage as ndi

        return ndi
    import cupyx.scipy.ndimage as cndi

    return cndi


def is_gpu_array(x: Any) -> bool:
    return array_module(x) is not np


def to_device(x: Any, device: str | None = None, dtype: Any = None) -> Any:
    """Place ``x`` on ``device`` (copy only when it lives elsewhere)."""
    xp = xp_for(device)
    if xp is np:
        return to_numpy(x, dtype=dtype)
    out = xp.asarray(x)
    return out.astype(dtype, copy=False) if dtype is not None else out


def to_numpy(x: Any, dtype: Any = None) -> np.ndarray:
    """Bring any array (NumPy, CuPy, torch) to host memory as NumPy."""
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    elif is_gpu_array(x):
        x = x.get()
    out = np.asarray(x)
    return out.astype(dtype, copy=False) if dtype is not None else out


def to_torch(x: Any) -> Any:
    """NumPy/CuPy array to a torch tensor sharing its memory (DLPack on the GPU)."""
    import torch

    if is_gpu_array(x):
        return torch.from_dlpack(x)
    return torch.from_numpy(np.ascontiguousarray(x))


def from_torch(t: Any, xp: ModuleType) -> Any:
    """A torch tensor to ``xp`` without a copy where both sides are on the same device."""
    if xp is np:
        return t.detach().cpu().numpy()
    if t.device.type != "cuda":
        return xp.asarray(t.detach().numpy())
    return xp.from_dlpack(t.detach())


def torch_device_for(xp: ModuleType) -> str:
    """The torch device string matching an array module."""
    return "cpu" if xp is np else "cuda"
