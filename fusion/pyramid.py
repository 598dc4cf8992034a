"""Gaussian/Laplacian pyramids and the multi-resolution spline blend.

A port of the Burt-Adelson pyramid as used by Mertens' exposure fusion (VIFB
``methods/CNN/pyramid``), exact to the VIFB pyramid code (docs/ports.md, the blend):
5-tap ``[1 4 6 4 1]/16`` filter, symmetric borders when reducing, replicate-pad
plus zero-padded filtering when expanding, and the odd-size crop.  Blending in
a pyramid instead of per pixel is what keeps hard weight maps from leaving
seams (the "spline" of Burt & Adelson 1983).

All functions act on the last two axes; leading axes are a batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from fusion.backend import array_module, ndimage_for

_TAPS = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0


def default_levels(height: int, width: int) -> int:
    """``floor(log2(min(H, W)))`` as in the reference (8 for 256x256)."""
    return max(1, int(math.floor(math.log2(min(height, width)))))


def _filter2(x: Any, mode: str) -> Any:
    xp = array_module(x)
    ndi = ndimage_for(xp)
    taps = xp.asarray(_TAPS, dtype=x.dtype)
    y = ndi.correlate1d(x, taps, axis=-1, mode=mode, cval=0.0)
    return ndi.correlate1d(y, taps, axis=-2, mode=mode, cval=0.0)


def downsample(x: Any) -> Any:
    """Blur with symmetric borders, keep every other row and column."""
    return _filter2(x, "reflect")[..., ::2, ::2]


def upsample(x: Any, odd: tuple[int, int]) -> Any:
    """Expand a coarse level to the size ``2*coarse - odd`` of the finer level."""
    xp = array_module(x)
    pad = [(0, 0)] * (x.ndim - 2) + [(1, 1), (1, 1)]
    p = xp.pad(x, pad, mode="edge")
    r, c = 2 * p.shape[-2], 2 * p.shape[-1]
    up = xp.zeros(p.shape[:-2] + (r, c), dtype=x.dtype)
    up[..., ::2, ::2] = 4 * p
    up = _filter2(up, "constant")
    return up[..., 2 : r - 2 - odd[0], 2 : c - 2 - odd[1]]


def _odd(coarse: Any, fine: Any) -> tuple[int, int]:
    return (2 * coarse.shape[-2] - fine.shape[-2], 2 * coarse.shape[-1] - fine.shape[-1])


def gaussian_pyramid(x: Any, levels: int) -> list[Any]:
    pyr = [x]
    for _ in range(levels - 1):
        pyr.append(downsample(pyr[-1]))
    return pyr


def laplacian_pyramid(x: Any, levels: int) -> list[Any]:
    pyr = []
    j = x
    for _ in range(levels - 1):
        coarse = downsample(j)
        pyr.append(j - upsample(coarse, _odd(coarse, j)))
        j = coarse
    pyr.append(j)
    return pyr


def reconstruct(pyr: Sequence[Any]) -> Any:
    out = pyr[-1]
    for level in reversed(pyr[:-1]):
        out = level + upsample(out, _odd(out, level))
    return out


def blend(images: Any, weights: Any, levels: int | None = None) -> Any:
    """Multi-resolution spline: ``sum_j G_l(W_j) * L_l(I_j)`` per level, then reconstruct.

    ``images`` and ``weights`` have shape ``(K, ..., H, W)``, the K inputs first;
    the weights should sum to 1 over K at every pixel.  Returns ``(..., H, W)``.
    """
    if images.shape != weights.shape:
        raise ValueError(f"images {images.shape} and weights {weights.shape} differ in shape")
    if levels is None:
        levels = default_levels(images.shape[-2], images.shape[-1])
    lap = laplacian_pyramid(images, levels)
    gau = gaussian_pyramid(weights, levels)
    return reconstruct([(g * l).sum(axis=0) for g, l in zip(gau, lap)])
