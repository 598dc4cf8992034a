"""Sample image pairs for the demo and the benchmarks.

The real Harvard pairs live in ``../shared/data/harvard`` beside a checkout; a
machine without them still gets a demo from a generated head-like phantom, so
the first command a new user runs never depends on outside data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HARVARD_SUBSETS = {"MRI_CT": "CT", "MRI_PET": "PET", "MRI_SPECT": "SPECT"}


def shared_dir() -> Path:
    """``$FUSION_SHARED_DIR``, else the ``shared`` folder beside the repository."""
    env = os.environ.get("FUSION_SHARED_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared"


@dataclass(frozen=True)
class SamplePair:
    name: str
    subset: str  #: MRI_CT, MRI_PET, MRI_SPECT or SYNTHETIC
    mri: Path | None
    other: Path | None


def harvard_pairs(root: Path | None = None, subset: str | None = None) -> list[SamplePair]:
    """All pre-registered Harvard pairs (MRI file, other-modality file), by subset and name."""
    base = (root or shared_dir() / "data") / "harvard"
    pairs = []
    for sub, other in HARVARD_SUBSETS.items():
        if subset and sub != subset:
            continue
        mri_dir, other_dir = base / sub / "MRI", base / sub / other
        if not mri_dir.is_dir():
            continue
        for f in sorted(mri_dir.iterdir(), key=lambda p: (len(p.stem), p.stem)):
            partner = other_dir / f.name
            if partner.exists():
                pairs.append(SamplePair(f.stem, sub, f, partner))
    return pairs


def load_image(path: Path) -> np.ndarray:
    """PNG/JPEG as uint8 (grey ``(H, W)`` or RGB ``(H, W, 3)``), or a ``.npy`` array."""
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


def synthetic_pair(size: int = 256, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """A head-like phantom: an MR-like slice (soft-tissue contrast) and a CT-like one (bright skull).

    Both are uint8 ``(size, size)`` and exactly aligned.  The CT-like image has a
    saturated skull and a black background - the regions that trap naive DMF weights.
    """
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]

    def ellipse(cx, cy, rx, ry):
        return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1

    head = ellipse(0, 0, 0.80, 0.92)
    brain = ellipse(0, 0.02, 0.70, 0.82)
    ventricles = ellipse(-0.12, -0.05, 0.08, 0.22) | ellipse(0.12, -0.05, 0.08, 0.22)
    lesion = ellipse(0.35, 0.3, 0.10, 0.08)
    grey = brain & ~ellipse(0, 0.02, 0.6, 0.72)

    mr = np.zeros((size, size))
    mr[head] = 0.35  # scalp/skull: dark-ish on T2-like MR
    mr[brain] = 0.55
    mr[grey] = 0.70
    mr[ventricles] = 0.95
    mr[lesion] = 0.85
    mr += 0.03 * np.sin(12 * x) * np.cos(9 * y) * brain  # gyral texture
    mr += rng.normal(0, 0.015, mr.shape) * head

    ct = np.zeros((size, size))
    ct[head] = 1.0  # skull, saturated
    ct[brain] = 0.30
    ct[ventricles] = 0.18
    ct[lesion] = 0.42
    ct[ellipse(-0.4, -0.5, 0.05, 0.05)] = 1.0  # calcification
    ct += rng.normal(0, 0.01, ct.shape) * brain
    to8 = lambda im: np.clip(np.round(im * 255), 0, 255).astype(np.uint8)  # noqa: E731
    return to8(mr), to8(ct)
