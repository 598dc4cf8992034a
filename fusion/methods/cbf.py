"""CBF: cross-bilateral-filter detail weighting.

B. K. Shreyamsha Kumar, "Image fusion based on pixel significance using cross
bilateral filter", Signal, Image and Video Processing 9(5), 2015.  Ported number for
number from VIFB's ``run_CBF.m``, ``cross_bilateral_filt2Df.m``, ``cbf_ieeeconf2011f.m``
and ``covarf.m`` (VIFB snapshot 22b2ea9; docs/ports.md, CBF), so that ``quantize=True`` reproduces VIFB's
published outputs.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fusion.backend import array_module
from fusion.methods import register
from fusion.methods._common import finish, prepare_pair

SIGMA_S = 1.8
SIGMA_R = 25.0
KSIZE = 11
COV_WSIZE = 5
MATLAB_EPS = float(np.finfo(np.float64).eps)  # MATLAB ``eps`` (double), used for w == 0


def _reflect_pad(x: Any, half: int) -> Any:
    """``per_extn_im_fn``: mirror extension that does not repeat the edge pixel.

    Despite its name ("periodic extension") the reference copies rows/columns
    ``half+1 .. 2`` above row 1 (and likewise on the other sides), which is NumPy's
    ``'reflect'`` (scipy.ndimage ``'mirror'``), applied to the two image axes only.
    """
    xp = array_module(x)
    return xp.pad(x, [(0, 0)] * (x.ndim - 2) + [(half, half), (half, half)], mode="reflect")


def cross_bilateral(x: Any, guide: Any, sigma_s: float = SIGMA_S, sigma_r: float = SIGMA_R,
                    ksize: int = KSIZE) -> Any:
    """``cross_bilateral_filt2Df``: filter ``x`` with range weights measured on ``guide``.

    The reference loops over pixels; here the loop runs over the ksize^2 kernel offsets
    instead, each step updating every pixel of every slice at once (numerator and
    denominator accumulated, the unnormalised Gaussian cancels in the ratio).
    """
    xp = array_module(x)
    half = ksize // 2
    h, w = x.shape[-2:]
    xm = _reflect_pad(x, half)
    gm = _reflect_pad(guide, half)
    neg_inv = -1.0 / (2.0 * sigma_r**2)
    num = xp.zeros_like(x)
    den = xp.zeros_like(x)
    t = xp.empty_like(x)
    for dy in range(-half, half + 1):
        for dx in range(-half, half + 1):
            gs = math.exp(-(dy * dy + dx * dx) / (2.0 * sigma_s**2))
            rows = slice(half + dy, half + dy + h)
            cols = slice(half + dx, half + dx + w)
            xp.subtract(gm[..., rows, cols], guide, out=t)
            xp.multiply(t, t, out=t)
            xp.multiply(t, neg_inv, out=t)
            xp.exp(t, out=t)
            xp.multiply(t, gs, out=t)
            xp.add(den, t, out=den)
            xp.multiply(t, xm[..., rows, cols], out=t)
            xp.add(num, t, out=num)
    return num / den


def window_strength(detail: Any, wsize: int = COV_WSIZE) -> Any:
    """``cbf_ieeeconf2011f`` weight: sum(eig(cov(W))) + sum(eig(cov(W'))) per wsize^2 window W.

    ``covarf`` treats the window's rows as observations (column means subtracted,
    divided by wsize - 1), and the sum of eigenvalues is the trace, so the weight is
    the sum of the column variances plus the sum of the row variances of the window
    (ddof = 1), with the detail image mirrored as in ``per_extn_im_fn``.  Variances are
    taken around each window's own column/row means (no sum-of-squares cancellation).
    """
    half = (wsize - 1) // 2
    h, w = detail.shape[-2:]
    p = _reflect_pad(detail, half)
    inv_n = 1.0 / wsize
    # Column variances: vertical windows centred on every image row, all padded columns.
    col_mean = sum(p[..., half + k:half + k + h, :] for k in range(-half, half + 1)) * inv_n
    col_ss = sum((p[..., half + k:half + k + h, :] - col_mean) ** 2
                 for k in range(-half, half + 1))
    col_term = sum(col_ss[..., :, half + k:half + k + w] for k in range(-half, half + 1))
    # Row variances: horizontal windows centred on every image column, all padded rows.
    row_mean = sum(p[..., :, half + k:half + k + w] for k in range(-half, half + 1)) * inv_n
    row_ss = sum((p[..., :, half + k:half + k + w] - row_mean) ** 2
                 for k in range(-half, half + 1))
    row_term = sum(row_ss[..., half + k:half + k + h, :] for k in range(-half, half + 1))
    return (col_term + row_term) / float(wsize - 1)


@register("cbf")
def cbf(a: Any, b: Any, *, quantize: bool = False) -> Any:
    """Fuse ``a`` (anatomical, VIFB "VI") and ``b`` (other modality, VIFB "IR") with CBF.

    VIFB's ``run_CBF`` uses ``x{1} = IR`` and ``x{2} = VI``: each image's detail is the
    image minus its cross-bilateral filtering guided by the other one, and the sources
    are averaged with the detail-window strengths as weights (``w = eps`` where it is
    exactly 0, as in the reference).  There are no internal uint8 steps; ``quantize``
    only rounds the result.
    """
    xp, va, ir = prepare_pair(a, b)
    x1, x2 = ir, va
    detail1 = x1 - cross_bilateral(x1, x2)
    detail2 = x2 - cross_bilateral(x2, x1)
    w1 = window_strength(detail1)
    w2 = window_strength(detail2)
    w1 = xp.where(w1 == 0, MATLAB_EPS, w1)
    w2 = xp.where(w2 == 0, MATLAB_EPS, w2)
    fused = (x1 * w1 + x2 * w2) / (w1 + w2)
    return finish(fused, quantize=quantize)
