"""Gradient and window kernels on whole stacks ``(..., H, W)``.

Each function is written once against the array module of its input, so the
NumPy/SciPy path and the CuPy path (``cupyx.scipy.ndimage`` kernels, plus one
fused ``ElementwiseKernel`` for the wrapped angle difference) are the same
code.  Filtering acts on the last two axes only; leading axes (slices,
exposures, channels) are a batch.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from fusion.backend import array_module, ndimage_for

#: Boundary handling of the Gaussian-derivative and window filters: mirror with
#: the edge sample repeated (MATLAB 'symmetric'), so borders do not look like edges.
BOUNDARY = "reflect"


@functools.lru_cache(maxsize=32)
def gaussian_derivative_kernels(sigma: float, truncate: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """1-D Gaussian ``g`` and first-derivative ``dg`` taps for correlation.

    ``g`` sums to 1; ``dg`` is scaled so that a unit ramp has derivative exactly 1
    (``sum(-x * dg(x)) == 1`` as a correlation), which keeps gradient magnitudes
    in image units whatever sigma is.
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    radius = max(1, int(math.ceil(truncate * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    g = np.exp(-0.5 * (x / sigma) ** 2)
    g /= g.sum()
    dg = -x * g  # derivative of the Gaussian (up to scale)
    # correlation of a ramp f(x)=x with taps dg gives sum(x_k * dg_k) at 0; make it 1
    dg /= np.sum(x * dg)
    return g, dg


def gaussian_gradient(img: Any, sigma: float = 1.0) -> tuple[Any, Any]:
    """First derivatives of a 2-D Gaussian along x (columns) and y (rows)."""
    xp = array_module(img)
    ndi = ndimage_for(xp)
    g, dg = (xp.asarray(k, dtype=img.dtype) for k in gaussian_derivative_kernels(float(sigma)))
    ax_y, ax_x = img.ndim - 2, img.ndim - 1
    smooth_y = ndi.correlate1d(img, g, axis=ax_y, mode=BOUNDARY)
    gx = ndi.correlate1d(smooth_y, dg, axis=ax_x, mode=BOUNDARY)
    smooth_x = ndi.correlate1d(img, g, axis=ax_x, mode=BOUNDARY)
    gy = ndi.correlate1d(smooth_x, dg, axis=ax_y, mode=BOUNDARY)
    return gx, gy


def gradient_magnitude_orientation(img: Any, sigma: float = 1.0) -> tuple[Any, Any]:
    """Gradient magnitude and orientation (radians, in (-pi, pi]) of each slice."""
    xp = array_module(img)
    gx, gy = gaussian_gradient(img, sigma)
    return xp.hypot(gx, gy), xp.arctan2(gy, gx)


def structure_tensor_eig(j11: Any, j12: Any, j22: Any) -> tuple[Any, Any]:
    """Di Zenzo multi-channel gradient from summed structure-tensor entries.

    Returns ``sqrt(lambda_max)`` (the gradient magnitude of a vector image) and the
    direction of the dominant eigenvector, ``0.5*atan2(2 J12, J11 - J22)``, in
    (-pi/2, pi/2] - an axial orientation, defined modulo pi.
    """
    xp = array_module(j11)
    half_trace = 0.5 * (j11 + j22)
    root = xp.sqrt(0.25 * (j11 - j22) ** 2 + j12**2)
    lam = xp.maximum(half_trace + root, 0)
    return xp.sqrt(lam), 0.5 * xp.arctan2(2 * j12, j11 - j22)


def window_sum(x: Any, l: int) -> Any:
    """Sum over a (2l+1)x(2l+1) window around each pixel (mirrored borders)."""
    return window_mean(x, l) * (2 * l + 1) ** 2


def window_mean(x: Any, l: int) -> Any:
    """Mean over a (2l+1)x(2l+1) window around each pixel (mirrored borders)."""
    if l < 0:
        raise ValueError(f"window half-size l must be >= 0, got {l}")
    ndi = ndimage_for(array_module(x))
    size = (1,) * (x.ndim - 2) + (2 * l + 1, 2 * l + 1)
    return ndi.uniform_filter(x, size=size, mode=BOUNDARY)


@functools.lru_cache(maxsize=1)
def _wrapped_diff_kernel() -> Any:
    import cupy as cp

    return cp.ElementwiseKernel(
        "T a, T b, T period",
        "T d",
        """
        T r = fmod(fabs(a - b), period);
        d = r > period * (T)0.5 ? period - r : r;
        """,
        "fusion_wrapped_angle_diff",
    )


def wrapped_angle_difference(a: Any, b: Any, period: float = math.pi) -> Any:
    """|a - b| measured on a circle of the given period, in [0, period/2].

    Orientations of gradients are compared on the circle so that angles just
    either side of the wrap point count as close, not as opposite.
    """
    xp = array_module(a)
    if xp is not np:
        return _wrapped_diff_kernel()(a, b, a.dtype.type(period))
    r = np.fmod(np.abs(a - b), period)
    return np.where(r > period / 2, period - r, r)
