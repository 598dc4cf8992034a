"""``fusion.fuse``: the one call most users need.

Inputs may be a single slice or a stack, grey or RGB, NumPy or CuPy; the work
happens on ``device`` and the result comes back where the input lives.  Colour
inputs (PET/SPECT pseudo-colour) are fused in luminance with their chroma kept
(see ``fusion.intensity``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fusion.backend import array_module, is_gpu_array, resolve_device, to_device, to_numpy
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

#: the paper's trios (El-Shafai & Azar 2025): ADF+CBF+FPDE for MRI-CT, TIF+WLS+LatLRR for
#: MRI-PET/SPECT; ``dmf_paper`` uses them with the paper's weights (DMFParams defaults)
PAPER_TRIOS = {
    "CT": ("adf", "cbf", "fpde"),
    "PT": ("tif", "wls", "mdlatlrr"),
    "NM": ("tif", "wls", "mdlatlrr"),
}

#: the default of ``fuse``, ``fusion-node fuse`` and a pipeline's ``method``: gradient-domain
#: fusion anchored on the brighter source, which keeps bone and uptake (docs/fidelity.md)
DEFAULT_METHOD = "faithful"
#: the DMF variants: ``dmf`` = the paper's weights on the measured-best trios (DEFAULT_TRIOS),
#: ``dmf_paper`` = the paper's weights on the paper's trios (PAPER_TRIOS)
DMF_METHODS = ("dmf", "dmf_paper")


def is_dmf(method: str) -> bool:
    """Whether ``method`` is one of the DMF variants (it then takes a trio and a feature source)."""
    return method.lower() in DMF_METHODS


def uses_vgg(method: str, feature_source: str = "vgg") -> bool:
    """Whether fusing with ``method`` needs the VGG16 weights (only DMF with VGG features does).

    The node and the CLI load, and check, the weights only then: the default method needs none.
    """
    return is_dmf(method) and feature_source == "vgg"


#: what an overlay is taken to be when nobody says: colour images are PET/SPECT renderings, grey ones CT
ASSUMED_COLOUR_MODALITY = "PT"
ASSUMED_GREY_MODALITY = "CT"


def default_trio(modality: str, method: str = "dmf") -> tuple[str, ...]:
    """The DMF trio for fusing an MRI with ``modality`` (DICOM code: CT, PT, NM; others get CT's)."""
    table = PAPER_TRIOS if method.lower() == "dmf_paper" else DEFAULT_TRIOS
    return table.get(modality.upper(), table["CT"])


def resolve_trio(trio: Sequence[str] | None, modality: str | None = None, colour: bool = False,
                 method: str = "dmf") -> tuple[str, ...]:
    """The one default-trio rule of the library, the CLI and the node.

    An explicit ``trio`` wins.  Else the default of ``method`` (``dmf``: the
    measured trios, ``dmf_paper``: the paper's) for the overlay's ``modality``
    (DICOM code: CT, PT, NM); when the modality is not known, a colour overlay is
    taken as PET and a grey one as CT.  Methods other than DMF take no trio: ``()``.
    """
    if not is_dmf(method):
        return ()
    if trio:
        return tuple(m.lower() for m in trio)
    if modality is None:
        modality = ASSUMED_COLOUR_MODALITY if colour else ASSUMED_GREY_MODALITY
    return default_trio(modality, method)


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


def fusion_methods() -> list[str]:
    """Every name ``fuse``/``fuse_grey`` take as ``method``: the DMF variants and the registered methods."""
    return [*DMF_METHODS, *available_methods()]


def fuse_grey(
    a: Any,
    b: Any,
    *,
    method: str = DEFAULT_METHOD,
    trio: Sequence[str] = DEFAULT_TRIO,
    feature_source: FeatureSource = "vgg",
    model: Any = None,
    params: DMFParams = DMFParams(),
) -> Any:
    """Fuse two registered grey stacks ``(S, H, W)`` on 0..1 with ``method``, on their own device."""
    name = method.lower()
    if is_dmf(name):
        return dmf_stack(a, b, trio=trio, feature_source=feature_source, model=model, params=params).fused
    if name in available_methods():
        return get_method(name)(a, b)
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(fusion_methods())}")


def fuse(
    a: Any,
    b: Any,
    method: str = DEFAULT_METHOD,
    trio: Sequence[str] | None = None,
    device: str = "auto",
    feature_source: FeatureSource = "vgg",
    params: DMFParams = DMFParams(),
    model: Any = None,
    modality: str | None = None,
) -> Any:
    """Fuse anatomical image ``a`` (MRI) with ``b`` (CT, PET, SPECT).

    ``a``/``b``: ``(H, W)``, ``(S, H, W)``, or with a trailing RGB axis; integer
    images are scaled by their dtype's range, floats are taken as 0..1.  The two
    must already be registered and of equal size.  ``method`` is ``"faithful"``
    (the default, docs/fidelity.md), ``"dmf"``/``"dmf_paper"`` or any single method
    of ``fusion.methods``.  ``trio`` (DMF's exposures) defaults by
    :func:`resolve_trio` from ``modality``, the overlay's DICOM modality (CT, PT,
    NM), or from whether ``b`` is colour.  Returns float32 on 0..1, grey of the
    input's shape, or RGB when either input is colour, as NumPy unless the input
    was CuPy.
    """
    return_gpu = is_gpu_array(a)
    dev = resolve_device(device)
    trio = resolve_trio(trio, modality, colour=_is_rgb(b), method=method) or DEFAULT_TRIO
    a, b, chroma = split_colour(to_unit(to_device(a, dev)), to_unit(to_device(b, dev)))
    single = a.ndim == 2
    a3, b3 = (a[None], b[None]) if single else (a, b)
    if a3.ndim != 3:
        raise ValueError(f"expected a slice (H, W) or a stack (S, H, W), got shape {a.shape}")
    fused = fuse_grey(a3, b3, method=method, trio=trio, feature_source=feature_source, model=model, params=params)
    if single:
        fused = fused[0]
    fused = merge_colour(fused, chroma)
    return fused if return_gpu else to_numpy(fused)
