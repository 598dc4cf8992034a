"""DMF: gradient-based quality weights over three fused "exposures", blended in a pyramid.

El-Shafai & Azar (2025).  Three conventional fusions of the same pair are the
exposures ``I_j``; each pixel of the result takes most from the exposure whose
structure there is strongest (visibility, eq. 3), agrees with the others in
orientation (consistency, eqs. 4-5) and is well exposed (eqs. 6-7).  The
weights (eq. 8) drive a multi-resolution spline.

Shapes: exposures are ``(K, S, H, W)`` - K exposures of a stack of S slices.
Every step is vectorised over K and S.

The background/saturation trap: on medical slices the black background, CT
bone and PET hot spots fall outside ``(1 - tau, tau)`` in *every* exposure.
The paper's formulas with eps only in the denominators then give zero weight
to every exposure there, and those regions fade to black in the blend.  Here
every normalisation falls back to uniform weights ``1/K`` where its
denominator vanishes, so such regions keep the exposures' mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fusion.backend import array_module
from fusion.filters import window_mean, wrapped_angle_difference
from fusion.gradients import ORIENTATION_PERIOD
from fusion.pyramid import blend


@dataclass(frozen=True)
class DMFParams:
    """Parameters of the DMF weights; defaults are the paper's."""

    window: int = 9  #: l in eq. 4: the dissimilarity window is (2l+1)^2
    sigma_s: float = 0.2  #: eq. 5, radians
    tau: float = 0.9  #: eq. 7, on the 0..1 intensity scale
    eps: float = 1e-12  #: denominators at or below this count as zero (uniform fallback)
    levels: int | None = None  #: pyramid levels; None = floor(log2(min(H, W)))
    #: exponent on VA*CA before eq. 8's normalisation; 1 is the paper. Larger values let the
    #: best exposure dominate where the paper's near-uniform weights average (docs/quality.md)
    sharpness: float = 1.0


def normalise(x: Any, eps: float) -> Any:
    """``x_j / sum_k x_k`` over axis 0, and ``1/K`` wherever the sum is <= eps."""
    xp = array_module(x)
    total = x.sum(axis=0, keepdims=True)
    defined = total > eps
    k = x.shape[0]
    return xp.where(defined, x / xp.where(defined, total, 1), x.dtype.type(1.0 / k))


def visibility(magnitude: Any, eps: float) -> Any:
    """Eq. 3: each exposure's share of the gradient magnitude."""
    return normalise(magnitude, eps)


def consistency(orientation: Any, window: int, sigma_s: float) -> Any:
    """Eqs. 4-5: sum over the other exposures of a Gaussian of the windowed orientation gap."""
    xp = array_module(orientation)
    k = orientation.shape[0]
    sc = xp.zeros_like(orientation)
    for j in range(k):  # K is 3: a loop over exposure pairs, not over pixels or slices
        for m in range(j + 1, k):
            d = window_mean(wrapped_angle_difference(orientation[j], orientation[m], ORIENTATION_PERIOD), window)
            s = xp.exp(-(d * d) / (2.0 * sigma_s * sigma_s))
            sc[j] += s
            sc[m] += s
    return sc


def exposure_mask(exposures: Any, tau: float) -> Any:
    """Eq. 7: 1 where ``1 - tau < I_j < tau``."""
    return ((exposures > 1.0 - tau) & (exposures < tau)).astype(exposures.dtype)


def contrast_weights(sc: Any, mask: Any, eps: float) -> Any:
    """Eq. 6: consistency restricted to well-exposed pixels, normalised over exposures."""
    return normalise(sc * mask, eps)


def dmf_weights(exposures: Any, magnitude: Any, orientation: Any, params: DMFParams = DMFParams()) -> Any:
    """Eq. 8: ``W_j = VA_j CA_j / sum_k VA_k CA_k`` with uniform fallbacks; sums to 1 over K."""
    va = visibility(magnitude, params.eps)
    ca = contrast_weights(consistency(orientation, params.window, params.sigma_s), exposure_mask(exposures, params.tau), params.eps)
    q = va * ca
    return normalise(q if params.sharpness == 1.0 else q**params.sharpness, params.eps)


def dmf_blend(exposures: Any, weights: Any, params: DMFParams = DMFParams()) -> Any:
    """Multi-resolution spline of the exposures with the DMF weights, clipped to [0, 1]."""
    xp = array_module(exposures)
    return xp.clip(blend(exposures, weights, params.levels), 0.0, 1.0)
