"""What both evaluators share: reading images as the toolkits do, colour to grey, the Q^AB/F kernel, the suite type."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
from scipy import ndimage as ndi

ImageLike = np.ndarray | str | Path


def round_half_away(x: np.ndarray) -> np.ndarray:
    """MATLAB ``round`` / ``int16()``: halves go away from zero (NumPy rounds them to even)."""
    t = np.trunc(x)
    return t + np.where(np.abs(x - t) >= 0.5, np.sign(x), 0.0)


def load_image(path: str | Path) -> np.ndarray:
    """An 8-bit image file as ``imread``/Pillow gives it: uint8 ``(H, W)`` or ``(H, W, 3)``."""
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in ("1", "L", "LA"):
            return np.asarray(im.convert("L"))
        if im.mode in ("RGB", "RGBA", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
            return np.asarray(im.convert("RGB"))
        raise ValueError(f"{path}: {im.mode} images are not 8-bit; both evaluators score 8-bit images")


def to_uint8_values(x: ImageLike) -> np.ndarray:
    """A path is loaded; an array is taken on 0..255 and rounded to 8 bits, as saving it would."""
    if isinstance(x, (str, Path)):
        return load_image(x)
    x = np.asarray(x)
    if x.ndim == 3 and x.shape[2] == 4:
        x = x[..., :3]
    if x.ndim not in (2, 3) or (x.ndim == 3 and x.shape[2] != 3):
        raise ValueError(f"expected a (H, W) or (H, W, 3) image, got shape {x.shape}")
    if x.dtype == np.uint8:
        return x
    if x.dtype == np.bool_:
        return x.astype(np.uint8) * 255
    x = x.astype(np.float64)
    if np.issubdtype(x.dtype, np.floating) and 0 < np.nanmax(x) <= 1.0:
        raise ValueError("image looks like 0..1 floats; both evaluators score 0..255 (multiply by 255)")
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def rgb2gray_matlab(x: np.ndarray) -> np.ndarray:
    """MATLAB ``rgb2gray`` on uint8 (weights of the NTSC inverse, rounded to uint8)."""
    if x.ndim == 2:
        return x
    w = np.array([0.298936021293775, 0.587043074451121, 0.114020904255103])
    y = x[..., :3].astype(np.float64) @ w
    return np.clip(round_half_away(y), 0, 255).astype(np.uint8)


def gray_cv2(x: np.ndarray) -> np.ndarray:
    """``np.round(cv2.cvtColor(imread(...).astype(float32), COLOR_BGR2GRAY))`` as float32."""
    if x.ndim == 2:
        return np.asarray(x, dtype=np.float32)
    rgb = x[..., :3].astype(np.float32)
    y = rgb[..., 2] * np.float32(0.114) + rgb[..., 1] * np.float32(0.587) + rgb[..., 0] * np.float32(0.299)
    return np.round(y).astype(np.float32)


class MetricSuite:
    """One evaluator: ``suite.EN(f, a, b)`` etc., ``suite(f, a, b)`` for all of them as a dict.

    Every metric takes ``(fused, a, b)``; single-image metrics ignore ``a`` and ``b``.
    ``lower_is_better`` names the metrics where smaller is better.
    """

    def __init__(self, name: str, description: str, metrics: dict[str, Callable[..., float]],
                 lower_is_better: tuple[str, ...] = ()):
        self.name = name
        self.description = description
        self.metrics = dict(metrics)
        self.lower_is_better = frozenset(lower_is_better)
        for key, fn in metrics.items():
            setattr(self, key, fn)

    @property
    def names(self) -> list[str]:
        return list(self.metrics)

    def __call__(self, f: npt.ArrayLike, a: npt.ArrayLike, b: npt.ArrayLike,
                 only: list[str] | None = None) -> dict[str, float]:
        return {k: float(self.metrics[k](f, a, b)) for k in (only or self.metrics)}

    def __repr__(self) -> str:
        return f"<MetricSuite {self.name}: {', '.join(self.metrics)}>"



_QABF = dict(tg=0.9994, kg=-15.0, dg=0.5, ta=0.9879, ka=-22.0, da=0.8)
_H1 = np.array([[1.0, 2, 1], [0, 0, 0], [-1, -2, -1]])   # y
_H3 = np.array([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])   # x


def qabf_gradient(z, conv):
    """Q^AB/F's Sobel magnitude and orientation (``atan(sy/sx)``, pi/2 where ``sx`` is 0)."""
    sx, sy = conv(z, _H3), conv(z, _H1)
    g = np.sqrt(sx * sx + sy * sy)
    a = np.full_like(sx, math.pi / 2)
    nz = sx != 0
    a[nz] = np.arctan(sy[nz] / sx[nz])
    return g, a


def qabf_core(fa, fb, ff, conv):
    """Hong's Xydeas-Petrovic variant; ``conv(img, kernel)`` is conv2 'same'."""
    def grad(z):
        return qabf_gradient(z, conv)

    c = _QABF
    gA, aA = grad(fa)
    gB, aB = grad(fb)
    gF, aF = grad(ff)

    def q(gX, aX):
        G = np.zeros_like(gX)
        gt, eq, lt = gX > gF, gX == gF, gX < gF
        G[gt] = gF[gt] / gX[gt]
        G[eq] = gF[eq]  # the variant's quirk: gF itself, not 1
        G[lt] = gX[lt] / gF[lt]
        A = 1 - np.abs(aX - aF) / (math.pi / 2)
        return c["tg"] / (1 + np.exp(c["kg"] * (G - c["dg"]))) * c["ta"] / (1 + np.exp(c["ka"] * (A - c["da"])))

    qa, qb = q(gA, aA), q(gB, aB)
    return (qa * gA + qb * gB).sum() / (gA + gB).sum()


def conv_same_zero(z, k):
    return ndi.convolve(z, k, mode="constant")

