"""ADF: anisotropic diffusion + Karhunen-Loeve fusion.

Bavirisetti & Dhuli, "Fusion of infrared and visible sensor images based on
anisotropic diffusion and Karhunen-Loeve transform", IEEE Sensors J. 16(1), 2016.
Ported number for number from VIFB's ``run_ADF.m`` / ``anisodiff2D.m`` (VIFB snapshot 22b2ea9; docs/ports.md,
row ADF), so that ``quantize=True`` reproduces VIFB's published outputs.
"""

from __future__ import annotations

import math
from typing import Any

from fusion.backend import array_module
from fusion.methods import register
from fusion.methods._common import finish, pca_detail_weights, prepare_pair

NUM_ITER = 10
DELTA_T = 0.15
KAPPA = 30.0

# The 8-neighbour stencil of anisodiff2D: (row offset, column offset, 1/distance^2).
# MATLAB computes the diagonal factor as 1/(sqrt(2)^2), which is not exactly 0.5.
_DIAG = 1.0 / (math.sqrt(2.0) ** 2)
_NEIGHBOURS = (
    (-1, 0, 1.0), (1, 0, 1.0), (0, -1, 1.0), (0, 1, 1.0),
    (-1, 1, _DIAG), (1, 1, _DIAG), (1, -1, _DIAG), (-1, -1, _DIAG),
)


def anisodiff(im: Any, num_iter: int = NUM_ITER, delta_t: float = DELTA_T,
              kappa: float = KAPPA) -> Any:
    """Perona-Malik diffusion (conduction option 1, ``exp(-(grad/kappa)^2)``) of an image or stack.

    ``anisodiff2D`` takes its neighbour differences with ``imfilter(., 'conv')``,
    whose default boundary is zero padding: pixels outside the image count as 0, so
    bright borders diffuse towards black.  That is part of the reference behaviour
    and is kept (zero padding on the last two axes only; slices stay independent).
    """
    xp = array_module(im)
    pad = [(0, 0)] * (im.ndim - 2) + [(1, 1), (1, 1)]
    h, w = im.shape[-2:]
    inv_k = 1.0 / kappa
    diff = im
    for _ in range(num_iter):
        padded = xp.pad(diff, pad, mode="constant")
        update = xp.zeros_like(diff)
        for dy, dx, weight in _NEIGHBOURS:
            nabla = padded[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w] - diff
            c = xp.exp(-((nabla * inv_k) ** 2))
            update += weight * (c * nabla)
        diff = diff + delta_t * update
    return diff


@register("adf")
def adf(a: Any, b: Any, *, quantize: bool = False) -> Any:
    """Fuse ``a`` (anatomical, VIFB "VI") and ``b`` (other modality, VIFB "IR") with ADF.

    Each source is split into an anisotropic-diffusion base and a detail residual; details
    are combined with the per-slice principal-component weights of their covariance,
    bases are averaged.  VIFB calls ``ADF(IR, VI)``, so ``b`` is the first image and
    ``a`` the second, which fixes the tie-break of the PCA weights exactly as in MATLAB.
    There are no internal uint8 steps; ``quantize`` only rounds the result.
    """
    _, va, ir = prepare_pair(a, b)
    i1, i2 = ir, va
    a1 = anisodiff(i1)
    a2 = anisodiff(i2)
    d1 = i1 - a1
    d2 = i2 - a2
    p1, p2 = pca_detail_weights(d1, d2)
    fused = (p1 * d1 + p2 * d2) + (0.5 * a1 + 0.5 * a2)
    return finish(fused, quantize=quantize)

