"""Fusion-quality metrics in the two conventions users meet (docs/ports.md, metrics).

Published numbers are only comparable within one evaluator: the same fused image
scores differently under different toolkits (docs/ports.md: the same toy fusion under each).  This module therefore
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
    against the measured values of the papers' convention (docs/ports.md) on the Harvard pairs (CDDFuse's test set).

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

Modules: ``common`` (image reading, colour to grey, the Q^AB/F kernel),
``vifb_matlab`` and ``cddfuse`` (one evaluator each), ``simple`` (the simple set).
"""

from __future__ import annotations

from fusion.metrics.cddfuse import PAPERS as papers
from fusion.metrics.common import ImageLike, MetricSuite, gray_cv2, load_image, rgb2gray_matlab, to_uint8_values
from fusion.metrics.simple import METRICS, average_gradient, entropy, mutual_information, qabf, score, ssim, std
from fusion.metrics.vifb_matlab import VIFB as vifb

__all__ = [
    "CONVENTIONS", "METRICS", "ImageLike", "MetricSuite", "average_gradient", "entropy", "evaluate",
    "gray_cv2", "load_image", "mutual_information", "papers", "qabf", "rgb2gray_matlab", "score", "ssim",
    "std", "vifb",
]

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
    f8, a8, b8 = (to_uint8_values(x) for x in (fused, a, b))
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


