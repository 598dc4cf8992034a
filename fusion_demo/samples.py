"""Sample image pairs for the demo and the benchmarks.

The real Harvard pairs live in ``../shared/data/harvard`` beside a checkout; a
machine without them still gets a demo from a generated head-like phantom, so
the first command a new user runs never depends on outside data.
"""

from __future__ import annotations

from fusion import environment
from fusion.imageio import read_image as load_image

__all__ = ["HARVARD_SUBSETS", "SamplePair", "harvard_pairs", "load_image", "shared_dir", "synthetic_pair",
           "write_synthetic_pair"]

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HARVARD_SUBSETS = {"MRI_CT": "CT", "MRI_PET": "PET", "MRI_SPECT": "SPECT"}


def shared_dir() -> Path:
    """``$FUSION_SHARED_DIR``, else the ``shared`` folder beside the repository (``fusion.environment``)."""
    return environment.shared_dir()


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
    to8 = lambda im: np.clip(np.round(im * 255), 0, 255).astype(np.uint8)
    return to8(mr), to8(ct)


# -- a generated DICOM pair: CT-like and MR-like series of one head phantom -------------

_TISSUES = {  # label: (CT HU, MR signal)
    "air": (-1000, 0),
    "scalp": (40, 380),
    "skull": (1200, 60),
    "brain": (35, 700),
    "grey": (42, 900),
    "ventricle": (5, 1500),
    "lesion": (70, 1200),
}


def _phantom_labels(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Tissue label per point (mm, phantom frame centred at 0): nested ellipsoids of a head."""

    def inside(cx, cy, cz, rx, ry, rz):
        return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 + ((z - cz) / rz) ** 2 <= 1

    names = list(_TISSUES)
    lab = np.zeros(x.shape, np.int8)
    lab[inside(0, 0, 0, 80, 95, 70)] = names.index("scalp")
    lab[inside(0, 0, 0, 75, 90, 65)] = names.index("skull")
    lab[inside(0, 2, 0, 68, 83, 58)] = names.index("grey")
    lab[inside(0, 2, 0, 60, 75, 50)] = names.index("brain")
    lab[inside(-12, -5, 5, 7, 22, 12) | inside(12, -5, 5, 7, 22, 12)] = names.index("ventricle")
    lab[inside(30, 30, -10, 10, 8, 9)] = names.index("lesion")
    lab[inside(-35, -45, 20, 6, 6, 6)] = names.index("skull")  # calcification
    return lab


def write_synthetic_pair(out_dir: Path, *, offset_mm: tuple[float, float, float] = (14.0, -9.0, 6.0),
                         rotation_deg: float = 4.0,
                         seed: int = 11) -> tuple[Path, Path]:
    """Write a CT-like and an MR-like DICOM series of one phantom into ``out_dir/CT`` and ``out_dir/MR``.

    Same patient and study, different frames of reference and grids.  Between the
    scans the head moved: a point ``p`` of the CT is at ``R p + offset_mm`` in the
    MR, ``R`` a rotation by ``rotation_deg`` about the z axis - the transform a
    registration (CT fixed, MR moving) must find.  Returns the two folders.
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

    rng = np.random.default_rng(seed)
    study_uid, names = generate_uid(), list(_TISSUES)
    common = {"PatientName": "PHANTOM^SYNTHETIC", "PatientID": "SYN-0001", "PatientBirthDate": "19700101",
              "PatientSex": "O", "StudyInstanceUID": study_uid, "StudyDate": "20261122", "StudyTime": "101500",
              "StudyID": "1", "AccessionNumber": "SYN1", "ReferringPhysicianName": "", "StudyDescription": "Head phantom"}

    def write(kind: str, shape: tuple[int, int, int], spacing: float, slice_gap: float, values: np.ndarray,
              rot_deg: float, shift: tuple[float, float, float], sop_class: UID, extra: dict[str, Any]) -> Path:
        # the grid is axis-aligned and centred on 0; the *phantom* is moved by (rot_deg, shift), as a
        # head that moved between the two scans

        folder = out_dir / kind
        folder.mkdir(parents=True, exist_ok=True)
        rows, cols, nz = shape
        th = np.deg2rad(rot_deg)
        rot = np.array([[np.cos(th), -np.sin(th), 0.0], [np.sin(th), np.cos(th), 0.0], [0.0, 0.0, 1.0]])
        row_dir, col_dir, normal = np.eye(3)
        origin = -row_dir * spacing * (cols - 1) / 2 - col_dir * spacing * (rows - 1) / 2 - normal * slice_gap * (nz - 1) / 2
        series_uid, for_uid = generate_uid(), generate_uid()
        j, i = np.meshgrid(np.arange(cols), np.arange(rows))
        for k in range(nz):
            pos = origin + normal * slice_gap * k
            pts = pos[:, None, None] + row_dir[:, None, None] * spacing * j + col_dir[:, None, None] * spacing * i
            q = np.einsum("ji,jhw->ihw", rot, pts - np.asarray(shift, float)[:, None, None])  # R^T (p - t)
            lab = _phantom_labels(q[0], q[1], q[2])
            img = values[lab] + rng.normal(0, extra["noise"], lab.shape)
            ds = pydicom.Dataset()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = sop_class
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.SpecificCharacterSet = "ISO_IR 100"
            ds.SOPClassUID = sop_class
            for key, val in common.items():
                setattr(ds, key, val)
            ds.Modality, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = kind, series_uid, for_uid
            ds.SeriesNumber, ds.InstanceNumber, ds.AcquisitionNumber = extra["series_number"], k + 1, 1
            ds.SeriesDescription = extra["description"]
            ds.SeriesDate, ds.SeriesTime = "20261122", extra["time"]
            ds.Manufacturer, ds.PositionReferenceIndicator = "dicom-fusion-node synthetic", ""
            ds.PatientPosition, ds.BodyPartExamined = "HFS", "HEAD"
            ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
            ds.ImagePositionPatient = [f"{v:.4f}" for v in pos]
            ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_dir, *col_dir)]
            ds.PixelSpacing = [f"{spacing:g}", f"{spacing:g}"]
            ds.SliceThickness = f"{slice_gap:g}"
            ds.SliceLocation = f"{float(pos @ normal):.4f}"
            ds.ImagesInAcquisition = nz
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.Rows, ds.Columns = rows, cols
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
            if kind == "CT":
                ds.PixelRepresentation, ds.RescaleIntercept, ds.RescaleSlope = 1, -1024, 1
                ds.RescaleType, ds.KVP = "HU", "120"
                ds.WindowCenter, ds.WindowWidth = "40", "80"
                pix = np.clip(np.round(img + 1024), -32768, 32767).astype(np.int16)
            else:
                ds.PixelRepresentation = 0
                ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "SE", "NONE", ""
                ds.MRAcquisitionType, ds.EchoTime, ds.RepetitionTime = "2D", "90", "4000"
                ds.EchoTrainLength, ds.MagneticFieldStrength = "16", "3"
                pix = np.clip(np.round(img), 0, 65535).astype(np.uint16)
            ds.PixelData = pix.tobytes()
            ds.save_as(folder / f"{kind}_{k:04d}.dcm", enforce_file_format=True)
        return folder

    ct_values = np.array([_TISSUES[n][0] for n in names], dtype=np.float64)
    mr_values = np.array([_TISSUES[n][1] for n in names], dtype=np.float64)
    ct = write("CT", (160, 160, 40), 1.25, 3.0, ct_values, 0.0, (0.0, 0.0, 0.0), CTImageStorage,
               {"noise": 6.0, "series_number": 2, "description": "HEAD 3mm", "time": "101600"})
    mr = write("MR", (128, 128, 44), 1.6, 2.5, mr_values, rotation_deg, offset_mm, MRImageStorage,
               {"noise": 15.0, "series_number": 5, "description": "T2 AX", "time": "103000"})
    return ct, mr
