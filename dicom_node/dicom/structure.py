"""The element stream of a received file, walked header by header before anything is decoded.

pydicom is forgiving on purpose: it guesses the VR encoding, stops quietly
at a truncated element, and reads a lying length as far as the file goes.
An intake check must be strict instead, and must not allocate what a hostile
length asks for, so this walker reads only element headers (8 or 12 bytes)
and seeks over values.  It checks that every length fits in its container,
that an explicit-VR body really carries VRs, that tags ascend, that
sequences and items close, and it records where the top-level elements
and the Pixel Data fragments are, for the checks that follow.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import BinaryIO, Final

UNDEFINED: Final = 0xFFFFFFFF
PIXEL_DATA: Final = 0x7FE00010
_ITEM: Final = 0xFFFEE000
_ITEM_END: Final = 0xFFFEE00D
_SEQ_END: Final = 0xFFFEE0DD

#: every VR of PS3.5 6.2
_VRS: Final = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split())
#: VRs with a 2-byte reserved field and a 4-byte length in explicit VR (PS3.5 7.1.2)
_LONG_VRS: Final = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
#: nesting deeper than this is an attack on the parser, not a dataset
_MAX_DEPTH: Final = 16


class StructureError(ValueError):
    """The element stream is malformed: truncated, a lying length, a wrong VR encoding."""


@dataclass(frozen=True)
class Element:
    """One top-level element as found in the stream: where its value is, not the value itself."""

    tag: int
    vr: str | None  # None in implicit VR
    length: int
    value_offset: int


@dataclass
class Layout:
    """The top-level elements of a dataset, and the fragments of encapsulated Pixel Data."""

    elements: dict[int, Element] = field(default_factory=dict)
    #: (offset, length) of each Pixel Data item after the Basic Offset Table; empty for native data
    fragments: list[tuple[int, int]] = field(default_factory=list)
    #: (offset, length) of the Basic Offset Table item
    offset_table: tuple[int, int] | None = None


class _Reader:
    def __init__(self, fp: BinaryIO, little: bool, implicit: bool) -> None:
        self.fp, self.implicit = fp, implicit
        self.u16 = struct.Struct("<H" if little else ">H")
        self.u32 = struct.Struct("<I" if little else ">I")
        self.tag = struct.Struct("<HH" if little else ">HH")

    def inner(self, vr: str | None) -> _Reader:
        """The reader for a sequence's content: UN of undefined length holds implicit VR LE (PS3.5 6.2.2)."""
        return _Reader(self.fp, True, True) if vr == "UN" else self

    def read(self, pos: int, n: int, end: int) -> bytes:
        if pos + n > end:
            raise StructureError(f"element header at offset {pos} runs past the end of its container ({end})")
        self.fp.seek(pos)
        data = self.fp.read(n)
        if len(data) != n:
            raise StructureError(f"file ends inside an element header at offset {pos}")
        return data

    def header(self, pos: int, end: int, *, explicit_ok: bool = True) -> tuple[int, str | None, int, int]:
        """(tag, vr, length, value offset) of the element at ``pos``."""
        g, e = self.tag.unpack(self.read(pos, 4, end))
        tag = g << 16 | e
        if g == 0xFFFE or self.implicit or not explicit_ok:
            return tag, None, self.u32.unpack(self.read(pos + 4, 4, end))[0], pos + 8
        vr = self.read(pos + 4, 2, end)
        if vr not in _VRS:
            raise StructureError(f"element ({g:04X},{e:04X}) at offset {pos} has no valid VR "
                                 f"(an explicit VR transfer syntax with an implicit VR body?)")
        if vr in _LONG_VRS:
            return tag, vr.decode(), self.u32.unpack(self.read(pos + 8, 4, end))[0], pos + 12
        return tag, vr.decode(), self.u16.unpack(self.read(pos + 6, 2, end))[0], pos + 8


def walk(fp: BinaryIO, start: int, end: int, *, little: bool = True, implicit: bool = False) -> Layout:
    """Check the dataset between ``start`` and ``end`` and return its top-level layout."""
    r = _Reader(fp, little, implicit)
    layout = Layout()
    pos, last_tag = start, -1
    while pos < end:
        tag, vr, length, value = r.header(pos, end)
        if tag >> 16 == 0xFFFE:
            raise StructureError(f"item or delimiter tag at top level, offset {pos}")
        if tag <= last_tag:
            raise StructureError(f"tags not in ascending order at offset {pos} ({tag:08X} after {last_tag:08X})")
        last_tag = tag
        if tag == PIXEL_DATA and length == UNDEFINED:
            if implicit:
                raise StructureError("Pixel Data of undefined length in an implicit VR (native) transfer syntax")
            pos = _fragments(r, value, end, layout)
        elif length == UNDEFINED:
            if vr not in (None, "SQ", "UN"):
                raise StructureError(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) of VR {vr} has undefined length")
            pos = _sequence(r.inner(vr), value, end, None, 1)
        else:
            if value + length > end:
                raise StructureError(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) declares {length} bytes, "
                                     f"only {end - value} remain")
            if vr == "SQ":
                _sequence(r, value, value + length, length, 1)
            pos = value + length
        layout.elements[tag] = Element(tag, vr, length, value)
    return layout


def _sequence(r: _Reader, pos: int, end: int, length: int | None, depth: int) -> int:
    """Walk a sequence's items; returns the offset after it (after its delimiter if undefined length)."""
    if depth > _MAX_DEPTH:
        raise StructureError(f"sequences nested deeper than {_MAX_DEPTH}")
    stop = end if length is None else pos + length
    while pos < stop:
        tag, _, ilen, value = r.header(pos, stop, explicit_ok=False)
        if tag == _SEQ_END:
            if length is not None:
                raise StructureError(f"sequence delimiter inside a sequence of defined length at offset {pos}")
            return value
        if tag != _ITEM:
            raise StructureError(f"expected an item in a sequence at offset {pos}, found ({tag >> 16:04X},{tag & 0xFFFF:04X})")
        if ilen == UNDEFINED:
            pos = _item(r, value, stop, None, depth)
        else:
            if value + ilen > stop:
                raise StructureError(f"item at offset {pos} declares {ilen} bytes, only {stop - value} remain")
            _item(r, value, value + ilen, ilen, depth)
            pos = value + ilen
    if length is None:
        raise StructureError("sequence of undefined length without its delimiter (truncated)")
    return pos


def _item(r: _Reader, pos: int, end: int, length: int | None, depth: int) -> int:
    stop = end if length is None else pos + length
    last_tag = -1
    while pos < stop:
        tag, vr, elen, value = r.header(pos, stop)
        if tag == _ITEM_END:
            if length is not None:
                raise StructureError(f"item delimiter inside an item of defined length at offset {pos}")
            return value
        if tag >> 16 == 0xFFFE:
            raise StructureError(f"unexpected item tag inside an item at offset {pos}")
        if tag <= last_tag:
            raise StructureError(f"tags not in ascending order inside an item at offset {pos}")
        last_tag = tag
        if elen == UNDEFINED:
            if vr not in (None, "SQ", "UN"):
                raise StructureError(f"element of VR {vr} with undefined length inside an item at offset {pos}")
            pos = _sequence(r.inner(vr), value, stop, None, depth + 1)
        else:
            if value + elen > stop:
                raise StructureError(f"element at offset {pos} declares {elen} bytes, only {stop - value} remain in its item")
            if vr == "SQ":
                _sequence(r, value, value + elen, elen, depth + 1)
            pos = value + elen
    if length is None:
        raise StructureError("item of undefined length without its delimiter (truncated)")
    return pos


def _fragments(r: _Reader, pos: int, end: int, layout: Layout) -> int:
    first = True
    while pos < end:
        tag, _, flen, value = r.header(pos, end, explicit_ok=False)
        if tag == _SEQ_END:
            if first:
                raise StructureError("encapsulated Pixel Data without a Basic Offset Table item")
            return value
        if tag != _ITEM or flen == UNDEFINED:
            raise StructureError(f"encapsulated Pixel Data: expected a fragment item of defined length at offset {pos}")
        if value + flen > end:
            raise StructureError(f"Pixel Data fragment at offset {pos} declares {flen} bytes, only {end - value} remain "
                                 "(truncated)")
        if first:
            layout.offset_table = (value, flen)
            first = False
        else:
            layout.fragments.append((value, flen))
        pos = value + flen
    raise StructureError("encapsulated Pixel Data without its sequence delimiter (truncated)")


def dataset_start(fp: BinaryIO, size: int) -> tuple[int, dict[int, bytes]]:
    """The offset of the dataset after a Part-10 preamble and File Meta, and the meta values (raw bytes)."""
    r = _Reader(fp, True, False)
    if size < 132 or r.read(128, 4, size) != b"DICM":
        raise StructureError("not a Part-10 file (no DICM prefix)")
    pos, meta = 132, {}
    while pos < size:
        fp.seek(pos)
        if fp.read(2) != b"\x02\x00":
            break
        tag, _, length, value = r.header(pos, size)
        if length == UNDEFINED or value + length > size or length > 1 << 16:
            raise StructureError("malformed File Meta Information")
        meta[tag] = r.read(value, length, size)
        pos = value + length
    return pos, meta
