"""CDDFuse's ``utils/Evaluator.py``, the medical fusion papers' evaluator; see ``fusion.metrics``."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi
from scipy.signal import convolve2d

from fusion.metrics.common import MetricSuite, gray_cv2, qabf_core


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
    return float(qabf_core(a, b, f, _conv2_same))


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


PAPERS = MetricSuite(
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

