"""dicom_node.dicom.volume: DICOM series -> SimpleITK volume with checked geometry; modality scales."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_node.dicom.volume import GeometryError, load_series
from fusion.intensity import normalise_for_modality, percentile_normalise, suv_bw_factor, window

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
PET_STORAGE = "1.2.840.10008.5.1.4.1.1.128"
ENHANCED_CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    ax, ay, az = np.radians([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ rx @ ry


def _base(sop_class: str, modality: str, series_uid: str, rows: int, cols: int) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientID = "SYN1"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.3"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    return ds


def write_series(
    folder: Path,
    positions: list,
    *,
    iop=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    rows: int = 8,
    cols: int = 10,
    pixel_spacing=(0.8, 0.7),
    modality: str = "CT",
    intercept: float = -1024.0,
    slope: float = 1.0,
    seed: int = 3,
    overrides: dict | None = None,
    extra=None,
) -> list[dict]:
    """One file per position, shuffled names and instance numbers; returns what each slice holds.

    Stored value of slice ``k`` (in the order given) at (row r, column c):
    ``100 * k + 10 * r + c``, so the test can tell slices and pixels apart.
    ``overrides`` maps a slice index to header changes (e.g. another Rows).
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(positions))
    series_uid = generate_uid()
    out = []
    for k, ipp in enumerate(positions):
        o = (overrides or {}).get(k, {})
        r, c = o.get("Rows", rows), o.get("Columns", cols)
        ds = _base(PET_STORAGE if modality == "PT" else CT_STORAGE, modality, series_uid, r, c)
        ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in o.get("iop", iop)]
        ds.PixelSpacing = [f"{v:.6f}" for v in o.get("PixelSpacing", pixel_spacing)]
        ds.InstanceNumber = int(order[k]) + 1
        ds.RescaleIntercept = f"{intercept:g}"
        ds.RescaleSlope = f"{o.get('slope', slope):g}"
        stored = (100 * k + 10 * np.arange(r)[:, None] + np.arange(c)[None, :]).astype(np.int16)
        ds.PixelData = stored.tobytes()
        if extra is not None:
            extra(ds, k)
        name = folder / f"IMG{int(order[k]) * 7 % 97:04d}.dcm"
        ds.save_as(name, enforce_file_format=True)
        out.append({"ipp": np.asarray(ipp, float), "stored": stored, "path": name, "slope": o.get("slope", slope)})
    return out


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.dcm"))


def _axial(n: int = 6, step: float = 2.5, origin=(-10.0, -20.0, 30.0)) -> list:
    return [np.add(origin, (0, 0, -k * step)) for k in range(n)]  # given in descending z order


# ---------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------


def test_axial_series_sorted_by_position_with_hu(tmp_path):
    slices = write_series(tmp_path, _axial())
    vol = load_series(_files(tmp_path))
    img = vol.image
    assert img.GetSize() == (10, 8, 6)
    assert img.GetSpacing() == pytest.approx((0.7, 0.8, 2.5))
    # ascending along the normal (+z): the last slice written is the first in the volume
    assert img.GetOrigin() == pytest.approx(tuple(slices[-1]["ipp"]))
    assert img.GetDirection() == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1))
    arr = vol.array()
    assert arr.dtype == np.float32
    for z, k in enumerate(reversed(range(6))):
        np.testing.assert_array_equal(arr[z], slices[k]["stored"] - 1024.0)
        assert Path(vol.paths[z]) == slices[k]["path"]
        assert float(vol.headers[z].ImagePositionPatient[2]) == pytest.approx(slices[k]["ipp"][2])
        assert "PixelData" not in vol.headers[z]
    assert vol.units == "HU" and vol.modality == "CT"
    assert vol.series_uid and vol.study_uid.endswith(".1") and vol.frame_of_reference_uid.endswith(".3")
    # index -> physical point agrees with every slice's header
    for z, k in enumerate(reversed(range(6))):
        p = img.TransformIndexToPhysicalPoint((3, 5, z))
        assert p == pytest.approx(tuple(slices[k]["ipp"] + 3 * 0.7 * np.array([1, 0, 0]) + 5 * 0.8 * np.array([0, 1, 0])))


def test_oblique_orientation(tmp_path):
    rot = _rotation(20.0, -10.0, 30.0)
    row, col = rot[:, 0], rot[:, 1]
    normal = np.cross(row, col)
    origin = np.array([5.0, -7.0, 12.0])
    positions = [origin + k * 3.0 * normal for k in (3, 0, 5, 1, 4, 2)]  # not in order
    slices = write_series(tmp_path, positions, iop=tuple(row) + tuple(col), pixel_spacing=(0.9, 0.6))
    vol = load_series(_files(tmp_path))
    d = np.array(vol.image.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(d.T @ d, np.eye(3), atol=1e-7)
    assert np.linalg.det(d) == pytest.approx(1.0)
    np.testing.assert_allclose(d[:, 0], row, atol=1e-7)
    np.testing.assert_allclose(d[:, 1], col, atol=1e-7)
    np.testing.assert_allclose(d[:, 2], normal, atol=1e-7)
    assert vol.image.GetSpacing() == pytest.approx((0.6, 0.9, 3.0), abs=1e-5)
    assert vol.image.GetOrigin() == pytest.approx(tuple(origin), abs=1e-5)
    arr = vol.array()
    for s in slices:
        z = int(round((s["ipp"] - origin) @ normal / 3.0))
        np.testing.assert_array_equal(arr[z], s["stored"] - 1024.0)
        corner = vol.image.TransformIndexToPhysicalPoint((9, 7, z))
        expect = s["ipp"] + 9 * 0.6 * row + 7 * 0.9 * col
        np.testing.assert_allclose(corner, expect, atol=1e-4)


def test_sagittal_sorted_along_normal_not_z(tmp_path):
    # sagittal: row = +y (posterior), column = -z (down); normal = row x col = (-1, 0, 0)
    iop = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
    positions = [np.array([x, -50.0, 60.0]) for x in (4.0, -2.0, 1.0, -5.0, 7.0)]
    write_series(tmp_path, positions, iop=iop)
    vol = load_series(_files(tmp_path))
    xs = [float(h.ImagePositionPatient[0]) for h in vol.headers]
    assert xs == [7.0, 4.0, 1.0, -2.0, -5.0]  # ascending along the normal -x
    d = np.array(vol.image.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(d[:, 2], (-1, 0, 0), atol=1e-9)
    assert vol.image.GetSpacing()[2] == pytest.approx(3.0)


def test_per_slice_rescale(tmp_path):
    slices = write_series(tmp_path, _axial(4), overrides={1: {"slope": 2.0}}, intercept=-1000.0)
    vol = load_series(_files(tmp_path))
    arr = vol.array()
    z = 4 - 1 - 1  # slice 1 of the descending list sits at index 2
    np.testing.assert_array_equal(arr[z], slices[1]["stored"] * 2.0 - 1000.0)
    np.testing.assert_array_equal(arr[0], slices[3]["stored"] - 1000.0)


def test_small_tilt_within_tolerance_is_accepted(tmp_path):
    t = math.tan(math.radians(0.3))
    positions = [np.array([0.0, k * 2.5 * t, k * 2.5]) for k in range(6)]
    write_series(tmp_path, positions)
    vol = load_series(_files(tmp_path))
    assert vol.image.GetSize()[2] == 6


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("tilt", "gantry tilt"),
        ("irregular", "irregular slice spacing"),
        ("missing", "missing slice"),
        ("duplicate", "duplicate slice position"),
        ("sizes", "mixed image sizes"),
        ("spacing", "mixed pixel spacings"),
        ("orientation", "mixed orientations"),
        ("single", "at least 2"),
    ],
)
def test_refusals(tmp_path, case, message):
    step = 2.5
    positions = [np.array([0.0, 0.0, k * step]) for k in range(6)]
    overrides = {}
    if case == "tilt":  # 5 degrees: y shifts with z
        t = math.tan(math.radians(5.0))
        positions = [p + (0, p[2] * t, 0) for p in positions]
    elif case == "irregular":
        positions = [p + (0, 0, 0.3) if k >= 3 else p for k, p in enumerate(positions)]
    elif case == "missing":
        del positions[2]
    elif case == "duplicate":
        positions[4] = positions[1].copy()
    elif case == "sizes":
        overrides = {2: {"Rows": 9}}
    elif case == "spacing":
        overrides = {2: {"PixelSpacing": (0.8, 0.75)}}
    elif case == "orientation":
        overrides = {3: {"iop": (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)}}
    elif case == "single":
        positions = positions[:1]
    write_series(tmp_path, positions, overrides=overrides)
    with pytest.raises(GeometryError, match=message) as err:
        load_series(_files(tmp_path))
    text = str(err.value)
    if case in ("irregular", "missing"):
        # names the gap: both neighbouring files and positions
        assert "between" in text and text.count(".dcm") >= 2
    if case == "missing":
        assert "5.000 mm" in text and "about 1 slice" in text


def test_spacing_tolerance_accepts_rounding(tmp_path):
    # IPPs written with rounding noise of a few micrometres: accepted, step is the mean gap
    rng = np.random.default_rng(0)
    positions = [np.array([0.0, 0.0, k * 1.25 + rng.uniform(-0.003, 0.003)]) for k in range(10)]
    write_series(tmp_path, positions)
    vol = load_series(_files(tmp_path))
    zs = sorted(p[2] for p in positions)
    assert vol.image.GetSpacing()[2] == pytest.approx((zs[-1] - zs[0]) / 9, abs=1e-5)


def test_not_dicom_and_mixed_series(tmp_path):
    bad = tmp_path / "junk.dcm"
    bad.write_bytes(b"not dicom at all")
    with pytest.raises(GeometryError, match="not a readable DICOM"):
        load_series([bad])
    write_series(tmp_path / "a", _axial(3))
    write_series(tmp_path / "b", _axial(3))
    with pytest.raises(GeometryError, match="2 different series"):
        load_series(_files(tmp_path / "a") + _files(tmp_path / "b"))


# ---------------------------------------------------------------------------
# enhanced multi-frame
# ---------------------------------------------------------------------------


def _enhanced(path: Path, z_positions: list[float], rows: int = 6, cols: int = 5) -> np.ndarray:
    ds = _base(ENHANCED_CT_STORAGE, "CT", generate_uid(), rows, cols)
    ds.NumberOfFrames = len(z_positions)
    shared = Dataset()
    ori = Dataset()
    ori.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    meas = Dataset()
    meas.PixelSpacing = [0.5, 0.4]
    meas.SliceThickness = 2.0
    pvt = Dataset()
    pvt.RescaleIntercept = -1024
    pvt.RescaleSlope = 1
    pvt.RescaleType = "HU"
    shared.PlaneOrientationSequence = DicomSequence([ori])
    shared.PixelMeasuresSequence = DicomSequence([meas])
    shared.PixelValueTransformationSequence = DicomSequence([pvt])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    per = []
    for z in z_positions:
        item = Dataset()
        pos = Dataset()
        pos.ImagePositionPatient = [-3.0, 4.0, z]
        item.PlanePositionSequence = DicomSequence([pos])
        per.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per)
    frames = np.stack([np.full((rows, cols), int(10 * z), np.int16) for z in z_positions])
    ds.PixelData = frames.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return frames


def test_enhanced_multiframe(tmp_path):
    zs = [4.0, 0.0, 6.0, 2.0, 8.0]
    frames = _enhanced(tmp_path / "enh.dcm", zs)
    vol = load_series([tmp_path / "enh.dcm"])
    assert vol.image.GetSize() == (5, 6, 5)
    assert vol.image.GetSpacing() == pytest.approx((0.4, 0.5, 2.0))
    assert vol.image.GetOrigin() == pytest.approx((-3.0, 4.0, 0.0))
    assert vol.frames == (1, 3, 0, 2, 4)
    arr = vol.array()
    for z, f in enumerate(vol.frames):
        np.testing.assert_array_equal(arr[z], frames[f] - 1024.0)
    assert vol.units == "HU"


def test_enhanced_without_positions_is_refused(tmp_path):
    path = tmp_path / "enh.dcm"
    _enhanced(path, [0.0, 2.0, 4.0])
    ds = pydicom.dcmread(path)
    for item in ds.PerFrameFunctionalGroupsSequence:
        del item.PlanePositionSequence
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(GeometryError, match="not supported yet"):
        load_series([path])


# ---------------------------------------------------------------------------
# PET: SUV body weight
# ---------------------------------------------------------------------------


def _pet_headers(weight: float | None):
    def extra(ds: Dataset, k: int) -> None:
        ds.Units = "BQML"
        ds.DecayCorrection = "START"
        ds.CorrectedImage = ["ATTN", "DECY"]
        ds.SeriesDate = "20260105"
        ds.SeriesTime = "101500"
        ds.AcquisitionTime = "101500"
        if weight is not None:
            ds.PatientWeight = weight
        rp = Dataset()
        rp.RadionuclideTotalDose = 370e6
        rp.RadionuclideHalfLife = 6586.2
        rp.RadiopharmaceuticalStartTime = "091500"
        ds.RadiopharmaceuticalInformationSequence = DicomSequence([rp])

    return extra


def test_pet_suv_bw(tmp_path):
    slices = write_series(tmp_path, _axial(3), modality="PT", intercept=0.0, slope=3.0, extra=_pet_headers(72.5))
    vol = load_series(_files(tmp_path))
    assert vol.units == "SUVbw"
    factor = suv_bw_factor(72.5, 370e6, 6586.2, 3600.0)
    assert vol.suv_factor == pytest.approx(factor)
    # hand calculation: 72.5 kg / (370 MBq decayed for one hour)
    assert factor == pytest.approx(72500.0 / (370e6 * math.exp(-math.log(2) * 3600 / 6586.2)))
    np.testing.assert_allclose(vol.array()[0], slices[2]["stored"] * 3.0 * factor, rtol=1e-6)


def test_pet_without_weight_stays_raw(tmp_path):
    write_series(tmp_path, _axial(3), modality="PT", intercept=0.0, extra=_pet_headers(None))
    vol = load_series(_files(tmp_path))
    assert vol.units == "raw" and vol.suv_factor is None
    assert any("PatientWeight" in n for n in vol.notes)


def test_suv_factor_rejects_nonsense():
    with pytest.raises(ValueError, match="patient_weight_kg"):
        suv_bw_factor(0.0, 370e6, 6586.2, 10.0)
    with pytest.raises(ValueError, match="seconds_since_injection"):
        suv_bw_factor(70.0, 370e6, 6586.2, -5.0)
    assert suv_bw_factor(70.0, 370e6, 6586.2, 0.0) == pytest.approx(70000.0 / 370e6)


# ---------------------------------------------------------------------------
# modality scales (fusion.intensity additions)
# ---------------------------------------------------------------------------


def test_window_follows_dicom_linear_voi():
    # PS3.3 C.11.2.1.2.1 with c=40, w=80: 0 at x <= c - 0.5 - (w-1)/2 = 0, 1 at x > c - 0.5 + (w-1)/2 = 79
    x = np.array([-1000.0, 0.0, 0.1, 40.0, 79.0, 79.1, 3000.0])
    y = window(x, 40.0, 80.0)
    assert y[0] == 0 and y[1] == 0 and y[-1] == 1 and y[-2] == 1
    assert y[2] == pytest.approx(0.1 / 79)
    assert y[3] == pytest.approx((40 - 39.5) / 79 + 0.5)
    assert y[4] == pytest.approx(1.0)
    assert window(np.int16([0, 100]), 40, 80).dtype == np.float32
    assert window(np.array([39.0, 40.0]), 40.0, 80.0, "LINEAR_EXACT") == pytest.approx([0.4875, 0.5])
    with pytest.raises(ValueError, match=">= 1"):
        window(x, 40.0, 0.5)


def test_percentile_normalise_and_modalities(rng):
    mr = rng.gamma(2.0, 100.0, (4, 16, 16)).astype(np.float32)
    mr[:, :4] = 0.0  # background
    out = percentile_normalise(mr, mask=mr != 0)
    assert out.dtype == np.float32 and out.min() == 0 and out.max() == 1
    inside = out[mr != 0]
    assert 0.004 < (inside == 0).mean() < 0.007 and 0.004 < (inside == 1).mean() < 0.007
    np.testing.assert_array_equal(normalise_for_modality(mr, "MR"), out)
    assert percentile_normalise(np.full((2, 2), 5.0)).max() == 0
    ct = np.array([-1000.0, 40.0, 1000.0])
    assert normalise_for_modality(ct, "CT").tolist() == pytest.approx([0.0, 0.5063291, 1.0])
    assert normalise_for_modality(ct, "CT", ct_window=(40, 400))[1] == pytest.approx(0.5 + 0.5 / 399)
    pet = rng.exponential(2.0, (3, 8, 8)).astype(np.float32)
    n = normalise_for_modality(pet, "PT", units="SUVbw")
    assert n.min() >= 0 and n.max() == 1 and (n == 1).mean() < 0.02
    assert normalise_for_modality(pet, "PT", units="SUVbw", suv_max=10.0) == pytest.approx(np.clip(pet / 10, 0, 1))


# ---------------------------------------------------------------------------
# real data
# ---------------------------------------------------------------------------


@pytest.mark.data
def test_cirs_series(cirs_dir):
    ct = load_series(sorted((cirs_dir / "CT").glob("*.dcm")))
    mr = load_series(sorted((cirs_dir / "MR").glob("*.dcm")))
    assert ct.image.GetSize() == (512, 512, 142)
    assert ct.image.GetSpacing() == pytest.approx((0.65625, 0.65625, 1.25))
    assert ct.units == "HU" and ct.header_window() == (40.0, 400.0)
    assert mr.image.GetSize() == (320, 240, 176)
    assert mr.image.GetSpacing() == pytest.approx((1.1875, 1.1875, 2.0))
    assert mr.units == "raw" and mr.modality == "MR"
    for vol in (ct, mr):
        z = [float(h.ImagePositionPatient[2]) for h in vol.headers]
        assert z == sorted(z) and vol.image.GetOrigin()[2] == pytest.approx(z[0])
    # CT values are HU: air about -1000, the phantom's water-like body about 0
    centre = ct.array()[71, 200:300, 200:300]
    assert -100 < float(np.median(centre)) < 100
    assert ct.frame_of_reference_uid != mr.frame_of_reference_uid


# ---------------------------------------------------------------------------
# patient coordinates (LPS): every voxel holds what was measured at its position
# ---------------------------------------------------------------------------


def _field(p: np.ndarray) -> np.ndarray:
    """A linear 'scan' of physical space: stored value at LPS point p (mm), exact in int16 after rounding."""
    return 2.0 * p[..., 0] - 3.0 * p[..., 1] + 5.0 * p[..., 2]


def write_field_series(folder: Path, positions: list, iop, pixel_spacing, rows: int, cols: int, *,
                       instance_numbers=None, names=None) -> None:
    """One file per position; pixel (r, c) of slice k stores round(_field(IPP_k + c*dc*row + r*dr*col)).

    ``instance_numbers`` / ``names`` default to a shuffled order unrelated to the position.
    """
    folder.mkdir(parents=True, exist_ok=True)
    row, col = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    dr, dc = pixel_spacing
    rr, cc = np.mgrid[:rows, :cols]
    series_uid = generate_uid()
    n = len(positions)
    order = np.random.default_rng(11).permutation(n)
    for k, ipp in enumerate(positions):
        ds = _base(CT_STORAGE, "CT", series_uid, rows, cols)
        ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in iop]
        ds.PixelSpacing = [f"{v:.6f}" for v in pixel_spacing]
        ds.InstanceNumber = int(instance_numbers[k] if instance_numbers is not None else order[k] + 1)
        ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
        pts = np.asarray(ipp, float) + cc[..., None] * dc * row + rr[..., None] * dr * col
        ds.PixelData = np.round(_field(pts)).astype(np.int16).tobytes()
        name = names[k] if names is not None else f"S{int(order[k]):03d}.dcm"
        ds.save_as(folder / name, enforce_file_format=True)


def _assert_voxels_at_their_positions(img, atol: float = 0.5 + 1e-3) -> None:
    """Every voxel's value equals the field at the physical point SimpleITK assigns to its index."""
    import SimpleITK as sitk

    arr = sitk.GetArrayViewFromImage(img)
    nz, ny, nx = arr.shape
    k, j, i = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    d = np.array(img.GetDirection()).reshape(3, 3)
    idx = np.stack([i, j, k], -1) * np.array(img.GetSpacing())
    pts = np.array(img.GetOrigin()) + idx @ d.T
    np.testing.assert_allclose(arr, _field(pts), atol=atol)
    # and SimpleITK's own index -> point agrees with the vectorised one
    for ijk in [(0, 0, 0), (nx - 1, ny - 1, nz - 1), (nx // 2, 0, nz - 1)]:
        np.testing.assert_allclose(img.TransformIndexToPhysicalPoint(ijk), pts[ijk[2], ijk[1], ijk[0]], atol=1e-6)


_VOXEL_ORDERS = {
    # name: (row cosine, column cosine, slice step along the normal as written, pixel spacing (row, col))
    "axial": ((1, 0, 0), (0, 1, 0), 2.5, (0.8, 0.7)),
    "axial left-right flipped": ((-1, 0, 0), (0, 1, 0), 2.5, (0.8, 0.7)),  # columns run from patient left to right
    "axial anterior-posterior flipped": ((1, 0, 0), (0, -1, 0), 2.5, (0.8, 0.7)),
    "axial feet-first (slices descending)": ((1, 0, 0), (0, 1, 0), -2.5, (0.8, 0.7)),
    "axial rotated 180 deg in plane": ((-1, 0, 0), (0, -1, 0), 2.5, (0.8, 0.7)),
    "sagittal": ((0, 1, 0), (0, 0, -1), 3.0, (0.9, 0.9)),
    "coronal": ((1, 0, 0), (0, 0, -1), 3.0, (0.9, 0.9)),
    "anisotropic 0.4 x 0.9 x 5 mm": ((1, 0, 0), (0, 1, 0), 5.0, (0.9, 0.4)),
}


@pytest.mark.parametrize("order", list(_VOXEL_ORDERS))
def test_voxels_sit_at_their_patient_positions(tmp_path, order):
    row, col, step, ps = _VOXEL_ORDERS[order]
    row, col = np.array(row, float), np.array(col, float)
    normal = np.cross(row, col)
    start = np.array([-12.0, 25.0, -40.0])
    positions = [start + k * step * normal for k in range(7)]
    write_field_series(tmp_path, positions, (*row, *col), ps, rows=9, cols=11)
    vol = load_series(_files(tmp_path))
    d = np.array(vol.image.GetDirection()).reshape(3, 3)
    assert np.linalg.det(d) == pytest.approx(1.0)
    np.testing.assert_allclose(d[:, :2], np.column_stack([row, col]), atol=1e-9)
    assert vol.image.GetSpacing() == pytest.approx((ps[1], ps[0], abs(step)))
    _assert_voxels_at_their_positions(vol.image)


def test_oblique_voxels_sit_at_their_patient_positions(tmp_path):
    rot = _rotation(17.0, -23.0, 38.0)
    row, col = rot[:, 0], rot[:, 1]
    normal = np.cross(row, col)
    positions = [np.array([4.0, -9.0, 21.0]) + k * 1.7 * normal for k in (4, 1, 6, 0, 3, 5, 2)]
    write_field_series(tmp_path, positions, (*row, *col), (0.6, 1.1), rows=10, cols=8)
    vol = load_series(_files(tmp_path))
    _assert_voxels_at_their_positions(vol.image)


def test_sorted_by_position_not_instance_number_or_file_name(tmp_path):
    # instance numbers count down while the position goes up, and file names follow neither
    positions = [np.array([0.0, 0.0, 10.0 + 2.0 * k]) for k in range(6)]
    names = [f"IMG{n:02d}.dcm" for n in (3, 0, 5, 1, 4, 2)]
    write_field_series(tmp_path, positions, (1, 0, 0, 0, 1, 0), (1.0, 1.0), rows=4, cols=5,
                       instance_numbers=[6, 5, 4, 3, 2, 1], names=names)
    for listing in (_files(tmp_path), list(reversed(_files(tmp_path)))):
        vol = load_series(listing)
        z = [float(h.ImagePositionPatient[2]) for h in vol.headers]
        assert z == [10.0, 12.0, 14.0, 16.0, 18.0, 20.0]
        assert [int(h.InstanceNumber) for h in vol.headers] == [6, 5, 4, 3, 2, 1]
        assert [p.name for p in vol.paths] == names
        _assert_voxels_at_their_positions(vol.image)


def test_two_voxel_orders_of_one_scan_are_the_same_volume(tmp_path):
    """A left-right flipped, feet-first copy of a grid resamples onto the original exactly (LPS everywhere)."""
    import SimpleITK as sitk

    start = np.array([-20.0, -10.0, 5.0])
    a_pos = [start + (0, 0, 2.0 * k) for k in range(6)]
    write_field_series(tmp_path / "a", a_pos, (1, 0, 0, 0, 1, 0), (1.0, 1.5), rows=8, cols=12)
    # the same points: first column at the patient's left end, slices written top-down
    far = start + (11 * 1.5, 0, 0)
    b_pos = [far + (0, 0, 2.0 * k) for k in range(6)]
    write_field_series(tmp_path / "b", b_pos, (-1, 0, 0, 0, 1, 0), (1.0, 1.5), rows=8, cols=12)
    a = load_series(_files(tmp_path / "a")).image
    b = load_series(_files(tmp_path / "b")).image
    assert a.GetDirection() != b.GetDirection()
    on_a = sitk.Resample(b, a, sitk.Transform(), sitk.sitkNearestNeighbor, -9999.0, sitk.sitkFloat32)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(on_a), sitk.GetArrayViewFromImage(a))


def test_enhanced_multiframe_oblique_positions(tmp_path):
    """Multi-frame: each frame's Plane Position/Orientation places its voxels (frames stored out of order)."""
    rot = _rotation(-12.0, 8.0, 25.0)
    row, col = rot[:, 0], rot[:, 1]
    normal = np.cross(row, col)
    rows, cols, ps = 7, 6, (0.9, 0.8)
    order = [3, 0, 4, 1, 2]
    ds = _base(ENHANCED_CT_STORAGE, "CT", generate_uid(), rows, cols)
    ds.NumberOfFrames = len(order)
    shared = Dataset()
    ori = Dataset()
    ori.ImageOrientationPatient = [f"{v:.8f}" for v in (*row, *col)]
    meas = Dataset()
    meas.PixelSpacing = [f"{v:.6f}" for v in ps]
    meas.SliceThickness = 2.0
    shared.PlaneOrientationSequence = DicomSequence([ori])
    shared.PixelMeasuresSequence = DicomSequence([meas])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    per, frames = [], []
    rr, cc = np.mgrid[:rows, :cols]
    for k in order:
        ipp = np.array([3.0, -5.0, 8.0]) + k * 2.0 * normal
        item, pos = Dataset(), Dataset()
        pos.ImagePositionPatient = [f"{v:.6f}" for v in ipp]
        item.PlanePositionSequence = DicomSequence([pos])
        per.append(item)
        pts = ipp + cc[..., None] * ps[1] * row + rr[..., None] * ps[0] * col
        frames.append(np.round(_field(pts)).astype(np.int16))
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per)
    ds.PixelData = np.stack(frames).tobytes()
    ds.save_as(tmp_path / "mf.dcm", enforce_file_format=True)
    vol = load_series([tmp_path / "mf.dcm"])
    assert vol.frames == (1, 3, 4, 0, 2)
    _assert_voxels_at_their_positions(vol.image)
