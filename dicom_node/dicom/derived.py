"""The DICOM objects the node writes: the fused Secondary Capture series and a Spatial Registration.

Science stays out of here and DICOM I/O stays out of ``fusion``: this module takes
numpy arrays and pydicom headers (read with ``stop_before_pixels``) and returns
pydicom ``Dataset`` objects with complete file meta (Explicit VR Little Endian),
ready for ``ds.save_as(path, enforce_file_format=True)`` or a C-STORE.  It opens
no files and no sockets.

What is written, and why (checked with dciodvfy, see tests/test_derived.py):

Fused series — one Secondary Capture Image (1.2.840.10008.5.1.4.1.1.7) per base slice
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

Registration — one Spatial Registration object (1.2.840.10008.5.1.4.1.1.66.1), Modality REG
    * the registration Frame of Reference is the base's; the Registration Sequence
      holds (a) the base Frame of Reference with the identity matrix and (b) the
      overlay's Frame of Reference with the matrix that maps overlay coordinates into
      base coordinates (see ``build_registration`` for the direction convention).

Character sets (PS3.5 6.1; tests/test_charsets.py)
    * Patient and study text is copied as pydicom decoded it from the base, and the
      object is written in the base's Specific Character Set, verbatim (single-byte
      sets such as ISO_IR 100, UTF-8 ISO_IR 192, ISO 2022 code extensions such as
      ``["", "ISO 2022 IR 87"]``; pydicom re-encodes each PN component group with the
      escape sequences), so a PACS files the derived series under the same name bytes.
    * When that set cannot hold every text value the object carries (a base that
      sends non-ASCII without declaring a set, a set pydicom does not know, a
      configured institution name outside the base's repertoire), the object is
      written in ISO_IR 192 instead (``FALLBACK_CHARSET``): UTF-8 holds every value,
      where keeping the base's declaration would write bytes it does not cover.
    * Text the node adds itself (descriptions, labels) must fit the output set; the
      node's own texts are ASCII.

Codes (checked against pydicom's copy of PS3.16):
    * Derivation Code Sequence (CID 7203 "Image Derivation"): PS3.16 has no code for
      multimodal image fusion (CID 7203 lists resampling, MPR, MIP, pixel-by-pixel
      arithmetic, segmentation ...; the only SNOMED "Fusion", 129379006, means surgical
      fixation, CID 7310).  We write (113085, DCM, "Spatial resampling"), which is
      exact — the overlay was registered and resampled onto the base grid — and say
      what was fused, and how, in Derivation Description.  A local code (e.g. 99DFN
      "FUSION") would be allowed, CID 7203 being extensible, but readers ignore it
      and dciodvfy flags the unknown coding scheme; it is left out.
    * Purpose of Reference in Source Image Sequence (CID 7202):
      (121322, DCM, "Source image for image processing operation") for the base and
      the overlay slices alike.
    * Registration Type Code Sequence (CID 7100 "RCS Registration Method Type"):
      (125021, DCM, "Frame of Reference Identity") for the base item,
      (125024, DCM, "Image Content-based Alignment") for the mutual-information result.
"""

from __future__ import annotations

import datetime
import platform
import re
import warnings
from collections.abc import Iterator, Sequence
from copy import deepcopy
from dataclasses import dataclass

import numpy as np
from highdicom.base_content import ContributingEquipment
from highdicom.sc import SCImage
from pydicom.charset import convert_encodings, custom_encoders, python_encoding
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.coding import Code
from pydicom.uid import (
    ExplicitVRLittleEndian,
    SpatialRegistrationStorage,
    generate_uid,
)
from pydicom.valuerep import DA, DS, TM

from dicom_node import __version__

__all__ = [
    "CODE_FRAME_OF_REFERENCE_IDENTITY",
    "CODE_IMAGE_CONTENT_BASED_ALIGNMENT",
    "CODE_SOURCE_IMAGE_FOR_PROCESSING",
    "CODE_SPATIAL_RESAMPLING",
    "Equipment",
    "FALLBACK_CHARSET",
    "IMPLEMENTATION_CLASS_UID",
    "SC_MODALITY",
    "build_registration",
    "build_sc_series",
    "overlay_slices_for_base",
    "registration_matrix",
    "sc_series_description",
]

# --------------------------------------------------------------------------------------
# constants
# --------------------------------------------------------------------------------------

#: Modality of the fused SC series.  The SC Equipment Module defines Modality as the
#: source equipment; a fused image has two sources, so neither CT nor MR is true.
#: Worse, a "CT" series of 0-255 display values without Rescale would get a
#: workstation's CT window presets and HU read-outs, i.e. wrong numbers on screen.
#: 'OT' (Other) is the value highdicom's SCImage writes and dciodvfy accepts.
SC_MODALITY = "OT"

#: CID 7203 Image Derivation: the overlay was registered and resampled onto the base grid.
CODE_SPATIAL_RESAMPLING = Code("113085", "DCM", "Spatial resampling")
#: CID 7202 Source Image Purpose of Reference.
CODE_SOURCE_IMAGE_FOR_PROCESSING = Code("121322", "DCM", "Source image for image processing operation")
#: CID 7100 RCS Registration Method Type.
CODE_FRAME_OF_REFERENCE_IDENTITY = Code("125021", "DCM", "Frame of Reference Identity")
CODE_IMAGE_CONTENT_BASED_ALIGNMENT = Code("125024", "DCM", "Image Content-based Alignment")

#: Identifies this software (deterministic, per version, under pydicom's UID root, which
#: is meant for exactly this: UIDs derived from entropy sources).
IMPLEMENTATION_CLASS_UID = generate_uid(
    prefix="1.2.826.0.1.3680043.8.498.", entropy_srcs=["dicom-fusion-node", __version__]
)
IMPLEMENTATION_VERSION_NAME = f"DFN_{__version__}"[:16]

#: Specific Character Set of a derived object whose base's set cannot hold every text value
#: the object carries (see the module docstring): UTF-8 holds them all.
FALLBACK_CHARSET = "ISO_IR 192"

_IS_MAX = 2**31 - 1
_LO_MAX = 64
_ST_MAX = 1024
_CONTENT_LABEL = re.compile(r"^[A-Z0-9_ ]{1,16}$")

# Patient, Patient Study and General Study attributes copied verbatim from the base.
# The Type 2 ones are written empty when the base lacks them.
_COPIED_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
_COPIED_OPTIONAL = (
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "PatientBirthTime",
    "OtherPatientIDsSequence",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    "IssuerOfAccessionNumberSequence",
    "StudyDescription",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
)


@dataclass(frozen=True)
class Equipment:
    """Who made the object: General / Enhanced General / SC Equipment attributes.

    ``device_serial_number`` is Type 1 in the Enhanced General Equipment Module of
    the REG object; for software it identifies the installation (default: host name;
    the pipeline may pass the node's AE title).
    """

    manufacturer: str = "dicom-fusion-node"
    manufacturer_model_name: str = "dicom-fusion-node"
    software_versions: str = __version__
    device_serial_number: str | None = None
    institution_name: str | None = None

    def serial(self) -> str:
        return (self.device_serial_number or platform.node() or "unknown")[:_LO_MAX]


_DEFAULT_EQUIPMENT = Equipment()


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


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
    return text[:_LO_MAX].rstrip()


def registration_matrix(base_to_overlay: np.ndarray) -> np.ndarray:
    """The matrix to store in a Spatial Registration for the overlay's Frame of Reference.

    PS3.3 C.20.2.1.1: Frame of Reference Transformation Matrix ``M_AB`` maps a point
    ``(Bx, By, Bz, 1)`` in the registered frame B (here: the overlay's) to
    ``(Ax, Ay, Az, 1)`` in the registration frame A (the REG object's Frame of
    Reference = the base's).  Registration tools such as SimpleITK report the
    opposite, fixed(base) -> moving(overlay) point map, so the stored matrix is its
    inverse.  Both use DICOM patient (LPS) millimetres, so no axis flips are needed.
    """
    m = _check_matrix(base_to_overlay)
    inv = np.linalg.inv(m)
    inv[3] = (0.0, 0.0, 0.0, 1.0)
    return inv


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
    m = np.eye(4) if base_to_overlay is None else _check_matrix(base_to_overlay)
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


# --------------------------------------------------------------------------------------
# Secondary Capture series
# --------------------------------------------------------------------------------------


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
    """
    eq = equipment or _DEFAULT_EQUIPMENT
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
    charset = _output_charset(base0, eq)
    _check_lo(series_description, "series_description", charset)
    _check_text(derivation_description, "derivation_description", _ST_MAX, charset)
    if overlay_index is None:
        overlay_index = overlay_slices_for_base(base_headers, overlay_headers, base_to_overlay)
    if len(overlay_index) != n:
        raise ValueError(f"overlay_index has {len(overlay_index)} entries, expected {n}")
    for i, idx in enumerate(overlay_index):
        for k in idx:
            if not 0 <= int(k) < len(overlay_headers):
                raise IndexError(f"overlay_index[{i}] refers to overlay slice {k}, there are {len(overlay_headers)}")

    series_uid = series_instance_uid or generate_uid(prefix=uid_root)
    number = _default_series_number(base0, 1000) if series_number is None else int(series_number)
    if not 1 <= number <= _IS_MAX:
        raise ValueError(f"series_number {number} outside 1..{_IS_MAX}")
    now = datetime.datetime.now()
    lossy = any(str(h.get("LossyImageCompression", "")) == "01" for h in (*base_headers, *overlay_headers))
    contributing = _contributing_equipment(base0, overlay_headers[0] if overlay_headers else None, charset)

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
            sop_instance_uid=generate_uid(prefix=uid_root),
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
        _copy_patient_study(base0, ds, charset)
        ds.PatientOrientation = orientation
        _copy_laterality(base0, ds)
        # General Image
        ds.ImageType = ["DERIVED", "SECONDARY"]
        ds.DerivationDescription = derivation_description
        ds.DerivationCodeSequence = [_code_item(CODE_SPATIAL_RESAMPLING)]
        ds.SourceImageSequence = [_source_item(base)] + [_source_item(overlay_headers[int(k)]) for k in overlay_index[i]]
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


# --------------------------------------------------------------------------------------
# Spatial Registration
# --------------------------------------------------------------------------------------


def build_registration(
    base_headers: Sequence[Dataset],
    overlay_headers: Sequence[Dataset],
    matrix: np.ndarray,
    *,
    uid_root: str,
    content_label: str,
    series_description: str = "Rigid registration (MI)",
    series_number: int | None = None,
    content_description: str = "Rigid mutual-information registration, overlay onto base",
    equipment: Equipment | None = None,
) -> Dataset:
    """A Spatial Registration object (Modality REG) in the base study, as a new series.

    Direction convention — read this before passing ``matrix``:

    * ``matrix`` is the 4x4 homogeneous transform that maps a **base** physical point
      (DICOM patient coordinates, mm) to the corresponding **overlay** point — the
      fixed -> moving transform that SimpleITK's registration returns (base = fixed).
    * PS3.3 C.20.2 stores, for each registered Frame of Reference, the matrix that
      transforms coordinates **from that registered frame into the registration frame**
      (the Frame of Reference of this REG object, which is the base's).  So the
      overlay item holds ``inv(matrix)``: applied to a point in overlay coordinates it
      gives the point in base coordinates.  The base item holds the identity.

    The Registration Sequence items carry both the Frame of Reference UID and a
    Referenced Image Sequence with every instance of the series; the Common Instance
    Reference Module lists the base series (this study) and the overlay series, under
    Studies Containing Other Referenced Instances when it is in another study (the
    CIRS pair is in different studies of different patients).
    """
    eq = equipment or _DEFAULT_EQUIPMENT
    base_headers = list(base_headers)
    overlay_headers = list(overlay_headers)
    if not base_headers or not overlay_headers:
        raise ValueError("both base_headers and overlay_headers are needed")
    stored = registration_matrix(matrix)
    base0, ov0 = base_headers[0], overlay_headers[0]
    charset = _output_charset(base0, eq)
    if not _CONTENT_LABEL.match(content_label):
        raise ValueError(f"content_label {content_label!r} must be 1-16 of A-Z, 0-9, '_' or space (CS)")
    _check_lo(series_description, "series_description", charset)
    _check_lo(content_description, "content_description", charset)
    for h, what in ((base0, "base"), (ov0, "overlay")):
        if not h.get("FrameOfReferenceUID"):
            raise ValueError(f"the {what} series has no FrameOfReferenceUID")
    number = _default_series_number(base0, 2000) if series_number is None else int(series_number)
    if not 1 <= number <= _IS_MAX:
        raise ValueError(f"series_number {number} outside 1..{_IS_MAX}")

    now = datetime.datetime.now()
    sop_uid = generate_uid(prefix=uid_root)
    ds = Dataset()
    ds.file_meta = _file_meta(SpatialRegistrationStorage, sop_uid)
    # SOP Common
    ds.SOPClassUID = SpatialRegistrationStorage
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = DA(now.date())
    ds.InstanceCreationTime = TM(now.time())
    # Patient, General Study, Patient Study
    _copy_patient_study(base0, ds, charset)
    # General Series + Spatial Registration Series
    ds.Modality = "REG"
    ds.SeriesInstanceUID = generate_uid(prefix=uid_root)
    ds.SeriesNumber = number
    ds.SeriesDate = DA(now.date())
    ds.SeriesTime = TM(now.time())
    ds.SeriesDescription = series_description
    _copy_laterality(base0, ds)
    # Frame of Reference: the registration frame is the base's
    ds.FrameOfReferenceUID = base0.FrameOfReferenceUID
    ds.PositionReferenceIndicator = base0.get("PositionReferenceIndicator", "") or ""
    # General + Enhanced General Equipment
    ds.Manufacturer = eq.manufacturer
    ds.ManufacturerModelName = eq.manufacturer_model_name
    ds.DeviceSerialNumber = eq.serial()
    ds.SoftwareVersions = eq.software_versions
    if eq.institution_name:
        ds.InstitutionName = eq.institution_name
    # Spatial Registration (Content Identification macro, Content Date/Time)
    ds.InstanceNumber = 1
    ds.ContentLabel = content_label
    ds.ContentDescription = content_description
    ds.ContentCreatorName = ""
    ds.ContentDate = DA(now.date())
    ds.ContentTime = TM(now.time())
    ds.RegistrationSequence = [
        _registration_item(base_headers, np.eye(4), CODE_FRAME_OF_REFERENCE_IDENTITY,
                           "Base frame = registration frame: identity"),
        _registration_item(overlay_headers, stored, CODE_IMAGE_CONTENT_BASED_ALIGNMENT,
                           "Maps overlay frame coordinates into the base frame"),
    ]
    # Common Instance Reference
    _common_instance_reference(ds, base0.StudyInstanceUID, (*base_headers, *overlay_headers))
    return ds


# --------------------------------------------------------------------------------------
# internals
# --------------------------------------------------------------------------------------


def _check_matrix(matrix: np.ndarray) -> np.ndarray:
    m = np.asarray(matrix, dtype=float)
    if m.shape != (4, 4):
        raise ValueError(f"matrix must be 4x4, got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise ValueError("matrix has non-finite values")
    if not np.allclose(m[3], (0, 0, 0, 1), atol=1e-9):
        raise ValueError(f"matrix last row must be [0, 0, 0, 1], got {m[3].tolist()}")
    if abs(np.linalg.det(m[:3, :3])) < 1e-9:
        raise ValueError("matrix is singular")
    return m


def _matrix_type(m: np.ndarray) -> str:
    """PS3.3 C.20.2.1.2: RIGID (proper rotation + translation), RIGID_SCALE (rotation
    times a diagonal scaling, so R^T R is diagonal), else AFFINE."""
    r = m[:3, :3]
    if np.allclose(r.T @ r, np.eye(3), atol=1e-5) and np.linalg.det(r) > 0:
        return "RIGID"
    # RIGID_SCALE (C.20.2.1.2): rotation with per-axis scaling, i.e. R.T R diagonal
    g = r.T @ r
    if np.allclose(g, np.diag(np.diag(g)), atol=1e-5) and np.linalg.det(r) > 0:
        return "RIGID_SCALE"
    return "AFFINE"


def _ds16(value: float) -> DS:
    return DS(float(value), auto_format=True)


def _registration_item(headers: Sequence[Dataset], m: np.ndarray, method: Code, comment: str) -> Dataset:
    matrix_item = Dataset()
    matrix_item.FrameOfReferenceTransformationMatrixType = _matrix_type(m)
    matrix_item.FrameOfReferenceTransformationMatrix = [_ds16(v) for v in m.reshape(-1)]
    reg = Dataset()
    reg.FrameOfReferenceTransformationComment = comment
    reg.RegistrationTypeCodeSequence = [_code_item(method)]
    reg.MatrixSequence = [matrix_item]
    item = Dataset()
    item.FrameOfReferenceUID = headers[0].FrameOfReferenceUID
    item.ReferencedImageSequence = [_sop_ref(h) for h in headers]
    item.MatrixRegistrationSequence = [reg]
    return item


def _common_instance_reference(ds: Dataset, own_study: str, headers: Sequence[Dataset]) -> None:
    studies: dict[str, dict[str, list[Dataset]]] = {}
    for h in headers:
        studies.setdefault(str(h.StudyInstanceUID), {}).setdefault(str(h.SeriesInstanceUID), []).append(h)

    def series_items(series: dict[str, list[Dataset]]) -> list[Dataset]:
        items = []
        for uid, hs in series.items():
            item = Dataset()
            item.SeriesInstanceUID = uid
            item.ReferencedInstanceSequence = [_sop_ref(h) for h in _unique(hs)]
            items.append(item)
        return items

    if own_study in studies:
        ds.ReferencedSeriesSequence = series_items(studies.pop(own_study))
    if studies:
        others = []
        for study_uid, series in studies.items():
            item = Dataset()
            item.StudyInstanceUID = study_uid
            item.ReferencedSeriesSequence = series_items(series)
            others.append(item)
        ds.StudiesContainingOtherReferencedInstancesSequence = others


def _unique(headers: Sequence[Dataset]) -> list[Dataset]:
    seen, out = set(), []
    for h in headers:
        if h.SOPInstanceUID not in seen:
            seen.add(h.SOPInstanceUID)
            out.append(h)
    return out


def _sop_ref(h: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = h.SOPClassUID
    item.ReferencedSOPInstanceUID = h.SOPInstanceUID
    return item


def _source_item(h: Dataset) -> Dataset:
    item = _sop_ref(h)
    item.PurposeOfReferenceCodeSequence = [_code_item(CODE_SOURCE_IMAGE_FOR_PROCESSING)]
    return item


def _code_item(code: Code) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


def _file_meta(sop_class: str, sop_instance: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    return meta


def _copy_patient_study(base: Dataset, ds: Dataset, charset) -> None:
    """Patient / General Study / Patient Study attributes, verbatim (same study as the base).

    ``charset`` is the object's Specific Character Set (``_output_charset``); the
    copied values are Unicode, so pydicom encodes them in it when the object is written.
    """
    ds.StudyInstanceUID = base.StudyInstanceUID
    if charset:
        ds.SpecificCharacterSet = deepcopy(charset)
    elif "SpecificCharacterSet" in ds:
        del ds.SpecificCharacterSet
    for kw in _COPIED_TYPE2:
        if kw in base:
            ds[kw] = deepcopy(base[kw])
        else:
            setattr(ds, kw, None)
    for kw in _COPIED_OPTIONAL:
        if kw in base:
            ds[kw] = deepcopy(base[kw])
        elif kw in ds:
            del ds[kw]


def _copy_laterality(base: Dataset, ds: Dataset) -> None:
    """General Series Laterality (Type 2C) and Body Part Examined (Type 3) from the base.

    Laterality is required for paired body parts.  The base's value is copied; without
    one, Body Part Examined is copied so that readers (and dciodvfy) can tell an
    unpaired part; when neither is known, Laterality is written empty, which PS3.3
    allows for "unknown" (dciodvfy: a warning; an absent Laterality: an error).
    """
    if "Laterality" in base:
        ds.Laterality = deepcopy(base["Laterality"]).value
        return
    body_part = base.get("BodyPartExamined")
    if body_part:
        ds.BodyPartExamined = body_part
    else:
        ds.Laterality = ""


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


def _contributing_equipment(base: Dataset, overlay: Dataset | None, charset) -> list[ContributingEquipment]:
    """The acquisition equipment of both source series (SOP Common, Type 3).

    Optional information: an item is left out when it cannot be built (no
    Manufacturer ...) or its text does not fit the base's character set (the overlay
    may come from another site with another Specific Character Set).
    """
    items = []
    for h in (base, overlay):
        if h is None:
            continue
        try:
            item = ContributingEquipment.for_image_acquisition(h)
        except Exception:
            continue
        if all(_encodable(t, charset) for t in _texts(item)):
            items.append(item)
    return items


def _default_series_number(base: Dataset, offset: int) -> int:
    try:
        number = int(base.get("SeriesNumber") or 0) + offset
    except (TypeError, ValueError):
        number = offset
    return max(1, min(number, _IS_MAX))


def _charset_terms(charset) -> list[str]:
    if not charset:
        return []
    values = [charset] if isinstance(charset, str) else list(charset)
    return [str(v).strip() for v in values]


def _codecs(charset) -> list[str]:
    """Python codecs of a Specific Character Set; the default repertoire is checked as ASCII."""
    terms = _charset_terms(charset)
    if not terms:
        return ["ascii"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        codecs = convert_encodings(terms)
    # pydicom writes the default repertoire (ISO-IR 6) with Latin-1, which would hide non-ASCII
    return ["ascii" if c == "iso8859" else c for c in codecs]


def _known_charset(charset) -> bool:
    """Every term is a DICOM defined term pydicom can encode (a misspelt or unknown
    term was decoded with a guessed set, so declaring it again would be wrong)."""
    return all(t in python_encoding for t in _charset_terms(charset))


_TEXT_VRS = {"LO", "SH", "ST", "LT", "UT", "UC", "PN"}
# Copied from the base besides the patient/study attributes (REG: Position Reference Indicator, LO).
_COPIED_OTHER = ("PositionReferenceIndicator",)


def _texts(ds: Dataset) -> Iterator[str]:
    """Every text value (LO, SH, ST, LT, UT, UC, PN) in ``ds``, sequence items included."""
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value or ():
                yield from _texts(item)
        elif elem.VR in _TEXT_VRS and elem.value not in (None, ""):
            values = elem.value if elem.VM > 1 else [elem.value]
            yield from (str(v) for v in values if v is not None)


def _fits(text: str, codec: str) -> bool:
    encoder = custom_encoders.get(codec)  # pydicom's strict JIS X 0201/0208/0212 encoders
    try:
        if encoder is not None:
            encoder(text)
        else:
            text.encode(codec)
    except (UnicodeError, LookupError, ValueError):
        return False
    return True


def _encodable(value: str, charset) -> bool:
    """Whether ``value`` can be written in ``charset`` (default repertoire = ASCII).

    With ISO 2022 code extensions (several terms) each character needs only to be in
    one of the declared sets: pydicom switches sets with escape sequences inside a value.
    """
    codecs = _codecs(charset)
    if any(_fits(value, c) for c in codecs):
        return True
    return len(codecs) > 1 and all(any(_fits(ch, c) for c in codecs) for ch in value)


def _output_charset(base: Dataset, eq: Equipment) -> str | list[str] | None:
    """The Specific Character Set of a derived object: the base's, else ``FALLBACK_CHARSET``.

    The base's set is kept whenever it covers every text value copied from the base
    and every equipment string, so the derived series carries the patient's name as
    the source series did (see the module docstring for when it does not).
    """
    charset = base.get("SpecificCharacterSet")
    copied = Dataset()
    for kw in (*_COPIED_TYPE2, *_COPIED_OPTIONAL, *_COPIED_OTHER):
        if kw in base:
            copied[kw] = base[kw]
    texts = [*_texts(copied), eq.manufacturer, eq.manufacturer_model_name, eq.software_versions,
             eq.serial(), eq.institution_name or ""]
    if _known_charset(charset) and all(_encodable(t, charset) for t in texts):
        return deepcopy(charset) if charset else None
    return FALLBACK_CHARSET


def _check_text(value: str, name: str, max_len: int, charset) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string")
    if len(value) > max_len:
        raise ValueError(f"{name} is {len(value)} characters, at most {max_len} allowed")
    if not _encodable(value, charset):
        raise ValueError(f"{name} {value!r} cannot be encoded in the base's character set {charset!r}")


def _check_lo(value: str, name: str, charset) -> None:
    _check_text(value, name, _LO_MAX, charset)
    if "\\" in value or any(ord(ch) < 32 for ch in value):
        raise ValueError(f"{name} must not contain backslashes or control characters")
