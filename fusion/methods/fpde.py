"""FPDE: fourth-order PDE decomposition + Karhunen-Loeve fusion.

Bavirisetti, Xiao & Liu, "Multi-sensor image fusion based on fourth order partial
differential equations", 20th Int. Conf. on Information Fusion (FUSION), 2017.
Ported number for number from VIFB's ``run_FPDE.m`` / ``fpdepyou.m`` (VIFB snapshot 22b2ea9; docs/ports.md,
row FPDE), so that ``quantize=True`` reproduces VIFB's published outputs.
"""

from __future__ import annotations

from typing import Any

from fusion.backend import array_module
from fusion.methods import register
from fusion.methods._common import finish, matlab_uint8, pca_detail_weights, prepare_pair

NUM_ITER = 15
DT = 0.9
K = 4.0


def fourth_order_diffusion(im: Any, num_iter: int = NUM_ITER, dt: float = DT,
                           k: float = K) -> Any:
    """``fpdepyou`` before its final ``uint8``: You-Kaveh fourth-order diffusion.

    Every derivative is MATLAB ``gradient`` (central differences inside, one-sided at
    the borders), which is ``xp.gradient`` with ``edge_order=1``; x is the column axis
    (-1) and y the row axis (-2), applied to all slices of a stack at once.
    """
    xp = array_module(im)
    inv_k = 1.0 / k
    cur = im
    for _ in range(num_iter):
        ix = xp.gradient(cur, axis=-1)
        iy = xp.gradient(cur, axis=-2)
        ixx = xp.gradient(ix, axis=-1)
        iyy = xp.gradient(iy, axis=-2)
        c = 1.0 / (1.0 + (xp.sqrt(ixx * ixx + iyy * iyy) * inv_k) ** 2)
        div11 = xp.gradient(xp.gradient(c * ixx, axis=-1), axis=-1)
        div22 = xp.gradient(xp.gradient(c * iyy, axis=-2), axis=-2)
        cur = cur - dt * (div11 + div22)
    return cur


@register("fpde")
def fpde(a: Any, b: Any, *, quantize: bool = False) -> Any:
    """Fuse ``a`` (anatomical, VIFB "VI") and ``b`` (other modality, VIFB "IR") with FPDE.

    VIFB calls ``FPDE(IR, VI)``; ``b`` is the first image, ``a`` the second.  In the
    reference the base layers are ``uint8`` (``frth = uint8(I1)``), so the details are
    taken against the rounded base and the base average ``0.5*A1 + 0.5*A2`` is uint8
    arithmetic: each half is rounded half away from zero and the sum saturates at 255.
    ``quantize=True`` reproduces that; ``quantize=False`` keeps the bases as floats,
    only saturated to 0..255, and averages them exactly.
    """
    xp, va, ir = prepare_pair(a, b)
    i1, i2 = ir, va
    t1 = fourth_order_diffusion(i1)
    t2 = fourth_order_diffusion(i2)
    if quantize:
        a1 = matlab_uint8(t1)
        a2 = matlab_uint8(t2)
        base = xp.minimum(matlab_uint8(0.5 * a1) + matlab_uint8(0.5 * a2), 255.0)
    else:
        a1 = xp.clip(t1, 0.0, 255.0)
        a2 = xp.clip(t2, 0.0, 255.0)
        base = 0.5 * a1 + 0.5 * a2
    d1 = i1 - a1
    d2 = i2 - a2
    p1, p2 = pca_detail_weights(d1, d2)
    fused = (p1 * d1 + p2 * d2) + base
    return finish(fused, quantize=quantize)
