"""FAITHFUL: gradient-domain fusion anchored on the brighter source (the node's default).

Why not DMF.  DMF blends three fusions that already average the two sources, so it
never beats the best of them and it dims what a reader looks for first: the skull
to light grey, the hottest uptake to ~85 % (docs/quality.md, docs/fidelity.md).
The pixel-wise max keeps both bright, but where one source wins it throws the
other's edges away.

What this method does instead (docs/method.md, "FAITHFUL"):

1. *Target gradients*: at every pixel, the gradient of the source whose local
   gradient energy (a 3x3 mean of the gradient magnitude) is larger - MRI sulci
   and grey/white boundaries, CT bone edges, PET/SPECT uptake borders each come
   from the image that has them.
2. *Intensity anchor*: the pixel-wise max of the two sources, so bone and hot
   uptake keep their brightness at every scale coarser than a few pixels.
3. The fused image ``F`` minimises ``lam * |F - M|^2 + |grad F - G|^2``, a screened
   Poisson equation ``(lam - Laplacian) F = lam M - div G`` with mirrored (Neumann)
   borders, solved exactly by one DCT-II per slice (the DCT diagonalises the
   Neumann Laplacian).  ``1/sqrt(lam)`` is the length, in pixels, over which the
   gradients may move the intensities away from the anchor: ~3 px by default.

Everything acts on the last two axes; a stack is one batched transform on NumPy
(``scipy.fft``) or CuPy (``cupyx.scipy.fft``).  No network weights: it needs no
VGG16 (``fusion.api.uses_vgg``).  Its parameters were tuned on every 4th Harvard
pair of each subset and reported on all pairs (docs/fidelity.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fusion.backend import array_module
from fusion.filters import window_mean
from fusion.methods import register
from fusion.methods._common import check_pair_unit, matlab_uint8


@dataclass(frozen=True)
class FaithfulParams:
    """Parameters of :func:`faithful_fuse`; the defaults are the node's (docs/fidelity.md)."""

    #: weight of the intensity anchor against the gradient term; smaller = more detail,
    #: less faithful intensities (0.01 .. 1 tried; docs/fidelity.md)
    lam: float = 0.1
    #: half-size of the window over which gradient energies are compared (3x3 when 1)
    activity_radius: int = 1


def forward_gradient(u: Any) -> tuple[Any, Any]:
    """Forward differences along x and y with a zero last column/row (the Neumann border)."""
    xp = array_module(u)
    gx = xp.zeros_like(u)
    gy = xp.zeros_like(u)
    gx[..., :, :-1] = u[..., :, 1:] - u[..., :, :-1]
    gy[..., :-1, :] = u[..., 1:, :] - u[..., :-1, :]
    return gx, gy


def divergence(gx: Any, gy: Any) -> Any:
    """Backward-difference divergence, the negative adjoint of :func:`forward_gradient`."""
    xp = array_module(gx)
    d = xp.zeros_like(gx)
    d[..., :, 0] += gx[..., :, 0]
    d[..., :, 1:] += gx[..., :, 1:] - gx[..., :, :-1]
    d[..., 0, :] += gy[..., 0, :]
    d[..., 1:, :] += gy[..., 1:, :] - gy[..., :-1, :]
    return d


def _fft_module(xp: Any) -> Any:
    if xp.__name__ == "numpy":
        from scipy import fft

        return fft
    from cupyx.scipy import fft as cufft  # the CuPy twin of scipy.fft

    return cufft


def screened_poisson(anchor: Any, gx: Any, gy: Any, lam: float) -> Any:
    """Solve ``(lam - Laplacian) F = lam * anchor - div(gx, gy)`` with Neumann borders, per slice.

    With ``gx, gy = forward_gradient(anchor)`` the answer is ``anchor`` itself
    (tests/test_fidelity.py checks it), so the solver adds nothing of its own.
    """
    if lam <= 0:
        raise ValueError(f"lam must be positive (it keeps the intensities anchored), got {lam}")
    xp = array_module(anchor)
    fft = _fft_module(xp)
    h, w = anchor.shape[-2:]
    ky = 2.0 - 2.0 * xp.cos(xp.pi * xp.arange(h, dtype=anchor.dtype) / h)
    kx = 2.0 - 2.0 * xp.cos(xp.pi * xp.arange(w, dtype=anchor.dtype) / w)
    denom = lam + ky[:, None] + kx[None, :]
    rhs = lam * anchor - divergence(gx, gy)
    spec = fft.dctn(rhs, type=2, norm="ortho", axes=(-2, -1)) / denom
    return fft.idctn(spec, type=2, norm="ortho", axes=(-2, -1)).astype(anchor.dtype, copy=False)


def faithful_fuse(a: Any, b: Any, params: FaithfulParams = FaithfulParams()) -> Any:
    """Fuse two registered 0..1 images/stacks; float result on 0..1 of their shape."""
    xp, a, b = check_pair_unit(a, b)
    a, b = xp.broadcast_arrays(a, b)
    ax, ay = forward_gradient(a)
    bx, by = forward_gradient(b)
    energy_a = xp.hypot(ax, ay)
    energy_b = xp.hypot(bx, by)
    if params.activity_radius > 0:
        energy_a = window_mean(energy_a, params.activity_radius)
        energy_b = window_mean(energy_b, params.activity_radius)
    from_a = energy_a >= energy_b
    gx = xp.where(from_a, ax, bx)
    gy = xp.where(from_a, ay, by)
    fused = screened_poisson(xp.maximum(a, b), gx, gy, params.lam)
    return xp.clip(fused, 0.0, 1.0)


@register("faithful")
def faithful(a: Any, b: Any, *, quantize: bool = False) -> Any:
    """The registry's entry: :func:`faithful_fuse` with the default parameters."""
    fused = faithful_fuse(a, b)
    return matlab_uint8(fused * 255.0) / 255.0 if quantize else fused
