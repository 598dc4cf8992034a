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
