"""Labelled montages: the picture a radiologist looks at instead of a table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from fusion.backend import to_numpy

if TYPE_CHECKING:
    from PIL import Image, ImageFont


def _as_rgb8(img: object) -> np.ndarray:
    arr = to_numpy(img)
    if arr.dtype != np.uint8:
        arr = np.clip(np.floor(arr.astype(np.float64) * 255 + 0.5), 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    return arr


def _font(size: int = 12) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled scalable font (readable spacing); its old bitmap font where FreeType is missing."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def montage(rows: Sequence[Sequence[object]], labels: Sequence[Sequence[str]] | None = None, pad: int = 4, label_h: int = 14) -> Image.Image:
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
                draw.text((x0 + 2, y0 + 1), str(labels[r][c]), fill=(235, 235, 235), font=_font(11))
            oy = y0 + label_h + (cell_h - tile.shape[0]) // 2
            ox = x0 + (cell_w - tile.shape[1]) // 2
            canvas.paste(Image.fromarray(tile), (ox, oy))
    return canvas


def display_range(volume: np.ndarray, low: float = 1.0, high: float = 99.5) -> np.ndarray:
    """``volume`` scaled to 0..1 between two percentiles of its values above its minimum (padding and air ignored).

    A display window for looking at alignment, not a diagnostic one: edges of
    bone, skin and ventricles should be visible in any modality.
    """
    arr = np.asarray(to_numpy(volume), dtype=np.float32)
    finite = arr[np.isfinite(arr)]
    above = finite[finite > finite.min()] if finite.size else finite
    if above.size < 16:
        return np.zeros_like(arr)
    lo, hi = np.percentile(above[:: max(1, above.size // 2_000_000)], (low, high))
    if not hi > lo:  # a flat object (e.g. a mask): show it against the background
        lo = float(finite.min())
    if not hi > lo:
        return np.zeros_like(arr)
    return np.clip((arr - np.float32(lo)) / np.float32(max(hi - lo, 1e-12)), 0.0, 1.0)


def checkerboard(a: np.ndarray, b: np.ndarray, tiles: int = 8) -> np.ndarray:
    """``a`` and ``b`` (same shape, 2-D, 0..1) alternating in a ``tiles`` x ``tiles`` board.

    The classic registration check: a misalignment shows as edges that jump
    at the tile borders.
    """
    h, w = a.shape[:2]
    yy = (np.arange(h) * tiles // max(h, 1))[:, None]
    xx = (np.arange(w) * tiles // max(w, 1))[None, :]
    mask = (yy + xx) % 2 == 0
    return np.where(mask, a, b)


def _physical(img: np.ndarray, row_mm: float, col_mm: float) -> np.ndarray:
    """A 2-D slice resized (nearest) so one pixel is the same size in both directions, at most 256 px high."""
    h, w = img.shape
    px = min(row_mm, col_mm)
    out_h, out_w = max(1, round(h * row_mm / px)), max(1, round(w * col_mm / px))
    scale = min(1.0, 256.0 / max(out_h, out_w))
    out_h, out_w = max(1, round(out_h * scale)), max(1, round(out_w * scale))
    rows = np.minimum((np.arange(out_h) * h / out_h).astype(int), h - 1)
    cols = np.minimum((np.arange(out_w) * w / out_w).astype(int), w - 1)
    return img[rows][:, cols]


def registration_sheet(base: np.ndarray, before: np.ndarray, after: np.ndarray,
                       spacing_zyx: Sequence[float], names: tuple[str, str] = ("base", "overlay"),
                       title: str = "") -> Image.Image:
    """Orthogonal slices through the base's centre: base, overlay before and after registration, and checkerboards.

    ``base``, ``before`` and ``after`` are ``(z, y, x)`` volumes on the base grid
    (``before``: the overlay as the scanners placed it; ``after``: registered),
    0..1 for display (see :func:`display_range`).  One row per view (axial,
    coronal, sagittal, in physical proportions; head up in the coronal and
    sagittal views when the base is an axial series).  Returns a ``PIL.Image``.
    """
    from PIL import ImageDraw

    dz, dy, dx = (float(s) for s in spacing_zyx)
    z, y, x = (n // 2 for n in base.shape)
    views = (("axial", lambda v: v[z], dy, dx),
             ("coronal", lambda v: v[::-1, y, :], dz, dx),
             ("sagittal", lambda v: v[::-1, :, x], dz, dy))
    a, o = names
    rows, labels = [], []
    for view, cut, row_mm, col_mm in views:
        b0, o0, o1 = (_physical(cut(v), row_mm, col_mm) for v in (base, before, after))
        rows.append([b0, o0, checkerboard(b0, o0), o1, checkerboard(b0, o1)])
        labels.append([f"{a} {view}", f"{o} as acquired", "checkerboard before", f"{o} registered",
                       "checkerboard after"])
    sheet = montage(rows, labels)
    if title:
        from PIL import Image

        out = Image.new("RGB", (sheet.width, sheet.height + 18), (24, 24, 24))
        out.paste(sheet, (0, 18))
        ImageDraw.Draw(out).text((6, 3), title, fill=(235, 235, 235), font=_font(12))
        sheet = out
    return sheet
