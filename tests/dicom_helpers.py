"""Helpers for tests that talk DICOM: real DCMTK peers, free ports, small synthetic instances.

DCMTK tools are called by absolute path because ``storescu``/``echoscu`` on
PATH may be pynetdicom's console scripts, which behave differently.
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

DCMTK_DIR = Path("/usr/bin")
UID_PREFIX = "1.2.826.0.1.3680043.8.498."


def dcmtk(tool: str) -> str:
    """Absolute path of a DCMTK binary; skips the test when DCMTK is not installed."""
    path = DCMTK_DIR / tool
    if not path.is_file():
        pytest.skip(f"DCMTK tool {tool} not found at {path} (apt-get install dcmtk)")
    return str(path)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0 where you can instead)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_tool(tool: str, *args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run a DCMTK tool by absolute path and capture its output (text)."""
    return subprocess.run([dcmtk(tool), *map(str, args)], capture_output=True, text=True, timeout=timeout)


def make_image(
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    sop_class: str = CTImageStorage,
    modality: str = "CT",
    instance_number: int = 1,
    rows: int = 16,
    columns: int = 16,
    bits: int = 16,
    patient_id: str = "TEST-PATIENT",
    **extra,
) -> Dataset:
    """A small, valid single-frame grayscale image with file meta (Explicit VR Little Endian)."""
    sop_uid = sop_uid or generate_uid(UID_PREFIX)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid or generate_uid(UID_PREFIX)
    ds.SeriesInstanceUID = series_uid or generate_uid(UID_PREFIX)
    ds.FrameOfReferenceUID = generate_uid(UID_PREFIX)
    ds.PatientName = "Test^Patient"
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = "ACC1"
    ds.StudyID = "1"
    ds.ReferringPhysicianName = ""
    ds.Modality = modality
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    dtype = np.uint8 if bits == 8 else np.uint16
    arr = (np.arange(rows * columns).reshape(rows, columns) % (1 << min(bits, 12))).astype(dtype)
    ds.PixelData = arr.tobytes()
    for key, value in extra.items():
        setattr(ds, key, value)
    return ds


def write(ds: Dataset, path: Path) -> Path:
    """Save as a Part-10 file and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
