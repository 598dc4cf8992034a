"""Is a fused image faithful to its sources?  The three checks a reader makes first.

Q^AB/F, VIF and SSIM misrank what a radiologist sees (issue 14): a fusion can
score well and still dim the skull to grey or the hottest uptake to 85 %.  These
measures ask the reader's questions directly, on the unstretched fused image the
node writes (0..1 luminance, colour already reduced to Y):

- ``bone_kept``: mean of the fused image inside the CT's bright mask (CT >= 0.6,
  i.e. 153/255: cortical bone of a head CT in a brain window) over the CT's mean
  there.  1 = bone as white as on the CT.
- ``uptake_kept``: the same over the overlay's hottest 5 % of its foreground
  (luminance above 2/255), for PET/SPECT.
- ``qabf_shares``: Q^AB/F split into what each source's edges contribute
  (``Q = share_a + share_b``); ``share_a`` is the MRI's soft-tissue detail kept.

The Q^AB/F kernel and its constants are the papers' evaluator's
(``fusion.metrics.papers``: Hong's variant, conv2 'same'); the split only stops
before the final sum.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.signal import convolve2d

from fusion.metrics.common import _QABF, qabf_gradient

#: CT luminance (0..1) at and above which a pixel counts as bone
BONE_THRESHOLD = 0.6
#: the hottest fraction of the overlay's foreground that counts as uptake
HOT_FRACTION = 0.05
#: overlay luminance above which a pixel is foreground (not the black background)
FOREGROUND = 2.0 / 255.0


def _ratio_in(fused: np.ndarray, source: np.ndarray, mask: np.ndarray) -> float:
    if not mask.any():
        return float("nan")
    return float(fused[mask].mean() / max(float(source[mask].mean()), 1e-12))


def bone_kept(fused: np.ndarray, ct: np.ndarray, threshold: float = BONE_THRESHOLD) -> float:
    """Fused mean over the CT's mean inside ``ct >= threshold`` (2-D, 0..1); NaN if no bone."""
    fused, ct = np.asarray(fused, dtype=np.float64), np.asarray(ct, dtype=np.float64)
    return _ratio_in(fused, ct, ct >= threshold)


def hot_mask(overlay: np.ndarray, fraction: float = HOT_FRACTION) -> np.ndarray:
    """The overlay's hottest ``fraction`` of its foreground pixels (ties at the cut included)."""
    overlay = np.asarray(overlay, dtype=np.float64)
    fg = overlay > FOREGROUND
    if not fg.any():
        return fg
    cut = np.percentile(overlay[fg], 100.0 * (1.0 - fraction))
    return fg & (overlay >= cut)


def uptake_kept(fused: np.ndarray, overlay: np.ndarray, fraction: float = HOT_FRACTION) -> float:
    """Fused mean over the overlay's mean in its hottest ``fraction`` (2-D luminance, 0..1)."""
    fused, overlay = np.asarray(fused, dtype=np.float64), np.asarray(overlay, dtype=np.float64)
    return _ratio_in(fused, overlay, hot_mask(overlay, fraction))


def _conv(z: np.ndarray, k: np.ndarray) -> np.ndarray:
    return convolve2d(z, k.astype(z.dtype), mode="same")


def _grad(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return qabf_gradient(z, _conv)


def qabf_shares(f255: np.ndarray, a255: np.ndarray, b255: np.ndarray) -> tuple[float, float]:
    """``(share_a, share_b)`` of the papers' Q^AB/F on 0..255 float32 images; they sum to Q^AB/F."""
    c = _QABF
    g_a, o_a = _grad(np.asarray(a255, dtype=np.float32))
    g_b, o_b = _grad(np.asarray(b255, dtype=np.float32))
    g_f, o_f = _grad(np.asarray(f255, dtype=np.float32))

    def q(g_x: np.ndarray, o_x: np.ndarray) -> np.ndarray:
        ratio = np.zeros_like(g_x)
        gt, eq, lt = g_x > g_f, g_x == g_f, g_x < g_f
        ratio[gt] = g_f[gt] / g_x[gt]
        ratio[eq] = g_f[eq]  # the variant's quirk, kept so that the shares add up to its Q^AB/F
        ratio[lt] = g_x[lt] / g_f[lt]
        agree = 1 - np.abs(o_x - o_f) / (math.pi / 2)
        return (c["tg"] / (1 + np.exp(c["kg"] * (ratio - c["dg"])))
                * c["ta"] / (1 + np.exp(c["ka"] * (agree - c["da"]))))

    total = float((g_a + g_b).sum())
    return float((q(g_a, o_a) * g_a).sum() / total), float((q(g_b, o_b) * g_b).sum() / total)


def stretch255(fused01: np.ndarray) -> np.ndarray:
    """The papers' protocol: each image min-max stretched to [0, 255] and rounded (float32)."""
    f = np.asarray(fused01, dtype=np.float64)
    lo, hi = f.min(axis=(-2, -1), keepdims=True), f.max(axis=(-2, -1), keepdims=True)
    return np.round((f - lo) / np.maximum(hi - lo, 1e-12) * 255.0).astype(np.float32)
