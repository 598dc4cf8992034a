"""The VIFB benchmark's MATLAB metrics (``metrics/metrics*.m``), quirks included; see ``fusion.metrics``."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
from scipy import ndimage as ndi

from fusion.metrics.common import (
    MetricSuite,
    conv_same_zero,
    qabf_core,
    rgb2gray_matlab,
    round_half_away,
)


def _vifb_prepare(f, a, b):
    f = np.asarray(f, dtype=np.float64)
    conv = (lambda x: None if x is None else np.asarray(
        rgb2gray_matlab(np.asarray(x)) if f.ndim == 2 else x, dtype=np.float64))
    return f, conv(a), conv(b)


def _channel(x, k):
    return None if x is None else (x if x.ndim == 2 else x[..., k])


def _per_channel(fn):
    """VIFB's wrapper: 2-D fused scored directly, colour fused per channel then the mean.

    (A colour source with a grey fused image goes through ``rgb2gray`` first, as for MIF.)
    """
    def metric(f: npt.ArrayLike, a: npt.ArrayLike | None = None, b: npt.ArrayLike | None = None) -> float:
        fx, ax, bx = _vifb_prepare(f, a, b)
        if fx.ndim == 2:
            return float(fn(fx, ax, bx))
        return float(np.mean([fn(fx[..., k], _channel(ax, k), _channel(bx, k)) for k in range(fx.shape[2])]))

    metric.__name__ = fn.__name__.lstrip("_")
    metric.__doc__ = fn.__doc__
    return metric


def _v_en(f, a, b):
    """EN: 256-bin histogram of ``floor(F)``, log2."""
    idx = np.clip(np.floor(f), 0, 255).astype(np.int64)
    p = np.bincount(idx.ravel(), minlength=256) / f.size
    p = p[p > 0]
    return -(p * np.log2(p)).sum()


def _v_sd(f, a, b):
    """SD ("Variance" file): population standard deviation."""
    return np.sqrt(((f - f.mean()) ** 2).sum() / f.size)


def vifb_sf(f: npt.ArrayLike, a: npt.ArrayLike | None = None, b: npt.ArrayLike | None = None) -> float:
    """SF: ``sqrt(RF + CF)``, both sums divided by M*N; colour channels laid side by side."""
    f = np.asarray(f, dtype=np.float64)
    if f.ndim == 3:  # [m, n] = size(F) folds the channels: F(:, :) is [R G B]
        f = np.concatenate([f[..., k] for k in range(f.shape[2])], axis=1)
    rf = (np.diff(f, axis=1) ** 2).sum() / f.size
    cf = (np.diff(f, axis=0) ** 2).sum() / f.size
    return float(np.sqrt(rf + cf))


def _v_ag(f, a, b):
    """AG: MATLAB ``gradient`` (central, one-sided at edges); sum / ((M-1)(N-1))."""
    gy, gx = np.gradient(f)
    m, n = f.shape
    return np.sqrt((gx**2 + gy**2) / 2).sum() / ((m - 1) * (n - 1))


_FSPECIAL_SOBEL = np.array([[1.0, 2, 1], [0, 0, 0], [-1, -2, -1]])


def _v_ei(f, a, b):
    """EI: ``imfilter`` (correlation, replicate) with fspecial('sobel') and its transpose; mean magnitude."""
    gx = ndi.correlate(f, _FSPECIAL_SOBEL, mode="nearest")
    gy = ndi.correlate(f, _FSPECIAL_SOBEL.T, mode="nearest")
    return np.sqrt(gx * gx + gy * gy).mean()


def _v_mutinf(x, y):
    def levels(z):
        lo, hi = z.min(), z.max()
        z = (z - lo) / (hi - lo) if hi != lo else np.zeros_like(z)
        return round_half_away(z * 255).astype(np.int64)  # int16(z*255); +1 is MATLAB indexing

    xi, yi = levels(x).ravel(), levels(y).ravel()
    hab = np.bincount(xi * 256 + yi, minlength=65536).astype(np.float64)

    def h(counts):
        p = counts[counts > 0] / counts.sum()
        return -(p * np.log(p)).sum()

    return h(np.bincount(xi, minlength=256)) + h(np.bincount(yi, minlength=256)) - h(hab)


def _v_mi(f, a, b):
    """MI: ``mutinf(A, F) + mutinf(B, F)`` with min-max normalisation, int16 rounding, nats."""
    return _v_mutinf(a, f) + _v_mutinf(b, f)


def _v_ce1(x, f):
    p1 = np.bincount(np.clip(x, 0, 255).astype(np.int64).ravel(), minlength=256) / x.size
    p2 = np.bincount(np.clip(f, 0, 255).astype(np.int64).ravel(), minlength=256) / x.size
    k = (p1 > 0) & (p2 > 0)
    return (p1[k] * np.log2(p1[k] / p2[k])).sum()


def _v_ce(f, a, b):
    """CE: ``(CE(A, F) + CE(B, F))/2``, each a KL divergence of 256-bin histograms (log2)."""
    return (_v_ce1(a, f) + _v_ce1(b, f)) / 2.0


def _v_e(x, f):
    return np.sqrt(((x - f) ** 2).sum()) / x.size  # VIFB's "mse": sqrt(SSE)/(M*N)


def _v_psnr(f, a, b):
    """PSNR: ``20 log10(255/sqrt(MES))``, ``MES = (e(A,F) + e(B,F))/2``, ``e = sqrt(SSE)/(M*N)``."""
    mes = (_v_e(a, f) + _v_e(b, f)) / 2.0
    with np.errstate(divide="ignore"):
        return 20 * np.log10(255 / np.sqrt(mes))


def _v_rmse(f, a, b):
    """RMSE: ``(e(A,F) + e(B,F))/2`` with ``e = sqrt(SSE)/(M*N)``."""
    return (_v_e(a, f) + _v_e(b, f)) / 2.0


def _gauss1d(size: int, sigma: float) -> np.ndarray:
    r = np.arange(size) - (size - 1) / 2
    g = np.exp(-(r * r) / (2 * sigma * sigma))
    return g / g.sum()


_WANG_G = _gauss1d(11, 1.5)  # fspecial('gaussian', 11, 1.5) = outer(g, g)


def _filter_valid_sep(z, g):
    r = len(g) // 2
    out = ndi.correlate1d(ndi.correlate1d(z, g, axis=0, mode="constant"), g, axis=1, mode="constant")
    return out[r:-r, r:-r]


def _ssim_wang(x, y):
    """Wang et al. 2004: 11x11 Gaussian (sigma 1.5), 'valid', L = 255, mean of the map."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = _filter_valid_sep(x, _WANG_G), _filter_valid_sep(y, _WANG_G)
    sxx = _filter_valid_sep(x * x, _WANG_G) - mx * mx
    syy = _filter_valid_sep(y * y, _WANG_G) - my * my
    sxy = _filter_valid_sep(x * y, _WANG_G) - mx * my
    m = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return m.mean()


def _v_ssim(f, a, b):
    """SSIM: ``SSIM(A, F) + SSIM(B, F)`` (Wang 2004), at most 2."""
    return _ssim_wang(a, f) + _ssim_wang(b, f)


def _v_qabf(f, a, b):
    """Qabf (Hong variant) on ``255*im2double`` images, i.e. all three scaled by 255."""
    return qabf_core(255 * a, 255 * b, 255 * f, conv_same_zero)


def _normalize1(x):
    hi, lo = x.max(), x.min()
    if hi == 0 and lo == 0:
        return x
    with np.errstate(divide="ignore", invalid="ignore"):
        return round_half_away((x - lo) / (hi - lo) * 255)


def _freqspace_r(shape, scale_rows, scale_cols):
    """``[u, v] = freqspace([M, N], 'meshgrid'); u *= N/scale; v *= M/scale; r = hypot(u, v)``."""
    m, n = shape
    fu = (np.arange(n) - n // 2) * (2.0 / n) * (n / scale_cols)
    fv = (np.arange(m) - m // 2) * (2.0 / m) * (m / scale_rows)
    return np.sqrt(fu[None, :] ** 2 + fv[:, None] ** 2)


def _csf_filter(x, s_centered):
    """``ifft2(ifftshift(fftshift(fft2(x)) .* S))``: real because S is symmetric."""
    return np.fft.ifft2(np.fft.fft2(x) * np.fft.ifftshift(s_centered)).real


_G31 = {s: np.exp(-(np.arange(-15, 16) ** 2) / (2.0 * s * s)) for s in (2, 4)}


def _gauss31_same(x, sigma):
    g = _G31[sigma]
    y = ndi.correlate1d(ndi.correlate1d(x, g, axis=0, mode="constant"), g, axis=1, mode="constant")
    return y / (2 * math.pi * sigma * sigma)  # unnormalised exp(-r^2/2s^2)/(2 pi s^2)


def _v_qcb1(im1, im2, fused):
    im1, im2, fused = _normalize1(im1), _normalize1(im2), _normalize1(fused)
    f0, f1, a = 15.3870, 1.3456, 0.7622
    m, n = im1.shape
    r = _freqspace_r((m, n), 30.0, 30.0)
    sd = np.exp(-(r / f0) ** 2) - a * np.exp(-(r / f1) ** 2)

    with np.errstate(divide="ignore", invalid="ignore"):
        def cp(x):
            x = _csf_filter(x, sd)
            c = np.abs(_gauss31_same(x, 2) / _gauss31_same(x, 4) - 1)
            return c**3 / (c**2 + 0.0001)

        c1p, c2p, cfp = cp(im1), cp(im2), cp(fused)
        mask = (c1p < cfp).astype(np.float64)
        q1f = (c1p / cfp) * mask + (cfp / c1p) * (1 - mask)
        mask = (c2p < cfp).astype(np.float64)
        q2f = (c2p / cfp) * mask + (cfp / c2p) * (1 - mask)
        den = c1p * c1p + c2p * c2p
        q = (c1p * c1p) / den * q1f + (c2p * c2p) / den * q2f
    return q.mean()


def _v_qcb(f, a, b):
    """Qcb (Chen-Blum, Z. Liu's code as VIFB ships it)."""
    return _v_qcb1(a, b, f)


def _blocks(x, size=16):
    """``blkproc(x, [size size], ...)``: partial blocks zero-padded; returns (by, bx, size*size)."""
    m, n = x.shape
    pm, pn = -m % size, -n % size
    x = np.pad(x, ((0, pm), (0, pn)))
    by, bx = x.shape[0] // size, x.shape[1] // size
    return x.reshape(by, size, bx, size).transpose(0, 2, 1, 3).reshape(by, bx, size * size)


_QCV_X = np.array([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])
_QCV_Y = np.array([[-1.0, -2, -1], [0, 0, 0], [1, 2, 1]])


def _v_qcv1(im1, im2, fused, window=16, alpha=5):
    im1, im2, fused = _normalize1(im1), _normalize1(im2), _normalize1(fused)

    def sal(z):
        gx = ndi.correlate(z, _QCV_X, mode="constant")
        gy = ndi.correlate(z, _QCV_Y, mode="constant")
        return (_blocks(np.sqrt(gx * gx + gy * gy), window) ** alpha).sum(-1)

    l1, l2 = sal(im1), sal(im2)
    m, n = im1.shape
    r = _freqspace_r((m, n), 8.0, 8.0)
    theta = 2.6 * (0.0192 + 0.144 * r) * np.exp(-((0.144 * r) ** 1.1))  # 0.144 as in the code
    d1 = (_blocks(_csf_filter(im1 - fused, theta), window) ** 2).mean(-1)
    d2 = (_blocks(_csf_filter(im2 - fused, theta), window) ** 2).mean(-1)
    return (l1 * d1 + l2 * d2).sum() / (l1 + l2).sum()


def _v_qcv(f, a, b):
    """Qcv (Chen-Varshney, Z. Liu's code as VIFB ships it); lower is better."""
    return _v_qcv1(a, b, f)


VIFB = MetricSuite(
    "vifb",
    "VIFB benchmark MATLAB metrics (metrics/metrics*.m), 8-bit inputs, colour per channel then mean",
    {
        "EN": _per_channel(_v_en),
        "SD": _per_channel(_v_sd),
        "SF": vifb_sf,
        "AG": _per_channel(_v_ag),
        "EI": _per_channel(_v_ei),
        "MI": _per_channel(_v_mi),
        "CE": _per_channel(_v_ce),
        "PSNR": _per_channel(_v_psnr),
        "RMSE": _per_channel(_v_rmse),
        "SSIM": _per_channel(_v_ssim),
        "Qabf": _per_channel(_v_qabf),
        "Qcb": _per_channel(_v_qcb),
        "Qcv": _per_channel(_v_qcv),
    },
    lower_is_better=("CE", "RMSE", "Qcv"),
)

