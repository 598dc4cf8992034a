"""Small helpers shared by the conventional methods (MATLAB conversions)."""

from __future__ import annotations

from typing import Any

from fusion.backend import array_module


def matlab_uint8(x: Any) -> Any:
    """MATLAB ``uint8(x)`` on the 0..255 scale: round half away from zero, saturate, NaN -> 0."""
    xp = array_module(x)
    y = xp.where(xp.isnan(x), 0, x)
    y = xp.sign(y) * xp.floor(xp.abs(y) + 0.5)
    return xp.clip(y, 0, 255)


def finish(fused255: Any, *, quantize: bool) -> Any:
    """Return a method's 0..255 result on the 0..1 scale, saturated (rounded when ``quantize``)."""
    xp = array_module(fused255)
    if quantize:
        return matlab_uint8(fused255) / 255.0
    y = xp.where(xp.isnan(fused255), 0, fused255)
    return xp.clip(y, 0, 255) / 255.0


def prepare_pair(a: Any, b: Any) -> tuple[Any, Any, Any]:
    """Validate two 0..1 float images/stacks and return ``(xp, a255, b255)`` on the 0..255 scale.

    The VIFB reference code works on ``double(imread(...))``, i.e. the 0..255 scale, and
    its constants (diffusion kappa, bilateral sigma_r, FPDE k) assume it.  ``b`` may be
    broadcast against ``a`` (VIFB fuses a grayscale IR image with every channel of an RGB
    visible image); the common dtype of the inputs is kept.
    """
    xp = array_module(a)
    a = xp.asarray(a)
    b = xp.asarray(b)
    dtype = xp.result_type(a, b)
    if dtype.kind != "f":
        raise TypeError(f"fusion methods take float images on the 0..1 scale, got {dtype}")
    a, b = xp.broadcast_arrays(a, b)
    if a.ndim not in (2, 3):
        raise ValueError(f"expected an image (H, W) or a stack (S, H, W), got shape {a.shape}")
    return xp, a.astype(dtype, copy=False) * 255.0, b.astype(dtype, copy=False) * 255.0


def pca_detail_weights(d1: Any, d2: Any) -> tuple[Any, Any]:
    """Per-slice KLT/PCA weights ``(p1, p2)`` of two detail layers (ADF, FPDE).

    Bavirisetti & Dhuli fuse detail layers with the principal eigenvector of
    ``cov([D1(:) D2(:)])`` (MATLAB ``cov``, ddof = 1) scaled to sum to one
    (SPEC section 2, rows ADF and FPDE).  The covariance is reduced over the last two
    axes so every slice of a stack gets its own weights, and the eigenvector of the
    2x2 symmetric matrix is written in closed form (no ``eig``, batched on CPU and GPU).
    Returned weights have shape ``(..., 1, 1)`` so they broadcast over the slice.

    Degenerate cases follow MATLAB where it is well defined: for a multiple of the
    identity (e.g. both details all zero) ``eig`` returns the unit vectors and the code
    picks the first, so ``p = (1, 0)``.  Where the eigenvector components sum to zero
    MATLAB divides by zero (Inf/NaN); we use ``(0.5, 0.5)`` instead.
    """
    xp = array_module(d1)
    n = d1.shape[-2] * d1.shape[-1]
    axes = (-2, -1)
    z1 = d1 - d1.mean(axis=axes, keepdims=True)
    z2 = d2 - d2.mean(axis=axes, keepdims=True)
    denom = float(max(n - 1, 1))
    c11 = (z1 * z1).sum(axis=axes, keepdims=True) / denom
    c22 = (z2 * z2).sum(axis=axes, keepdims=True) / denom
    c12 = (z1 * z2).sum(axis=axes, keepdims=True) / denom
    # Largest eigenvalue lam = (c11+c22)/2 + r; eigenvector (lam-c22, c12) or (c12, lam-c11),
    # taking the form without cancellation.
    h = (c11 - c22) / 2.0
    r = xp.sqrt(h * h + c12 * c12)
    v1 = xp.where(h >= 0, h + r, c12)
    v2 = xp.where(h >= 0, c12, r - h)
    s = v1 + v2
    ident = r == 0
    bad = (s == 0) & ~ident
    safe = xp.where(s == 0, 1.0, s)
    p1 = xp.where(ident, 1.0, xp.where(bad, 0.5, v1 / safe))
    p2 = xp.where(ident, 0.0, xp.where(bad, 0.5, v2 / safe))
    return p1.astype(d1.dtype, copy=False), p2.astype(d1.dtype, copy=False)
