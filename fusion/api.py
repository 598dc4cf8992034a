"""``fusion.fuse``: the one call most users need.

Inputs may be a single slice or a stack, grey or RGB, NumPy or CuPy; the work
happens on ``device`` and the result comes back where the input lives.  Colour
inputs (PET/SPECT pseudo-colour) are fused in luminance with their chroma kept
(see ``fusion.intensity``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from fusion.backend import array_module, is_gpu_array, to_device, to_numpy, resolve_device
from fusion.dmf import DMFParams, dmf_blend, dmf_weights
from fusion.gradients import FeatureSource, exposure_gradients
from fusion.intensity import rgb_to_ycbcr, to_unit, ycbcr_to_rgb
from fusion.methods import available as available_methods
from fusion.methods import get_method

#: DMF trio per modality fused with the MRI: the best-Q^AB/F trio of the exhaustive search in
#: docs/quality.md (the paper's trios, ADF+CBF+FPDE for MRI-CT and TIF+WLS+(MDLatLRR|CBF|GFCE)
#: for MRI-PET, scored lower there on Q^AB/F)
DEFAULT_TRIOS = {
    "CT": ("cbf", "tif", "wls"),
    "PT": ("adf", "cbf", "tif"),
    "NM": ("adf", "cbf", "tif"),
}
DEFAULT_TRIO = DEFAULT_TRIOS["CT"]
DEFAULT_LAYERS = ("relu1_2", "relu2_2")


def default_trio(modality: str) -> tuple[str, ...]:
    """The DMF trio for fusing an MRI with ``modality`` (DICOM code: CT, PT, NM; others get CT's)."""
    return DEFAULT_TRIOS.get(modality.upper(), DEFAULT_TRIO)


@dataclass
class DMFResult:
    """The fused stack and what produced it (for previews, benchmarks and audits)."""

    fused: Any  #: (S, H, W) on 0..1
    exposures: Any  #: (K, S, H, W) the trio's outputs
    weights: Any  #: (K, S, H, W) eq. 8, summing to 1 over K


def dmf_stack(
    a: Any,
    b: Any,
    *,
    trio: Sequence[str] = DEFAULT_TRIO,
    feature_source: FeatureSource = "vgg",
    model: Any = None,
    layers: Sequence[str] = DEFAULT_LAYERS,
    params: DMFParams = DMFParams(),
) -> DMFResult:
    """DMF on two registered grey stacks ``(S, H, W)`` on 0..1, on their own device."""
    xp = array_module(a)
    if len(trio) < 2:
        raise ValueError(f"DMF needs at least two exposures, got trio={tuple(trio)}")
    exposures = xp.stack([get_method(name)(a, b) for name in trio])
    if feature_source == "vgg" and model is None:
        from fusion.features import load_vgg16

        model = load_vgg16(layers=tuple(layers), device="cuda" if is_gpu_array(a) else "cpu")
    mag, phi = exposure_gradients(exposures, feature_source, model=model, layers=layers)
    weights = dmf_weights(exposures, mag, phi, params)
    return DMFResult(dmf_blend(exposures, weights, params), exposures, weights)


def _is_rgb(x: Any) -> bool:
    return x.ndim >= 3 and x.shape[-1] == 3


def split_colour(a: Any, b: Any) -> tuple[Any, Any, Any]:
    """Reduce colour inputs to luminance; return ``(a_y, b_y, chroma or None)``.

    The chroma kept is the overlay's (PET/SPECT colour), or the base's when only
    the base is colour; inputs must be on 0..1.
    """
    chroma = None
    if _is_rgb(b):
        ycc = rgb_to_ycbcr(b)
        b, chroma = ycc[..., 0], ycc[..., 1:]
    if _is_rgb(a):
        ycc = rgb_to_ycbcr(a)
        a = ycc[..., 0]
        chroma = ycc[..., 1:] if chroma is None else chroma
    if a.shape != b.shape:
        raise ValueError(
            f"inputs differ in size: {a.shape} vs {b.shape}; register and resample the "
            "overlay onto the base grid first"
        )
    return a, b, chroma


def merge_colour(fused_y: Any, chroma: Any) -> Any:
    """Put fused luminance back together with kept chroma (identity when ``chroma`` is None)."""
    if chroma is None:
        return fused_y
    xp = array_module(fused_y)
    return ycbcr_to_rgb(xp.concatenate([fused_y[..., None], chroma], axis=-1))


def fuse(
    a: Any,
    b: Any,
    method: str = "dmf",
    trio: Sequence[str] = DEFAULT_TRIO,
    device: str = "auto",
    feature_source: FeatureSource = "vgg",
    params: DMFParams = DMFParams(),
    model: Any = None,
) -> Any:
    """Fuse anatomical image ``a`` (MRI) with ``b`` (CT, PET, SPECT).

    ``a``/``b``: ``(H, W)``, ``(S, H, W)``, or with a trailing RGB axis; integer
    images are scaled by their dtype's range, floats are taken as 0..1.  The two
    must already be registered and of equal size.  ``method`` is ``"dmf"`` or any
    single method of ``fusion.methods``.  Returns float32 on 0..1, grey of the
    input's shape, or RGB when either input is colour, as NumPy unless the input
    was CuPy.
    """
    return_gpu = is_gpu_array(a)
    dev = resolve_device(device)
    a, b, chroma = split_colour(to_unit(to_device(a, dev)), to_unit(to_device(b, dev)))
    single = a.ndim == 2
    a3, b3 = (a[None], b[None]) if single else (a, b)
    if a3.ndim != 3:
        raise ValueError(f"expected a slice (H, W) or a stack (S, H, W), got shape {a.shape}")

    name = method.lower()
    if name == "dmf":
        fused = dmf_stack(a3, b3, trio=trio, feature_source=feature_source, model=model, params=params).fused
    elif name in available_methods():
        fused = get_method(name)(a3, b3)
    else:
        raise ValueError(f"unknown method {method!r}; choose 'dmf' or one of {', '.join(available_methods())}")
    if single:
        fused = fused[0]
    fused = merge_colour(fused, chroma)
    return fused if return_gpu else to_numpy(fused)
