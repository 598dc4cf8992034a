"""Image files to arrays and back, for the command line, the demo and the benchmarks (the node reads DICOM instead)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def read_image(path: Path) -> np.ndarray:
    """PNG/JPEG as uint8 (grey ``(H, W)`` or RGB ``(H, W, 3)``), or a ``.npy`` array.

    An RGB file whose three channels are equal is returned grey: many grey
    images are saved as RGB, and a grey overlay must not be fused as colour.
    """
    path = Path(path)
    if path.suffix.lower() == ".npy":
        return np.load(path, allow_pickle=False)
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr"):
            arr = np.asarray(im.convert("RGB"))
            if np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2]):
                return arr[..., 0].copy()  # grey stored as RGB
            return arr
        if im.mode in ("I;16", "I;16B", "I"):
            return np.asarray(im)
        return np.asarray(im.convert("L"))


def write_image(path: Path, img: np.ndarray) -> None:
    """``.npy`` keeps float32 0..1; anything else is saved as an 8-bit image (rounded, saturated)."""
    from fusion.intensity import to_uint8

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".npy":
        np.save(path, np.asarray(img, dtype=np.float32))
        return
    from PIL import Image

    Image.fromarray(to_uint8(np.asarray(img, dtype=np.float32))).save(path)
