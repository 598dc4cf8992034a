"""TIF: two-scale image fusion with saliency weights.

D. P. Bavirisetti and R. Dhuli, "Two-scale image fusion of visible and infrared images
using saliency detection", Infrared Physics & Technology 76, 2016.  Ported number for
number from VIFB's ``run_TIF.m`` (VIFB snapshot 22b2ea9; docs/ports.md, TIF), so that ``quantize=True``
reproduces VIFB's published outputs.
"""

from __future__ import annotations

from typing import Any

from fusion.backend import array_module, ndimage_for
from fusion.methods import register
from fusion.methods._common import finish, prepare_pair

MEAN_SIZE = 35  # base layer: 35x35 mean, 'circular' boundary
MEDIAN_SIZE = 3  # saliency: 3x3 median (medfilt2, zero padding)


def _circular_mean(x: Any, size: int = MEAN_SIZE) -> Any:
    """``imfilter(x, ones(size)/size^2, 'circular')`` on the last two axes.

    Periodic padding (NumPy ``'wrap'``, which keeps repeating for windows larger than the
    image), then the window sums from one cumulative sum per axis, then ``/ size^2``.
    """
    xp = array_module(x)
    half = size // 2
    pad = [(0, 0)] * (x.ndim - 2) + [(half, half), (half, half)]
    p = xp.pad(x, pad, mode="wrap")
    for axis in (-2, -1):
        zpad = [(0, 0)] * p.ndim
        zpad[p.ndim + axis] = (1, 0)
        c = xp.cumsum(xp.pad(p, zpad), axis=axis)
        n = c.shape[axis] - size
        hi = [slice(None)] * p.ndim
        lo = [slice(None)] * p.ndim
        hi[axis] = slice(size, size + n)
        lo[axis] = slice(0, n)
        p = c[tuple(hi)] - c[tuple(lo)]
    return p * (1.0 / (size * size))


def _saliency_parts(img: Any) -> tuple[Any, Any]:
    """Base ``b`` (circular 35x35 mean) and saliency ``S = (b - median3x3)^2`` of one source."""
    xp = array_module(img)
    ndi = ndimage_for(xp)
    size = (1,) * (img.ndim - 2) + (MEDIAN_SIZE, MEDIAN_SIZE)
    med = ndi.median_filter(img, size=size, mode="constant", cval=0.0)
    base = _circular_mean(img)
    return base, (base - med) ** 2


@register("tif")
def tif(a: Any, b: Any, *, quantize: bool = False) -> Any:
    """Fuse ``a`` (anatomical, VIFB "VI") and ``b`` (other modality, VIFB "IR") with TIF.

    ``run_TIF`` calls ``TIF(VI, IR)``: image 1 is ``a``, image 2 is ``b``.  Each source
    splits into a 35x35 circular-mean base and a detail residual; details are weighted by
    the saliencies ``S_i / (S_1 + S_2)``, bases averaged.  No internal uint8 steps;
    ``quantize`` only rounds the result.

    Deviation from MATLAB, on purpose: where ``S_1 + S_2 == 0`` MATLAB's weights are
    ``0/0 = NaN`` and ``uint8(NaN)`` turns the pixel black.  Here both weights are 0.5
    there, so the pixel becomes ``0.5 (d_1 + d_2) + 0.5 (b_1 + b_2)``, the mean of the
    two sources.  In flat black areas (both inputs 0 over the whole 35x35 window) that is
    0, i.e. the same as MATLAB; a flat grey area no longer turns black.
    """
    xp, i1, i2 = prepare_pair(a, b)
    b1, s1 = _saliency_parts(i1)
    b2, s2 = _saliency_parts(i2)
    d1 = i1 - b1
    d2 = i2 - b2
    den = s1 + s2
    flat = den == 0
    safe = xp.where(flat, 1.0, den)
    w1 = xp.where(flat, 0.5, s1 / safe)
    w2 = xp.where(flat, 0.5, s2 / safe)
    fused = (w1 * d1 + w2 * d2) + (0.5 * b1 + 0.5 * b2)
    return finish(fused.astype(i1.dtype, copy=False), quantize=quantize)
