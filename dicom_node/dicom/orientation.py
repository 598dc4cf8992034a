"""Header evidence about left and right: is a series' orientation self-consistent, do the two series agree?

The image-based mirror test (``fusion.registration.mirror``) cannot see a
flip of symmetric anatomy.  These checks read what the headers say and
report every inconsistency as a *doubt* (one sentence each, for the operator);
the pipeline treats a doubt like a registration outside its limits
(``on_poor_quality``: fail the job, or send it marked ``CHECK REG``).

Checked per series (on every slice header, stopping at the first bad one):

- **Image Orientation (Patient)**: six finite numbers, row and column cosines of
  unit length and orthogonal (within :data:`COSINE_TOL`); the direction matrix
  ``[row, column, row x column]`` has determinant +1 — a right-handed frame.  A
  non-orthonormal orientation is a corrupt or hand-edited header; its
  "normal" and so its left and right are undefined.
- **Patient Position vs Image Orientation** for axial series (slice normal
  within 30 deg of the patient's head-foot axis): scanners write the row
  cosine towards the patient's left (+x) or right (-x) and the column cosine
  towards posterior (+y) or anterior (-y) in one of two ways: in the scanner's
  own frame (head first supine: ``+x, +y``; feet first supine: ``-x, +y``;
  head first prone: ``-x, -y``; feet first prone: ``+x, -y``) or reoriented to
  the radiological display (``+x, +y`` for every position, common on MR).  An
  axial orientation that is neither for the recorded position — e.g. a head
  first supine CT whose rows run towards the patient's right — means one of
  the two attributes is wrong, and with it left and right.  Decubitus positions
  and non-axial series are not checked (no fixed convention).

Checked between the two series:

- **Laterality** (0020,0060), **Image Laterality** (0020,0062) and **Frame
  Laterality** (0020,9072, enhanced objects): a base marked L and an overlay
  marked R (or the reverse) are images of different sides; B (both) and U
  (unpaired) never conflict.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset

#: tolerance of the unit length and orthogonality of the orientation cosines
COSINE_TOL = 1e-3
#: axial: slice normal within this angle (degrees) of the head-foot axis
AXIAL_DEG = 30.0

#: Patient Position -> the axial (row x sign, column y sign) a scanner writes in its own frame
_SCANNER_FRAME = {"HFS": (1, 1), "FFS": (-1, 1), "HFP": (-1, -1), "FFP": (1, -1)}
#: the radiological display orientation (patient's left on the right of the screen, anterior up)
_DISPLAY = (1, 1)


def _orientation(ds: Dataset) -> np.ndarray | None:
    iop = ds.get("ImageOrientationPatient")
    if iop is None:
        seq = ds.get("SharedFunctionalGroupsSequence")
        if seq:
            plane = seq[0].get("PlaneOrientationSequence")
            if plane:
                iop = plane[0].get("ImageOrientationPatient")
    if iop is None:
        return None
    try:
        v = np.asarray([float(x) for x in iop], dtype=float)
    except (TypeError, ValueError):
        return np.full(6, np.nan)
    return v


def orientation_doubts(headers: Sequence[Dataset], name: str) -> list[str]:
    """Inconsistencies of one series' orientation headers (empty: none); ``name`` labels the sentences."""
    out: list[str] = []
    for ds in headers:
        v = _orientation(ds)
        if v is None:
            continue
        if v.size != 6 or not np.all(np.isfinite(v)):
            out.append(f"the {name}'s Image Orientation (Patient) is not six numbers")
            break
        row, col = v[:3], v[3:]
        if abs(np.linalg.norm(row) - 1) > COSINE_TOL or abs(np.linalg.norm(col) - 1) > COSINE_TOL \
                or abs(float(row @ col)) > COSINE_TOL:
            out.append(f"the {name}'s Image Orientation (Patient) {np.round(v, 4).tolist()} is not two orthogonal "
                       "unit vectors: its left and right are undefined (a corrupt or edited header)")
            break
        frame = np.column_stack([row, col, np.cross(row, col)])
        det = float(np.linalg.det(frame))
        if det < 1 - 10 * COSINE_TOL:  # cannot happen for row x col; kept as the handedness statement
            out.append(f"the {name}'s orientation frame is left-handed (determinant {det:.3f})")
            break
    if out or not headers:
        return out
    first = headers[0]
    v = _orientation(first)
    position = str(first.get("PatientPosition", "") or "").strip().upper()
    if v is None or position not in _SCANNER_FRAME:
        return out
    row, col = v[:3], v[3:]
    normal = np.cross(row, col)
    if abs(normal[2]) < np.cos(np.radians(AXIAL_DEG)):
        return out
    # axial: the in-plane axes should be close to +-x and +-y
    if abs(row[0]) < 0.7 or abs(col[1]) < 0.7:
        return out  # rotated far in plane: no convention to compare with
    signs = (int(np.sign(row[0])), int(np.sign(col[1])))
    if signs not in (_SCANNER_FRAME[position], _DISPLAY):
        names = {1: ("left", "posterior"), -1: ("right", "anterior")}
        out.append(f"the {name} is recorded as Patient Position {position} but its rows run towards the patient's "
                   f"{names[signs[0]][0]} and its columns towards {names[signs[1]][1]}, which no scanner writes "
                   f"for {position}: the position or the orientation header is wrong, and with it left and right")
    return out


def _laterality(headers: Sequence[Dataset]) -> str | None:
    for ds in headers[:1]:
        for kw in ("ImageLaterality", "Laterality", "FrameLaterality"):
            v = str(ds.get(kw, "") or "").strip().upper()
            if v in ("L", "R"):
                return v
        seq = ds.get("SharedFunctionalGroupsSequence")
        if seq:
            anat = seq[0].get("FrameAnatomySequence")
            if anat:
                v = str(anat[0].get("FrameLaterality", "") or "").strip().upper()
                if v in ("L", "R"):
                    return v
    return None


def header_doubts(base: Sequence[Dataset], overlay: Sequence[Dataset]) -> list[str]:
    """Every header inconsistency about left and right in either series or between them (see the module notes)."""
    out = orientation_doubts(base, "base") + orientation_doubts(overlay, "overlay")
    lb, lo = _laterality(base), _laterality(overlay)
    if lb and lo and lb != lo:
        out.append(f"the base is marked laterality {lb} and the overlay {lo}: images of different sides")
    return out
