"""Helpers for tests that talk DICOM: real DCMTK peers, free ports, small synthetic instances.

DCMTK tools are called by absolute path because ``storescu``/``echoscu`` on
PATH may be pynetdicom's console scripts, which behave differently.
"""

from __future__ import annotations

import io
import json
import logging
import re
import socket
import subprocess
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
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


# -- dicom3tools' dciodvfy -------------------------------------------------------------------

DCIODVFY = Path("/usr/bin/dciodvfy")


def dciodvfy(path: Path, expected_warnings: Iterable[re.Pattern[str]] = (), *,
             max_warnings: int | None = None) -> list[str]:
    """Run dicom3tools' ``dciodvfy``; fail on any error or on a warning no pattern explains.

    Returns the warning lines.  The output is decoded leniently: dciodvfy echoes
    offending values in the file's own bytes, which need not be UTF-8.  The IOD
    name line (e.g. "SCImage") must be there, so a file dciodvfy did not
    recognise cannot pass silently.
    """
    if not DCIODVFY.exists():
        pytest.skip(f"{DCIODVFY} not installed (apt-get install dicom3tools); conformance not checked")
    proc = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, errors="replace",
                          timeout=120)
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    print(f"dciodvfy {Path(path).name}:\n  " + "\n  ".join(lines))
    errors = [ln for ln in lines if "Error" in ln or ln.startswith("Abort")]
    assert not errors, f"dciodvfy errors for {Path(path).name}:\n" + "\n".join(errors)
    assert any(re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", ln.strip()) for ln in lines), (
        f"dciodvfy did not name an IOD for {Path(path).name}:\n" + "\n".join(lines))
    patterns = list(expected_warnings)
    warnings_ = [ln for ln in lines if ln.startswith("Warning")]
    unexpected = [w for w in warnings_ if not any(p.search(w) for p in patterns)]
    assert not unexpected, f"unexpected dciodvfy warnings for {Path(path).name}:\n" + "\n".join(unexpected)
    if max_warnings is not None:
        assert len(warnings_) <= max_warnings, warnings_
    return warnings_


#: dciodvfy warnings every SC object with the base slice's geometry gives (derived.py module doc):
#: Image Position/Orientation (Patient), Frame of Reference UID and Slice Location are Standard
#: Extended attributes of the SC Image IOD.
SC_GEOMETRY_WARNINGS = re.compile(
    r"not present in standard DICOM IOD - \(0x0020,0x00(32|37|52)\)|\(0x0020,0x1041\)"
    r"|this is a Standard Extended SOP Class"
)


# -- synthetic source series (headers only, what a scanner sends minus the pixels) ------------

_SOURCE_SOP_CLASSES = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "PT": "1.2.840.10008.5.1.4.1.1.128",
}


def source_series(
    modality: str,
    n: int,
    *,
    rows: int = 16,
    cols: int = 16,
    spacing: float | tuple[float, float] = 1.0,
    dz: float = 2.0,
    z0: float = 0.0,
    iop=(1, 0, 0, 0, 1, 0),
    study_uid: str | None = None,
    frame_uid: str | None = None,
    charset: str | list[str] | None = "ISO_IR 100",
    patient_name: str = "Doe^Jane",
    patient_id: str = "P123",
    study_description: str = "Head",
    study_date: str = "20260101",
    series_number: int = 3,
    manufacturer: str = "ACME",
    body_part: str | None = "HEAD",
) -> list[Dataset]:
    """Headers of one CT, MR or PT series (axial, contiguous), in volume order.

    ``charset`` is written as Specific Character Set (None: none, i.e. the default
    repertoire) and the text values are set as Unicode; write them to disk and read
    them back to get what the node sees.
    """
    study_uid = study_uid or generate_uid(UID_PREFIX)
    frame_uid = frame_uid or generate_uid(UID_PREFIX)
    series_uid = generate_uid(UID_PREFIX)
    sp = (float(spacing), float(spacing)) if np.isscalar(spacing) else tuple(float(v) for v in spacing)
    iop = np.asarray(iop, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    out = []
    for k in range(n):
        h = Dataset()
        if charset is not None:
            h.SpecificCharacterSet = charset
        h.SOPClassUID = _SOURCE_SOP_CLASSES[modality]
        h.SOPInstanceUID = generate_uid(UID_PREFIX)
        h.Modality = modality
        h.PatientName = patient_name
        h.PatientID = patient_id
        h.PatientBirthDate = "19700101"
        h.PatientSex = "F"
        h.StudyInstanceUID = study_uid
        h.StudyDate = study_date
        h.StudyTime = "101500"
        h.AccessionNumber = "ACC1"
        h.ReferringPhysicianName = "Who^Doctor"
        h.StudyID = "S1"
        h.StudyDescription = study_description
        h.SeriesInstanceUID = series_uid
        h.SeriesNumber = series_number
        h.Manufacturer = manufacturer
        h.ManufacturerModelName = f"{manufacturer} {modality}"
        if body_part:
            h.BodyPartExamined = body_part
        h.FrameOfReferenceUID = frame_uid
        h.PositionReferenceIndicator = ""
        h.InstanceNumber = k + 1
        pos = np.array([-rows * sp[0] / 2, -cols * sp[1] / 2, 0.0]) + (z0 + k * dz) * normal
        h.ImagePositionPatient = [f"{v:.4f}" for v in pos]
        h.ImageOrientationPatient = [f"{v:g}" for v in iop]
        h.SliceLocation = f"{z0 + k * dz:.4f}"
        h.PixelSpacing = [f"{sp[0]:g}", f"{sp[1]:g}"]
        h.SliceThickness = f"{dz:g}"
        h.Rows, h.Columns = rows, cols
        if modality == "PT":
            h.Units = "BQML"
            h.CorrectedImage = ["ATTN", "DECY"]
            h.DecayCorrection = "START"
        out.append(h)
    return out


def through_disk(headers: Iterable[Dataset], folder: Path) -> list[Dataset]:
    """Write each header as a Part-10 file and read it back without pixels, as the node reads its store."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for h in headers:
        h = Dataset(h)
        h.file_meta = FileMetaDataset()
        h.file_meta.MediaStorageSOPClassUID = h.SOPClassUID
        h.file_meta.MediaStorageSOPInstanceUID = h.SOPInstanceUID
        h.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"{h.SOPInstanceUID}.dcm"
        h.save_as(path, enforce_file_format=True)
        out.append(dcmread(path, stop_before_pixels=True))
    return out


class JsonLog:
    """What the node's loggers wrote while capturing, as the JSON lines an operator would see."""

    def __init__(self) -> None:
        self.buffer = io.StringIO()

    def text(self) -> str:
        return self.buffer.getvalue()

    def events(self, event: str | None = None) -> list[dict]:
        """Every log record as a dict, or only those with this stable event name."""
        docs = [json.loads(line) for line in self.text().splitlines() if line.strip()]
        return [d for d in docs if event is None or d["event"] == event]


@contextmanager
def json_logs(*names: str, level: int = logging.INFO) -> Iterator[JsonLog]:
    """Capture the named loggers through the node's own JSON formatter (independent of propagation)."""
    from dicom_node.logs import JsonFormatter

    log = JsonLog()
    handler = logging.StreamHandler(log.buffer)
    handler.setFormatter(JsonFormatter())
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(level)
    try:
        yield log
    finally:
        for lg, old in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(old)


class RunningSCP:
    """A started node listener plus what tests look at beside it: its store and its config."""

    def __init__(self, cfg, store, *, query_retrieve: bool = False) -> None:
        from dicom_node.net.listener import Listener
        from dicom_node.net.query_retrieve import QueryRetrieveService
        from dicom_node.net.storage_scp import StorageService

        services = [StorageService(store, cfg.limits)] + ([QueryRetrieveService(cfg, store)] if query_retrieve else [])
        self.cfg, self.store = cfg, store
        self.listener = Listener(cfg, services).start()

    @property
    def port(self) -> int:
        return self.listener.port

    @property
    def tls_port(self) -> int | None:
        return self.listener.tls_port

    def stop(self) -> None:
        self.listener.stop()

    def __enter__(self) -> RunningSCP:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_listening(port: int, proc: subprocess.Popen | None = None, log: Path | None = None,
                   timeout: float = 60.0) -> None:
    """Until something accepts on 127.0.0.1:``port``; fails at once when ``proc`` exits (with ``log``'s tail)."""
    import time

    def tail() -> str:
        return log.read_text()[-3000:] if log is not None and log.exists() else ""

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the process for port {port} exited with {proc.returncode} at start:\n{tail()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout} s:\n{tail()}")


def storescu(port: int, *paths: Path, env: dict[str, str] | None = None, timeout: float = 300,
             verbose: bool = False) -> subprocess.CompletedProcess:
    """DCMTK storescu (AE SCANNER) of files or folders to FUSIONNODE on 127.0.0.1:``port``; the caller checks."""
    return subprocess.run([dcmtk("storescu"), *(["-v"] if verbose else []), "-aet", "SCANNER", "-aec", "FUSIONNODE",
                           "+sd", "127.0.0.1", str(port), *map(str, paths)],
                          capture_output=True, text=True, timeout=timeout, env=env)
