"""GFCE: guided-filter context enhancement fusion.

Z. Zhou, M. Dong, X. Xie and Z. Gao, "Fusion of infrared and visible images for
night-vision context enhancement", Applied Optics 55(23), 2016.  Ported number for number
from VIFB's ``run_GFCE.m``, ``Ehn_GF.m``, ``fastguidedfilter_md.m``, ``guidedfilter.m``,
``Relative_PS.m``, ``PS.m``, ``GradientSobel.m`` and ``WinAvgPE.m`` (VIFB snapshot 22b2ea9; docs/ports.md, row
GFCE), so that ``quantize=True`` reproduces VIFB's published outputs.

Every image-wide quantity of the reference (min/max normalisations, the perceptual
saliency ratio and the lambda it selects, the maxima ``Rmax``, the contrast compression
factor) is computed per slice, so a stack gives the slices' results.  For RGB, VIFB runs
``GFCE`` on each visible channel with the (gray, or same-channel) infrared image, i.e.
a per-channel stack.

Degenerate inputs, where MATLAB produces NaN (and ``min(NaN, 255)`` = 255, a white
pixel), are handled explicitly:

- a constant source (``max == min``) normalises to 0 instead of ``0/0``, and a constant
  visible slice is not enhanced (it stays 0; a constant log-base would otherwise need
  ``log(4)/0``, for which compression factor 1 is used), so an all-black pair fuses to
  black;
- a zero perceptual saliency gives ``Rs = 0`` (lambda 100) when both are 0, ``Rs = inf``
  (lambda 2000) when only the visible one is 0;
- ``Rmax = 0`` (the infrared detail never exceeds the visible one) gives ``P = 0``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fusion.backend import array_module
from fusion.methods import register
from fusion.methods._common import (
    box_sum,
    filter_symmetric,
    finish,
    fspecial_gaussian_1d,
    guided_filter,
    imresize,
    prepare_pair,
)

N_LEVEL = 4
PS_BLOCK = 40  # blockproc window of PS.m
PS_R = 32.0  # CSF frequency scale of PS.m
PS_ALPHA = 2  # gradient-weight exponent of PS.m
OUT_SCALE = 275.0  # FI = min(round(MB * 275), 255)

_AX = (-2, -1)


def _minmax_255(x: Any) -> Any:
    """``(x - min)/(max - min)*255`` per slice; a constant slice gives 0 (MATLAB: NaN)."""
    xp = array_module(x)
    mi = x.min(axis=_AX, keepdims=True)
    ma = x.max(axis=_AX, keepdims=True)
    rng = ma - mi
    flat = rng == 0
    return xp.where(flat, 0.0, (x - mi) / xp.where(flat, 1.0, rng) * 255.0)


def _fast_guided_filter_self(img: Any, r: int, eps: float, s: float) -> Any:
    """``fastguidedfilter_md(I, I, r, eps, s)`` for ``eps < 100`` (the branch Ehn_GF uses).

    Subsamples with ``imresize(., 1/s, 'nearest')``, runs the guided filter with radius
    ``r/s`` on the small image and brings the mean coefficients back with
    ``imresize(., [H W], 'bilinear')`` before applying them to the full-resolution guide.
    """
    xp = array_module(img)
    r_sub_f = r / s
    r_sub = int(round(r_sub_f))
    if abs(r_sub - r_sub_f) > 1e-9:  # the reference needs an integer (``make sure ...``)
        raise ValueError(f"fast guided filter radius r/s = {r_sub_f} is not an integer")
    if s > 1:
        sub = imresize(img, scale=1.0 / s, method="nearest")
    else:
        sub = img
    n = box_sum(xp.ones(sub.shape[-2:], dtype=img.dtype), r_sub)
    mean_i = box_sum(sub, r_sub) / n
    mean_p = mean_i
    mean_ip = box_sum(sub * sub, r_sub) / n
    cov_ip = mean_ip - mean_i * mean_p
    mean_ii = mean_ip
    var_i = mean_ii - mean_i * mean_i
    a = cov_ip / (var_i + eps)
    b = mean_p - a * mean_i
    mean_a = box_sum(a, r_sub) / n
    mean_b = box_sum(b, r_sub) / n
    if s > 1:
        size = tuple(img.shape[-2:])
        mean_a = imresize(mean_a, size=size, method="bilinear")
        mean_b = imresize(mean_b, size=size, method="bilinear")
    return mean_a * img + mean_b


def enhance_visible(img: Any) -> Any:
    """``Ehn_GF``: log-domain base/detail contrast compression of the visible image (0..255)."""
    xp = array_module(img)
    img1 = _minmax_255(img)
    log_img = xp.log(img1 + 1.0)
    m, n = img1.shape[-2:]
    r = int(math.floor(0.04 * max(m, n)))
    s = max(1.0, r / 4.0)
    eps = 0.1
    base = 255.0 * _fast_guided_filter_self(img1 / 255.0, r, eps * eps, s)
    log_base = xp.log(base + 1.0)
    log_detail = log_img - log_base
    target_contrast = math.log(4.0)
    lb_max = log_base.max(axis=_AX, keepdims=True)
    lb_min = log_base.min(axis=_AX, keepdims=True)
    span = lb_max - lb_min
    flat = span == 0
    compress = xp.where(flat, 1.0, target_contrast / xp.where(flat, 1.0, span))
    log_absolute_scale = (1.0 - compress) * lb_max
    log_output = compress * log_base + log_detail + log_absolute_scale
    enhanced = xp.minimum(xp.exp(log_output), 255.0)
    # A constant slice has nothing to enhance: it stays at its normalised value 0.
    const = img.max(axis=_AX, keepdims=True) == img.min(axis=_AX, keepdims=True)
    return xp.where(const, 0.0, enhanced)


def _csf_weights(bh: int, bw: int) -> np.ndarray:
    """Mannos-Sakrison CSF on MATLAB ``freqspace([bh bw], 'meshgrid')`` scaled by R/2."""
    fu = (np.arange(bw) - bw // 2) * (2.0 / bw)
    fv = (np.arange(bh) - bh // 2) * (2.0 / bh)
    u, v = np.meshgrid(fu, fv)
    u = u / 2.0 * PS_R
    v = v / 2.0 * PS_R
    r = np.sqrt(u**2 + v**2)
    return 2.6 * (0.0192 + 0.114 * r) * np.exp(-((0.114 * r) ** 1.1))


def _spans(n: int, block: int) -> list[tuple[int, int, int]]:
    """``blockproc`` tiling of one axis without padding: (start, stop, block length) groups."""
    full = n // block
    out = []
    if full:
        out.append((0, full * block, block))
    if n % block:
        out.append((full * block, n, n % block))
    return out


def _blocks(x: Any, r0: int, r1: int, bh: int, c0: int, c1: int, bw: int) -> Any:
    """The (bh, bw) blocks of ``x[..., r0:r1, c0:c1]`` as ``(..., nby, nbx, bh, bw)``."""
    xp = array_module(x)
    sub = x[..., r0:r1, c0:c1]
    lead = sub.shape[:-2]
    nby, nbx = (r1 - r0) // bh, (c1 - c0) // bw
    sub = sub.reshape(lead + (nby, bh, nbx, bw))
    return xp.moveaxis(sub, -3, -2)


def perceptual_saliency(img: Any) -> Any:
    """``PS.m`` per slice: CSF-weighted spectral energy of 40x40 blocks, averaged with
    weights ``sum(|grad|^2)`` (Sobel 'valid' gradient), on the image cropped by one pixel.

    Blocks are grouped by shape (full, partial row, partial column, corner; MATLAB's
    ``blockproc`` does not pad) and each group is transformed in one batched FFT.
    Returns shape ``(..., 1, 1)``; 0 where all gradients are 0 (MATLAB: NaN).
    """
    xp = array_module(img)
    # conv2(img, Sobel, 'valid'); the sign of the true convolution does not matter (squared).
    dxr = img[..., :, 2:] - img[..., :, :-2]
    gx = dxr[..., :-2, :] + 2.0 * dxr[..., 1:-1, :] + dxr[..., 2:, :]
    dyc = img[..., 2:, :] - img[..., :-2, :]
    gy = dyc[..., :, :-2] + 2.0 * dyc[..., :, 1:-1] + dyc[..., :, 2:]
    g = xp.sqrt(gx**2 + gy**2)
    core = img[..., 1:-1, 1:-1]
    h, w = core.shape[-2:]
    num = xp.zeros(img.shape[:-2] + (1, 1), dtype=img.dtype)
    den = xp.zeros_like(num)
    for r0, r1, bh in _spans(h, PS_BLOCK):
        for c0, c1, bw in _spans(w, PS_BLOCK):
            blk = _blocks(core, r0, r1, bh, c0, c1, bw)
            ffc = xp.fft.fftshift(xp.fft.fft2(blk, axes=_AX), axes=_AX)
            fw = xp.asarray(_csf_weights(bh, bw), dtype=img.dtype)
            mag = xp.abs(ffc * fw)
            energy = xp.sqrt((mag * mag).sum(axis=_AX)) / (bh * bw)
            lam = (_blocks(g, r0, r1, bh, c0, c1, bw) ** PS_ALPHA).sum(axis=_AX)
            num = num + (energy * lam).sum(axis=_AX)[..., None, None]
            den = den + lam.sum(axis=_AX)[..., None, None]
    return xp.where(den == 0, 0.0, num / xp.where(den == 0, 1.0, den))


def _lambda(ir: Any, vi: Any) -> Any:
    """Automatic lambda from ``Rs = PS(IR)/PS(VI)`` (per slice, shape (..., 1, 1))."""
    xp = array_module(ir)
    ps_ir = perceptual_saliency(ir)
    ps_vi = perceptual_saliency(vi)
    zero = ps_vi == 0
    rs = xp.where(zero, xp.where(ps_ir > 0, xp.inf, 0.0), ps_ir / xp.where(zero, 1.0, ps_vi))
    return xp.where(rs < 0.8, 100.0, xp.where(rs > 1.6, 2000.0, 2500.0 * rs - 1900.0))


def _decompose(img01: Any) -> tuple[list, list, list]:
    """Hybrid multiscale decomposition: bases M, and the E and D detail layers per level."""
    m = [img01]
    ml = img01
    e_layers: list = [None]
    d_layers: list = [None]
    r, eps = 2, 0.1
    for _ in range(N_LEVEL):
        m_next = guided_filter(m[-1], m[-1], r, 100.0**2)
        ml = guided_filter(ml, ml, r, eps**2)
        d_layers.append(m[-1] - ml)
        e_layers.append(ml - m_next)
        m.append(m_next)
        r *= 2
        eps /= 2
    return m, e_layers, d_layers


@register("gfce")
def gfce(a: Any, b: Any, *, quantize: bool = False) -> Any:
    """Fuse ``a`` (anatomical, VIFB "VI") and ``b`` (other modality, VIFB "IR") with GFCE.

    ``run_GFCE`` calls ``GFCE(VI, IR)``: the visible image ``a`` is enhanced (``Ehn_GF``),
    the infrared image ``b`` min-max normalised; both are decomposed with two guided-filter
    chains; levels 5..3 take the infrared detail with the weight
    ``C = atan(lambda P)/atan(lambda)`` (7x7 Gaussian smoothed; the base map with the
    385x385 sigma-64 Gaussian), level 2 uses binary max-abs maps.  ``FI =
    min(round(275 MB), 255)``, clipped at 0: ``quantize`` does that rounding, otherwise
    ``275 MB`` is kept as a float and saturated.
    """
    xp, vi, ir = prepare_pair(a, b)
    dtype = vi.dtype
    img1 = enhance_visible(vi)
    img2 = _minmax_255(ir)
    lam = _lambda(img2, img1).astype(dtype, copy=False)

    m1, e1, d1 = _decompose(img1 / 255.0)
    m2, e2, d2 = _decompose(img2 / 255.0)

    sigma0 = 2.0 * 2.0**N_LEVEL
    atan_lam = xp.arctan(lam)
    k_c = fspecial_gaussian_1d(1.0, 3)
    mb = None
    for j in range(N_LEVEL, 1, -1):  # MATLAB j = nLevel+1 .. 3 (1-based cells)
        diff = xp.maximum(xp.abs(e2[j]) - xp.abs(e1[j]), 0.0)
        rmax = diff.max(axis=_AX, keepdims=True)
        p = xp.where(rmax == 0, 0.0, diff / xp.where(rmax == 0, 1.0, rmax))
        cj = xp.arctan(lam * p) / atan_lam
        if j == N_LEVEL:
            sigma_b = 2.0 * sigma0
            half = int(math.floor(3.0 * sigma_b))
            cb = filter_symmetric(cj, fspecial_gaussian_1d(sigma_b, half))
            mb = cb * m2[N_LEVEL] + (1.0 - cb) * m1[N_LEVEL]
        cj = filter_symmetric(cj, k_c)
        mb = mb + (cj * e2[j] + (1.0 - cj) * e1[j])
        mb = mb + (cj * d2[j] + (1.0 - cj) * d1[j])

    c11 = (xp.abs(e1[1]) < xp.abs(e2[1])).astype(dtype)
    c11 = filter_symmetric(c11, k_c)
    mb = mb + (c11 * e2[1] + (1.0 - c11) * e1[1])
    c10 = (xp.abs(d1[1]) < xp.abs(d2[1])).astype(dtype)
    mb = mb + (c10 * d2[1] + (1.0 - c10) * d1[1])
    return finish((mb * OUT_SCALE).astype(dtype, copy=False), quantize=quantize)
