"""The DICOM standard colour palettes (PS3.6 Annex B) for PET/NM on the fused series.

A reader knows these palettes from every workstation: Hot Iron (black - red -
yellow - white) and PET (black - blue - purple - red - yellow - white).  The
lookup tables come from pydicom's copies of the standard Palette Color Lookup
Table instances (:func:`pydicom.pixels.apply_color_lut`), 256 entries of
8 bits each: a value ``v`` on 0..1 becomes entry ``round(255 v)``, exactly
what a workstation shows for the stored value ``round(255 v)``.
"""

from __future__ import annotations

import functools
from typing import Literal

import numpy as np

#: pipeline key value -> the palette's SOP Instance UID (PS3.6 Annex A, Well-known SOP Instances)
PALETTE_UIDS: dict[str, str] = {"hot_iron": "1.2.840.10008.1.5.1", "pet": "1.2.840.10008.1.5.2"}
#: the palettes' names as PS3.6 Annex B titles them (for Derivation Description and the docs)
PALETTE_NAMES: dict[str, str] = {"hot_iron": "Hot Iron", "pet": "PET"}

Palette = Literal["hot_iron", "pet"]


@functools.cache
def palette_lut(palette: str) -> np.ndarray:
    """(256, 3) float32 on 0..1: the standard palette's red, green and blue entries."""
    from pydicom.pixels import apply_color_lut
    from pydicom.uid import UID

    if palette not in PALETTE_UIDS:
        raise ValueError(f"unknown palette {palette!r}; available: {', '.join(PALETTE_UIDS)}")
    lut = apply_color_lut(np.arange(256, dtype=np.uint8), palette=UID(PALETTE_UIDS[palette]))
    out = np.asarray(lut, dtype=np.float32) / 255.0
    out.setflags(write=False)
    return out


def colourise(grey: np.ndarray, palette: str = "hot_iron") -> np.ndarray:
    """Values on 0..1 (any shape) to RGB on 0..1 through the standard ``palette`` (a trailing axis of 3)."""
    idx = np.clip(np.rint(np.asarray(grey, dtype=np.float32) * 255.0), 0, 255).astype(np.intp)
    return palette_lut(palette)[idx]
