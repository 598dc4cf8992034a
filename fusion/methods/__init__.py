"""Conventional two-image fusion methods, looked up by name.

Contract shared by every method (so DMF can treat them as interchangeable
"exposures" and so they can be validated against their reference code):

- ``fn(a, b, *, quantize=False) -> fused``
- ``a`` is the anatomical image (MRI; VIFB's "VI" role), ``b`` the other
  modality (CT/PET/SPECT; VIFB's "IR" role).  Some methods are asymmetric, so
  the order matters.
- ``a`` and ``b`` are float arrays on the 0..1 scale, shape ``(H, W)`` or a
  stack ``(S, H, W)``; NumPy or CuPy (the method works on whatever it is given,
  via ``fusion.backend.array_module``).  Slices are independent: a stack is
  processed as a batch, never with a Python loop over slices.
- The result has the input's shape, dtype and array module, on the 0..1 scale,
  saturated to [0, 1].
- ``quantize=True`` reproduces the reference implementation's uint8 rounding
  steps (internal and final, MATLAB's round-half-away-from-zero) exactly; this
  is what the reference tests use.  ``quantize=False`` (what DMF uses) keeps
  floats so that CPU and GPU results agree to float precision.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol


class FusionMethod(Protocol):
    def __call__(self, a: Any, b: Any, *, quantize: bool = False) -> Any: ...


_REGISTRY: dict[str, FusionMethod] = {}


def register(name: str) -> Callable[[FusionMethod], FusionMethod]:
    """Decorator adding a method to the registry under ``name`` (lower case)."""

    def deco(fn: FusionMethod) -> FusionMethod:
        key = name.lower()
        if key in _REGISTRY:
            raise ValueError(f"fusion method {key!r} registered twice")
        _REGISTRY[key] = fn
        return fn

    return deco


def get_method(name: str) -> FusionMethod:
    """The method registered as ``name``; a clear error listing the choices otherwise."""
    _load_builtin()
    try:
        return _REGISTRY[name.lower()]
    except KeyError:
        raise KeyError(
            f"unknown fusion method {name!r}; available: {', '.join(available())}"
        ) from None


def available() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def _load_builtin() -> None:
    # Importing every module of this package runs its @register decorators.
    import importlib
    import pkgutil

    for mod in pkgutil.iter_modules(__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")
