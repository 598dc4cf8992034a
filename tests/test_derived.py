"""The objects the node writes: fused Secondary Capture series and Spatial Registration.

Each object is written to disk and checked twice: read back with pydicom (UIDs,
study membership, references, pixels, matrix direction) and validated with
dicom3tools' ``dciodvfy`` (no errors; every warning must be one we expect and
explain below).  The real-header tests use the CIRS phantom pair in
../shared/data (skipped when absent); the synthetic-header tests need nothing.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import dicom_helpers
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    SpatialRegistrationStorage,
    generate_uid,
)

from dicom_node.dicom.derived import Equipment
from dicom_node.dicom.reg import build_registration, registration_matrix
from dicom_node.dicom.sc import build_sc_series, overlay_slices_for_base, sc_series_description

UID_ROOT = "1.2.826.0.1.3680043.8.498."
DERIVATION = "DMF fusion of MR onto CT: ADF+CBF+FPDE exposures, VGG16 gradients; rigid MI registration"

# Warnings dciodvfy may give, and why they are acceptable:
EXPECTED_WARNINGS = {
    # the CIRS headers carry PatientName "test" (no '^'); copied verbatim from the base
    "source PN": re.compile(r"Patient's Name .*Retired Person Name form"),
    # base without Laterality or Body Part Examined: Laterality written empty = unknown
    "empty Laterality": re.compile(r"only permitted to be empty when actually unknown.*<Laterality>"),
    # include_geometry=True: IPP/IOP/FoR/Slice Location are Standard Extended in SC
    "SC geometry": dicom_helpers.SC_GEOMETRY_WARNINGS,
}


# ------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------


def dciodvfy(path: Path) -> list[str]:
    """Run dciodvfy; return its warning lines; fail on any error line or unexpected warning."""
    return dicom_helpers.dciodvfy(path, EXPECTED_WARNINGS.values(), max_warnings=8)


def write(ds: Dataset, path: Path) -> Dataset:
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


def synthetic_series(
    modality: str,
    n: int,
    *,
    rows: int,
    cols: int,
    spacing: tuple[float, float],
    z0: float,
    dz: float,
    study_uid: str,
    frame_uid: str,
    patient_id: str = "P123",
    patient_name: str = "Doe^Jane",
    series_number: int = 3,
    iop=(1, 0, 0, 0, 1, 0),
    body_part: str | None = "HEAD",
) -> list[Dataset]:
    """Minimal CT/MR headers (what a scanner sends, pixel data left out), ISO_IR 100."""
    return dicom_helpers.source_series(
        modality, n, rows=rows, cols=cols, spacing=spacing, dz=dz, z0=z0, iop=iop, study_uid=study_uid,
        frame_uid=frame_uid, patient_name=patient_name, patient_id=patient_id, study_date="20250101",
        series_number=series_number, body_part=body_part)


def rigid(rx_deg: float, ry_deg: float, rz_deg: float, t) -> np.ndarray:
    rx, ry, rz = np.deg2rad([rx_deg, ry_deg, rz_deg])
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    r_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    r_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    r_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    m = np.eye(4)
    m[:3, :3] = r_z @ r_y @ r_x
    m[:3, 3] = t
    return m


def stored_matrix(item: Dataset) -> np.ndarray:
    values = item.MatrixRegistrationSequence[0].MatrixSequence[0].FrameOfReferenceTransformationMatrix
    return np.array([float(v) for v in values]).reshape(4, 4)


def check_sc_series(written: list[Dataset], base, overlay, fused, overlay_index, *, series_number=None):
    """The pydicom-level promises of build_sc_series, on datasets read back from disk."""
    n = len(base)
    assert len(written) == n
    series_uids = {ds.SeriesInstanceUID for ds in written}
    assert len(series_uids) == 1
    series_uid = series_uids.pop()
    assert series_uid.startswith(UID_ROOT) and series_uid != base[0].SeriesInstanceUID
    sop_uids = [ds.SOPInstanceUID for ds in written]
    assert len(set(sop_uids)) == n and all(u.startswith(UID_ROOT) for u in sop_uids)
    expected_number = series_number or int(base[0].SeriesNumber) + 1000
    for i, ds in enumerate(written):
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPClassUID == SecondaryCaptureImageStorage == ds.SOPClassUID
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.StudyInstanceUID == base[0].StudyInstanceUID
        for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                   "AccessionNumber", "ReferringPhysicianName", "StudyID", "SpecificCharacterSet"):
            assert ds.get(kw) == base[0].get(kw), kw
        assert ds.get("StudyDescription", "") == base[0].get("StudyDescription", "")
        assert ds.Modality == "OT"
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
        assert ds.ConversionType == "WSD"
        assert ds.BurnedInAnnotation == "NO"
        assert ds.DerivationDescription == DERIVATION
        assert [(c.CodeValue, c.CodingSchemeDesignator) for c in ds.DerivationCodeSequence] == [("113085", "DCM")]
        assert ds.InstanceNumber == i + 1
        assert ds.SeriesNumber == expected_number
        assert len(ds.SeriesDescription) <= 64
        refs = ds.SourceImageSequence
        expected = [base[i]] + [overlay[k] for k in overlay_index[i]]
        assert [(r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID) for r in refs] == [
            (h.SOPClassUID, h.SOPInstanceUID) for h in expected
        ]
        for r in refs:
            code = r.PurposeOfReferenceCodeSequence[0]
            assert (code.CodeValue, code.CodingSchemeDesignator) == ("121322", "DCM")
        assert np.array_equal(ds.pixel_array, fused[i])
        assert [float(v) for v in ds.PixelSpacing] == [float(v) for v in base[i].PixelSpacing]


# ------------------------------------------------------------------------------------
# real headers: the CIRS phantom pair (CT base, MR overlay; different studies and patients)
# ------------------------------------------------------------------------------------


def _read_sorted(folder: Path, start: int, count: int) -> list[Dataset]:
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.glob("*.dcm"))]
    iop = np.asarray(headers[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    headers.sort(key=lambda h: float(np.dot(np.asarray(h.ImagePositionPatient, dtype=float), normal)))
    return headers[start:start + count]


@pytest.fixture(scope="module")
def cirs(cirs_dir):
    ct = _read_sorted(cirs_dir / "CT", 60, 5)
    mr = _read_sorted(cirs_dir / "MR", 80, 8)
    return ct, mr


def test_sc_grey_on_cirs(cirs, tmp_path):
    ct, mr = cirs
    rng = np.random.default_rng(1)
    fused = rng.integers(0, 256, (len(ct), int(ct[0].Rows), int(ct[0].Columns)), dtype=np.uint8)
    overlay_index = [[0, 1], [1, 2], [3], [], [6, 7]]
    desc = sc_series_description("dmf", "CT", "MR", None)
    series = build_sc_series(ct, mr, fused, uid_root=UID_ROOT, series_description=desc,
                             derivation_description=DERIVATION, overlay_index=overlay_index)
    written = [write(ds, tmp_path / f"sc{i:03d}.dcm") for i, ds in enumerate(series)]
    check_sc_series(written, ct, mr, fused, overlay_index)
    first = written[0]
    assert first.PhotometricInterpretation == "MONOCHROME2" and first.SamplesPerPixel == 1
    assert (first.BitsAllocated, first.BitsStored, first.HighBit, first.PixelRepresentation) == (8, 8, 7, 0)
    assert first.SeriesDescription == "FUSED MR>CT DMF"
    # geometry of the base slice, so workstations can link scrolling with the CT
    for ds, h in zip(written, ct):
        assert ds.FrameOfReferenceUID == h.FrameOfReferenceUID
        assert [float(v) for v in ds.ImagePositionPatient] == [float(v) for v in h.ImagePositionPatient]
        assert [float(v) for v in ds.ImageOrientationPatient] == [float(v) for v in h.ImageOrientationPatient]
        assert list(ds.PatientOrientation) == ["L", "P"]
    # the MR is in another study of another patient; the fused series stays in the CT's
    assert mr[0].StudyInstanceUID != first.StudyInstanceUID and mr[0].PatientID != first.PatientID
    warnings_ = dciodvfy(tmp_path / "sc000.dcm")
    assert any("Standard Extended" in w for w in warnings_)


def test_sc_rgb_on_cirs(cirs, tmp_path):
    ct, mr = cirs
    rng = np.random.default_rng(2)
    fused = rng.integers(0, 256, (len(ct), int(ct[0].Rows), int(ct[0].Columns), 3), dtype=np.uint8)
    overlay_index = [[k] for k in range(len(ct))]
    series = build_sc_series(ct, mr, fused, uid_root=UID_ROOT, series_description="FUSED MR>CT DMF",
                             derivation_description=DERIVATION, overlay_index=overlay_index, series_number=77)
    written = [write(ds, tmp_path / f"rgb{i:03d}.dcm") for i, ds in enumerate(series)]
    check_sc_series(written, ct, mr, fused, overlay_index, series_number=77)
    first = written[0]
    assert first.PhotometricInterpretation == "RGB" and first.SamplesPerPixel == 3
    assert first.PlanarConfiguration == 0
    assert "WindowCenter" not in first
    dciodvfy(tmp_path / "rgb000.dcm")


def test_registration_on_cirs(cirs, tmp_path):
    ct, mr = cirs
    base_to_overlay = rigid(3.0, -2.0, 7.5, (4.2, -11.3, 88.4))  # fixed(CT) -> moving(MR), SimpleITK's
    reg = build_registration(ct, mr, base_to_overlay, uid_root=UID_ROOT, content_label="RIGID_MI")
    ds = write(reg, tmp_path / "reg.dcm")
    assert ds.SOPClassUID == SpatialRegistrationStorage == ds.file_meta.MediaStorageSOPClassUID
    assert ds.Modality == "REG"
    assert ds.StudyInstanceUID == ct[0].StudyInstanceUID and ds.PatientID == ct[0].PatientID
    assert ds.SeriesInstanceUID.startswith(UID_ROOT) and ds.SOPInstanceUID.startswith(UID_ROOT)
    assert ds.SeriesInstanceUID not in (ct[0].SeriesInstanceUID, mr[0].SeriesInstanceUID)
    assert ds.SeriesNumber == int(ct[0].SeriesNumber) + 2000
    assert ds.FrameOfReferenceUID == ct[0].FrameOfReferenceUID  # the registration frame
    assert ds.ContentLabel == "RIGID_MI" and ds.InstanceNumber == 1
    assert ds.ContentDate and ds.ContentTime

    base_item, overlay_item = ds.RegistrationSequence
    assert base_item.FrameOfReferenceUID == ct[0].FrameOfReferenceUID
    assert overlay_item.FrameOfReferenceUID == mr[0].FrameOfReferenceUID
    assert np.allclose(stored_matrix(base_item), np.eye(4))
    m = stored_matrix(overlay_item)
    assert np.allclose(m, np.linalg.inv(base_to_overlay), atol=1e-9)
    assert overlay_item.MatrixRegistrationSequence[0].MatrixSequence[0].FrameOfReferenceTransformationMatrixType == "RIGID"
    code = overlay_item.MatrixRegistrationSequence[0].RegistrationTypeCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator) == ("125024", "DCM")

    # a point given in MR (overlay) coordinates lands on the CT (base) point it came from
    p_base = np.array([-120.5, 33.25, -140.0, 1.0])
    p_overlay = base_to_overlay @ p_base
    assert np.allclose(m @ p_overlay, p_base, atol=1e-6)

    # both series referenced: per registration item and in the Common Instance Reference
    assert [r.ReferencedSOPInstanceUID for r in base_item.ReferencedImageSequence] == [h.SOPInstanceUID for h in ct]
    assert [r.ReferencedSOPInstanceUID for r in overlay_item.ReferencedImageSequence] == [h.SOPInstanceUID for h in mr]
    (own,) = ds.ReferencedSeriesSequence
    assert own.SeriesInstanceUID == ct[0].SeriesInstanceUID
    assert len(own.ReferencedInstanceSequence) == len(ct)
    (other,) = ds.StudiesContainingOtherReferencedInstancesSequence
    assert other.StudyInstanceUID == mr[0].StudyInstanceUID != ct[0].StudyInstanceUID
    (other_series,) = other.ReferencedSeriesSequence
    assert other_series.SeriesInstanceUID == mr[0].SeriesInstanceUID
    assert {r.ReferencedSOPInstanceUID for r in other_series.ReferencedInstanceSequence} == {h.SOPInstanceUID for h in mr}
    dciodvfy(tmp_path / "reg.dcm")


def test_default_overlay_index_on_cirs(cirs):
    """With the registration matrix, each CT slice references the MR slices around it."""
    ct, mr = cirs
    # put CT slice 2 exactly onto MR slice 4 (axial both; MR slices 2 mm apart here)
    spacing = float(np.median(np.diff([float(h.ImagePositionPatient[2]) for h in mr])))
    z_ct = float(ct[2].ImagePositionPatient[2])
    z_mr = float(mr[4].ImagePositionPatient[2])
    base_to_overlay = np.eye(4)
    base_to_overlay[2, 3] = z_mr - z_ct
    index = overlay_slices_for_base(ct, mr, base_to_overlay)
    assert index[2] == [4]
    for i, idx in enumerate(index):
        z = float(ct[i].ImagePositionPatient[2]) + z_mr - z_ct
        assert idx == [k for k, h in enumerate(mr) if abs(float(h.ImagePositionPatient[2]) - z) < spacing - 1e-6]


# ------------------------------------------------------------------------------------
# synthetic headers: the module without shared data
# ------------------------------------------------------------------------------------


@pytest.fixture
def pair():
    """CT base (6 slices, 3 mm) and MR overlay (12 slices, 1.5 mm) of one patient and study."""
    study = generate_uid()
    ct = synthetic_series("CT", 6, rows=32, cols=40, spacing=(0.8, 0.8), z0=0.0, dz=3.0,
                          study_uid=study, frame_uid=generate_uid())
    mr = synthetic_series("MR", 12, rows=24, cols=24, spacing=(1.2, 1.2), z0=-1.5, dz=1.5,
                          study_uid=study, frame_uid=generate_uid(), series_number=4)
    return ct, mr


def test_sc_synthetic_default_index_and_strict_conformance(pair, tmp_path):
    ct, mr = pair
    fused = (np.arange(6 * 32 * 40) % 256).astype(np.uint8).reshape(6, 32, 40)
    series = build_sc_series(ct, mr, fused, uid_root=UID_ROOT, series_description="FUSED MR>CT DMF",
                             derivation_description=DERIVATION, include_geometry=False)
    written = [write(ds, tmp_path / f"s{i}.dcm") for i, ds in enumerate(series)]
    # identity geometry: base z = 0, 3, ... 15; MR z = -1.5 + 1.5 k -> slices within 1.5 mm
    expected_index = [[k for k in range(12) if abs(-1.5 + 1.5 * k - 3.0 * i) < 1.5 - 1e-6] for i in range(6)]
    assert expected_index[0] == [1] and expected_index[1] == [3]
    check_sc_series(written, ct, mr, fused, expected_index)
    assert "ImagePositionPatient" not in written[0] and "FrameOfReferenceUID" not in written[0]
    assert written[0].BodyPartExamined == "HEAD" and "Laterality" not in written[0]
    # proper PN, known body part, no geometry: a strictly standard object, no warnings at all
    assert dciodvfy(tmp_path / "s0.dcm") == []


def test_sc_synthetic_with_geometry(pair, tmp_path):
    ct, mr = pair
    fused = np.zeros((6, 32, 40, 3), np.uint8)
    fused[..., 0] = 200
    series = build_sc_series(ct, mr, fused, uid_root=UID_ROOT, series_description="FUSED MR>CT DMF",
                             derivation_description=DERIVATION, overlay_index=[[]] * 6,
                             equipment=Equipment(device_serial_number="FUSIONNODE", institution_name="General"))
    ds = write(series[3], tmp_path / "g.dcm")
    assert [float(v) for v in ds.ImagePositionPatient] == [float(v) for v in ct[3].ImagePositionPatient]
    assert float(ds.SliceLocation) == float(ct[3].SliceLocation)
    assert ds.DeviceSerialNumber == "FUSIONNODE" and ds.InstitutionName == "General"
    assert len(ds.SourceImageSequence) == 1  # the base slice only
    assert {e.Manufacturer for e in ds.ContributingEquipmentSequence} >= {"ACME"}
    warnings_ = dciodvfy(tmp_path / "g.dcm")
    assert all(EXPECTED_WARNINGS["SC geometry"].search(w) for w in warnings_)


def test_registration_synthetic_same_study(pair, tmp_path):
    ct, mr = pair
    base_to_overlay = rigid(10.0, 0.0, -20.0, (5.0, 0.0, -3.0))
    reg = build_registration(ct, mr, base_to_overlay, uid_root=UID_ROOT, content_label="RIGID_MI",
                             series_number=9)
    ds = write(reg, tmp_path / "reg.dcm")
    assert ds.SeriesNumber == 9
    assert "StudiesContainingOtherReferencedInstancesSequence" not in ds
    assert {s.SeriesInstanceUID for s in ds.ReferencedSeriesSequence} == {ct[0].SeriesInstanceUID, mr[0].SeriesInstanceUID}
    m = stored_matrix(ds.RegistrationSequence[1])
    # the stored matrix is the inverse of the given one, also after DS (16-character) encoding
    assert np.allclose(m, np.linalg.inv(base_to_overlay), atol=1e-9)
    corner = np.array([250.0, -250.0, 180.0, 1.0])
    assert np.allclose(m @ (base_to_overlay @ corner), corner, atol=1e-6)
    assert not np.allclose(m, base_to_overlay)  # non-trivial: direction matters
    assert dciodvfy(tmp_path / "reg.dcm") == []


def test_registration_matrix_convention():
    b2o = rigid(0, 0, 90, (10, 0, 0))  # base point (x, y, z) -> overlay (10 - y, x, z)
    assert np.allclose(b2o @ [1, 2, 3, 1], [8, 1, 3, 1])
    m = registration_matrix(b2o)
    assert np.allclose(m @ [8, 1, 3, 1], [1, 2, 3, 1])  # overlay -> base
    with pytest.raises(ValueError, match="4x4"):
        registration_matrix(np.eye(3))
    with pytest.raises(ValueError, match="last row"):
        registration_matrix(np.ones((4, 4)))
    singular = np.eye(4)
    singular[2, 2] = 0
    with pytest.raises(ValueError, match="singular"):
        registration_matrix(singular)


def test_matrix_type_scaled_and_affine(pair, tmp_path):
    ct, mr = pair
    scaled = np.diag([1.1, 0.9, 1.0, 1.0])
    ds = build_registration(ct, mr, scaled, uid_root=UID_ROOT, content_label="SCALED")
    kind = ds.RegistrationSequence[1].MatrixRegistrationSequence[0].MatrixSequence[0]
    assert kind.FrameOfReferenceTransformationMatrixType == "RIGID_SCALE"
    sheared = np.eye(4)
    sheared[0, 1] = 0.2
    ds = build_registration(ct, mr, sheared, uid_root=UID_ROOT, content_label="SHEAR")
    kind = ds.RegistrationSequence[1].MatrixRegistrationSequence[0].MatrixSequence[0]
    assert kind.FrameOfReferenceTransformationMatrixType == "AFFINE"


def test_overlay_slices_for_tilted_registration(pair):
    ct, mr = pair
    # translation by half an MR slice: each CT slice falls between two MR slices
    shift = np.eye(4)
    shift[2, 3] = 0.75
    index = overlay_slices_for_base(ct, mr, shift)
    assert index[1] == [3, 4]  # z = 3.75 between MR slice 3 (z = 3.0) and 4 (z = 4.5)
    # a 20 degree tilt about x spreads a 32 x 0.8 mm plane over several MR slices
    tilted = overlay_slices_for_base(ct, mr, rigid(20.0, 0, 0, (0, 0, 0)))
    assert len(tilted[2]) > len(index[2]) and all(0 <= k < 12 for idx in tilted for k in idx)
    # a slice far outside the overlay references none
    far = np.eye(4)
    far[2, 3] = 500.0
    assert overlay_slices_for_base(ct, mr, far) == [[]] * 6


def test_oblique_patient_orientation(tmp_path):
    c, s = np.cos(np.deg2rad(30)), np.sin(np.deg2rad(30))
    study = generate_uid()
    base = synthetic_series("CT", 2, rows=8, cols=8, spacing=(1.0, 1.0), z0=0, dz=1, study_uid=study,
                            frame_uid=generate_uid(), iop=(1, 0, 0, 0, c, -s))
    series = build_sc_series(base, [], np.zeros((2, 8, 8), np.uint8), uid_root=UID_ROOT,
                             series_description="X", derivation_description="Y", overlay_index=[[], []])
    assert list(series[0].PatientOrientation) == ["L", "PF"]


def test_series_number_default_and_clipping(pair):
    ct, mr = pair
    fused = np.zeros((6, 32, 40), np.uint8)
    kw = dict(uid_root=UID_ROOT, series_description="FUSED", derivation_description="D", overlay_index=[[]] * 6)
    assert build_sc_series(ct, mr, fused, **kw)[0].SeriesNumber == 1003
    for h in ct:
        h.SeriesNumber = 2**31 - 5
    assert build_sc_series(ct, mr, fused, **kw)[0].SeriesNumber == 2**31 - 1
    for h in ct:
        del h.SeriesNumber
    assert build_sc_series(ct, mr, fused, **kw)[0].SeriesNumber == 1000


def test_patient_study_copied_verbatim_and_type2_present(pair):
    ct, mr = pair
    for h in ct:
        h.PatientName = "Müller^Jörg"  # Latin-1, base says ISO_IR 100
        h.PatientSex = "O"
        del h.AccessionNumber
        h.PatientAge = "055Y"
    ds = build_sc_series(ct, mr, np.zeros((6, 32, 40), np.uint8), uid_root=UID_ROOT, series_description="F",
                         derivation_description="D", overlay_index=[[]] * 6)[0]
    assert ds.PatientName == "Müller^Jörg" and ds.SpecificCharacterSet == "ISO_IR 100"
    assert ds.PatientAge == "055Y" and ds.PatientSex == "O"
    assert "AccessionNumber" in ds and not ds.AccessionNumber  # Type 2: present, empty


def test_sc_rejects_bad_input(pair):
    ct, mr = pair
    ok = np.zeros((6, 32, 40), np.uint8)
    kw = dict(uid_root=UID_ROOT, series_description="FUSED", derivation_description="D", overlay_index=[[]] * 6)
    with pytest.raises(TypeError, match="uint8"):
        build_sc_series(ct, mr, ok.astype(np.uint16), **kw)
    with pytest.raises(ValueError, match="slices"):
        build_sc_series(ct, mr, ok[:5], **kw)
    with pytest.raises(ValueError, match="base grid"):
        build_sc_series(ct, mr, np.zeros((6, 16, 40), np.uint8), **kw)
    with pytest.raises(ValueError, match="shape"):
        build_sc_series(ct, mr, np.zeros((6, 32, 40, 4), np.uint8), **kw)
    with pytest.raises(ValueError, match="at most 64"):
        build_sc_series(ct, mr, ok, **{**kw, "series_description": "X" * 65})
    with pytest.raises(ValueError, match="character set"):
        build_sc_series(ct, mr, ok, **{**kw, "series_description": "FUSED MR→CT"})
    with pytest.raises(IndexError):
        build_sc_series(ct, mr, ok, **{**kw, "overlay_index": [[12]] * 6})
    with pytest.raises(ValueError, match="entries"):
        build_sc_series(ct, mr, ok, **{**kw, "overlay_index": [[]] * 5})


def test_registration_rejects_bad_input(pair):
    ct, mr = pair
    with pytest.raises(ValueError, match="content_label"):
        build_registration(ct, mr, np.eye(4), uid_root=UID_ROOT, content_label="rigid mi")
    no_frame = [Dataset(h) for h in mr]
    for h in no_frame:
        del h.FrameOfReferenceUID
    with pytest.raises(ValueError, match="FrameOfReferenceUID"):
        build_registration(ct, no_frame, np.eye(4), uid_root=UID_ROOT, content_label="X")


def test_sc_series_description():
    assert sc_series_description("dmf", "CT", "MR", None) == "FUSED MR>CT DMF"
    assert sc_series_description("mr-pet", "pt", "mr", None) == "FUSED MR>PT MR-PET"
    warned = sc_series_description("dmf", "CT", "MR", "mi low 0.21")
    assert warned.startswith("CHECK REG: MI LOW 0.21") and warned.endswith("FUSED MR>CT DMF")
    long = sc_series_description("x" * 80, "CT", "MR", "y\\" * 40)
    assert len(long) <= 64 and long.startswith("CHECK REG:") and "\\" not in long
    assert sc_series_description("é", "CT", "MR", None).isascii()


@pytest.mark.skipif(shutil.which("dcmdump") is None, reason="DCMTK dcmdump not installed")
def test_dcmtk_reads_the_objects(pair, tmp_path):
    """A second, independent parser (DCMTK) reads both objects without complaint."""
    ct, mr = pair
    sc = build_sc_series(ct, mr, np.zeros((6, 32, 40), np.uint8), uid_root=UID_ROOT, series_description="F",
                         derivation_description="D", overlay_index=[[]] * 6)[0]
    sc.save_as(tmp_path / "sc.dcm", enforce_file_format=True)
    build_registration(ct, mr, np.eye(4), uid_root=UID_ROOT, content_label="X").save_as(
        tmp_path / "reg.dcm", enforce_file_format=True)
    for name in ("sc.dcm", "reg.dcm"):
        proc = subprocess.run(["dcmdump", "-q", "-E", str(tmp_path / name)], capture_output=True, text=True)
        assert proc.returncode == 0 and "E:" not in proc.stderr and "W:" not in proc.stderr, proc.stderr


def test_uid_seed_makes_the_same_objects_again(pair):
    """A re-run of a job (same seed) writes the same UIDs, so a PACS keeps one copy; another seed, other UIDs."""
    ct, mr = pair
    fused = np.zeros((6, 32, 40), np.uint8)

    def make(seed):
        sc = build_sc_series(ct, mr, fused, uid_root=UID_ROOT, series_description="FUSED MR>CT DMF",
                             derivation_description=DERIVATION, include_geometry=False, uid_seed=seed)
        reg = build_registration(ct, mr, np.eye(4), uid_root=UID_ROOT, content_label="RIGID_MI", uid_seed=seed)
        return [(str(d.SeriesInstanceUID), str(d.SOPInstanceUID)) for d in (*sc, reg)]

    first = make("job-seed-a")
    assert first == make("job-seed-a")
    assert len({s for s, _ in first}) == 2 and len({i for _, i in first}) == 7
    assert all(u.startswith(UID_ROOT) and len(u) <= 64 for pair_ in first for u in pair_)
    other = make("job-seed-b")
    assert not {u for p in other for u in p} & {u for p in first for u in p}
    unseeded = make(None)
    assert unseeded != make(None)  # without a seed: fresh UIDs, as before


def test_two_pipelines_on_one_base_get_their_own_numbers_and_descriptions(pair):
    """Measured bug: MR+PT and MR+CT of one base both made Series Number 1002 and REG 2002 of one description."""
    from dicom_node.config import parse_config
    from dicom_node.workflow import stages

    ct, mr = pair
    settings = parse_config({"pipelines": [
        {"name": name, "base": {"modality": ["CT"]}, "overlay": {"modality": ["MR"]}} for name in ("ct-mr", "ct-mr2")]})

    class V:  # derive reads only a volume's headers and modality
        def __init__(self, headers, modality):
            self.headers, self.modality = headers, modality

    reg = stages.Registration(tuple(tuple(float(v) for v in r) for r in np.eye(4)))
    fused = stages.FusedStack(np.zeros((6, 32, 40), np.uint8), "dmf", ("cbf", "tif", "wls"), "image", "cpu")
    out = [stages.derive(stages.LoadedPair(V(ct, "CT"), V(mr, "MR")), reg, fused, p, UID_ROOT,  # type: ignore[arg-type]  # - a stand-in volume: derive reads only headers and modality
                         uid_seed=f"seed-{p.name}", series_offset=i)
           for i, p in enumerate(settings.pipelines)]
    base_number = int(ct[0].SeriesNumber)
    assert [int(o.sc[0].SeriesNumber) for o in out] == [base_number + 1000, base_number + 1001]
    assert [int(o.reg.SeriesNumber) for o in out] == [base_number + 2000, base_number + 2001]
    assert len({o.sc[0].SeriesDescription for o in out}) == 2 and len({o.reg.SeriesDescription for o in out}) == 2
    assert out[0].reg.SeriesDescription == "REG MR>CT CT-MR"
    v2 = stages.derive(stages.LoadedPair(V(ct, "CT"), V(mr, "MR")), reg, fused, settings.pipelines[0],  # type: ignore[arg-type]  # - a stand-in volume: derive reads only headers and modality
                       UID_ROOT, uid_seed="seed-v2", version=2)
    assert v2.sc[0].SeriesDescription.endswith("CT-MR V2") and v2.reg.SeriesDescription.endswith("V2")
    assert "(version 2)" in v2.sc[0].DerivationDescription
