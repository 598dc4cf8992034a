"""The first simple metric set: float64 wrappers on 2-D grey 0..255 arrays over the evaluators' kernels."""

from __future__ import annotations

import numpy as np

from fusion.metrics.cddfuse import _p_ag, _p_en, mutual_info_score
from fusion.metrics.common import conv_same_zero, qabf_core
from fusion.metrics.vifb_matlab import _v_ssim


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
    r = lambda x: np.clip(np.round(_f64(x)), 0, 255)
    return mutual_info_score(r(f), r(a)) + mutual_info_score(r(f), r(b))


def ssim(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> float:
    """SSIM, VIFB's convention (Wang 2004, 11x11 Gaussian, 'valid'): ``SSIM(A, F) + SSIM(B, F)``."""
    return float(_v_ssim(_f64(f), _f64(a), _f64(b)))


def qabf(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> float:
    """Q^AB/F, Hong variant without the x255 scaling (papers' convention), float64."""
    return float(qabf_core(_f64(a), _f64(b), _f64(f), conv_same_zero))


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
