"""Labelled montages: the picture a radiologist looks at instead of a table."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fusion.backend import to_numpy


def _as_rgb8(img) -> np.ndarray:
    arr = to_numpy(img)
    if arr.dtype != np.uint8:
        arr = np.clip(np.floor(arr.astype(np.float64) * 255 + 0.5), 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    return arr


def montage(rows: Sequence[Sequence[object]], labels: Sequence[Sequence[str]] | None = None, pad: int = 4, label_h: int = 14):
    """A grid of images (grey or RGB, 0..1 floats or uint8) with a caption above each.

    Returns a ``PIL.Image``; tiles of different sizes are centred in cells of the
    largest size.
    """
    from PIL import Image, ImageDraw

    tiles = [[_as_rgb8(im) for im in row] for row in rows]
    cell_h = max(t.shape[0] for row in tiles for t in row)
    cell_w = max(t.shape[1] for row in tiles for t in row)
    ncols = max(len(row) for row in tiles)
    width = ncols * (cell_w + pad) + pad
    height = len(tiles) * (cell_h + label_h + pad) + pad
    canvas = Image.new("RGB", (width, height), (24, 24, 24))
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            x0 = pad + c * (cell_w + pad)
            y0 = pad + r * (cell_h + label_h + pad)
            if labels is not None:
                draw.text((x0 + 2, y0 + 1), str(labels[r][c]), fill=(235, 235, 235))
            oy = y0 + label_h + (cell_h - tile.shape[0]) // 2
            ox = x0 + (cell_w - tile.shape[1]) // 2
            canvas.paste(Image.fromarray(tile), (ox, oy))
    return canvas
