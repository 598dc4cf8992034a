"""Small helpers shared by the conventional methods (MATLAB conversions)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fusion.backend import array_module

if TYPE_CHECKING:
    import numpy as np


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


def _float_pair(a: Any, b: Any) -> tuple[Any, Any, Any, Any]:
    """``(xp, a, b, dtype)``: both as arrays of one module, and their common dtype, which must be float."""
    xp = array_module(a)
    a = xp.asarray(a)
    b = xp.asarray(b)
    dtype = xp.result_type(a, b)
    if dtype.kind != "f":
        raise TypeError(f"fusion methods take float images on the 0..1 scale, got {dtype}")
    return xp, a, b, dtype


def prepare_pair(a: Any, b: Any) -> tuple[Any, Any, Any]:
    """Validate two 0..1 float images/stacks and return ``(xp, a255, b255)`` on the 0..255 scale.

    The VIFB reference code works on ``double(imread(...))``, i.e. the 0..255 scale, and
    its constants (diffusion kappa, bilateral sigma_r, FPDE k) assume it.  ``b`` may be
    broadcast against ``a`` (VIFB fuses a grayscale IR image with every channel of an RGB
    visible image); the common dtype of the inputs is kept.
    """
    xp, a, b, dtype = _float_pair(a, b)
    a, b = xp.broadcast_arrays(a, b)
    if a.ndim not in (2, 3):
        raise ValueError(f"expected an image (H, W) or a stack (S, H, W), got shape {a.shape}")
    return xp, a.astype(dtype, copy=False) * 255.0, b.astype(dtype, copy=False) * 255.0


def pca_detail_weights(d1: Any, d2: Any) -> tuple[Any, Any]:
    """Per-slice KLT/PCA weights ``(p1, p2)`` of two detail layers (ADF, FPDE).

    Bavirisetti & Dhuli fuse detail layers with the principal eigenvector of
    ``cov([D1(:) D2(:)])`` (MATLAB ``cov``, ddof = 1) scaled to sum to one
    (docs/ports.md, ADF and FPDE).  The covariance is reduced over the last two
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


# --- Box / guided filters, MATLAB fspecial-Gaussian filtering and imresize emulation
# --- (added for TIF, MGFF, GFCE; docs/ports.md).  Everything works on the last two
# --- axes, so stacks (S, H, W) are filtered slice-independently in one batch.


def _axis_pad(ndim: int, axis: int, before: int, after: int) -> list[tuple[int, int]]:
    pad = [(0, 0)] * ndim
    pad[axis] = (before, after)
    return pad


def _box_sum_axis(x: Any, r: int, axis: int) -> Any:
    xp = array_module(x)
    n = x.shape[axis]
    c = xp.cumsum(xp.pad(x, _axis_pad(x.ndim, axis, r + 1, r)), axis=axis)
    hi = [slice(None)] * x.ndim
    lo = [slice(None)] * x.ndim
    hi[axis] = slice(2 * r + 1, 2 * r + 1 + n)
    lo[axis] = slice(0, n)
    return c[tuple(hi)] - c[tuple(lo)]


def box_sum(x: Any, r: int) -> Any:
    """He et al.'s ``boxfilter(imSrc, r)``: sum over the (2r+1)^2 window clipped to the image.

    The reference takes a cumulative sum down the columns and differences it, then the
    same along the rows.  Zero-padding ``r + 1`` before and ``r`` after each axis and
    differencing one cumulative sum gives exactly the same additions (the padded zeros
    add exactly 0 and the three cases of the MATLAB code become one), and also works
    for images smaller than the window.
    """
    return _box_sum_axis(_box_sum_axis(x, r, -2), r, -1)


def guided_filter(guide: Any, src: Any, r: int, eps: float) -> Any:
    """He et al.'s ``guidedfilter(I, p, r, eps)`` (gray guide), with border-normalised means."""
    xp = array_module(src)
    n = box_sum(xp.ones(guide.shape[-2:], dtype=src.dtype), r)
    mean_i = box_sum(guide, r) / n
    mean_p = box_sum(src, r) / n
    mean_ip = box_sum(guide * src, r) / n
    cov_ip = mean_ip - mean_i * mean_p
    mean_ii = box_sum(guide * guide, r) / n
    var_i = mean_ii - mean_i * mean_i
    a = cov_ip / (var_i + eps)
    b = mean_p - a * mean_i
    mean_a = box_sum(a, r) / n
    mean_b = box_sum(b, r) / n
    return mean_a * guide + mean_b


def fspecial_gaussian_1d(sigma: float, half: int) -> Any:
    """1-D factor of MATLAB ``fspecial('gaussian', [2h+1 2h+1], sigma)`` (a NumPy vector).

    The 2-D kernel ``exp(-(x^2+y^2)/(2 sigma^2))/sum`` is the outer product of this vector
    with itself; fspecial's cut of values below ``eps*max`` never triggers for the
    ``half = floor(3 sigma)`` kernels used here (the smallest entry is ``exp(-9)``).
    """
    import numpy as np

    x = np.arange(-half, half + 1, dtype=np.float64)
    g = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return g / g.sum()


def filter_symmetric(x: Any, k1d: Any) -> Any:
    """``imfilter(x, outer(k1d, k1d), 'symmetric')`` for a symmetric separable kernel.

    Padding is NumPy ``'symmetric'`` (MATLAB ``padarray(..., 'symmetric')``: the edge
    pixel is repeated), which keeps mirroring when the kernel is larger than the image.
    Each axis is padded, correlated and cropped in turn.
    """
    from fusion.backend import ndimage_for

    xp = array_module(x)
    ndi = ndimage_for(xp)
    half = (len(k1d) - 1) // 2
    w = xp.asarray(k1d, dtype=x.dtype)
    out = x
    for axis in (-2, -1):
        p = xp.pad(out, _axis_pad(out.ndim, out.ndim + axis, half, half), mode="symmetric")
        f = ndi.correlate1d(p, w, axis=axis, mode="constant")
        idx = [slice(None)] * out.ndim
        idx[axis] = slice(half, half + out.shape[axis])
        out = f[tuple(idx)]
    return out


def _imresize_contributions(in_len: int, out_len: int, scale: float, method: str) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights of MATLAB ``imresize`` along one axis (0-based indices).

    Follows ``imresize>contributions`` without antialiasing (MATLAB's default for
    ``'nearest'``; for ``'bilinear'`` it only matters when shrinking, which is not used
    here): ``u = x/scale + 0.5(1 - 1/scale)`` for output pixel ``x`` (1-based), kernel
    taps ``floor(u - width/2) + (0 .. ceil(width)+1)``, weights normalised to sum 1,
    out-of-range taps folded back with the symmetric ``[1:n, n:-1:1]`` rule.
    """
    import numpy as np

    if method == "nearest":
        width = 1.0

        def kernel(t):
            return ((t >= -0.5) & (t < 0.5)).astype(np.float64)
    elif method == "bilinear":
        width = 2.0

        def kernel(t):
            return (t + 1) * ((t >= -1) & (t < 0)) + (1 - t) * ((t >= 0) & (t <= 1))
    else:
        raise ValueError(f"unsupported imresize method {method!r}")
    x = np.arange(1, out_len + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1.0 - 1.0 / scale)
    left = np.floor(u - width / 2.0)
    taps = int(np.ceil(width)) + 2
    idx = left[:, None] + np.arange(taps)[None, :]
    wts = kernel(u[:, None] - idx)
    wts = wts / wts.sum(axis=1, keepdims=True)
    aux = np.concatenate([np.arange(in_len), np.arange(in_len)[::-1]])
    idx0 = aux[np.mod(idx.astype(np.int64) - 1, aux.size)]
    keep = np.any(wts != 0, axis=0)
    return idx0[:, keep], wts[:, keep]


def _imresize_axis(x: Any, out_len: int, scale: float, method: str, axis: int) -> Any:
    xp = array_module(x)
    idx, wts = _imresize_contributions(x.shape[axis], out_len, scale, method)
    if method == "nearest":
        # One tap of weight 1 per output pixel.
        sel = idx[range(out_len), wts.argmax(axis=1)]
        return xp.take(x, xp.asarray(sel), axis=axis)
    shape = [1] * x.ndim
    shape[axis] = out_len
    out = None
    for k in range(idx.shape[1]):
        term = xp.take(x, xp.asarray(idx[:, k]), axis=axis) * xp.asarray(
            wts[:, k].reshape(shape), dtype=x.dtype)
        out = term if out is None else out + term
    return out


def imresize(x: Any, *, scale: float | None = None, size: tuple[int, int] | None = None,
             method: str = "bilinear") -> Any:
    """MATLAB ``imresize`` on the last two axes, ``'nearest'`` or ``'bilinear'``, no antialiasing.

    Give either ``scale`` (output size ``ceil(scale * input)``, that scale used for the
    mapping, as MATLAB does) or ``size`` (the scale of each axis is ``out/in``).  Both
    axes are resized separably, the axis with the smaller scale first (MATLAB's order).
    """
    import math

    h, w = x.shape[-2:]
    if size is None:
        if scale is None:
            raise ValueError("give scale or size")
        size = (int(math.ceil(scale * h)), int(math.ceil(scale * w)))
        scales = (float(scale), float(scale))
    else:
        scales = (size[0] / h, size[1] / w)
    order = (-2, -1) if scales[0] <= scales[1] else (-1, -2)
    out = x
    for axis in order:
        i = 0 if axis == -2 else 1
        out = _imresize_axis(out, size[i], scales[i], method, out.ndim + axis)
    return out


# --- Pair validation on the 0..1 scale without broadcasting (added for WLS/VSMWLS and
# --- MDLatLRR, which work on I/255 and im2double(I) rather than on 0..255).


def check_pair_unit(a: Any, b: Any) -> tuple[Any, Any, Any]:
    """Validate two 0..1 float images/stacks like ``prepare_pair``; return ``(xp, a, b)``.

    Unlike ``prepare_pair`` the 0..1 scale is kept (no ``* 255`` round trip, so ``k/255``
    inputs stay exactly MATLAB's ``double(I)/255``) and the inputs keep their own shapes:
    they only have to broadcast to an image ``(H, W)`` or a stack ``(S, H, W)``.  A single
    "IR" image shared by a whole stack can then be decomposed once.  Both are cast to
    their common float dtype.
    """
    xp, a, b, dtype = _float_pair(a, b)
    import numpy as np  # shape arithmetic only (CuPy arrays have the same shapes)

    try:
        shape = np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise ValueError(f"images of shapes {a.shape} and {b.shape} do not broadcast") from None
    if len(shape) not in (2, 3):
        raise ValueError(f"expected an image (H, W) or a stack (S, H, W), got shape {shape}")
    if a.shape[-2:] != b.shape[-2:]:
        raise ValueError(f"image sizes differ: {a.shape[-2:]} vs {b.shape[-2:]}")
    return xp, a.astype(dtype, copy=False), b.astype(dtype, copy=False)
