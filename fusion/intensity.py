"""Intensity scales and colour: bring inputs to 0..1, fuse colour in luminance.

PET and SPECT arrive as pseudo-colour RGB (the Harvard pairs) or get a colour
map later.  Fusing R, G and B separately against a grey MRI would shift hues,
which carry the tracer uptake; so the grey anatomy is fused into the luminance
Y only and the chroma (Cb, Cr) of the colour image is kept (ITU-R BT.601
full-range YCbCr, as JPEG and the fusion papers use).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fusion.backend import array_module

# ITU-R BT.601 full range, on 0..1 with chroma centred on 0.5
_RGB_TO_YCBCR = np.array(
    [
        [0.299, 0.587, 0.114],
        [-0.168735892, -0.331264108, 0.5],
        [0.5, -0.418687589, -0.081312411],
    ]
)
_YCBCR_TO_RGB = np.linalg.inv(_RGB_TO_YCBCR)


def to_unit(x: Any) -> Any:
    """Integer images to float32 on 0..1 by their dtype's range; floats pass unchanged.

    Floats are assumed to be on 0..1 already: a float image on another scale is
    the caller's to normalise (windowing belongs to the modality, not here).
    float64 stays float64, for callers who need CPU and GPU to agree closely.
    """
    xp = array_module(x)
    if np.issubdtype(x.dtype, np.integer):
        info = np.iinfo(x.dtype)
        return (x.astype(xp.float32) - info.min) / float(info.max - info.min)
    if np.issubdtype(x.dtype, np.bool_):
        return x.astype(xp.float32)
    return x


def to_uint8(x: Any) -> Any:
    """0..1 float to uint8 with rounding and saturation."""
    xp = array_module(x)
    return xp.clip(xp.floor(x * 255.0 + 0.5), 0, 255).astype(xp.uint8)


def rgb_to_ycbcr(rgb: Any) -> Any:
    """``(..., 3)`` RGB on 0..1 to ``(..., 3)`` Y, Cb, Cr on 0..1 (chroma centred on 0.5)."""
    xp = array_module(rgb)
    m = xp.asarray(_RGB_TO_YCBCR, dtype=rgb.dtype)
    out = rgb @ m.T
    out[..., 1:] += 0.5
    return out


def ycbcr_to_rgb(ycc: Any) -> Any:
    """Inverse of :func:`rgb_to_ycbcr`, clipped to [0, 1]."""
    xp = array_module(ycc)
    m = xp.asarray(_YCBCR_TO_RGB, dtype=ycc.dtype)
    centred = ycc.copy()
    centred[..., 1:] -= 0.5
    return xp.clip(centred @ m.T, 0.0, 1.0)


def luminance(rgb: Any) -> Any:
    """BT.601 luma Y of an RGB image on 0..1 (what the papers' evaluator scores)."""
    return rgb_to_ycbcr(rgb)[..., 0]


# ---------------------------------------------------------------------------
# Modality scales: DICOM VOI windowing, robust percentiles, PET SUV
# ---------------------------------------------------------------------------

#: CT window used when neither the pipeline (``ct_window``) nor the caller names
#: one: the usual brain window, centre 40 HU, width 80 HU (grey/white matter,
#: CSF and blood separated; bone and air saturate).  Chosen because the node's
#: first use is MR-CT of the head; body pipelines should set ``ct_window``.
CT_BRAIN_WINDOW = (40.0, 80.0)
#: Percentiles for robust MR (and fallback) normalisation, over nonzero voxels.
MR_PERCENTILES = (0.5, 99.5)
#: Upper percentile of a PET/SPECT stack mapped to 1 (over voxels > 0).
PET_UPPER_PERCENTILE = 99.5


def _float_out(x: Any) -> Any:
    """float32 working copy, float64 kept as float64 (like :func:`to_unit`)."""
    xp = array_module(x)
    return x.astype(xp.float64 if x.dtype == np.float64 else xp.float32, copy=False)


def window(x: Any, centre: float, width: float, function: str = "LINEAR") -> Any:
    """DICOM VOI LUT window to 0..1 (PS3.3 C.11.2.1.2).

    ``LINEAR`` (the default and the meaning of a bare Window Center/Width pair):
    ``y = ((x - (c - 0.5)) / (w - 1) + 0.5)`` clipped to [0, 1], i.e. 0 for
    ``x <= c - 0.5 - (w - 1)/2`` and 1 for ``x > c - 0.5 + (w - 1)/2``; needs
    ``w >= 1``.  ``LINEAR_EXACT``: ``y = (x - c)/w + 0.5`` clipped, ``w > 0``.
    ``SIGMOID``: ``y = 1 / (1 + exp(-4 (x - c) / w))``, ``w > 0``.
    """
    xp = array_module(x)
    xf = _float_out(x)
    fn = function.upper()
    c, w = float(centre), float(width)
    if fn == "LINEAR":
        if w < 1:
            raise ValueError(f"LINEAR window width must be >= 1 (PS3.3 C.11.2.1.2.1), got {width}")
        if w == 1:  # a threshold: the formula's denominator vanishes
            return (xf > c - 0.5).astype(xf.dtype)
        return xp.clip((xf - (c - 0.5)) / (w - 1.0) + 0.5, 0.0, 1.0)
    if w <= 0:
        raise ValueError(f"window width must be > 0, got {width}")
    if fn == "LINEAR_EXACT":
        return xp.clip((xf - c) / w + 0.5, 0.0, 1.0)
    if fn == "SIGMOID":
        return 1.0 / (1.0 + xp.exp(-4.0 * (xf - c) / w))
    raise ValueError(f"unknown VOI LUT function {function!r} (LINEAR, LINEAR_EXACT or SIGMOID)")


def percentile_normalise(x: Any, lo: float = 0.5, hi: float = 99.5, mask: Any = None) -> Any:
    """Map the ``lo``..``hi`` percentiles of ``x`` to 0..1 (clipped): robust MR scaling.

    The percentiles are taken over the whole stack (so every slice gets the same
    scale), or only over ``mask`` (boolean, same shape) when given — e.g. the
    nonzero voxels, so a black background or resampling padding does not pull the
    lower percentile down.  An empty mask or a constant image gives zeros.
    """
    if not 0 <= lo < hi <= 100:
        raise ValueError(f"need 0 <= lo < hi <= 100, got lo={lo}, hi={hi}")
    xp = array_module(x)
    xf = _float_out(x)
    values = xf if mask is None else xf[mask]
    if values.size == 0:
        return xp.zeros_like(xf)
    p = xp.percentile(values.astype(xp.float64, copy=False).ravel(), xp.asarray([lo, hi], dtype=xp.float64))
    plo, phi = float(p[0]), float(p[1])
    if phi <= plo:
        return (xf > plo).astype(xf.dtype)
    return xp.clip((xf - plo) / (phi - plo), 0.0, 1.0)


def suv_bw_factor(
    patient_weight_kg: float,
    injected_dose_bq: float,
    half_life_s: float,
    seconds_since_injection: float,
) -> float:
    """Factor turning activity concentration (Bq/ml) into body-weight SUV (g/ml).

    ``SUVbw = C * weight_g / dose_at_reference`` with the injected dose decayed
    from the injection time to the time the image values are decay-corrected to
    (for DecayCorrection ``START``: the series start), i.e.
    ``dose * 2 ** (-seconds_since_injection / half_life_s)``.  Pure numbers in;
    reading them from DICOM headers is the caller's business.
    """
    for name, value in (
        ("patient_weight_kg", patient_weight_kg),
        ("injected_dose_bq", injected_dose_bq),
        ("half_life_s", half_life_s),
    ):
        if not (value > 0 and np.isfinite(value)):
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    if not (seconds_since_injection >= 0 and np.isfinite(seconds_since_injection)):
        raise ValueError(
            f"seconds_since_injection must be >= 0 (injection before the scan), got {seconds_since_injection!r}"
        )
    decayed = injected_dose_bq * 2.0 ** (-seconds_since_injection / half_life_s)
    return patient_weight_kg * 1000.0 / decayed


def normalise_for_modality(
    stack: Any,
    modality: str,
    *,
    ct_window: tuple[float, float] | list[float] | None = None,
    units: str = "raw",
    suv_max: float | None = None,
) -> Any:
    """Bring a modality's stack to 0..1 for fusion.

    - ``CT``: the VOI window ``ct_window = (centre, width)`` in HU (LINEAR), else
      :data:`CT_BRAIN_WINDOW` (40/80).
    - ``MR`` (and any modality not named here): percentiles
      :data:`MR_PERCENTILES` over the nonzero voxels (zeros are background or
      resampling padding).
    - ``PT``/``NM``: 0 maps to 0 and the 99.5th percentile of the positive voxels
      to 1; with ``units == 'SUVbw'`` and ``suv_max`` given, the fixed SUV window
      0..``suv_max`` instead (comparable across patients).
    """
    xp = array_module(stack)
    mod = modality.upper()
    if mod == "CT":
        c, w = ct_window if ct_window else CT_BRAIN_WINDOW
        return window(stack, c, w)
    if mod in ("PT", "NM"):
        xf = _float_out(stack)
        if units == "SUVbw" and suv_max is not None:
            if suv_max <= 0:
                raise ValueError(f"suv_max must be > 0, got {suv_max}")
            return xp.clip(xf / float(suv_max), 0.0, 1.0)
        positive = xf[xf > 0]
        if positive.size == 0:
            return xp.zeros_like(xf)
        top = float(xp.percentile(positive.astype(xp.float64, copy=False), PET_UPPER_PERCENTILE))
        return xp.clip(xf / top, 0.0, 1.0)
    return percentile_normalise(stack, *MR_PERCENTILES, mask=stack != 0)
