"""The Spatial Registration object (Modality REG) that records how the overlay was moved onto the base.

one Spatial Registration object (1.2.840.10008.5.1.4.1.1.66.1), Modality REG
    * the registration Frame of Reference is the base's; the Registration Sequence
      holds (a) the base Frame of Reference with the identity matrix and (b) the
      overlay's Frame of Reference with the matrix that maps overlay coordinates into
      base coordinates (see ``build_registration`` for the direction convention).

"""

from __future__ import annotations

import datetime
import re
from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import (
    SpatialRegistrationStorage,
    generate_uid,
)
from pydicom.valuerep import DA, DS, TM, DSdecimal, DSfloat

from dicom_node.dicom.derived import (
    DEFAULT_EQUIPMENT,
    IS_MAX,
    Equipment,
    check_lo,
    check_matrix,
    code_item,
    copy_laterality,
    copy_patient_study,
    default_series_number,
    file_meta,
    output_charset,
    sop_ref,
    unique_headers,
)
from dicom_node.dicom.uids import derived_uid

#: CID 7100 RCS Registration Method Type.
CODE_FRAME_OF_REFERENCE_IDENTITY = Code("125021", "DCM", "Frame of Reference Identity")
CODE_IMAGE_CONTENT_BASED_ALIGNMENT = Code("125024", "DCM", "Image Content-based Alignment")

CONTENT_LABEL = re.compile(r"^[A-Z0-9_ ]{1,16}$")


def registration_matrix(base_to_overlay: np.ndarray) -> np.ndarray:
    """The matrix to store in a Spatial Registration for the overlay's Frame of Reference.

    PS3.3 C.20.2.1.1: Frame of Reference Transformation Matrix ``M_AB`` maps a point
    ``(Bx, By, Bz, 1)`` in the registered frame B (here: the overlay's) to
    ``(Ax, Ay, Az, 1)`` in the registration frame A (the REG object's Frame of
    Reference = the base's).  Registration tools such as SimpleITK report the
    opposite, fixed(base) -> moving(overlay) point map, so the stored matrix is its
    inverse.  Both use DICOM patient (LPS) millimetres, so no axis flips are needed.
    """
    m = check_matrix(base_to_overlay)
    inv = np.linalg.inv(m)
    inv[3] = (0.0, 0.0, 0.0, 1.0)
    return inv


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
    uid_seed: str | None = None,
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
    eq = equipment or DEFAULT_EQUIPMENT
    base_headers = list(base_headers)
    overlay_headers = list(overlay_headers)
    if not base_headers or not overlay_headers:
        raise ValueError("both base_headers and overlay_headers are needed")
    stored = registration_matrix(matrix)
    base0, ov0 = base_headers[0], overlay_headers[0]
    charset = output_charset(base0, eq)
    if not CONTENT_LABEL.match(content_label):
        raise ValueError(f"content_label {content_label!r} must be 1-16 of A-Z, 0-9, '_' or space (CS)")
    check_lo(series_description, "series_description", charset)
    check_lo(content_description, "content_description", charset)
    for h, what in ((base0, "base"), (ov0, "overlay")):
        if not h.get("FrameOfReferenceUID"):
            raise ValueError(f"the {what} series has no FrameOfReferenceUID")
    number = default_series_number(base0, 2000) if series_number is None else int(series_number)
    if not 1 <= number <= IS_MAX:
        raise ValueError(f"series_number {number} outside 1..{IS_MAX}")

    now = datetime.datetime.now()
    # uid_seed: the series and instance UIDs follow from the job (dicom.uids.derived_uid), so a re-run is the same object
    sop_uid = derived_uid(uid_root, uid_seed, "reg") if uid_seed else generate_uid(prefix=uid_root)
    ds = Dataset()
    ds.file_meta = file_meta(SpatialRegistrationStorage, sop_uid)
    # SOP Common
    ds.SOPClassUID = SpatialRegistrationStorage
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = DA(now.date())
    ds.InstanceCreationTime = TM(now.time())
    # Patient, General Study, Patient Study
    copy_patient_study(base0, ds, charset)
    # General Series + Spatial Registration Series
    ds.Modality = "REG"
    ds.SeriesInstanceUID = derived_uid(uid_root, uid_seed, "reg-series") if uid_seed else generate_uid(prefix=uid_root)
    ds.SeriesNumber = number
    ds.SeriesDate = DA(now.date())
    ds.SeriesTime = TM(now.time())
    ds.SeriesDescription = series_description
    copy_laterality(base0, ds)
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


def _ds16(value: float) -> DSfloat | DSdecimal:
    ds = DS(float(value), auto_format=True)
    assert isinstance(ds, (DSfloat, DSdecimal))  # a float in: never None or a blank string out
    return ds


def _registration_item(headers: Sequence[Dataset], m: np.ndarray, method: Code, comment: str) -> Dataset:
    matrix_item = Dataset()
    matrix_item.FrameOfReferenceTransformationMatrixType = _matrix_type(m)
    matrix_item.FrameOfReferenceTransformationMatrix = [_ds16(v) for v in m.reshape(-1)]
    reg = Dataset()
    reg.FrameOfReferenceTransformationComment = comment
    reg.RegistrationTypeCodeSequence = [code_item(method)]
    reg.MatrixSequence = [matrix_item]
    item = Dataset()
    item.FrameOfReferenceUID = headers[0].FrameOfReferenceUID
    item.ReferencedImageSequence = [sop_ref(h) for h in headers]
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
            item.ReferencedInstanceSequence = [sop_ref(h) for h in unique_headers(hs)]
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


