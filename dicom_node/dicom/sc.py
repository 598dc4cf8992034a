"""The fused series: one Secondary Capture Image per base slice, in the base study.

one Secondary Capture Image (1.2.840.10008.5.1.4.1.1.7) per base slice
    * built by ``highdicom.sc.SCImage`` (SC Equipment, SC Image, Image Pixel, file meta,
      pixel encoding), then completed with pydicom where highdicom has no parameter:
      ImageType ``DERIVED\\SECONDARY``, ConversionType ``WSD`` (highdicom writes ``DI``),
      Derivation Description/Code Sequence, Source Image Sequence, Burned In Annotation,
      the Patient/Study attributes copied verbatim from the base (highdicom would
      re-validate and re-format them, and rejects values some scanners write), and the
      base slice geometry.
    * lives in the base study (same StudyInstanceUID, Patient and General Study
      attributes copied from the base), new Series Instance UID, one new SOP Instance
      UID per slice, all from ``uid_root``.
    * Modality ``OT`` (see ``SC_MODALITY``).
    * geometry: Pixel Spacing is part of the SC Image Module (Type 3).  Image Position/
      Orientation (Patient), Slice Location and Frame of Reference UID are not part of
      the SC Image IOD; they are written as Standard Extended attributes (Standard
      Extended SOP Class, PS3.4 Annex B) because workstations use them to link scrolling with the CT/MR series on
      the same Frame of Reference.  dciodvfy reports them as warnings ("attribute is
      not present in standard DICOM IOD"), not errors; pass ``include_geometry=False``
      for a strictly-standard object.

"""

from __future__ import annotations

import datetime
import re
from collections.abc import Sequence
from copy import deepcopy

import numpy as np
from highdicom.sc import SCImage
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import (
    ExplicitVRLittleEndian,
    generate_uid,
)
from pydicom.valuerep import DS

from dicom_node.dicom.derived import (
    DEFAULT_EQUIPMENT,
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    IS_MAX,
    LO_MAX,
    ST_MAX,
    Equipment,
    check_lo,
    check_matrix,
    check_text,
    code_item,
    contributing_equipment,
    copy_laterality,
    copy_patient_study,
    default_series_number,
    output_charset,
    source_item,
)
from dicom_node.dicom.uids import derived_uid

#: Modality of the fused SC series.  The SC Equipment Module defines Modality as the
#: source equipment; a fused image has two sources, so neither CT nor MR is true.
#: Worse, a "CT" series of 0-255 display values without Rescale would get a
#: workstation's CT window presets and HU read-outs, i.e. wrong numbers on screen.
#: 'OT' (Other) is the value highdicom's SCImage writes and dciodvfy accepts.
SC_MODALITY = "OT"

#: CID 7203 Image Derivation: the overlay was registered and resampled onto the base grid.
CODE_SPATIAL_RESAMPLING = Code("113085", "DCM", "Spatial resampling")


def sc_series_description(
    pipeline_name: str, base_modality: str, overlay_modality: str, warning: str | None = None
) -> str:
    """A radiologist-readable Series Description (LO, at most 64 characters).

    >>> sc_series_description("dmf", "CT", "MR", None)
    'FUSED MR>CT DMF'
    >>> sc_series_description("dmf", "CT", "MR", "reg doubtful")
    'CHECK REG: REG DOUBTFUL - FUSED MR>CT DMF'

    A warning is put first so it survives truncation and is the first thing seen in
    a worklist or series browser.  The result contains no backslash and is ASCII.
    """
    core = f"FUSED {overlay_modality.strip().upper()}>{base_modality.strip().upper()}"
    name = pipeline_name.strip().upper()
    if name:
        core = f"{core} {name}"
    text = core
    if warning:
        text = f"CHECK REG: {warning.strip().upper()} - {core}"
    text = re.sub(r"\s+", " ", text.replace("\\", "/"))
    text = text.encode("ascii", "replace").decode("ascii")
    return text[:LO_MAX].rstrip()


def overlay_slices_for_base(
    base_headers: Sequence[Dataset],
    overlay_headers: Sequence[Dataset],
    base_to_overlay: np.ndarray | None = None,
) -> list[list[int]]:
    """Indices of the overlay slices that contribute to each base slice after resampling.

    For base slice ``i`` the corners of its plane are mapped into overlay coordinates
    with ``base_to_overlay`` (fixed -> moving, as SimpleITK reports it; identity when
    ``None``, i.e. the two series are taken to share a frame of reference) and
    projected onto the overlay's slice normal.  An overlay slice contributes when it
    lies within one slice spacing of that span — the support of linear interpolation.
    In-plane overlap is not checked, so the list may be a small superset.  Requires
    Image Position/Orientation (Patient), Pixel Spacing, Rows and Columns.
    """
    m = np.eye(4) if base_to_overlay is None else check_matrix(base_to_overlay)
    if not overlay_headers:
        return [[] for _ in base_headers]
    try:
        ov_iop = np.asarray(overlay_headers[0].ImageOrientationPatient, dtype=float)
        ov_normal = np.cross(ov_iop[:3], ov_iop[3:])
        ov_pos = np.array(
            [np.dot(np.asarray(h.ImagePositionPatient, dtype=float), ov_normal) for h in overlay_headers]
        )
    except AttributeError as exc:
        raise ValueError(f"overlay headers lack geometry ({exc}); pass overlay_index explicitly") from None
    if len(ov_pos) > 1:
        spacing = float(np.median(np.abs(np.diff(np.sort(ov_pos)))))
    else:
        spacing = float(overlay_headers[0].get("SliceThickness") or 1.0)
    spacing = max(spacing, 1e-6)
    result = []
    for h in base_headers:
        try:
            corners = _plane_corners(h)
        except AttributeError as exc:
            raise ValueError(f"base headers lack geometry ({exc}); pass overlay_index explicitly") from None
        mapped = (m @ np.c_[corners, np.ones(len(corners))].T).T[:, :3]
        proj = mapped @ ov_normal
        lo, hi = proj.min() - spacing, proj.max() + spacing
        result.append([int(k) for k in np.flatnonzero((ov_pos > lo + 1e-6) & (ov_pos < hi - 1e-6))])
    return result


def build_sc_series(
    base_headers: Sequence[Dataset],
    overlay_headers: Sequence[Dataset],
    fused: np.ndarray,
    *,
    uid_root: str,
    series_description: str,
    derivation_description: str,
    series_number: int | None = None,
    overlay_index: Sequence[Sequence[int]] | None = None,
    base_to_overlay: np.ndarray | None = None,
    equipment: Equipment | None = None,
    include_geometry: bool = True,
    series_instance_uid: str | None = None,
    uid_seed: str | None = None,
) -> list[Dataset]:
    """One Secondary Capture Image per base slice, in the base study, as a new series.

    Parameters
    ----------
    base_headers
        The base series' headers in volume order (pixel data not needed); slice ``i``
        of ``fused`` lies on base slice ``i``.
    overlay_headers
        The overlay series' headers (any order; ``overlay_index`` refers to it).
    fused
        ``(S, H, W)`` uint8 (written MONOCHROME2) or ``(S, H, W, 3)`` uint8 (RGB,
        Planar Configuration 0), ``S == len(base_headers)``.
    uid_root
        Prefix of every new UID (``NodeSettings.uid_root``).
    series_description
        Series Description (LO, <= 64 characters); see ``sc_series_description``.
    derivation_description
        Derivation Description (ST, <= 1024 characters), e.g. the method, the
        exposures and the registration used.
    series_number
        Default: the base Series Number + 1000 (clipped to the IS range).
    overlay_index
        ``overlay_index[i]``: indices into ``overlay_headers`` of the overlay slices
        that contributed to fused slice ``i``.  Default: computed from the geometry
        by ``overlay_slices_for_base`` with ``base_to_overlay``.
    base_to_overlay
        Only used to compute the default ``overlay_index``: the 4x4 base -> overlay
        point map of the registration (identity when ``None``: right only when both
        series share a Frame of Reference).
    equipment
        Manufacturer / model / software versions written as General and SC Equipment.
    include_geometry
        Write Image Position/Orientation (Patient), Slice Location and Frame of
        Reference UID of the base slice (Standard Extended attributes, see module doc).
    series_instance_uid
        Use this Series Instance UID instead of a new one (e.g. to re-create a series
        idempotently); default: a new UID under ``uid_root``.
    uid_seed
        Derive the series UID and every SOP Instance UID from this text
        (``dicom.uids.derived_uid``) instead of random ones: a re-run of the
        same job makes the same objects, so a PACS keeps one copy.
    """
    eq = equipment or DEFAULT_EQUIPMENT
    base_headers = list(base_headers)
    overlay_headers = list(overlay_headers)
    fused = np.asarray(fused)
    n = len(base_headers)
    if n == 0:
        raise ValueError("base_headers is empty")
    if fused.dtype != np.uint8:
        raise TypeError(f"fused must be uint8, got {fused.dtype}")
    if fused.ndim == 3:
        photometric = "MONOCHROME2"
    elif fused.ndim == 4 and fused.shape[-1] == 3:
        photometric = "RGB"
    else:
        raise ValueError(f"fused must be (S, H, W) or (S, H, W, 3), got shape {fused.shape}")
    if fused.shape[0] != n:
        raise ValueError(f"fused has {fused.shape[0]} slices but there are {n} base headers")
    rows, cols = fused.shape[1:3]
    for i, h in enumerate(base_headers):
        if "Rows" in h and "Columns" in h and (int(h.Rows), int(h.Columns)) != (rows, cols):
            raise ValueError(
                f"fused slices are {rows}x{cols} but base slice {i} is {h.Rows}x{h.Columns}: "
                "fuse on the base grid"
            )
    base0 = base_headers[0]
    charset = output_charset(base0, eq)
    check_lo(series_description, "series_description", charset)
    check_text(derivation_description, "derivation_description", ST_MAX, charset)
    if overlay_index is None:
        overlay_index = overlay_slices_for_base(base_headers, overlay_headers, base_to_overlay)
    if len(overlay_index) != n:
        raise ValueError(f"overlay_index has {len(overlay_index)} entries, expected {n}")
    for i, idx in enumerate(overlay_index):
        for k in idx:
            if not 0 <= int(k) < len(overlay_headers):
                raise IndexError(f"overlay_index[{i}] refers to overlay slice {k}, there are {len(overlay_headers)}")

    series_uid = series_instance_uid or (derived_uid(uid_root, uid_seed, "sc-series") if uid_seed
                                         else generate_uid(prefix=uid_root))
    number = default_series_number(base0, 1000) if series_number is None else int(series_number)
    if not 1 <= number <= IS_MAX:
        raise ValueError(f"series_number {number} outside 1..{IS_MAX}")
    now = datetime.datetime.now()
    lossy = any(str(h.get("LossyImageCompression", "")) == "01" for h in (*base_headers, *overlay_headers))
    contributing = contributing_equipment(base0, overlay_headers[0] if overlay_headers else None, charset)

    out: list[Dataset] = []
    for i, base in enumerate(base_headers):
        spacing = base.get("PixelSpacing")
        orientation = _patient_orientation(base)
        sc = SCImage(
            pixel_array=fused[i],
            photometric_interpretation=photometric,
            bits_allocated=8,
            coordinate_system="PATIENT",
            study_instance_uid=base0.StudyInstanceUID,
            series_instance_uid=series_uid,
            series_number=number,
            sop_instance_uid=derived_uid(uid_root, uid_seed, "sc", i) if uid_seed else generate_uid(prefix=uid_root),
            instance_number=i + 1,
            manufacturer=eq.manufacturer,
            pixel_spacing=(float(spacing[0]), float(spacing[1])) if spacing else None,
            # highdicom only takes single-letter values; the exact (possibly
            # oblique, multi-letter) value is written below.
            patient_orientation=("L", "P"),
            transfer_syntax_uid=ExplicitVRLittleEndian,
            contributing_equipment=contributing,
            series_description=series_description,
            manufacturer_model_name=eq.manufacturer_model_name,
            software_versions=eq.software_versions,
            device_serial_number=eq.serial(),
            institution_name=eq.institution_name,
            series_date=now.date(),
            series_time=now.time(),
            content_date=now.date(),
            content_time=now.time(),
        )
        ds: Dataset = sc
        ds.Modality = SC_MODALITY  # highdicom writes the same; see SC_MODALITY
        copy_patient_study(base0, ds, charset)
        ds.PatientOrientation = orientation
        copy_laterality(base0, ds)
        # General Image
        ds.ImageType = ["DERIVED", "SECONDARY"]
        ds.DerivationDescription = derivation_description
        ds.DerivationCodeSequence = [code_item(CODE_SPATIAL_RESAMPLING)]
        ds.SourceImageSequence = [source_item(base)] + [source_item(overlay_headers[int(k)]) for k in overlay_index[i]]
        ds.BurnedInAnnotation = "NO"
        ds.LossyImageCompression = "01" if lossy else "00"
        # SC Equipment
        ds.ConversionType = "WSD"
        ds.SecondaryCaptureDeviceManufacturer = eq.manufacturer
        ds.SecondaryCaptureDeviceManufacturerModelName = eq.manufacturer_model_name
        ds.SecondaryCaptureDeviceSoftwareVersions = eq.software_versions
        # VOI LUT: show the stored 0..255 display values as they are (no auto-windowing)
        if photometric == "MONOCHROME2":
            ds.WindowCenter = DS("127.5")
            ds.WindowWidth = DS("256")
        if include_geometry:
            _copy_geometry(base, ds)
        ds.file_meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
        ds.file_meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
        out.append(ds)
    return out


def _copy_geometry(base: Dataset, ds: Dataset) -> None:
    for kw in ("FrameOfReferenceUID", "ImagePositionPatient", "ImageOrientationPatient", "SliceLocation"):
        if kw in base and base[kw].value not in (None, ""):
            ds[kw] = deepcopy(base[kw])


def _plane_corners(h: Dataset) -> np.ndarray:
    ipp = np.asarray(h.ImagePositionPatient, dtype=float)
    iop = np.asarray(h.ImageOrientationPatient, dtype=float)
    dr, dc = (float(v) for v in h.PixelSpacing)  # row spacing, column spacing
    along_row, along_col = iop[:3] * dc, iop[3:] * dr
    r, c = int(h.Rows) - 1, int(h.Columns) - 1
    return np.array([ipp, ipp + c * along_row, ipp + r * along_col, ipp + c * along_row + r * along_col])


def _orientation_letters(v: np.ndarray) -> str:
    letters = (("L", "R"), ("P", "A"), ("H", "F"))
    order = np.argsort(-np.abs(v))
    out = ""
    for axis in order:
        if abs(v[axis]) >= 0.01:
            out += letters[axis][0] if v[axis] > 0 else letters[axis][1]
    return out


def _patient_orientation(base: Dataset) -> list[str]:
    """Patient Orientation (Type 2C) from the base's Image Orientation (Patient); empty if unknown."""
    iop = base.get("ImageOrientationPatient")
    if iop is None or len(iop) != 6:
        return []
    v = np.asarray(iop, dtype=float)
    return [_orientation_letters(v[:3]), _orientation_letters(v[3:])]


