"""A DICOM series as one SimpleITK volume with its patient geometry checked.

``load_series`` reads the headers of every file first (no pixel data), checks
that the slices form one regular Cartesian grid, and only then decodes pixels.
Anything that would make the volume's geometry a guess is refused with a
:class:`GeometryError` whose message says what is wrong and what to do:

- mixed orientations, image sizes or pixel spacings (several series or stacks
  sent under one Series Instance UID),
- gantry tilt (slice positions not along the slice normal by more than
  :data:`TILT_TOLERANCE_DEG`),
- irregular spacing and missing slices (a gap differing from the median gap by
  more than ``SPACING_ATOL_MM + SPACING_RTOL * median``), duplicate positions,
- fewer than two slices, colour images, frames without position/orientation.

Geometry (DICOM patient coordinates = ITK's LPS, millimetres):

- slices are sorted by the projection of Image Position (Patient) on the slice
  normal ``n = row_cosine x column_cosine`` — never by file name or Instance
  Number, which scanners do not order consistently;
- ``origin`` = IPP of the first slice in that order, ``spacing`` = (column
  spacing, row spacing, slice step) with the step the mean of the gaps (equal to
  every gap within the tolerance above), ``direction`` = the columns
  ``[row_cosine, column_cosine, n]`` (a proper rotation; z grows along n).

Values: Rescale Slope/Intercept are applied per slice (PET often has one slope
per slice), so CT is in HU.  PET with the headers needed (Units BQML,
DecayCorrection START, weight, dose, half-life, injection time) is converted to
body-weight SUV with :func:`fusion.intensity.suv_bw_factor`; otherwise it stays
in its stored units and :attr:`Volume.notes` says why.

Enhanced (multi-frame) objects are supported when the series is one such file
with a Plane Position and Plane Orientation for every frame (per-frame or
shared functional groups); each frame is then one slice.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from dicom_node.errors import NodeError
from fusion.intensity import suv_bw_factor

#: Largest angle between the slice-position line and the slice normal accepted (degrees).
TILT_TOLERANCE_DEG = 0.5
#: A slice gap may differ from the median gap by SPACING_ATOL_MM + SPACING_RTOL * median.
SPACING_RTOL = 0.01
SPACING_ATOL_MM = 0.01
#: Two slices closer than this along the normal are the same position.
DUPLICATE_TOL_MM = 1e-3
#: Orientation cosines of two slices differing by more than this are different orientations.
ORIENTATION_TOL = 1e-4
#: Relative difference of PixelSpacing values treated as equal.
PIXEL_SPACING_RTOL = 1e-4


class GeometryError(NodeError, ValueError):
    """The files do not form one regular volume; the message says what and what to do."""


@dataclass(frozen=True)
class Volume:
    """One series as a float32 LPS volume plus its sorted headers."""

    image: sitk.Image
    #: one header per z index (read without pixel data), in the volume's z order;
    #: for an enhanced multi-frame object every entry is that one dataset
    headers: list[Dataset]
    modality: str
    frame_of_reference_uid: str
    series_uid: str
    study_uid: str
    #: 'HU' (CT), 'SUVbw' (PET converted) or 'raw' (stored values after rescale)
    units: str
    #: files in the same order as ``headers``
    paths: tuple[Path, ...] = ()
    #: frame number (0-based) of each z index for a multi-frame object, else empty
    frames: tuple[int, ...] = ()
    #: remarks for the log: why PET stayed raw, etc.
    notes: tuple[str, ...] = ()
    #: the factor applied to PET values to get SUVbw, when it was
    suv_factor: float | None = None

    @property
    def size(self) -> tuple[int, int, int]:
        """(columns, rows, slices) — SimpleITK's (x, y, z) order."""
        return tuple(self.image.GetSize())

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(self.image.GetSpacing())

    def array(self) -> np.ndarray:
        """The voxels as a ``(slices, rows, columns)`` float32 array (a copy)."""
        return sitk.GetArrayFromImage(self.image)

    def header_window(self) -> tuple[float, float] | None:
        """The first (Window Center, Window Width) of the middle slice's header, if any."""
        ds = self.headers[len(self.headers) // 2]
        c, w = ds.get("WindowCenter"), ds.get("WindowWidth")
        if c is None or w is None:
            voi = _functional_item(ds, "FrameVOILUTSequence", self.frames[len(self.frames) // 2] if self.frames else None)
            if voi is None:
                return None
            c, w = voi.get("WindowCenter"), voi.get("WindowWidth")
            if c is None or w is None:
                return None
        c = c[0] if isinstance(c, MultiValue) else c
        w = w[0] if isinstance(w, MultiValue) else w
        return float(c), float(w)


@dataclass
class _Slice:
    """What the geometry check needs of one slice (a file, or a frame of one)."""

    path: Path
    header: Dataset
    frame: int | None
    ipp: np.ndarray
    iop: np.ndarray
    rows: int
    columns: int
    pixel_spacing: tuple[float, float]
    slope: float
    intercept: float
    position: float = 0.0  # projection on the normal, filled in later
    extra: dict[str, Any] = field(default_factory=dict)


def load_series(paths: Sequence[Path | str]) -> Volume:
    """Read the DICOM files of one series into a :class:`Volume` (see the module notes)."""
    files = [Path(p) for p in paths]
    if not files:
        raise GeometryError("no files given: a volume needs at least 2 slices of one series")
    headers: list[Dataset] = []
    for p in files:
        try:
            headers.append(pydicom.dcmread(p, stop_before_pixels=True))
        except Exception as exc:  # InvalidDicomError, OSError: name the file
            raise GeometryError(f"{p}: not a readable DICOM file ({exc})") from exc
    _check_one_series(files, headers)
    slices = _slices(files, headers)
    if len(slices) < 2:
        raise GeometryError(
            f"the series has {len(slices)} slice(s); a volume needs at least 2 "
            "(a single image, scout or screenshot cannot be registered)"
        )
    row, col, normal = _check_common_geometry(slices)
    slices = _sort_and_check_positions(slices, normal)

    first = headers[0]
    modality = str(first.get("Modality", "OT")).upper()
    stack = _read_pixels(slices)

    units = "raw"
    notes: tuple[str, ...] = ()
    factor: float | None = None
    if modality == "CT":
        units = "HU"
    elif modality == "PT":
        factor, reason = _suv_factor(slices)
        if factor is not None:
            stack *= np.float32(factor)
            units = "SUVbw"
        else:
            notes = (f"PET values left in stored units ({first.get('Units', 'unknown')}): {reason}",)

    step = (slices[-1].position - slices[0].position) / (len(slices) - 1)
    ps_row, ps_col = slices[0].pixel_spacing
    img = sitk.GetImageFromArray(stack, isVector=False)
    img.SetOrigin(tuple(float(v) for v in slices[0].ipp))
    img.SetSpacing((float(ps_col), float(ps_row), float(step)))
    img.SetDirection(tuple(float(v) for v in np.column_stack([row, col, normal]).ravel()))
    multi = slices[0].frame is not None
    return Volume(
        image=img,
        headers=[s.header for s in slices],
        modality=modality,
        frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "")),
        series_uid=str(first.get("SeriesInstanceUID", "")),
        study_uid=str(first.get("StudyInstanceUID", "")),
        units=units,
        paths=tuple(s.path for s in slices),
        # multi: every slice is a frame of the one enhanced object (_frames_of), so none is skipped
        frames=tuple(s.frame for s in slices if s.frame is not None) if multi else (),
        notes=notes,
        suv_factor=factor,
    )


# ---------------------------------------------------------------------------
# headers -> slices
# ---------------------------------------------------------------------------


def _check_one_series(paths: list[Path], headers: list[Dataset]) -> None:
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in headers}
    if len(series) > 1:
        raise GeometryError(
            f"the files belong to {len(series)} different series ({', '.join(sorted(series))}); "
            "load one Series Instance UID at a time"
        )
    frames = {str(ds.get("FrameOfReferenceUID", "")) for ds in headers}
    if len(frames) > 1:
        raise GeometryError(
            f"one series with {len(frames)} Frame of Reference UIDs: its slices are not in one "
            "patient coordinate system; ask the modality to resend or split the series"
        )
    for p, ds in zip(paths, headers):
        if int(ds.get("SamplesPerPixel", 1)) != 1:
            raise GeometryError(
                f"{p.name}: colour image (SamplesPerPixel {ds.SamplesPerPixel}, "
                f"{ds.get('PhotometricInterpretation', '?')}); only greyscale volumes can be registered"
            )
    multi = [ds for ds in headers if int(ds.get("NumberOfFrames", 1) or 1) > 1 or "PerFrameFunctionalGroupsSequence" in ds]
    if multi and len(headers) > 1:
        raise GeometryError(
            f"{len(multi)} multi-frame object(s) mixed with {len(headers) - len(multi)} other file(s) in one series; "
            "multi-frame series are supported as a single enhanced object only (not supported yet otherwise)"
        )


def _functional_item(ds: Dataset, sequence: str, frame: int | None) -> Dataset | None:
    """First item of ``sequence`` in the per-frame group of ``frame``, else in the shared group."""
    if frame is not None:
        groups = ds.get("PerFrameFunctionalGroupsSequence") or []
        if frame < len(groups):
            items = groups[frame].get(sequence) or []
            if len(items):
                return items[0]
    shared = ds.get("SharedFunctionalGroupsSequence") or []
    if len(shared):
        items = shared[0].get(sequence) or []
        if len(items):
            return items[0]
    return None


def _floats(value: Any, n: int, what: str, where: str) -> np.ndarray:
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise GeometryError(f"{where}: {what} is not numeric ({value!r})") from exc
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise GeometryError(f"{where}: {what} must have {n} finite values, got {value!r}")
    return arr


def _slices(paths: list[Path], headers: list[Dataset]) -> list[_Slice]:
    if len(headers) == 1 and (
        int(headers[0].get("NumberOfFrames", 1) or 1) > 1 or "PerFrameFunctionalGroupsSequence" in headers[0]
    ):
        return _frames_of(paths[0], headers[0])
    out = []
    for p, ds in zip(paths, headers):
        where = p.name
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
            raise GeometryError(
                f"{where}: no Image Position/Orientation (Patient) — not a cross-sectional image "
                f"(SOP class {ds.get('SOPClassUID', '?')}); only CT/MR/PET/SPECT slices can form a volume"
            )
        if "PixelSpacing" not in ds:
            raise GeometryError(f"{where}: no Pixel Spacing, so the image has no physical size")
        out.append(_make_slice(p, ds, None, where, ds, ds, ds, ds, extra={"acquisition": _tm(ds.get("AcquisitionTime"))}))
    return out


def _make_slice(path: Path, header: Dataset, frame: int | None, where: str, pos: Dataset, ori: Dataset,
                meas: Dataset, rescale: Dataset, extra: dict | None = None) -> _Slice:
    """One slice from the datasets holding its position, orientation, spacing and rescale."""
    return _Slice(
        path=path,
        header=header,
        frame=frame,
        ipp=_floats(pos.ImagePositionPatient, 3, "ImagePositionPatient", where),
        iop=_floats(ori.ImageOrientationPatient, 6, "ImageOrientationPatient", where),
        rows=int(header.Rows),
        columns=int(header.Columns),
        pixel_spacing=tuple(_floats(meas.PixelSpacing, 2, "PixelSpacing", where)),
        slope=float(rescale.get("RescaleSlope", 1.0) or 1.0),
        intercept=float(rescale.get("RescaleIntercept", 0.0) or 0.0),
        extra=extra or {},
    )


def _frames_of(path: Path, ds: Dataset) -> list[_Slice]:
    """Slices of an enhanced multi-frame object from its functional groups."""
    n = int(ds.get("NumberOfFrames", 1) or 1)
    out = []
    for f in range(n):
        where = f"{path.name} frame {f + 1}"
        pos = _functional_item(ds, "PlanePositionSequence", f)
        ori = _functional_item(ds, "PlaneOrientationSequence", f)
        meas = _functional_item(ds, "PixelMeasuresSequence", f)
        if pos is None or ori is None or meas is None or "PixelSpacing" not in meas:
            raise GeometryError(
                f"{where}: multi-frame object without a Plane Position, Plane Orientation and Pixel "
                "Measures for every frame; this kind of multi-frame object is not supported yet — "
                "ask the modality to send classic single-frame images"
            )
        pvt = _functional_item(ds, "PixelValueTransformationSequence", f)
        out.append(_make_slice(path, ds, f, where, pos, ori, meas, pvt if pvt is not None else ds))
    return out


# ---------------------------------------------------------------------------
# geometry checks
# ---------------------------------------------------------------------------


def _name(s: _Slice) -> str:
    return s.path.name if s.frame is None else f"{s.path.name} frame {s.frame + 1}"


def _check_common_geometry(slices: list[_Slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Same orientation, size and pixel spacing everywhere; returns orthonormal (row, col, normal)."""
    ref = slices[0]
    for s in slices[1:]:
        if np.max(np.abs(s.iop - ref.iop)) > ORIENTATION_TOL:
            raise GeometryError(
                f"mixed orientations: {_name(ref)} has ImageOrientationPatient {np.round(ref.iop, 5).tolist()} "
                f"but {_name(s)} has {np.round(s.iop, 5).tolist()}; the series holds several stacks "
                "(e.g. a localiser or another plane) — send or select one stack"
            )
        if (s.rows, s.columns) != (ref.rows, ref.columns):
            raise GeometryError(
                f"mixed image sizes: {_name(ref)} is {ref.columns}x{ref.rows} (columns x rows) but {_name(s)} is "
                f"{s.columns}x{s.rows}; the series holds several stacks — send or select one stack"
            )
        if not np.allclose(s.pixel_spacing, ref.pixel_spacing, rtol=PIXEL_SPACING_RTOL, atol=0):
            raise GeometryError(
                f"mixed pixel spacings: {_name(ref)} has {list(ref.pixel_spacing)} mm but {_name(s)} has "
                f"{list(s.pixel_spacing)} mm; the series holds several reconstructions — send or select one"
            )
    if min(ref.pixel_spacing) <= 0:
        raise GeometryError(f"{_name(ref)}: Pixel Spacing must be positive, got {list(ref.pixel_spacing)}")
    row, col = ref.iop[:3], ref.iop[3:]
    nr, nc = np.linalg.norm(row), np.linalg.norm(col)
    if abs(nr - 1) > 1e-3 or abs(nc - 1) > 1e-3 or abs(float(row @ col)) > 1e-3:
        raise GeometryError(
            f"{_name(ref)}: ImageOrientationPatient {ref.iop.tolist()} is not two orthogonal unit vectors; "
            "the header is corrupt — ask the modality to resend"
        )
    row = row / nr
    col = col - (col @ row) * row  # remove the rounding-level skew
    col = col / np.linalg.norm(col)
    normal = np.cross(row, col)
    return row, col, normal


def _sort_and_check_positions(slices: list[_Slice], normal: np.ndarray) -> list[_Slice]:
    for s in slices:
        s.position = float(s.ipp @ normal)
    slices = sorted(slices, key=lambda s: s.position)
    pos = np.array([s.position for s in slices])
    gaps = np.diff(pos)
    dup = np.flatnonzero(gaps < DUPLICATE_TOL_MM)
    if dup.size:
        a, b = slices[dup[0]], slices[dup[0] + 1]
        raise GeometryError(
            f"duplicate slice position {pos[dup[0]]:.3f} mm along the normal ({dup.size} duplicate(s)): "
            f"{_name(a)} and {_name(b)}; the series holds several volumes (echoes, phases, repeats) or a file "
            "twice — split it (e.g. by EchoNumbers/TemporalPositionIdentifier) or remove the duplicates"
        )
    # gantry tilt / shear: every slice must sit on the line through the first one along the normal
    offsets = np.array([s.ipp - slices[0].ipp for s in slices[1:]])
    along = pos[1:] - pos[0]
    across = np.linalg.norm(offsets - along[:, None] * normal[None, :], axis=1)
    angles = np.degrees(np.arctan2(across, np.abs(along)))
    worst = int(np.argmax(angles))
    if angles[worst] > TILT_TOLERANCE_DEG:
        raise GeometryError(
            f"gantry tilt or sheared stack: slice positions deviate {angles[worst]:.2f} deg from the slice normal "
            f"(limit {TILT_TOLERANCE_DEG} deg, worst at {_name(slices[worst + 1])}; the slices drift up to "
            f"{across.max():.2f} mm sideways from the first one's normal); "
            "resample the series to an untilted grid on the scanner or PACS, or rescan without tilt"
        )
    median = float(np.median(gaps))
    tol = SPACING_ATOL_MM + SPACING_RTOL * median
    bad = np.flatnonzero(np.abs(gaps - median) > tol)
    if bad.size:
        i = int(bad[0])
        g = gaps[i]
        ratio = g / median
        where = (
            f"between {_name(slices[i])} (at {pos[i]:.3f} mm) and {_name(slices[i + 1])} (at {pos[i + 1]:.3f} mm)"
        )
        if ratio > 1.5 and abs(ratio - round(ratio)) * median <= tol * max(1.0, round(ratio)):
            missing = int(round(ratio)) - 1
            raise GeometryError(
                f"missing slice(s): the gap {where} is {g:.3f} mm, {ratio:.2f} times the usual {median:.3f} mm "
                f"(about {missing} slice(s) missing; {bad.size} irregular gap(s) in all); wait for the series "
                "to complete or ask the sender to resend it"
            )
        raise GeometryError(
            f"irregular slice spacing: the gap {where} is {g:.3f} mm but the usual gap is {median:.3f} mm "
            f"(tolerance {tol:.3f} mm; {bad.size} irregular gap(s) in all); the volume would be distorted — "
            "reconstruct with a constant increment or resample the series first"
        )
    return slices


# ---------------------------------------------------------------------------
# pixels and values
# ---------------------------------------------------------------------------


def _read_pixels(slices: list[_Slice]) -> np.ndarray:
    ref = slices[0]
    stack = np.empty((len(slices), ref.rows, ref.columns), dtype=np.float32)
    if ref.frame is not None:
        frames = pydicom.pixels.pixel_array(ref.path)
        if frames.ndim == 2:
            frames = frames[None]
        for k, s in enumerate(slices):
            stack[k] = frames[s.frame].astype(np.float32) * np.float32(s.slope) + np.float32(s.intercept)
        return stack
    for k, s in enumerate(slices):
        try:
            arr = pydicom.pixels.pixel_array(s.path)
        except Exception as exc:
            raise GeometryError(f"{_name(s)}: pixel data cannot be decoded ({exc})") from exc
        if arr.shape != (ref.rows, ref.columns):
            raise GeometryError(f"{_name(s)}: pixel data has shape {arr.shape}, header says {ref.rows}x{ref.columns}")
        if s.slope == 1.0 and s.intercept == 0.0:
            stack[k] = arr
        else:
            # float64 for the product, then float32: exact for integer HU of 16-bit data
            stack[k] = arr.astype(np.float64) * s.slope + s.intercept
    return stack


def _tm(value: Any) -> float | None:
    """DICOM TM to seconds after midnight, None when absent or malformed."""
    if value in (None, ""):
        return None
    text = str(value).strip()
    try:
        hh = int(text[0:2])
        mm = int(text[2:4]) if len(text) >= 4 else 0
        ss = float(text[4:]) if len(text) > 4 else 0.0
    except ValueError:
        text = text.replace(":", "")
        try:
            hh, mm, ss = int(text[0:2]), int(text[2:4] or 0), float(text[4:] or 0)
        except ValueError:
            return None
    return hh * 3600 + mm * 60 + ss


def _dt_of(date: Any, time: Any) -> _dt.datetime | None:
    seconds = _tm(time)
    if seconds is None or not date:
        return None
    try:
        day = _dt.datetime.strptime(str(date).strip()[:8], "%Y%m%d")
    except ValueError:
        return None
    return day + _dt.timedelta(seconds=seconds)


def _parse_dt(value: Any) -> _dt.datetime | None:
    """DICOM DT (YYYYMMDDHHMMSS.FFFFFF&ZZXX) to a naive datetime (the offset is dropped)."""
    if not value:
        return None
    text = str(value).strip()
    for sign in "+-":
        if sign in text[8:]:
            text = text[: 8 + text[8:].index(sign)]
    return _dt_of(text[:8], text[8:] or "000000")


def _suv_factor(slices: list[_Slice]) -> tuple[float | None, str]:
    """SUVbw factor from PET headers, or (None, why not)."""
    ds = slices[0].header
    units = str(ds.get("Units", "")).upper()
    if units == "GML":
        return 1.0, ""
    if units != "BQML":
        return None, f"Units is {units or 'absent'}, SUV needs BQML"
    decay = str(ds.get("DecayCorrection", "")).upper()
    if decay != "START":
        return None, f"DecayCorrection is {decay or 'absent'}, only START is handled"
    corrected = [str(v).upper() for v in (ds.get("CorrectedImage") or [])]
    if corrected and "DECY" not in corrected:
        return None, "CorrectedImage does not list DECY (values not decay corrected)"
    weight = ds.get("PatientWeight")
    if not weight or float(weight) <= 0:
        return None, "PatientWeight is absent or zero"
    seq = ds.get("RadiopharmaceuticalInformationSequence")
    if not seq:
        return None, "no RadiopharmaceuticalInformationSequence"
    rp = seq[0]
    dose, half_life = rp.get("RadionuclideTotalDose"), rp.get("RadionuclideHalfLife")
    if not dose or not half_life:
        return None, "RadionuclideTotalDose or RadionuclideHalfLife absent"
    # reference time of the decay correction: series start; when the series time is
    # later than the first acquisition (some vendors rewrite it), the first acquisition (QIBA)
    start = _dt_of(ds.get("SeriesDate"), ds.get("SeriesTime"))
    acq: list[float] = [s.extra["acquisition"] for s in slices if s.extra.get("acquisition") is not None]
    if start is not None and acq:
        first_acq = start.replace(hour=0, minute=0, second=0, microsecond=0) + _dt.timedelta(seconds=min(acq))
        if first_acq < start:
            start = first_acq
    injected = _parse_dt(rp.get("RadiopharmaceuticalStartDateTime"))
    if injected is None and start is not None:
        t = _tm(rp.get("RadiopharmaceuticalStartTime"))
        if t is not None:
            injected = start.replace(hour=0, minute=0, second=0, microsecond=0) + _dt.timedelta(seconds=t)
            if injected > start:  # injected the evening before a scan after midnight
                injected -= _dt.timedelta(days=1)
    if start is None or injected is None:
        return None, "series start (SeriesDate/SeriesTime) or injection time absent"
    elapsed = (start - injected).total_seconds()
    try:
        return suv_bw_factor(float(weight), float(dose), float(half_life), elapsed), ""
    except ValueError as exc:
        return None, str(exc)
