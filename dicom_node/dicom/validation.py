"""Intake checks: is a received Part-10 file an instance the node can store and, later, fuse?

Kept apart from the network: :func:`validate_instance` takes a file, the
command's UIDs and the decoding limits, and returns a :class:`Problem` (or
``None``); the Storage SCP maps the problem's kind to the status the sender
sees.  The rule is "nothing is acknowledged that cannot be decoded": an
image is stored only after every frame has been decoded to an array of the
shape and bit depth its attributes declare.  The order of the checks is the
memory bound: the file size, then the element stream (headers only,
``structure``), then the image attributes, then each compressed frame's own
header (``frames``), and only then the decoders, at most
``limits.decode_concurrency`` at once (:class:`DecodeGate`).

Each file is parsed once, by the walk: the values the checks and the index
need are read at the offsets it found (:func:`_header`, not ``dcmread``),
:func:`check_instance` hands them to the caller, which indexes from them
(``Store.store_received(header=...)``), and the decoders read the pixels at the
offset the walk found, with the options taken from that same header, instead
of parsing the file again (what ``pydicom.pixels.iter_pixels(path)`` would do).
"""

from __future__ import annotations

import functools
import os
import re
import threading
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Final, Literal, TypeVar

from pydicom import dcmread
from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.filebase import DicomFileLike
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_file_meta_info
from pydicom.pixels import get_decoder
from pydicom.pixels.utils import as_pixel_options
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000TransferSyntaxes,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
    RLELossless,
    SpatialRegistrationStorage,
)

from dicom_node.config import LimitsConfig
from dicom_node.dicom import frames as fr
from dicom_node.dicom.structure import PIXEL_DATA, UNDEFINED, Layout, StructureError, dataset_start, walk
from dicom_node.dicom.uids import InvalidInstanceError, check_uid

#: the UIDs are missing, malformed, or differ from the command; the image attributes are impossible or missing
MISMATCH: Final = "mismatch"
#: the dataset cannot be parsed, or its pixel data cannot be decoded to what it declares
UNDECODABLE: Final = "undecodable"
#: the instance exceeds a decoding limit ([limits]), or no decode slot came free in time
OVER_LIMIT: Final = "over-limit"

ProblemKind = Literal["mismatch", "undecodable", "over-limit"]
T = TypeVar("T")

#: storage SOP classes without pixel data; every other accepted class must carry Pixel Data
NON_IMAGE_SOP_CLASSES: Final = frozenset({SpatialRegistrationStorage})

#: attributes whose VR is fixed by PS3.6 and which the node reads: a different VR is a malformed dataset
_EXPECTED_VR: Final = {
    0x00080016: "UI", 0x00080018: "UI", 0x0020000D: "UI", 0x0020000E: "UI", 0x00200052: "UI",
    0x00200011: "IS", 0x00200013: "IS", 0x00280008: "IS",
    0x00280002: "US", 0x00280006: "US", 0x00280010: "US", 0x00280011: "US", 0x00280100: "US",
    0x00280101: "US", 0x00280102: "US", 0x00280103: "US", 0x00280004: "CS", 0x00080060: "CS",
    0x00200032: "DS", 0x00200037: "DS", 0x00280030: "DS", 0x00180050: "DS", 0x00281052: "DS", 0x00281053: "DS",
}
#: US attributes of the image pixel module: exactly one 2-byte value (a lying length is caught here)
_US_ONE: Final = (0x00280002, 0x00280006, 0x00280010, 0x00280011, 0x00280100, 0x00280101, 0x00280102, 0x00280103)
_BITS_ALLOCATED: Final = frozenset({1, 8, 16, 32})
#: the characters each string VR of :data:`_EXPECTED_VR` allows (PS3.5 6.2), padding included
_STRING_FORM: Final = {
    "UI": re.compile(rb"[0-9.]*\x00?"),
    "IS": re.compile(rb"[ 0-9+\-\\]*"),
    "DS": re.compile(rb"[ 0-9+\-.eE\\]*"),
    "CS": re.compile(rb"[ A-Z0-9_\\]*"),
}


@dataclass(frozen=True)
class Problem:
    """Why an instance is refused: a kind the SCP maps to a status, a reason for the log, a detail."""

    kind: ProblemKind
    reason: str
    detail: str = ""


@dataclass(frozen=True)
class Intake:
    """The verdict on a received file, and the header it was judged on.

    ``header`` is the dataset as read from the received file itself: only
    the attributes the checks read and the ``keywords`` the caller asked for
    (:func:`check_instance`), with the File Meta; the store indexes from it
    instead of reading the file again.
    None when the file was refused, or when what was checked is not the file
    as received (a Deflated syntax is checked on its inflated copy).
    """

    problem: Problem | None
    header: Dataset | None = None


class _Refused(Exception):
    def __init__(self, kind: ProblemKind, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.problem = Problem(kind, reason, detail)


class DecodeGate:
    """At most ``limits.decode_concurrency`` pixel decodes at once, over all associations, on their own threads.

    Each association has its own thread; without a gate ``max_associations``
    worst-case decodes would run together.  The decodes also run on a pool of
    ``decode_concurrency`` threads rather than on the association threads:
    the C allocator keeps what a thread freed in that thread's arena, so ten
    association threads that each decoded one large frame in turn would hold
    ten frames' worth of memory; on a fixed pool the same memory is reused.
    The node's peak memory is then its idle size plus about
    ``decode_concurrency`` times the largest decode the limits allow.
    """

    def __init__(self, limits: LimitsConfig) -> None:
        self.limits = limits
        self._slots = threading.BoundedSemaphore(limits.decode_concurrency)
        self._pool = ThreadPoolExecutor(max_workers=limits.decode_concurrency, thread_name_prefix="decode")

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on a decode thread, once a slot is free (0xA700 after ``limits.decode_wait_s``)."""
        if not self._slots.acquire(timeout=self.limits.decode_wait_s):
            raise _Refused(OVER_LIMIT, "no decode slot free",
                           f"limits.decode_concurrency = {self.limits.decode_concurrency} decodes were busy for "
                           f"limits.decode_wait_s = {self.limits.decode_wait_s} s")
        try:
            return self._pool.submit(fn, *args).result()
        finally:
            self._slots.release()


def validate_instance(path: Path, affected_sop_class: str, affected_sop_instance: str,
                      gate: DecodeGate | None = None) -> Problem | None:
    """Check a received Part-10 file before it is stored; ``None`` means it may be stored.

    ``gate`` carries the limits and the decode slots; the Storage SCP passes
    its own (``dicom_node.net.storage_scp``), a caller without one gets the
    default limits and a private gate.
    """
    return check_instance(path, affected_sop_class, affected_sop_instance, gate).problem


def check_instance(path: Path, affected_sop_class: str, affected_sop_instance: str,
                   gate: DecodeGate | None = None, keywords: frozenset[str] = frozenset()) -> Intake:
    """:func:`validate_instance`, with the header it read for the caller (:class:`Intake`).

    The header holds the attributes the checks read, plus ``keywords`` (the
    store's :data:`dicom_node.index.store.INDEXED_KEYWORDS`), where present.
    """
    gate = gate or DecodeGate(LimitsConfig())
    path = Path(path)
    inflated: Path | None = None
    try:
        body, inflated = _body(path, gate.limits)
        problem, header = _validate(body, affected_sop_class, affected_sop_instance, gate, keywords)
        return Intake(problem, header if problem is None and inflated is None else None)
    except _Refused as refused:
        return Intake(refused.problem)
    except StructureError as exc:
        return Intake(Problem(UNDECODABLE, "dataset is malformed", str(exc)))
    except Exception as exc:  # noqa: BLE001 - a hostile dataset can make pydicom and the decoders raise anything
        return Intake(Problem(UNDECODABLE, "dataset cannot be parsed or decoded", f"{type(exc).__name__}: {exc}"))
    finally:
        if inflated is not None:
            inflated.unlink(missing_ok=True)


def _transfer_syntax(meta: dict[int, bytes]) -> UID:
    raw = meta.get(0x00020010)
    if raw is None:
        raise _Refused(UNDECODABLE, "dataset is malformed", "File Meta has no Transfer Syntax UID")
    return UID(raw.rstrip(b"\x00 ").decode("ascii", "replace"))


def _body(path: Path, limits: LimitsConfig) -> tuple[Path, Path | None]:
    """The file to check: the received one, or for a Deflated syntax its bounded inflation beside it."""
    size = path.stat().st_size
    if size > limits.max_instance_bytes:
        raise _Refused(OVER_LIMIT, "instance exceeds limits.max_instance_bytes",
                       f"{size} bytes, limits.max_instance_bytes = {limits.max_instance_bytes}")
    with open(path, "rb") as fp:
        start, meta = dataset_start(fp, size)
    tsyntax = _transfer_syntax(meta)
    if not tsyntax.is_deflated:
        return path, None
    dest = path.with_name(path.name + ".inflated")
    try:
        _inflate(path, start, dest, limits.max_inflated_bytes)
    except BaseException:
        dest.unlink(missing_ok=True)  # a refused bomb leaves no partial copy in the store's tmp folder
        raise
    return dest, dest


def _inflate(src_path: Path, start: int, dest: Path, limit: int) -> None:
    """Inflate to disk with ``max_length`` steps, so a deflate bomb stops at ``limit``, not in memory."""
    meta = read_file_meta_info(src_path)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(src_path, "rb") as src, os.fdopen(fd, "wb") as out:
        out.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(DicomFileLike(out), meta, enforce_standard=True)
        src.seek(start)
        while not inflater.eof and (chunk := src.read(1 << 16)):
            while chunk and not inflater.eof:
                data = inflater.decompress(chunk, 1 << 20)
                total += len(data)
                if total > limit:
                    raise _Refused(OVER_LIMIT, "inflated dataset exceeds limits.max_inflated_bytes",
                                   f"more than {limit} bytes after inflating")
                out.write(data)
                chunk = inflater.unconsumed_tail
        if not inflater.eof:
            raise _Refused(UNDECODABLE, "deflated dataset is truncated", "the deflate stream has no end")


def _validate(path: Path, sop_class: str, sop_instance: str, gate: DecodeGate,
              keywords: frozenset[str]) -> tuple[Problem | None, Dataset]:
    size = path.stat().st_size
    with open(path, "rb") as fp:
        start, meta = dataset_start(fp, size)
        tsyntax = _transfer_syntax(meta)
        layout = walk(fp, start, size, little=tsyntax.is_little_endian, implicit=tsyntax.is_implicit_VR)
        _check_vrs(layout, fp)
        ds = _header(path, fp, layout, tsyntax, _HEADER_TAGS | _tags(keywords))
    values = {kw: ds.get(kw) for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")}
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        try:
            check_uid(values[kw], kw)
        except InvalidInstanceError as exc:
            return Problem(MISMATCH, str(exc)), ds
    if str(values["SOPClassUID"] or "").strip() != str(sop_class):
        return Problem(MISMATCH, "SOPClassUID differs from the command's Affected SOP Class UID"), ds
    if str(values["SOPInstanceUID"]).strip() != str(sop_instance):
        return Problem(MISMATCH, "SOPInstanceUID differs from the command's Affected SOP Instance UID"), ds
    pixel = layout.elements.get(PIXEL_DATA)
    if pixel is None:
        if sop_class in NON_IMAGE_SOP_CLASSES:
            return None, ds
        return Problem(MISMATCH, "image without Pixel Data", "the SOP class is an image storage class"), ds
    geometry = _geometry(ds, gate.limits)
    if tsyntax.is_encapsulated:
        if pixel.length != UNDEFINED:
            return Problem(UNDECODABLE, "pixel data undecodable", "encapsulated Pixel Data of defined length"), ds
        _check_frame_headers(path, pixel.value_offset, layout, tsyntax, geometry, gate)
    else:
        if pixel.length == UNDEFINED:
            return Problem(UNDECODABLE, "pixel data undecodable", "native pixel data with undefined length"), ds
        expected = geometry.native_bytes
        if pixel.length not in (expected, expected + (expected & 1)):
            return Problem(UNDECODABLE, "pixel data undecodable",
                           f"pixel data has {pixel.length} bytes, the image geometry needs {expected}"), ds
    gate.run(_decode_all, path, geometry, _pixel_options(ds, tsyntax, pixel), pixel.value_offset)
    return None, ds


#: the attributes the checks read (the UIDs, the Image Pixel module, the offset tables) and the character set
_HEADER_TAGS: Final = frozenset({
    0x00080005, 0x00080016, 0x00080018, 0x0020000D, 0x0020000E,
    0x00280002, 0x00280004, 0x00280006, 0x00280008, 0x00280010, 0x00280011, 0x00280100, 0x00280101,
    0x00280102, 0x00280103, 0x7FE00001, 0x7FE00002,
})


@functools.lru_cache(maxsize=16)
def _tags(keywords: frozenset[str]) -> frozenset[int]:
    """The tags of ``keywords`` (the same few sets every time: looked up once)."""
    tags = {tag_for_keyword(kw) for kw in keywords}
    if None in tags:
        raise ValueError(f"not DICOM keywords: {sorted(kw for kw in keywords if tag_for_keyword(kw) is None)}")
    return frozenset(t for t in tags if t is not None)


def _header(path: Path, fp: BinaryIO, layout: Layout, tsyntax: UID, tags: frozenset[int]) -> Dataset:
    """The dataset's ``tags`` (those present), as pydicom would read them, from the offsets the walk found.

    Only these values are read: the rest of the header, a hostile private
    value included, stays on disk, and the ~200 other elements of a CT header
    cost nothing (``dcmread`` parses each).  The elements are pydicom's own
    raw elements, converted on access as a ``dcmread`` dataset's are.  A
    wanted element of undefined length (a sequence where a value belongs)
    leaves the judgement to ``dcmread`` itself.
    """
    implicit, little = tsyntax.is_implicit_VR, tsyntax.is_little_endian
    raws: dict[BaseTag, DataElement | RawDataElement] = {}
    charset: RawDataElement | None = None
    for tag in sorted(tags):
        el = layout.elements.get(tag)
        if el is None:
            continue
        if el.length == UNDEFINED:
            return dcmread(path, stop_before_pixels=True, defer_size=1 << 16)
        fp.seek(el.value_offset)
        raw = RawDataElement(BaseTag(tag), el.vr, el.length, fp.read(el.length), el.value_offset, implicit, little)
        raws[raw.tag] = raw
        if tag == 0x00080005:
            charset = raw
    ds = Dataset(raws)
    encoding = (convert_encodings(convert_raw_data_element(charset).value) if charset is not None
                else default_encoding)
    ds.set_original_encoding(implicit, little, encoding)
    ds.file_meta = read_file_meta_info(path)
    return ds


def _check_vrs(layout: Layout, fp: BinaryIO) -> None:
    """The attributes the node reads have their PS3.6 VR; in implicit VR, values of that VR's form."""
    for tag, want in _EXPECTED_VR.items():
        el = layout.elements.get(tag)
        if el is None:
            continue
        name = f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
        if el.vr is not None and el.vr != want:
            raise _Refused(MISMATCH, "attribute with the wrong VR", f"{name} is {el.vr}, PS3.6 says {want}")
        if el.length == UNDEFINED or (want in _STRING_FORM and el.length > 1024):
            raise _Refused(MISMATCH, "attribute with the wrong VR", f"{name} has a length no {want} value has")
        form = _STRING_FORM.get(want)
        if form is not None:
            fp.seek(el.value_offset)
            if not form.fullmatch(fp.read(el.length)):
                raise _Refused(MISMATCH, "attribute with the wrong VR", f"{name} is not a valid {want} value")
    for tag in _US_ONE:
        el = layout.elements.get(tag)
        if el is not None and el.length != 2:
            raise _Refused(MISMATCH, "attribute with a wrong length",
                           f"({tag >> 16:04X},{tag & 0xFFFF:04X}) has {el.length} bytes, one US value is 2")


@dataclass(frozen=True)
class _Geometry:
    rows: int
    columns: int
    samples: int
    bits: int
    frames: int
    native_bytes: int


def _int(ds: Any, keyword: str, default: int | None = None) -> int:
    value = ds.get(keyword)
    if value is None or value == "":
        if default is None:
            raise _Refused(MISMATCH, f"image without {keyword}")
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise _Refused(MISMATCH, f"{keyword} is not an integer") from None


def _geometry(ds: Any, limits: LimitsConfig) -> _Geometry:
    rows, columns = _int(ds, "Rows"), _int(ds, "Columns")
    samples, bits = _int(ds, "SamplesPerPixel", 1), _int(ds, "BitsAllocated")
    stored = _int(ds, "BitsStored", bits)
    frames = _int(ds, "NumberOfFrames", 1)
    if rows <= 0 or columns <= 0:
        raise _Refused(MISMATCH, "impossible image attributes", f"Rows = {rows}, Columns = {columns}")
    if bits not in _BITS_ALLOCATED or not 0 < stored <= bits:
        raise _Refused(MISMATCH, "impossible image attributes", f"BitsAllocated = {bits}, BitsStored = {stored}")
    if samples not in (1, 3):
        raise _Refused(MISMATCH, "impossible image attributes", f"SamplesPerPixel = {samples}")
    if frames <= 0:
        raise _Refused(MISMATCH, "impossible image attributes", f"NumberOfFrames = {frames}")
    if _int(ds, "PixelRepresentation", 0) not in (0, 1):
        raise _Refused(MISMATCH, "impossible image attributes", "PixelRepresentation is neither 0 nor 1")
    if not str(ds.get("PhotometricInterpretation", "") or "").strip():
        raise _Refused(MISMATCH, "image without PhotometricInterpretation")
    if rows * columns > limits.max_frame_pixels:
        raise _Refused(OVER_LIMIT, "frame exceeds limits.max_frame_pixels",
                       f"{rows} x {columns} pixels, limits.max_frame_pixels = {limits.max_frame_pixels}")
    frame_bytes = (rows * columns * samples * bits + 7) // 8
    if frame_bytes > limits.max_frame_bytes:
        raise _Refused(OVER_LIMIT, "frame exceeds limits.max_frame_bytes",
                       f"{frame_bytes} bytes, limits.max_frame_bytes = {limits.max_frame_bytes}")
    native_samples = samples
    if str(ds.get("PhotometricInterpretation", "")).strip() == "YBR_FULL_422":
        native_samples = 2  # two samples per pixel pair in native YBR_FULL_422 (PS3.3 C.7.6.3.1.2)
    native = (rows * columns * native_samples * bits * frames + 7) // 8
    return _Geometry(rows, columns, samples, bits, frames, native)


def _check_frame_headers(path: Path, value_offset: int, layout: Layout, tsyntax: UID, g: _Geometry,
                         gate: DecodeGate) -> None:
    """Each compressed frame's own header against the geometry, before any decoder allocates.

    Frames are read at offsets (a few kilobytes each), never whole, so this
    step costs no memory whatever the stream claims.
    """
    frags = layout.fragments
    if not frags:
        raise _Refused(UNDECODABLE, "pixel data undecodable", "encapsulated Pixel Data without fragments")
    if len(frags) < g.frames:
        raise _Refused(UNDECODABLE, "pixel data undecodable", f"{len(frags)} fragments for NumberOfFrames = {g.frames}")
    with open(path, "rb") as fp:
        groups = _frame_fragments(fp, layout, g.frames)
        if groups is None:
            # several fragments a frame and no offset table: only the markers tell the frames apart (pydicom reads
            # them whole), so this rare layout is checked under a decode slot
            gate.run(_check_whole_frames, path, value_offset, tsyntax, g)
            return
        _check_streams([fr.FileStream(fp, grp) for grp in groups], tsyntax, g)


def _check_whole_frames(path: Path, value_offset: int, tsyntax: UID, g: _Geometry) -> None:
    with open(path, "rb") as fp:
        fp.seek(value_offset)
        _check_streams([fr.Stream(f) for f in generate_frames(fp, number_of_frames=g.frames)], tsyntax, g)


def _frame_fragments(fp: BinaryIO, layout: Layout, frames: int) -> list[list[tuple[int, int]]] | None:
    """The fragments of each frame: PS3.5 A.4 one frame = all fragments, one fragment each, or the offset table."""
    frags = layout.fragments
    if frames == 1:
        return [frags]
    if frames == len(frags):
        return [[f] for f in frags]
    bot = layout.offset_table
    if bot is None or bot[1] != 4 * frames:
        return None
    fp.seek(bot[0])
    offsets = [int.from_bytes(fp.read(4), "little") for _ in range(frames)]
    first_item = frags[0][0] - 8
    starts = [off - 8 - first_item for off, _ in frags]  # each fragment's item, relative to the first
    if offsets[0] != 0 or any(b <= a for a, b in zip(offsets, offsets[1:], strict=False)):
        raise _Refused(UNDECODABLE, "pixel data undecodable", "Basic Offset Table offsets are not increasing from 0")
    groups: list[list[tuple[int, int]]] = [[] for _ in range(frames)]
    for frag, start in zip(frags, starts, strict=True):
        index = sum(1 for o in offsets if o <= start) - 1
        groups[index].append(frag)
    if any(not grp for grp in groups) or any(o not in starts for o in offsets):
        raise _Refused(UNDECODABLE, "pixel data undecodable", "Basic Offset Table does not point at fragments")
    return groups


def _check_streams(streams: list[fr.Stream], tsyntax: UID, g: _Geometry) -> None:
    if len(streams) != g.frames:
        raise _Refused(UNDECODABLE, "pixel data undecodable", f"{len(streams)} frames found, NumberOfFrames = {g.frames}")
    for i, stream in enumerate(streams, 1):
        try:
            _check_frame(stream, tsyntax, g)
        except fr.FrameError as exc:
            raise _Refused(UNDECODABLE, "pixel data undecodable", f"frame {i}: {exc}") from None


def _check_frame(frame: fr.Stream, tsyntax: UID, g: _Geometry) -> None:
    if tsyntax == RLELossless:
        fr.rle_header(frame, g.samples * (g.bits // 8 or 1))
        return
    if tsyntax in JPEGTransferSyntaxes or tsyntax in JPEGLSTransferSyntaxes:
        header = fr.jpeg_header(frame)
    elif tsyntax in JPEG2000TransferSyntaxes:
        header = fr.j2k_header(frame)
    else:
        return  # an encapsulated syntax without a known header: the full decode below decides
    if (header.rows, header.columns) != (g.rows, g.columns):
        raise fr.FrameError(f"the stream declares {header.rows} x {header.columns}, "
                            f"Rows x Columns are {g.rows} x {g.columns}")
    if header.components != g.samples:
        raise fr.FrameError(f"the stream has {header.components} components, SamplesPerPixel is {g.samples}")
    if not 0 < header.precision <= g.bits:
        raise fr.FrameError(f"the stream's precision is {header.precision} bits, BitsAllocated is {g.bits}")
    least = _least_stream_bytes(header)
    if frame.length < least:
        raise fr.FrameError(f"{frame.length} bytes cannot hold {header.rows} x {header.columns} x {header.components} "
                            f"samples (at least {least}); the decoder would pad the rest")


def _least_stream_bytes(h: fr.FrameHeader) -> int:
    """The fewest bytes an encoder can spend on this frame; fewer means a padded, not a decoded, image.

    Each 8 x 8 block of a DCT process costs at least two Huffman codes of one
    bit (DC difference and end of block); each sample of lossless JPEG at
    least one bit; a JPEG-LS line in run mode at least one bit per component.
    JPEG 2000 is checked by its tile list instead (``frames.j2k_header``).
    """
    if h.marker in (0xC3, 0xC7, 0xCB, 0xCF):  # lossless processes
        return h.rows * h.columns * h.components // 8
    if h.marker == 0xF7:  # JPEG-LS
        return h.rows * h.components // 8
    if h.marker:  # DCT processes
        return -(-h.rows // 8) * -(-h.columns // 8) * h.components // 4
    return 0


def _pixel_options(ds: Dataset, tsyntax: UID, pixel: Any) -> dict[str, Any]:
    """The decoder's options, as ``iter_pixels`` would take them from the file, here from the header read once."""
    opts = as_pixel_options(ds)
    opts["transfer_syntax_uid"] = tsyntax
    opts["pixel_keyword"] = "PixelData"
    if pixel.vr is not None:  # explicit VR: OB or OW, which tells the decoder how to swap big endian data
        opts["pixel_vr"] = pixel.vr
    return opts


def _decode_all(path: Path, g: _Geometry, opts: dict[str, Any], value_offset: int) -> None:
    """Decode every frame, one at a time, and compare each with the declared shape and bit depth.

    The decoder reads the Pixel Data value from the file at ``value_offset``
    (frame by frame, never the whole value), as ``iter_pixels(path)`` does
    after parsing the header a second time.
    """
    want = (g.rows, g.columns) if g.samples == 1 else (g.rows, g.columns, g.samples)
    itemsize = max(g.bits // 8, 1)
    count = 0
    decoder = get_decoder(opts["transfer_syntax_uid"])
    with open(path, "rb") as fp:
        fp.seek(value_offset)
        for arr, _ in decoder.iter_array(fp, validate=True, **opts):
            count += 1
            if count > g.frames:
                break
            if arr.shape != want or arr.dtype.itemsize not in (itemsize, 8 if g.bits == 32 else itemsize):
                raise _Refused(UNDECODABLE, "pixel data undecodable",
                               f"frame {count} decoded to {arr.shape} {arr.dtype}, the attributes declare {want} "
                               f"at {g.bits} bits")
    if count != g.frames:
        raise _Refused(UNDECODABLE, "pixel data undecodable", f"{count} frames decoded, NumberOfFrames = {g.frames}")
