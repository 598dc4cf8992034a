"""Fusion-quality metrics in the two conventions users meet (SPEC.md section 3).

Published numbers are only comparable within one evaluator: the same fused image
scores differently under different toolkits (SPEC.md 3.4).  This module therefore
implements two evaluators exactly, quirks included, and says which is which:

``vifb`` -- the VIFB benchmark's MATLAB ``metrics/metrics*.m`` (visible-infrared
    fusion; Zhang et al. 2020).  13 metrics: EN, SD, SF, AG, EI, MI, CE, PSNR,
    RMSE, SSIM, Qabf, Qcb, Qcv.  Inputs are 8-bit images as ``imread`` gives
    them (Pillow decodes VIFB's JPEGs bit-identically).  A colour fused image is
    scored per channel against the same channel of each source (a grey source is
    used for every channel) and the channel values are averaged; SF instead sees
    the channels side by side (``[R G B]``, seams included) because ``size``
    folds the third dimension; EI averages over all channels.  Quirks kept:
    MI min-max normalises each image and rounds with ``int16`` (half away from
    zero), natural log (nats); PSNR and RMSE use ``sqrt(SSE)/(M*N)`` instead of
    the RMSE (PSNR lands near 55-60 "dB"); SSIM is Wang's 11x11 Gaussian
    'valid' SSIM summed over both sources (max 2); Qabf is Hong's variant on
    images scaled by 255 (only changes the ``gA == gF`` branch); Qcb/Qcv use
    Z. Liu's code (``normalize1`` rounding, ``freqspace`` CSF grids, unnormalised
    31x31 Gaussians, 16x16 ``blkproc`` blocks zero-padded, Mannos-Sakrison with
    0.144).  Qcv, CE and RMSE are lower-is-better.  Validated number for number
    against VIFB's stored MATLAB values (``tests/test_metrics.py``).

``papers`` -- CDDFuse's ``utils/Evaluator.py``, the protocol behind most medical
    fusion papers' tables (CDDFuse, DDFM, EMMA, FILM, ...).  Images are read the
    way it reads them (``cv2`` BGR->GRAY, weights 0.299/0.587/0.114, ``np.round``,
    float32), so everything is scored on luminance and PET/SPECT colour is
    discarded.  EN (bits), SD, SF (means over H(W-1) and (H-1)W), AG (mean over
    H*W), MI (sklearn ``mutual_info_score`` on raw grey levels, nats, no
    normalisation), SCD, VIF (VIFp multi-scale, ``VIF(A,F)+VIF(B,F)``, NaN->1),
    Qabf (Hong variant, no x255), SSIM (skimage 0.19 defaults: 7x7 uniform window,
    sample covariance, reflect padding, 3-pixel crop and -- for float input --
    ``data_range=2``, i.e. C1=4e-4, C2=3.6e-3 on 0..255 data; summed over both
    sources), MSE, PSNR (``10 log10(max(F)^2/MSE)``, max of F, not 255) and CC.
    The arithmetic is the evaluator's, on float32 images (it can matter for SSIM,
    whose tiny constants meet float32 cancellation in flat non-zero regions).  Checked
    against SPEC 3.4's measured values on the Harvard pairs (CDDFuse's test set).

Why the numbers differ: SF and AG differ only in denominators (VIFB's SF divides
both sums by H*W, AG by (H-1)(W-1)); MI agrees on 8-bit images (VIFB's min-max
stretch never merges grey levels and MI ignores relabelling; only non-integer
images differ); SSIM differs by window and constants; PSNR by its definition
(VIFB ~56, CDDFuse ~15 on the same image).

``evaluate(fused, a, b, convention=...)`` loads paths or takes arrays and applies
the convention's colour handling.  The first simple set (``entropy``, ``std``,
``average_gradient``, ``mutual_information``, ``ssim``, ``qabf``, ``METRICS``,
``score``; used by ``benchmarks/quality.py``) is kept: float64 thin wrappers over
the same kernels on 2-D grey 0..255 arrays (papers convention except ``ssim``,
which is VIFB's Wang SSIM).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Union

import numpy as np
from scipy import ndimage as ndi
from scipy.signal import convolve2d

ImageLike = Union[np.ndarray, str, Path]

# --------------------------------------------------------------------------- helpers


def _round_half_away(x: np.ndarray) -> np.ndarray:
    """MATLAB ``round`` / ``int16()``: halves go away from zero (NumPy rounds them to even)."""
    t = np.trunc(x)
    return t + np.where(np.abs(x - t) >= 0.5, np.sign(x), 0.0)


def load_image(path: ImageLike) -> np.ndarray:
    """An 8-bit image file as ``imread``/Pillow gives it: uint8 ``(H, W)`` or ``(H, W, 3)``."""
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in ("1", "L", "LA"):
            return np.asarray(im.convert("L"))
        if im.mode in ("RGB", "RGBA", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
            return np.asarray(im.convert("RGB"))
        raise ValueError(f"{path}: {im.mode} images are not 8-bit; both evaluators score 8-bit images")


def _to_uint8_values(x: ImageLike) -> np.ndarray:
    """A path is loaded; an array is taken on 0..255 and rounded to 8 bits, as saving it would."""
    if isinstance(x, (str, Path)):
        return load_image(x)
    x = np.asarray(x)
    if x.ndim == 3 and x.shape[2] == 4:
        x = x[..., :3]
    if x.ndim not in (2, 3) or (x.ndim == 3 and x.shape[2] != 3):
        raise ValueError(f"expected a (H, W) or (H, W, 3) image, got shape {x.shape}")
    if x.dtype == np.uint8:
        return x
    if x.dtype == np.bool_:
        return x.astype(np.uint8) * 255
    x = x.astype(np.float64)
    if np.issubdtype(x.dtype, np.floating) and 0 < np.nanmax(x) <= 1.0:
        raise ValueError("image looks like 0..1 floats; both evaluators score 0..255 (multiply by 255)")
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def rgb2gray_matlab(x: np.ndarray) -> np.ndarray:
    """MATLAB ``rgb2gray`` on uint8 (weights of the NTSC inverse, rounded to uint8)."""
    if x.ndim == 2:
        return x
    w = np.array([0.298936021293775, 0.587043074451121, 0.114020904255103])
    y = x[..., :3].astype(np.float64) @ w
    return np.clip(_round_half_away(y), 0, 255).astype(np.uint8)


def gray_cv2(x: np.ndarray) -> np.ndarray:
    """``np.round(cv2.cvtColor(imread(...).astype(float32), COLOR_BGR2GRAY))`` as float32."""
    if x.ndim == 2:
        return np.asarray(x, dtype=np.float32)
    rgb = x[..., :3].astype(np.float32)
    y = rgb[..., 2] * np.float32(0.114) + rgb[..., 1] * np.float32(0.587) + rgb[..., 0] * np.float32(0.299)
    return np.round(y).astype(np.float32)


class MetricSuite:
    """One evaluator: ``suite.EN(f, a, b)`` etc., ``suite(f, a, b)`` for all of them as a dict.

    Every metric takes ``(fused, a, b)``; single-image metrics ignore ``a`` and ``b``.
    ``lower_is_better`` names the metrics where smaller is better.
    """

    def __init__(self, name: str, description: str, metrics: dict[str, Callable[..., float]],
                 lower_is_better: tuple[str, ...] = ()):
        self.name = name
        self.description = description
        self.metrics = dict(metrics)
        self.lower_is_better = frozenset(lower_is_better)
        for key, fn in metrics.items():
            setattr(self, key, fn)

    @property
    def names(self) -> list[str]:
        return list(self.metrics)

    def __call__(self, f, a, b, only: list[str] | None = None) -> dict[str, float]:
        return {k: float(self.metrics[k](f, a, b)) for k in (only or self.metrics)}

    def __repr__(self) -> str:
        return f"<MetricSuite {self.name}: {', '.join(self.metrics)}>"


# --------------------------------------------------------------------------- VIFB (MATLAB)

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
    def metric(f, a=None, b=None) -> float:
        f, a, b = _vifb_prepare(f, a, b)
        if f.ndim == 2:
            return float(fn(f, a, b))
        return float(np.mean([fn(f[..., k], _channel(a, k), _channel(b, k)) for k in range(f.shape[2])]))

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


def vifb_sf(f, a=None, b=None) -> float:
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
        return _round_half_away(z * 255).astype(np.int64)  # int16(z*255); +1 is MATLAB indexing

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


_QABF = dict(tg=0.9994, kg=-15.0, dg=0.5, ta=0.9879, ka=-22.0, da=0.8)
_H1 = np.array([[1.0, 2, 1], [0, 0, 0], [-1, -2, -1]])   # y
_H3 = np.array([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])   # x


def _qabf_core(fa, fb, ff, conv):
    """Hong's Xydeas-Petrovic variant; ``conv(img, kernel)`` is conv2 'same'."""
    def grad(z):
        sx, sy = conv(z, _H3), conv(z, _H1)
        g = np.sqrt(sx * sx + sy * sy)
        a = np.full_like(sx, math.pi / 2)
        nz = sx != 0
        a[nz] = np.arctan(sy[nz] / sx[nz])
        return g, a

    c = _QABF
    gA, aA = grad(fa)
    gB, aB = grad(fb)
    gF, aF = grad(ff)

    def q(gX, aX):
        G = np.zeros_like(gX)
        gt, eq, lt = gX > gF, gX == gF, gX < gF
        G[gt] = gF[gt] / gX[gt]
        G[eq] = gF[eq]  # the variant's quirk: gF itself, not 1
        G[lt] = gX[lt] / gF[lt]
        A = 1 - np.abs(aX - aF) / (math.pi / 2)
        return c["tg"] / (1 + np.exp(c["kg"] * (G - c["dg"]))) * c["ta"] / (1 + np.exp(c["ka"] * (A - c["da"])))

    qa, qb = q(gA, aA), q(gB, aB)
    return (qa * gA + qb * gB).sum() / (gA + gB).sum()


def _conv_same_zero(z, k):
    return ndi.convolve(z, k, mode="constant")


def _v_qabf(f, a, b):
    """Qabf (Hong variant) on ``255*im2double`` images, i.e. all three scaled by 255."""
    return _qabf_core(255 * a, 255 * b, 255 * f, _conv_same_zero)


def _normalize1(x):
    hi, lo = x.max(), x.min()
    if hi == 0 and lo == 0:
        return x
    with np.errstate(divide="ignore", invalid="ignore"):
        return _round_half_away((x - lo) / (hi - lo) * 255)


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


vifb = MetricSuite(
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

# --------------------------------------------------------------------------- papers (CDDFuse Evaluator)


def _p(x):
    """The evaluator's input: grey float32 (colour -> cv2 luminance, rounded)."""
    x = np.asarray(x)
    return gray_cv2(x) if x.ndim == 3 else x.astype(np.float32, copy=False)


def _p_en(f, a=None, b=None, *, cast=_p):
    """EN: 256-bin histogram of ``uint8(round(F))``, log2."""
    img = cast(f)
    v = np.clip(np.round(img), 0, 255).astype(np.uint8).ravel()
    h = np.bincount(v) / v.shape[0]
    return float(-np.sum(h * np.log2(h + (h == 0))))


def _p_sd(f, a=None, b=None, *, cast=_p):
    """SD: ``np.std`` (population)."""
    return float(np.std(cast(f)))


def _p_sf(f, a=None, b=None, *, cast=_p):
    """SF: ``sqrt(mean(dx^2) + mean(dy^2))``, means over H(W-1) and (H-1)W."""
    img = cast(f)
    return float(np.sqrt(np.mean((img[:, 1:] - img[:, :-1]) ** 2) + np.mean((img[1:, :] - img[:-1, :]) ** 2)))


def _p_ag(f, a=None, b=None, *, cast=_p):
    """AG: ``mean(sqrt((Gx^2 + Gy^2)/2))``, central differences (one-sided at edges), over H*W."""
    img = cast(f)
    gx, gy = np.zeros_like(img), np.zeros_like(img)
    gx[:, 0] = img[:, 1] - img[:, 0]
    gx[:, -1] = img[:, -1] - img[:, -2]
    gx[:, 1:-1] = (img[:, 2:] - img[:, :-2]) / 2
    gy[0, :] = img[1, :] - img[0, :]
    gy[-1, :] = img[-1, :] - img[-2, :]
    gy[1:-1, :] = (img[2:, :] - img[:-2, :]) / 2
    return float(np.mean(np.sqrt((gx**2 + gy**2) / 2)))


def mutual_info_score(x: np.ndarray, y: np.ndarray) -> float:
    """``sklearn.metrics.mutual_info_score(x.ravel(), y.ravel())``: distinct values as labels, nats."""
    _, xi = np.unique(np.asarray(x).ravel(), return_inverse=True)
    _, yi = np.unique(np.asarray(y).ravel(), return_inverse=True)
    nx, ny = xi.max() + 1, yi.max() + 1
    if nx == 1 or ny == 1:
        return 0.0
    joint = np.bincount(xi.astype(np.int64) * ny + yi, minlength=nx * ny).reshape(nx, ny)
    pi, pj = joint.sum(1), joint.sum(0)
    nzx, nzy = np.nonzero(joint)
    nz = joint[nzx, nzy].astype(np.float64)
    total = nz.sum()
    c_nm = nz / total
    outer = pi[nzx].astype(np.int64) * pj[nzy].astype(np.int64)
    log_outer = -np.log(outer) + math.log(pi.sum()) + math.log(pj.sum())
    mi = c_nm * (np.log(nz) - math.log(total)) + c_nm * log_outer
    mi = np.where(np.abs(mi) < np.finfo(mi.dtype).eps, 0.0, mi)
    return float(max(mi.sum(), 0.0))


def _p_mi(f, a, b, *, cast=_p):
    """MI: ``mutual_info_score(F, A) + mutual_info_score(F, B)`` (nats, raw grey levels)."""
    f, a, b = cast(f), cast(a), cast(b)
    return mutual_info_score(f, a) + mutual_info_score(f, b)


def _corr(x, y):
    dx, dy = x - np.mean(x), y - np.mean(y)
    return np.sum(dx * dy) / np.sqrt(np.sum(dx**2) * np.sum(dy**2))


def _p_scd(f, a, b, *, cast=_p):
    """SCD (Aslantas & Bendes 2015): ``corr(A, F - B) + corr(B, F - A)``."""
    f, a, b = cast(f), cast(a), cast(b)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(_corr(a, f - b) + _corr(b, f - a))


def _p_cc(f, a, b, *, cast=_p):
    """CC: ``(corr(A, F) + corr(B, F))/2``."""
    f, a, b = cast(f), cast(a), cast(b)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float((_corr(a, f) + _corr(b, f)) / 2)


def _vifp_mscale(ref, dist):
    """Sheikh-Bovik VIFp, 4 scales, as ``compare_viff`` in the evaluator; NaN -> 1."""
    sigma_nsq, eps = 2.0, 1e-10
    num = den = 0.0
    for scale in range(1, 5):
        n = 2 ** (4 - scale + 1) + 1
        sd = n / 5.0
        m = (n - 1.0) / 2.0
        y, x = np.ogrid[-m:m + 1, -m:m + 1]
        h = np.exp(-(x * x + y * y) / (2.0 * sd * sd))
        h[h < np.finfo(h.dtype).eps * h.max()] = 0
        win = np.rot90(h / h.sum(), 2)
        if scale > 1:
            ref = convolve2d(ref, win, mode="valid")[::2, ::2]
            dist = convolve2d(dist, win, mode="valid")[::2, ::2]
        mu1, mu2 = convolve2d(ref, win, mode="valid"), convolve2d(dist, win, mode="valid")
        s1 = convolve2d(ref * ref, win, mode="valid") - mu1 * mu1
        s2 = convolve2d(dist * dist, win, mode="valid") - mu2 * mu2
        s12 = convolve2d(ref * dist, win, mode="valid") - mu1 * mu2
        s1[s1 < 0] = 0
        s2[s2 < 0] = 0
        g = s12 / (s1 + eps)
        sv = s2 - g * s12
        low1 = s1 < eps
        g[low1] = 0
        sv[low1] = s2[low1]
        s1[low1] = 0
        low2 = s2 < eps
        g[low2] = 0
        sv[low2] = 0
        neg = g < 0
        sv[neg] = s2[neg]
        g[neg] = 0
        sv[sv <= eps] = eps
        num += np.sum(np.log10(1 + g * g * s1 / (sv + sigma_nsq)))
        den += np.sum(np.log10(1 + s1 / sigma_nsq))
    with np.errstate(divide="ignore", invalid="ignore"):
        v = num / den
    return 1.0 if np.isnan(v) else float(v)


def _p_vif(f, a, b, *, cast=_p):
    """VIF ("VIFF" in the evaluator): VIFp multi-scale, ``VIF(A, F) + VIF(B, F)``."""
    f, a, b = cast(f), cast(a), cast(b)
    return _vifp_mscale(a, f) + _vifp_mscale(b, f)


def _conv2_same(z, k):
    return convolve2d(z, k.astype(z.dtype), mode="same")


def _p_qabf(f, a, b, *, cast=_p):
    """Qabf: Hong variant, same constants as VIFB, without the x255 scaling."""
    f, a, b = cast(f), cast(a), cast(b)
    return float(_qabf_core(a, b, f, _conv2_same))


def _ssim_skimage019(x, y):
    """skimage 0.19 ``structural_similarity(x, y)`` defaults for float32 input (data_range = 2)."""
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.float32)
    win, ndim = 7, 2
    cov_norm = win**ndim / (win**ndim - 1)
    r = 2.0  # dtype_range[float32] = (-1, 1)
    c1, c2 = (0.01 * r) ** 2, (0.03 * r) ** 2

    def filt(z):
        return ndi.uniform_filter(z, size=win)  # mode 'reflect'

    ux, uy = filt(x), filt(y)
    uxx, uyy, uxy = filt(x * x), filt(y * y), filt(x * y)
    vx = np.float32(cov_norm) * (uxx - ux * ux)
    vy = np.float32(cov_norm) * (uyy - uy * uy)
    vxy = np.float32(cov_norm) * (uxy - ux * uy)
    a1, a2 = 2 * ux * uy + np.float32(c1), 2 * vxy + np.float32(c2)
    b1, b2 = ux**2 + uy**2 + np.float32(c1), vx + vy + np.float32(c2)
    s = (a1 * a2) / (b1 * b2)
    pad = (win - 1) // 2
    return float(s[pad:-pad, pad:-pad].mean(dtype=np.float64))


def _p_ssim(f, a, b, *, cast=_p):
    """SSIM: ``ssim(F, A) + ssim(F, B)`` with skimage 0.19 defaults (7x7 uniform, data_range 2)."""
    f, a, b = cast(f), cast(a), cast(b)
    return _ssim_skimage019(f, a) + _ssim_skimage019(f, b)


def _p_mse(f, a, b, *, cast=_p):
    """MSE: ``(MSE(A, F) + MSE(B, F))/2`` on 0..255."""
    f, a, b = cast(f), cast(a), cast(b)
    return float((np.mean((a - f) ** 2) + np.mean((b - f) ** 2)) / 2)


def _p_psnr(f, a, b, *, cast=_p):
    """PSNR: ``10 log10(max(F)^2 / MSE)`` -- max of F, not 255."""
    img = cast(f)
    with np.errstate(divide="ignore"):
        return float(10 * np.log10(float(np.max(img)) ** 2 / _p_mse(f, a, b, cast=cast)))


papers = MetricSuite(
    "papers",
    "CDDFuse utils/Evaluator.py (medical fusion papers): luminance via cv2 BGR2GRAY + round, float32",
    {
        "EN": _p_en,
        "SD": _p_sd,
        "SF": _p_sf,
        "AG": _p_ag,
        "MI": _p_mi,
        "SCD": _p_scd,
        "VIF": _p_vif,
        "Qabf": _p_qabf,
        "SSIM": _p_ssim,
        "MSE": _p_mse,
        "PSNR": _p_psnr,
        "CC": _p_cc,
    },
    lower_is_better=("MSE",),
)

CONVENTIONS: dict[str, MetricSuite] = {"papers": papers, "vifb": vifb}


def evaluate(fused: ImageLike, a: ImageLike, b: ImageLike, convention: str = "papers", *,
             gray: bool = False, only: list[str] | None = None) -> dict[str, float]:
    """Score ``fused`` against sources ``a`` and ``b`` in one evaluator's convention.

    Images are file paths (read with Pillow as 8-bit, like ``imread``/``cv2.imread``)
    or arrays on 0..255 (non-uint8 arrays are rounded to 8 bits, as a saved PNG
    would be).  ``papers``: everything on cv2 luminance (colour discarded).
    ``vifb``: images as read; a colour fused image per channel (VIFB's rule); with
    ``gray=True`` colour images first go through MATLAB ``rgb2gray`` (VIFB's
    advice for medical fusion).  For VIFB, ``a`` plays the VI role and ``b`` IR
    (the metrics are symmetric in them).  ``only`` restricts to some metrics.
    """
    try:
        suite = CONVENTIONS[convention]
    except KeyError:
        raise ValueError(f"unknown convention {convention!r}; use one of {sorted(CONVENTIONS)}") from None
    f8, a8, b8 = (_to_uint8_values(x) for x in (fused, a, b))
    if not (f8.shape[:2] == a8.shape[:2] == b8.shape[:2]):
        raise ValueError(f"image sizes differ: fused {f8.shape}, a {a8.shape}, b {b8.shape}")
    if only:
        unknown = [k for k in only if k not in suite.metrics]
        if unknown:
            raise ValueError(f"{convention} has no metric {unknown}; it has {suite.names}")
    if convention == "papers":
        f, a_, b_ = gray_cv2(f8), gray_cv2(a8), gray_cv2(b8)
    else:
        f, a_, b_ = (rgb2gray_matlab(x) for x in (f8, a8, b8)) if gray else (f8, a8, b8)
    return suite(f, a_, b_, only=only)


# --------------------------------------------------------------------------- the first simple set
# Thin float64 wrappers on 2-D grey arrays (0..255), kept for benchmarks/quality.py.

def _f64(x):
    return np.asarray(x, dtype=np.float64)


def entropy(f: np.ndarray) -> float:
    """EN (both conventions agree on integer images): bits, 256-bin histogram of ``uint8(round(F))``."""
    return _p_en(f, cast=_f64)


def std(f: np.ndarray) -> float:
    """SD: population standard deviation."""
    return float(np.std(_f64(f)))


def average_gradient(f: np.ndarray) -> float:
    """AG, papers' convention: ``mean(sqrt((Gx^2 + Gy^2)/2))``, central differences, over H*W."""
    return _p_ag(f, cast=_f64)


def mutual_information(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> float:
    """MI, papers' convention: ``MI(F, A) + MI(F, B)`` on the (rounded) grey levels, nats."""
    r = lambda x: np.clip(np.round(_f64(x)), 0, 255)  # noqa: E731
    return mutual_info_score(r(f), r(a)) + mutual_info_score(r(f), r(b))


def ssim(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> float:
    """SSIM, VIFB's convention (Wang 2004, 11x11 Gaussian, 'valid'): ``SSIM(A, F) + SSIM(B, F)``."""
    return float(_v_ssim(_f64(f), _f64(a), _f64(b)))


def qabf(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> float:
    """Q^AB/F, Hong variant without the x255 scaling (papers' convention), float64."""
    return float(_qabf_core(_f64(a), _f64(b), _f64(f), _conv_same_zero))


METRICS = {
    "Qabf": lambda a, b, f: qabf(a, b, f),
    "MI": mutual_information,
    "SSIM": ssim,
    "SD": lambda a, b, f: std(f),
    "EN": lambda a, b, f: entropy(f),
    "AG": lambda a, b, f: average_gradient(f),
}


def score(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> dict[str, float]:
    """The simple set for one fused image (inputs 2-D on 0..255); see ``evaluate`` for the full suites."""
    return {name: fn(a, b, f) for name, fn in METRICS.items()}
