"""Intake checks: is a received Part-10 file an instance the node can store and, later, fuse?

Kept apart from the network: :func:`validate_instance` takes a file and the
command's UIDs and returns a :class:`Problem` (or ``None``), and the Storage
SCP maps the problem's kind to the status the sender sees.  Everything that
can be wrong with an incoming instance is checked here, before it is stored,
so a scanner is never told "stored" for data the node can never use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from pydicom import dcmread
from pydicom.pixels import pixel_array
from pydicom.uid import UID

from dicom_node.dicom.uids import InvalidInstanceError, check_uid

#: the UIDs are missing, malformed, or differ from the command; the image attributes are impossible
MISMATCH: Final = "mismatch"
#: the dataset cannot be parsed, or its pixel data cannot be decoded to what it declares
UNDECODABLE: Final = "undecodable"

ProblemKind = Literal["mismatch", "undecodable"]

_PIXEL_DATA = 0x7FE00010


@dataclass(frozen=True)
class Problem:
    """Why an instance is refused: a kind the SCP maps to a status, a reason for the log, a detail."""

    kind: ProblemKind
    reason: str
    detail: str = ""


def _expected_pixel_bytes(ds: Any) -> int:
    rows, cols = int(ds.Rows), int(ds.Columns)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.BitsAllocated)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if str(ds.get("PhotometricInterpretation", "")).strip() == "YBR_FULL_422":
        # native YBR_FULL_422 stores two samples per pixel pair (PS3.3 C.7.6.3.1.2)
        samples = 2
    total_bits = rows * cols * samples * bits * frames
    return (total_bits + 7) // 8


def validate_instance(path: Path, affected_sop_class: str, affected_sop_instance: str) -> Problem | None:
    """Check a received Part-10 file before it is stored; ``None`` means it may be stored.

    Reads only the header (large elements are deferred); compressed pixel data
    is checked by decoding its first frame with the installed plugins, so a
    series that could never be fused is refused at the door, not at 3 a.m. in
    the pipeline.  The Storage SCP turns the problem's ``kind`` into its
    DIMSE status (``dicom_node.net.storage_scp``).
    """
    path = Path(path)
    try:
        ds = dcmread(path, stop_before_pixels=True)
        tsyntax = UID(str(ds.file_meta.TransferSyntaxUID))
        # force lazy decoding of what we use now, so parse errors surface here
        values = {kw: ds.get(kw) for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")}
    except Exception as exc:  # noqa: BLE001 - a hostile dataset can make pydicom raise anything
        return Problem(UNDECODABLE, "dataset cannot be parsed", f"{type(exc).__name__}: {exc}")

    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        try:
            check_uid(values[kw], kw)
        except InvalidInstanceError as exc:
            return Problem(MISMATCH, str(exc))
    if str(values["SOPClassUID"] or "").strip() != str(affected_sop_class):
        return Problem(MISMATCH, "SOPClassUID differs from the command's Affected SOP Class UID")
    if str(values["SOPInstanceUID"]).strip() != str(affected_sop_instance):
        return Problem(MISMATCH, "SOPInstanceUID differs from the command's Affected SOP Instance UID")

    try:
        return _check_pixels(path, ds, tsyntax)
    except Exception as exc:  # noqa: BLE001 - the decoder plugins raise many types for one meaning
        return Problem(UNDECODABLE, "pixel data undecodable", f"{type(exc).__name__}: {exc}")


def _check_pixels(path: Path, header: Any, tsyntax: UID) -> Problem | None:
    if tsyntax.is_encapsulated:
        if not _pixel_data_follows(path):
            return None
        try:
            pixel_array(path, index=0)
        except Exception as exc:  # noqa: BLE001 - the decoder plugins raise many types for one meaning
            return Problem(UNDECODABLE, "pixel data undecodable", f"{type(exc).__name__}: {exc}")
        return None

    # Native: compare the declared length (read without loading the value) with the geometry.
    ds = dcmread(path, defer_size=1024)
    raw = ds.get_item(_PIXEL_DATA, keep_deferred=True)
    if raw is None:
        return None
    length = getattr(raw, "length", None)
    if length is None:  # small enough to have been read: it is a DataElement
        length = len(raw.value or b"")
    if length == 0xFFFFFFFF:
        return Problem(UNDECODABLE, "pixel data undecodable",
                         "native pixel data with undefined length")
    expected = _expected_pixel_bytes(header)
    if length < expected:
        return Problem(UNDECODABLE, "pixel data undecodable",
                         f"pixel data has {length} bytes, the image geometry needs {expected}")
    value_tell = getattr(raw, "value_tell", None)
    if not tsyntax.is_deflated and value_tell is not None and value_tell + length > path.stat().st_size:
        return Problem(UNDECODABLE, "pixel data undecodable",
                         "pixel data is truncated (the file ends before its declared length)")
    return None


def _pixel_data_follows(path: Path) -> bool:
    """Whether top-level Pixel Data follows the header, without reading it (encapsulated = explicit LE)."""
    with open(path, "rb") as fp:
        dcmread(fp, stop_before_pixels=True)
        tag = fp.read(4)
    return len(tag) == 4 and (int.from_bytes(tag[:2], "little") << 16 | int.from_bytes(tag[2:], "little")) == _PIXEL_DATA
