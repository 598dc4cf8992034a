"""What a reader will see of a windowed CT: how much of the body a window saturates.

A CT window is a choice of what to show; one that whites out (or blacks out)
most of the body shows almost nothing of it — a lung window on a head, a bone
window's centre typed as the width, a header window meant for another
reconstruction.  The fused series inherits that, so the node warns (job
result, log) instead of sending such a picture silently.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: voxels above this (HU) are body: air (-1000) and the padding outside the reconstruction circle are not
BODY_MIN_HU = -500.0


@dataclass(frozen=True)
class WindowSaturation:
    #: share of the body voxels at or above the top of the window (shown white)
    white: float
    #: share of the body voxels at or below the bottom of the window (shown black)
    black: float
    body_voxels: int

    def worst(self) -> tuple[str, float]:
        return ("white", self.white) if self.white >= self.black else ("black", self.black)


def window_saturation(hu: np.ndarray, centre: float, width: float, body_min_hu: float = BODY_MIN_HU) -> WindowSaturation:
    """Shares of the body (``hu > body_min_hu``) the LINEAR window ``(centre, width)`` shows white or black.

    The window's bottom and top are ``centre - width / 2`` and ``centre + width / 2``
    (PS3.3 C.11.2.1.2 LINEAR, to within the half-unit the standard's formula adds).
    """
    a = np.asarray(hu)
    body = a > body_min_hu
    n = int(np.count_nonzero(body))
    if n == 0:
        return WindowSaturation(0.0, 0.0, 0)
    v = a[body]
    lo, hi = centre - width / 2.0, centre + width / 2.0
    return WindowSaturation(float(np.count_nonzero(v >= hi)) / n, float(np.count_nonzero(v <= lo)) / n, n)
