"""WLS (VIFB's VSMWLS): visual saliency map + weighted least squares fusion.

J. Ma, Z. Zhou, B. Wang and H. Zong, "Infrared and visible image fusion based on visual
saliency map and weighted least square optimization", Infrared Physics & Technology 82,
2017.  Ported number for number from VIFB's ``run_VSMWLS.m``, ``WLS_Fusion.m``,
``Visual_Weight_Map.m``, ``Solve_Optimal.m``, ``RollingGuidanceFilter_Guided.m`` and
``gaussFilter.m`` (VIFB snapshot 22b2ea9; docs/ports.md, WLS/VSMWLS), so that ``quantize=True`` reproduces
VIFB's published outputs.

Outline (images on the 0..1 scale, ``I1`` = IR role = ``b``, ``I2`` = VI role = ``a``):

1. Four-scale decomposition of each source: three rolling-guidance filters (Gaussian
   pre-smoothing, then 4 guided-filter iterations with ``r = sigma_s``,
   ``eps = 0.05^2``) at ``sigma_s = 2, 4, 8``, then a Gaussian (``sigma = 2``, 13x13,
   'replicate'); detail layers are the differences, the last Gaussian level is the base.
2. Base: ``(0.5 + 0.5(w1 - w2)) B1 + (0.5 + 0.5(w2 - w1)) B2`` with the histogram-
   contrast saliency ``w`` of ``uint8(255 I)`` (``mat2gray`` normalised).
3. Finest detail: the coefficient of larger magnitude.  Levels 4..2: the max-abs choice
   map smoothed by a 13x13 Gaussian (``sigma = 2``, 'symmetric') gives ``M``, then the
   WLS problem of ``Solve_Optimal``.  Its system matrix ``2I + lambda(A + A')`` is
   diagonal (``A`` is built with ``sparse(1:mn, 1:mn, ...)``), so the solve is the
   element-wise ``(2M + s b1) / (2 + s)`` with ``s = lambda (A + A)`` and
   ``A = 1 / (|mean7x7(D_VI)| + 1e-6)`` ('replicate') -- no sparse solver needed.
4. ``im2uint8(base + details)``.

RGB: VIFB fuses channel by channel (a gray IR with every channel of the visible image),
which is what a stack does here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fusion.backend import array_module, ndimage_for
from fusion.methods import register
from fusion.methods._common import (
    check_pair_unit,
    filter_symmetric,
    finish,
    fspecial_gaussian_1d,
    guided_filter,
    matlab_uint8,
)

N_LEVEL = 4
SIGMA_S0 = 2  # rolling guidance sigma_s of the first level, doubled per level
SIGMA_R = 0.05  # guided-filter eps = sigma_r^2
RGF_ITERATIONS = 4
SIGMA_LAST = 2.0  # gaussFilter of the last decomposition level
SIGMA_MAP = 2.0  # sigma0 of the detail choice-map smoothing (13x13, 'symmetric')
LAMBDA = 0.01
SMALL_NUM = 1e-6
MEAN_SIZE = 7  # Solve_Optimal: ones(7)/49, 'replicate'


def gauss_filter(x: Any, sigma: float) -> Any:
    """``gaussFilter``: ``imfilter(x, fspecial('gaussian', w, sigma), 'replicate')``.

    The window is ``double(uint8(3 sigma) * 2 + 1)``: ``uint8`` rounds, so the half width
    is ``round(3 sigma)`` (6, 12, 24 for sigma = 2, 4, 8).  The kernel is separable and
    applied along the two image axes with scipy mode ``'nearest'`` (= 'replicate').
    """
    xp = array_module(x)
    ndi = ndimage_for(xp)
    half = int(np.floor(3.0 * sigma + 0.5))
    w = xp.asarray(fspecial_gaussian_1d(sigma, half), dtype=x.dtype)
    out = ndi.correlate1d(x, w, axis=-2, mode="nearest")
    return ndi.correlate1d(out, w, axis=-1, mode="nearest")


def rolling_guidance(img: Any, sigma_s: int, sigma_r: float = SIGMA_R,
                     iterations: int = RGF_ITERATIONS) -> Any:
    """``RollingGuidanceFilter_Guided``: Gaussian start, then guided filters guided by the result.

    Each iteration is ``guidedfilter(res, I, sigma_s, sigma_r^2)``: the current result is
    the guide, the original image the filtering input.
    """
    res = gauss_filter(img, sigma_s)
    eps = sigma_r**2
    for _ in range(iterations):
        res = guided_filter(res, img, int(sigma_s), eps)
    return res


def decompose(img: Any) -> list[Any]:
    """``WLS_Fusion``'s decomposition: detail layers ``L[0..3]`` and the base ``L[4]``."""
    layers = []
    g = img
    sigma_s = SIGMA_S0
    for _ in range(N_LEVEL - 1):
        g_next = rolling_guidance(g, sigma_s)
        layers.append(g - g_next)
        g = g_next
        sigma_s *= 2
    g_last = gauss_filter(g, SIGMA_LAST)
    layers.append(g - g_last)
    layers.append(g_last)
    return layers


def visual_weight_map(img: Any) -> Any:
    """``Visual_Weight_Map``: histogram-contrast saliency of ``uint8(255 I)``, per slice.

    ``Sal(g) = sum_i hist(i) |g - i|`` over the slice's 256-bin histogram, looked up at
    every pixel, then ``mat2gray`` (per-slice min-max to [0, 1] as ``delta*S - min*delta``;
    a constant map stays as it is, i.e. 0 here, and is clipped to [0, 1]).  Histograms of
    all slices come from one ``bincount`` and the 256-entry tables from one matrix
    product, computed in float64 (exact integers) and cast to the image dtype at the end.
    """
    xp = array_module(img)
    h, w = img.shape[-2:]
    q = matlab_uint8(255.0 * img).astype(xp.int64).reshape(-1, h * w)
    n = q.shape[0]
    offsets = (xp.arange(n, dtype=xp.int64) * 256)[:, None]
    counts = xp.bincount((q + offsets).ravel(), minlength=256 * n).reshape(n, 256)
    levels = xp.arange(256, dtype=xp.float64)
    dist = xp.abs(levels[:, None] - levels[None, :])
    table = counts.astype(xp.float64) @ dist  # table[s, g] = sum_i count[s, i] |g - i|
    sal = xp.take_along_axis(table, q, axis=1)
    lo = sal.min(axis=1, keepdims=True)
    hi = sal.max(axis=1, keepdims=True)
    const = hi == lo
    delta = 1.0 / xp.where(const, 1.0, hi - lo)
    out = xp.where(const, sal, delta * sal + (-lo * delta))
    out = xp.clip(out, 0.0, 1.0)
    return out.reshape(img.shape).astype(img.dtype, copy=False)


def solve_optimal(m: Any, b1: Any, b2: Any, lam: float = LAMBDA) -> Any:
    """``Solve_Optimal(M, b1, b2, lambda)`` with its diagonal system solved element-wise.

    MATLAB: ``A = 1 ./ (|imfilter(b2, ones(7)/49, 'replicate')| + 1e-6)`` as a sparse
    diagonal, ``(2 I + lambda (A + A')) \\ (2 M(:) + lambda (A + A') b1(:))``.  ``A + A'``
    is the diagonal ``A + A``; the same operations in the same order element-wise.
    """
    xp = array_module(b2)
    ndi = ndimage_for(xp)
    k = xp.full((1,) * (b2.ndim - 2) + (MEAN_SIZE, MEAN_SIZE), 1.0 / (MEAN_SIZE * MEAN_SIZE),
                dtype=b2.dtype)
    a = xp.abs(ndi.correlate(b2, k, mode="nearest"))
    big_a = 1.0 / (a + SMALL_NUM)
    s = lam * (big_a + big_a)
    return (2.0 * m + s * b1) / (2.0 + s)


def wls_fusion(i1: Any, i2: Any) -> Any:
    """``WLS_Fusion(I1, I2)`` on the 0..1 scale (``I1`` = IR role, ``I2`` = VI role).

    ``i1`` and ``i2`` may have different leading shapes that broadcast (a single IR image
    and a stack of visible channels): each is decomposed on its own shape.
    """
    l1 = decompose(i1)
    l2 = decompose(i2)
    w1 = visual_weight_map(i1)
    w2 = visual_weight_map(i2)
    base = (0.5 + 0.5 * (w1 - w2)) * l1[N_LEVEL] + (0.5 + 0.5 * (w2 - w1)) * l2[N_LEVEL]

    xp = array_module(base)
    # C_0 .* L2 + (1 - C_0) .* L1 with a 0/1 map is an exact selection.
    detail = xp.where(xp.abs(l1[0]) < xp.abs(l2[0]), l2[0], l1[0])
    k13 = fspecial_gaussian_1d(SIGMA_MAP, int(np.floor(3 * SIGMA_MAP)))
    for i in range(N_LEVEL - 1, 0, -1):  # MATLAB levels 4, 3, 2
        choice = (xp.abs(l1[i]) < xp.abs(l2[i])).astype(base.dtype)
        choice = filter_symmetric(choice, k13)
        m = choice * l2[i] + (1.0 - choice) * l1[i]
        detail = detail + solve_optimal(m, l1[i], l2[i])
    return base + detail


@register("wls")
def wls(a: Any, b: Any, *, quantize: bool = False) -> Any:
    """Fuse ``a`` (anatomical, VIFB "VI") and ``b`` (other modality, VIFB "IR") with VSMWLS.

    ``run_VSMWLS`` calls ``WLS_Fusion(IR, VI)`` on ``double(I)/255`` and returns
    ``im2uint8`` of the result; the method is asymmetric (the WLS term keeps the IR detail
    where the visible detail is weak).  The only internal uint8 step is the saliency's
    ``uint8(255 I)``, which is always applied (it defines the histogram); ``quantize``
    rounds the result as ``im2uint8`` does.
    """
    xp, va, ir = check_pair_unit(a, b)
    fused = wls_fusion(ir, va)
    shape = np.broadcast_shapes(va.shape, ir.shape)
    fused = xp.broadcast_to(fused, shape)
    return finish(fused * 255.0, quantize=quantize).astype(va.dtype, copy=False)
