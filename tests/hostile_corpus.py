"""A corpus of malformed and hostile DICOM objects, each with the status the node must answer.

Every case is a Part-10 file (``Case.data``) that the suite sends byte for
byte (pynetdicom's chunked send copies the bytes after the File Meta), so
what the node sees is exactly what is written here, lies included.  The
expected status follows the conformance statement: 0x0000 only for an
instance that decodes fully; 0xA900 for missing/impossible attributes and
bad UIDs; 0xC000 for what cannot be parsed or decoded; 0xA700 for what
exceeds a decoding limit.  Every object carries the canary patient name and
ID, which must never appear in the node's log.

Used by ``tests/test_hostile_intake.py`` and ``benchmarks/intake_memory.py``.
"""

from __future__ import annotations

import copy
import io
import struct
import subprocess
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import (
    JPEG2000,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)

from dicom_node.dicom.structure import PIXEL_DATA, dataset_start, walk

CANARY_NAME = "CANARY^PATIENT"
CANARY_ID = "CANARYID123"
UID_PREFIX = "1.2.826.0.1.3680043.8.498."

SUCCESS, OUT_OF_RESOURCES, MISMATCH, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xA900, 0xC000

#: the limits the suite's node runs with (small inflate/instance limits keep the bombs quick)
TEST_LIMITS = {"max_instance_bytes": 8 << 20, "max_inflated_bytes": 16 << 20}

ROWS = COLS = 64


@dataclass(frozen=True)
class Case:
    name: str
    category: str
    data: bytes  # the whole Part-10 file
    sop_class: str
    transfer_syntax: str
    expected: int
    #: a known limitation outside the node (strict xfail with this reason)
    xfail: str = ""
    #: other statuses that are right too (decoder-dependent outcomes; a 0x0000 is then checked by decoding)
    also: tuple[int, ...] = ()

    def accepts(self, status: int | None) -> bool:
        return status == self.expected or status in self.also

    def write(self, folder: Path) -> Path:
        path = folder / f"{self.name}.dcm"
        path.write_bytes(self.data)
        return path


def new_uid() -> str:
    return generate_uid(UID_PREFIX)


def base_dataset(*, rows: int = ROWS, columns: int = COLS, seed: int = 0) -> Dataset:
    """A valid CT slice (12 bits in 16, noise over a gradient so compressed streams are not trivial)."""
    rng = np.random.default_rng(seed)
    uid = new_uid()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = uid
    ds.StudyDate, ds.StudyTime = "20260101", "120000"
    ds.AccessionNumber = "ACC1"
    ds.Modality = "CT"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "hostile intake"
    ds.PatientName = CANARY_NAME
    ds.PatientID = CANARY_ID
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = new_uid()
    ds.SeriesInstanceUID = new_uid()
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.ImagePositionPatient = [0, 0, 0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = new_uid()
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, columns
    ds.PixelSpacing = [1, 1]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    grad = np.add.outer(np.arange(rows), np.arange(columns)) * 16
    arr = (grad + rng.integers(0, 200, (rows, columns))) % 4096
    ds.PixelData = arr.astype("<u2").tobytes()
    return ds


def part10(ds: Dataset, *, implicit: bool = False, little: bool = True, meta: dict | None = None,
           deflate: bool = False) -> bytes:
    """The file bytes: preamble, File Meta (optionally lying), dataset in the asked encoding."""
    fm = FileMetaDataset(ds.file_meta)
    for k, v in (meta or {}).items():
        setattr(fm, k, v)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = little, implicit
    write_dataset(body, ds)
    raw = body.getvalue()
    if deflate:
        c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        raw = c.compress(raw) + c.flush()
        raw += b"\x00" * (len(raw) & 1)
    out = DicomBytesIO()
    out.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(out, fm, enforce_standard=True)
    return out.getvalue() + raw


# -- the syntaxes: one good instance each -------------------------------------------------------

@dataclass
class Syntax:
    key: str
    uid: str
    ds: Dataset  # decoded dataset of the good instance (PixelData as stored in this syntax)

    @property
    def implicit(self) -> bool:
        return self.uid == ImplicitVRLittleEndian

    @property
    def little(self) -> bool:
        return self.uid != ExplicitVRBigEndian

    @property
    def encapsulated(self) -> bool:
        return self.uid not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian,
                                DeflatedExplicitVRLittleEndian)

    def bytes_of(self, ds: Dataset, **meta) -> bytes:
        ds.file_meta.TransferSyntaxUID = self.uid
        m = {"MediaStorageSOPInstanceUID": ds.SOPInstanceUID, "MediaStorageSOPClassUID": ds.SOPClassUID, **meta}
        return part10(ds, implicit=self.implicit, little=self.little, meta=m,
                      deflate=self.uid == DeflatedExplicitVRLittleEndian)

    def fresh(self) -> Dataset:
        """A copy with new UIDs (each case is its own instance)."""
        ds = copy.deepcopy(self.ds)
        ds.SOPInstanceUID = new_uid()
        ds.SeriesInstanceUID = new_uid()
        return ds


def _dcmtk(tool: str, *args: str | Path) -> None:
    subprocess.run([f"/usr/bin/{tool}", *map(str, args)], check=True, capture_output=True, timeout=60)


def make_syntaxes(workdir: Path) -> list[Syntax]:
    """The good instance in every accepted transfer syntax (DCMTK encodes the JPEG family)."""
    workdir.mkdir(parents=True, exist_ok=True)
    src = workdir / "base.dcm"
    ds = base_dataset()
    ds.save_as(src, enforce_file_format=True)
    out: list[Syntax] = [Syntax("explicit", ExplicitVRLittleEndian, dcmread(src))]
    base = dcmread(src)
    out.append(Syntax("implicit", ImplicitVRLittleEndian, base))
    out.append(Syntax("big-endian", ExplicitVRBigEndian, dcmread(src)))
    out.append(Syntax("deflated", DeflatedExplicitVRLittleEndian, dcmread(src)))
    tools: list[tuple[str, str, list[str]]] = [
        ("jpeg-baseline", JPEGBaseline8Bit, ["dcmcjpeg", "+eb"]),
        ("jpeg-extended", JPEGExtended12Bit, ["dcmcjpeg", "+ee"]),
        ("jpeg-lossless", JPEGLossless, ["dcmcjpeg", "+el"]),
        ("jpeg-sv1", JPEGLosslessSV1, ["dcmcjpeg", "+e1"]),
        ("jpeg-ls", JPEGLSLossless, ["dcmcjpls", "+el"]),
        ("jpeg-ls-near", JPEGLSNearLossless, ["dcmcjpls", "+en"]),
        ("rle", RLELossless, ["dcmcrle"]),
    ]
    for key, uid, cmd in tools:
        dest = workdir / f"{key}.dcm"
        _dcmtk(cmd[0], *cmd[1:], src, dest)
        got = dcmread(dest)
        assert got.file_meta.TransferSyntaxUID == uid, (key, got.file_meta.TransferSyntaxUID)
        out.append(Syntax(key, uid, got))
    for key, uid, kw in [("j2k-lossless", JPEG2000Lossless, {}), ("j2k", JPEG2000, {"j2k_cr": [10]})]:
        j = dcmread(src)
        j.compress(uid, **kw)
        out.append(Syntax(key, uid, j))
    return out


# -- byte-level helpers ---------------------------------------------------------------------------

def layout_of(data: bytes, syntax: Syntax):
    fp = io.BytesIO(data)
    start, _ = dataset_start(fp, len(data))
    return start, walk(fp, start, len(data), little=syntax.little, implicit=syntax.implicit)


def header_offset(el, syntax: Syntax) -> int:
    long = el.vr in ("OB", "OW", "SQ", "UN", "UT", "OD", "OF", "OL", "OV", "SV", "UV", "UC", "UR")
    return el.value_offset - (8 if syntax.implicit or not long else 12)


def set_length(data: bytes, el, syntax: Syntax, length: int) -> bytes:
    """Rewrite an element's length field in place (the value stays where it is)."""
    fmt = "<" if syntax.little else ">"
    if syntax.implicit or el.vr in ("OB", "OW", "SQ", "UN", "UT"):
        return data[:el.value_offset - 4] + struct.pack(fmt + "I", length) + data[el.value_offset:]
    return data[:el.value_offset - 2] + struct.pack(fmt + "H", length) + data[el.value_offset:]


# -- the corpus ------------------------------------------------------------------------------------

def build_corpus(workdir: Path) -> list[Case]:
    syntaxes = make_syntaxes(workdir / "syntaxes")
    cases: list[Case] = []
    for sx in syntaxes:
        cases.extend(_generic_cases(sx))
        if sx.uid != DeflatedExplicitVRLittleEndian:
            cases.extend(_byte_cases(sx))
        if sx.encapsulated:
            cases.extend(_compressed_cases(sx))
    cases.extend(_uid_cases(syntaxes[0]))
    cases.extend(_deflate_cases(syntaxes[0]))
    cases.extend(_limit_cases())
    names = [c.name for c in cases]
    assert len(set(names)) == len(names), "case names must be unique"
    return cases


def _attr_mutations() -> Iterator[tuple[str, str, int, Callable[[Dataset], None]]]:
    """(name, category, expected, mutate): attribute lies every syntax can carry."""
    def setter(**kw):
        def f(ds):
            for k, v in kw.items():
                setattr(ds, k, v)
        return f

    def deleter(*kws):
        def f(ds):
            for k in kws:
                delattr(ds, k)
        return f

    yield "good", "good", SUCCESS, lambda ds: None
    yield "no-pixel-data", "missing", MISMATCH, deleter("PixelData")
    yield "rows-0", "impossible", MISMATCH, setter(Rows=0)
    yield "columns-0", "impossible", MISMATCH, setter(Columns=0)
    yield "rows-columns-0", "impossible", MISMATCH, setter(Rows=0, Columns=0)
    yield "bits-allocated-0", "impossible", MISMATCH, setter(BitsAllocated=0)
    yield "bits-allocated-7", "impossible", MISMATCH, setter(BitsAllocated=7)
    yield "bits-allocated-64", "impossible", MISMATCH, setter(BitsAllocated=64)
    yield "bits-stored-over-allocated", "impossible", MISMATCH, setter(BitsStored=17)
    yield "frames-minus-5", "impossible", MISMATCH, setter(NumberOfFrames=-5)
    yield "frames-0", "impossible", MISMATCH, setter(NumberOfFrames=0)
    yield "samples-2", "impossible", MISMATCH, setter(SamplesPerPixel=2)
    yield "pixel-representation-2", "impossible", MISMATCH, setter(PixelRepresentation=2)
    yield "no-rows", "missing", MISMATCH, deleter("Rows")
    yield "no-bits-allocated", "missing", MISMATCH, deleter("BitsAllocated")
    yield "no-photometric", "missing", MISMATCH, deleter("PhotometricInterpretation")
    yield "no-study-uid", "missing", MISMATCH, deleter("StudyInstanceUID")
    yield "no-series-uid", "missing", MISMATCH, deleter("SeriesInstanceUID")

    def vr(tag, vr_, value):
        def f(ds):
            ds[tag] = DataElement(tag, vr_, value)
        return f

    yield "columns-as-fd", "wrong-vr", MISMATCH, vr(0x00280011, "FD", 64.0)
    yield "rows-as-ul", "wrong-vr", MISMATCH, vr(0x00280010, "UL", 64)
    yield "instance-number-as-sq", "wrong-vr", MISMATCH, vr(0x00200013, "SQ", Sequence([Dataset()]))
    yield "instance-number-as-text", "wrong-vr", MISMATCH, vr(0x00200013, "LO", "one")
    yield "bits-allocated-as-ss", "wrong-vr", MISMATCH, vr(0x00280100, "SS", 16)
    yield "sop-uid-as-lo", "wrong-vr", MISMATCH, lambda ds: ds.__setitem__(
        0x00080018, DataElement(0x00080018, "LO", ds.SOPInstanceUID))
    yield "frames-as-us", "wrong-vr", MISMATCH, vr(0x00280008, "US", 1)
    yield "study-uid-as-pn", "wrong-vr", MISMATCH, lambda ds: ds.__setitem__(
        0x0020000D, DataElement(0x0020000D, "PN", CANARY_NAME))


def _generic_cases(sx: Syntax) -> Iterator[Case]:
    for name, category, expected, mutate in _attr_mutations():
        ds = sx.fresh()
        mutate(ds)
        if sx.implicit and category == "wrong-vr" and name in ("rows-as-ul", "bits-allocated-as-ss", "sop-uid-as-lo"):
            # implicit VR carries no VR: a same-length value of another VR is a valid value here
            continue
        if sx.encapsulated and name in ("bits-stored-over-allocated",):
            continue
        data = sx.bytes_of(ds)
        cases_name = f"{sx.key}-{name}"
        yield Case(cases_name, category, data, ds.SOPClassUID, sx.uid, expected)


def _byte_cases(sx: Syntax) -> Iterator[Case]:
    ds = sx.fresh()
    good = sx.bytes_of(ds)
    start, layout = layout_of(good, sx)
    px = layout.elements[PIXEL_DATA]
    px_header = header_offset(px, sx)
    cls = ds.SOPClassUID

    def case(name, category, data, expected):
        # the same instance UID is fine: none of these may be stored
        return Case(f"{sx.key}-{name}", category, data, cls, sx.uid, expected)

    yield case("cut-before-pixel-data", "truncated", good[:px_header], MISMATCH)
    yield case("cut-in-pixel-header", "truncated", good[:px_header + 6], CANNOT_UNDERSTAND)
    third = px.value_offset + (len(good) - px.value_offset) // 3
    yield case("cut-pixel-third", "truncated", good[:third], CANNOT_UNDERSTAND)
    yield case("cut-last-byte", "truncated", good[:-1], CANNOT_UNDERSTAND)
    yield case("cut-last-2-bytes", "truncated", good[:-2], CANNOT_UNDERSTAND)
    yield case("cut-mid-header", "truncated", good[:start + (px_header - start) // 2], CANNOT_UNDERSTAND)
    yield case("trailing-garbage", "garbage", good + b"\x13\x37\xde\xad\xbe\xef", CANNOT_UNDERSTAND)
    rows = layout.elements[0x00280010]
    yield case("rows-length-past-end", "lying-length", set_length(good, rows, sx, 0x7FF0 if not (
        sx.implicit) else 0x7FFFFFF0), CANNOT_UNDERSTAND)
    if sx.implicit:
        # a Rows length that swallows the rest, Pixel Data included: what remains is an impossible Rows
        swallow = len(good) - rows.value_offset
        yield case("rows-length-swallows-pixels", "lying-length", set_length(good, rows, sx, swallow), MISMATCH)
    else:
        # explicit VR: a 2-byte length cannot swallow 8 kB, so it lands inside the next element
        yield case("rows-length-odd", "lying-length", set_length(good, rows, sx, 7), CANNOT_UNDERSTAND)
    name_el = layout.elements[0x00100010]
    yield case("patient-name-length-past-end", "lying-length",
               set_length(good, name_el, sx, 0xFFF0 if not sx.implicit else 0xFFFFFF0), CANNOT_UNDERSTAND)
    uid_el = layout.elements[0x00080018]
    yield case("sop-uid-length-into-name", "lying-length", set_length(good, uid_el, sx, uid_el.length + 40),
               CANNOT_UNDERSTAND)
    if not sx.encapsulated:
        yield case("native-undefined-length", "lying-length", set_length(good, px, sx, 0xFFFFFFFF), CANNOT_UNDERSTAND)
        short = set_length(good, px, sx, px.length - 2)[:-2]
        yield case("native-pixels-short", "pixel-length", short, CANNOT_UNDERSTAND)
        long = set_length(good, px, sx, px.length + 64) + b"\x00" * 64
        yield case("native-pixels-long", "pixel-length", long, CANNOT_UNDERSTAND)
    else:
        yield case("encapsulated-defined-length", "lying-length", set_length(good, px, sx, px.length if px.length != (
            0xFFFFFFFF) else len(good) - px.value_offset), CANNOT_UNDERSTAND)
    # two elements swapped: tags out of order
    a, b = layout.elements[0x00080020], layout.elements[0x00080030]
    ha, hb = header_offset(a, sx), header_offset(b, sx)
    ea, eb = a.value_offset + a.length, b.value_offset + b.length
    if ea == hb:
        yield case("tags-out-of-order", "structure", good[:ha] + good[hb:eb] + good[ha:ea] + good[eb:],
                   CANNOT_UNDERSTAND)
    # a private element claiming 100 MB just before the pixels
    fmt = "<" if sx.little else ">"
    if sx.implicit:
        priv = struct.pack(fmt + "HHI", 0x0029, 0x0010, 100 << 20)
    else:
        priv = struct.pack(fmt + "HH", 0x0029, 0x0010) + b"OB\x00\x00" + struct.pack(fmt + "I", 100 << 20)
    yield case("private-100mb-claim", "lying-length", good[:px_header] + priv + good[px_header:], CANNOT_UNDERSTAND)
    # sequences nested 200 deep (undefined lengths, no delimiters at the end)
    nest = b""
    for _ in range(200):
        if sx.implicit:
            nest += struct.pack(fmt + "HHI", 0x0008, 0x1140, 0xFFFFFFFF)
        else:
            nest += struct.pack(fmt + "HH", 0x0008, 0x1140) + b"SQ\x00\x00" + struct.pack(fmt + "I", 0xFFFFFFFF)
        nest += struct.pack(fmt + "HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    insert_at = header_offset(layout.elements[0x00100010], sx)
    yield case("nested-200-deep", "structure", good[:insert_at] + nest, CANNOT_UNDERSTAND)
    if sx.uid == ExplicitVRLittleEndian:
        # the File Meta says Explicit VR, the body is implicit (and the other way round)
        yield case("explicit-syntax-implicit-body", "encoding",
                   part10(ds, implicit=True, meta={"TransferSyntaxUID": ExplicitVRLittleEndian}), CANNOT_UNDERSTAND)
        yield case("implicit-syntax-explicit-body", "encoding",
                   part10(ds, implicit=False, meta={"TransferSyntaxUID": ImplicitVRLittleEndian}), CANNOT_UNDERSTAND)
        yield case("big-endian-syntax-little-body", "encoding",
                   part10(ds, implicit=False, meta={"TransferSyntaxUID": ExplicitVRBigEndian}), CANNOT_UNDERSTAND)
        yield case("little-syntax-big-body", "encoding",
                   part10(ds, little=False, meta={"TransferSyntaxUID": ExplicitVRLittleEndian}), CANNOT_UNDERSTAND)
        yield case("jpeg-syntax-native-body", "encoding",
                   part10(ds, meta={"TransferSyntaxUID": JPEGBaseline8Bit}), CANNOT_UNDERSTAND)
        yield case("empty-dataset", "truncated", good[:start], MISMATCH)  # no UIDs at all
        yield case("random-bytes", "garbage", good[:start] + np.random.default_rng(7).bytes(4096), CANNOT_UNDERSTAND)


def _frames_of(sx: Syntax) -> bytes:
    from pydicom.encaps import generate_frames
    return next(generate_frames(sx.ds.PixelData, number_of_frames=1))


def _with_frame(sx: Syntax, frame: bytes, **attrs) -> tuple[Dataset, bytes]:
    ds = sx.fresh()
    for k, v in attrs.items():
        setattr(ds, k, v)
    frame += b"\x00" * (len(frame) & 1)
    # an empty Basic Offset Table, then the frame as one fragment (written by hand: pydicom refuses empty ones)
    ds.PixelData = struct.pack("<HHI", 0xFFFE, 0xE000, 0) + struct.pack("<HHI", 0xFFFE, 0xE000, len(frame)) + frame
    ds["PixelData"].is_undefined_length = True
    return ds, sx.bytes_of(ds)


def _patch_size(sx: Syntax, frame: bytes, rows: int, cols: int) -> bytes:
    if sx.key.startswith("j2k"):
        i = frame.find(b"\xff\x4f\xff\x51")
        siz = i + 4
        return frame[:siz + 4] + struct.pack(">II", cols, rows) + frame[siz + 12:]
    if sx.key == "rle":
        return frame
    pos = 2
    while pos < len(frame):
        marker = frame[pos + 1]
        seg = struct.unpack(">H", frame[pos + 2:pos + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xF7):
            return frame[:pos + 5] + struct.pack(">HH", rows, cols) + frame[pos + 9:]
        pos += 2 + seg
    raise AssertionError("no SOF")


def _compressed_cases(sx: Syntax) -> Iterator[Case]:
    frame = _frames_of(sx)
    cls = CTImageStorage

    def case(name, category, ds_bytes, expected):
        ds, data = ds_bytes
        return Case(f"{sx.key}-{name}", category, data, cls, sx.uid, expected)

    yield case("stream-cut-third", "truncated-stream", _with_frame(sx, frame[:len(frame) // 3]), CANNOT_UNDERSTAND)
    yield case("stream-cut-two-thirds", "truncated-stream", _with_frame(sx, frame[:2 * len(frame) // 3]),
               CANNOT_UNDERSTAND)
    yield case("stream-no-end-marker", "truncated-stream", _with_frame(sx, frame.rstrip(b"\x00")[:-2]),
               CANNOT_UNDERSTAND)
    # entropy-coded garbage between an intact header and end marker: whether it decodes to the declared shape
    # depends on the codec (libjpeg usually decodes it; the rule is "decodes fully", not "looks like anatomy"),
    # so 0x0000 is right too, and the suite then decodes the stored file to prove it
    yield replace(case("stream-garbage-body", "garbage", _with_frame(sx, frame[:len(frame) // 4] + b"\x55" * (
        len(frame) // 2) + frame[-2:]), CANNOT_UNDERSTAND), also=(SUCCESS,))
    yield case("frames-3-one-fragment", "impossible", _with_frame(sx, frame, NumberOfFrames=3), CANNOT_UNDERSTAND)
    yield case("empty-fragment", "truncated-stream", _with_frame(sx, b""), CANNOT_UNDERSTAND)
    if sx.key == "rle":
        bad = struct.pack("<I", 3) + frame[4:]
        yield case("rle-wrong-segment-count", "frame-header", _with_frame(sx, bad), CANNOT_UNDERSTAND)
        bad = frame[:4] + struct.pack("<I", 1 << 30) + frame[8:]
        yield case("rle-offset-past-end", "frame-header", _with_frame(sx, bad), CANNOT_UNDERSTAND)
        return
    for n in (4096, 16384, 65500):
        yield case(f"header-claims-{n}", "decode-bomb", _with_frame(sx, _patch_size(sx, frame, n, n)),
                   CANNOT_UNDERSTAND)
    # the frame header and Rows/Columns agree on a size over limits.max_frame_pixels: refused before decoding
    for n in (16384, 65500):
        yield case(f"bomb-{n}-consistent", "decode-bomb",
                   _with_frame(sx, _patch_size(sx, frame, n, n), Rows=n, Columns=n), OUT_OF_RESOURCES)
    # consistent 4096 x 4096 (within the limit) over a 64 x 64 stream: decodes must fail, not pad
    c = case("claims-4096-consistent", "decode-bomb",
             _with_frame(sx, _patch_size(sx, frame, 4096, 4096), Rows=4096, Columns=4096), CANNOT_UNDERSTAND)
    if sx.key.startswith("jpeg-ls"):
        c = replace(c, xfail="CharLS pads a JPEG-LS stream that ends early; a header that agrees with Rows/Columns "
                             "over a short but complete-looking stream decodes (to zeros) and is stored")
    yield c
    yield case("header-3-components", "frame-header",
               _with_frame(sx, frame, SamplesPerPixel=3, PhotometricInterpretation="RGB", PlanarConfiguration=0),
               CANNOT_UNDERSTAND)
    yield case("rows-differ-by-one", "frame-header", _with_frame(sx, frame, Rows=ROWS + 1), CANNOT_UNDERSTAND)


def _uid_cases(sx: Syntax) -> Iterator[Case]:
    cls = CTImageStorage
    pynetdicom_abort = ("pynetdicom (the sending library) refuses to encode a command SOP Instance UID over "
                        "64 characters / with non-ASCII characters and aborts before the node sees it")
    attacks = {
        "traversal": "../../../../tmp/evil",
        "traversal-dots": "1.2.3/../../../x",
        "absolute-path": "/etc/passwd",
        "over-long-65": "1." + "2" * 63,
        "over-long-200": "1." + "3" * 198,
        "non-ascii": "1.2.3.\u00fc.4",
        "empty": "",
        "spaces": "1.2 .3",
        "letters": "1.2.abc",
        "backslash": "1.2\\3.4",
        "nul-inside": "1.2\x003.4",
        "canary-in-uid": CANARY_ID,
    }
    for name, bad in attacks.items():
        for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            ds = sx.fresh()
            if keyword == "SOPInstanceUID":
                # the command carries the same value (pynetdicom takes it from the File Meta)
                meta_uid = bad
                xfail = ""
                if name in ("over-long-65", "over-long-200", "non-ascii", "empty", "nul-inside", "backslash"):
                    # send the lie in the dataset only; the command carries a valid UID
                    meta_uid = ds.SOPInstanceUID
                ds.SOPInstanceUID = bad
                data = sx.bytes_of(ds, MediaStorageSOPInstanceUID=meta_uid)
                yield Case(f"uid-{name}-{keyword}", "uid", data, cls, sx.uid, MISMATCH, xfail)
                if name in ("over-long-65", "over-long-200"):
                    ds2 = sx.fresh()
                    ds2.SOPInstanceUID = bad
                    yield Case(f"uid-{name}-command", "uid", sx.bytes_of(ds2, MediaStorageSOPInstanceUID=bad), cls,
                               sx.uid, MISMATCH, pynetdicom_abort)
            else:
                setattr(ds, keyword, bad)
                yield Case(f"uid-{name}-{keyword}", "uid", sx.bytes_of(ds), cls, sx.uid, MISMATCH)
    ds = sx.fresh()
    yield Case("uid-command-differs", "uid", sx.bytes_of(ds, MediaStorageSOPInstanceUID=new_uid()), cls, sx.uid,
               MISMATCH)
    ds = sx.fresh()
    ds.SOPClassUID = "../../x"
    yield Case("uid-sop-class-traversal", "uid", sx.bytes_of(ds, MediaStorageSOPClassUID=CTImageStorage), cls,
               sx.uid, MISMATCH)


def _deflate_cases(sx: Syntax) -> Iterator[Case]:
    cls = CTImageStorage
    good = sx.fresh()
    good.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    head = part10(good, meta={"TransferSyntaxUID": DeflatedExplicitVRLittleEndian})
    start = dataset_start(io.BytesIO(head), len(head))[0]
    body = head[start:]

    def deflated(raw: bytes) -> bytes:
        c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        return head[:start] + c.compress(raw) + c.flush()

    # a bomb: the body, then a private OB of 64 MiB of zeros (over limits.max_inflated_bytes = 16 MiB)
    px_at = body.find(b"\xe0\x7f\x10\x00")
    zeros = 64 << 20
    bomb_body = body[:px_at] + struct.pack("<HH", 0x0029, 0x1010) + b"OB\x00\x00" + struct.pack("<I", zeros)
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [c.compress(bomb_body)]
    chunk = b"\x00" * (1 << 20)
    for _ in range(zeros >> 20):
        parts.append(c.compress(chunk))
    parts.append(c.compress(body[px_at:]))
    parts.append(c.flush())
    yield Case("deflate-bomb-64mib", "deflate-bomb", head[:start] + b"".join(parts), cls,
               DeflatedExplicitVRLittleEndian, OUT_OF_RESOURCES)
    stream = deflated(body)[start:]
    yield Case("deflate-truncated", "truncated", head[:start] + stream[:len(stream) // 2], cls,
               DeflatedExplicitVRLittleEndian, CANNOT_UNDERSTAND)
    yield Case("deflate-garbage", "garbage", head[:start] + np.random.default_rng(3).bytes(2048), cls,
               DeflatedExplicitVRLittleEndian, CANNOT_UNDERSTAND)
    yield Case("deflate-zlib-header", "encoding", head[:start] + zlib.compress(body), cls,
               DeflatedExplicitVRLittleEndian, CANNOT_UNDERSTAND)
    yield Case("deflate-not-deflated", "encoding", head[:start] + body, cls, DeflatedExplicitVRLittleEndian,
               CANNOT_UNDERSTAND)


def _limit_cases() -> Iterator[Case]:
    """Instances over the limits the suite's node runs with (TEST_LIMITS) or the default frame limits."""
    cls = CTImageStorage
    ds = base_dataset()
    ds.NumberOfFrames = 2 * (TEST_LIMITS["max_instance_bytes"] // len(ds.PixelData)) + 2
    ds.PixelData = ds.PixelData * int(ds.NumberOfFrames)
    yield Case("instance-over-max-instance-bytes", "limits", part10(ds), cls, ExplicitVRLittleEndian,
               OUT_OF_RESOURCES)
    ds = base_dataset()
    ds.Rows = ds.Columns = 8192  # over max_frame_pixels (4096 x 4096); the pixels are a few bytes
    ds.PixelData = b"\x00" * 64
    yield Case("native-frame-over-max-frame-pixels", "limits", part10(ds), cls, ExplicitVRLittleEndian,
               OUT_OF_RESOURCES)
    ds = base_dataset()
    ds.Rows = ds.Columns = 65535
    ds.PixelData = b"\x00" * 64
    yield Case("native-65535-square", "limits", part10(ds), cls, ExplicitVRLittleEndian, OUT_OF_RESOURCES)
    ds = base_dataset()
    ds.Rows = ds.Columns = 4096
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31  # 192 MiB a frame, over max_frame_bytes
    ds.PixelData = b"\x00" * 64
    yield Case("native-frame-over-max-frame-bytes", "limits", part10(ds), cls, ExplicitVRLittleEndian,
               OUT_OF_RESOURCES)
    # multi-frame good instance: all frames decoded
    ds = base_dataset()
    ds.NumberOfFrames = 5
    ds.PixelData = ds.PixelData * 5
    yield Case("good-multiframe-5", "good", part10(ds), cls, ExplicitVRLittleEndian, SUCCESS)
    ds = base_dataset(rows=512, columns=512)
    yield Case("good-512-square", "good", part10(ds), cls, ExplicitVRLittleEndian, SUCCESS)


