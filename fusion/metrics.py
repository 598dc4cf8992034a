"""Fusion quality metrics (first set: EN, SD, AG, MI, SSIM, Q^AB/F).

Conventions differ between toolkits enough to change rankings (SPEC.md 3.4),
so each function states which one it follows.  Here: the medical-fusion
papers' evaluator (CDDFuse ``utils/Evaluator.py``) for EN, SD, AG, MI and
Q^AB/F, and Wang et al.'s SSIM with an 11x11 Gaussian window (the VIFB
definition; the papers' evaluator uses skimage 0.19 defaults instead).  All
take 2-D grey images on the 0..255 scale (luminance for colour), as float.
The fully validated suite with both conventions is a later step.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


def entropy(f: np.ndarray) -> float:
    """EN: Shannon entropy (bits) of the 256-bin histogram of ``uint8(round(F))``."""
    hist = np.bincount(np.clip(np.round(f), 0, 255).astype(np.int64).ravel(), minlength=256)
    p = hist[hist > 0] / hist.sum()
    return float(-(p * np.log2(p)).sum())


def std(f: np.ndarray) -> float:
    """SD: population standard deviation."""
    return float(np.std(f))


def average_gradient(f: np.ndarray) -> float:
    """AG (papers' evaluator): ``mean(sqrt((Gx^2 + Gy^2)/2))``, central differences, over H*W."""
    gy, gx = np.gradient(f.astype(np.float64))
    return float(np.mean(np.sqrt((gx**2 + gy**2) / 2)))


def _mi(x: np.ndarray, y: np.ndarray) -> float:
    xi = np.clip(np.round(x), 0, 255).astype(np.int64).ravel()
    yi = np.clip(np.round(y), 0, 255).astype(np.int64).ravel()
    joint = np.bincount(xi * 256 + yi, minlength=256 * 256).reshape(256, 256).astype(np.float64)
    joint /= joint.sum()
    px, py = joint.sum(1), joint.sum(0)
    nz = joint > 0
    return float((joint[nz] * np.log(joint[nz] / np.outer(px, py)[nz])).sum())


def mutual_information(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> float:
    """MI (papers' evaluator): ``MI(F, A) + MI(F, B)`` on integer grey levels, in nats."""
    return _mi(f, a) + _mi(f, b)


def _ssim(x: np.ndarray, y: np.ndarray) -> float:
    r = np.arange(-5, 6)
    g = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * 1.5**2))
    g /= g.sum()

    def filt(z):  # 'valid' correlation
        return ndi.correlate(z, g, mode="constant")[5:-5, 5:-5]

    x, y = x.astype(np.float64), y.astype(np.float64)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = filt(x), filt(y)
    sxx, syy, sxy = filt(x * x) - mx**2, filt(y * y) - my**2, filt(x * y) - mx * my
    m = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return float(m.mean())


def ssim(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> float:
    """SSIM (Wang 2004, 11x11 Gaussian sigma 1.5, 'valid'): ``SSIM(A, F) + SSIM(B, F)``, at most 2."""
    return _ssim(a, f) + _ssim(b, f)


_SOBEL_X = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float64)
_SOBEL_Y = np.array([[1, 2, 1], [0, 0, 0], [-1, -2, -1]], dtype=np.float64)


def _sobel(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z = z.astype(np.float64)
    gx = ndi.convolve(z, _SOBEL_X, mode="constant")
    gy = ndi.convolve(z, _SOBEL_Y, mode="constant")
    g = np.sqrt(gx**2 + gy**2)
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha = np.where(gx == 0, np.pi / 2, np.arctan(gy / np.where(gx == 0, 1, gx)))
    return g, alpha


def qabf(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> float:
    """Q^AB/F, Xydeas-Petrovic edge preservation in the Hong (2007) variant the papers use."""
    tg, kg, dg, ta, ka, da = 0.9994, -15.0, 0.5, 0.9879, -22.0, 0.8
    gf, af = _sobel(f)

    def q(x):
        gx_, ax_ = _sobel(x)
        with np.errstate(divide="ignore", invalid="ignore"):
            G = np.where(gx_ > gf, gf / gx_, np.where(gx_ == gf, gf, gx_ / gf))
        A = 1 - np.abs(ax_ - af) / (np.pi / 2)
        return tg / (1 + np.exp(kg * (G - dg))) * ta / (1 + np.exp(ka * (A - da))), gx_

    qa, ga = q(a)
    qb, gb = q(b)
    return float((qa * ga + qb * gb).sum() / (ga + gb).sum())


METRICS = {
    "Qabf": lambda a, b, f: qabf(a, b, f),
    "MI": mutual_information,
    "SSIM": ssim,
    "SD": lambda a, b, f: std(f),
    "EN": lambda a, b, f: entropy(f),
    "AG": lambda a, b, f: average_gradient(f),
}


def score(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> dict[str, float]:
    """All metrics of this module for one fused image (inputs on 0..255)."""
    return {name: fn(a, b, f) for name, fn in METRICS.items()}
