"""Compressed frame headers read before anything is decoded: what size does a stream claim?

A decoder allocates what the stream's own header says (JPEG SOF, JPEG-LS
SOF55, JPEG 2000 SIZ), not what the dataset's Rows and Columns say, so a
1 kB JPEG claiming 16384 x 16384 costs the node a gigabyte before it can
fail.  These parsers read a few bytes of each frame so the intake check can
refuse such a stream before the decoder runs, and check the end marker
that libjpeg and CharLS would otherwise pad over silently when a stream is
cut short.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO, Final

#: JPEG start-of-frame markers (ITU T.81 B.1.1.3) and JPEG-LS SOF55 (T.87 C.2.2)
_SOF: Final = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7})
_STANDALONE: Final = frozenset({0x01, *range(0xD0, 0xD8)})
_EOI: Final = b"\xff\xd9"  # JPEG EOI, JPEG-LS EOI and JPEG 2000 EOC share the code


class FrameError(ValueError):
    """A compressed frame whose header cannot be read, or whose stream is cut short."""


class Stream:
    """A frame read piece by piece: its length, and bytes at an offset (a frame is never read whole here)."""

    def __init__(self, data: bytes | None = None) -> None:
        self._data = data or b""
        self.length = len(self._data)

    def read(self, pos: int, n: int) -> bytes:
        return self._data[pos:pos + n]


class FileStream(Stream):
    """A frame made of Pixel Data fragments in a file, read at offsets, never loaded whole."""

    def __init__(self, fp: BinaryIO, fragments: list[tuple[int, int]]) -> None:
        super().__init__()
        self.fp, self.fragments = fp, fragments
        self.length = sum(n for _, n in fragments)

    def read(self, pos: int, n: int) -> bytes:
        out, base = [], 0
        for offset, length in self.fragments:
            if n <= 0:
                break
            if pos < base + length:
                start = max(pos - base, 0)
                take = min(length - start, n)
                self.fp.seek(offset + start)
                out.append(self.fp.read(take))
                n -= take
                pos += take
            base += length
        return b"".join(out)


#: how much of a frame's start the JPEG parsers look at for the SOF (tables come before it)
HEAD_BYTES: Final = 1 << 16


@dataclass(frozen=True)
class FrameHeader:
    """What a compressed frame says about itself."""

    rows: int
    columns: int
    components: int
    precision: int
    #: the SOF marker (0xC0-0xCF JPEG, 0xF7 JPEG-LS); 0 for JPEG 2000
    marker: int = 0


def _ends_with_eoi(stream: Stream, what: str) -> None:
    # frames are padded to an even length with one 0x00 (PS3.5 A.4)
    tail = stream.read(max(stream.length - 3, 0), 3)
    tail = tail[:-1] if tail.endswith(b"\x00") else tail
    if not tail.endswith(_EOI):
        raise FrameError(f"{what} stream does not end with its end marker (truncated)")


def jpeg_header(stream: Stream) -> FrameHeader:
    """The SOF (or JPEG-LS SOF55) of a JPEG / JPEG-LS frame; checks SOI and EOI."""
    frame = stream.read(0, HEAD_BYTES)
    if not frame.startswith(b"\xff\xd8"):
        raise FrameError("JPEG stream does not start with SOI")
    _ends_with_eoi(stream, "JPEG")
    pos, n = 2, len(frame)
    while pos + 4 <= n:
        if frame[pos] != 0xFF:
            raise FrameError(f"JPEG marker expected at byte {pos}")
        while pos < n and frame[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            break
        marker = frame[pos]
        pos += 1
        if marker in _STANDALONE:
            continue
        if marker in (0xD9, 0xDA):
            break  # EOI or start of scan before any SOF
        if pos + 2 > n:
            break
        (seg_len,) = struct.unpack(">H", frame[pos:pos + 2])
        if seg_len < 2:
            raise FrameError("JPEG segment of length < 2")
        if marker in _SOF:
            if pos + 8 > n:
                break
            precision, rows, columns, components = struct.unpack(">BHHB", frame[pos + 2:pos + 8])
            if rows == 0:
                raise FrameError("JPEG frame header declares 0 lines (DNL streams are not accepted)")
            return FrameHeader(rows, columns, components, precision, marker)
        pos += seg_len
    raise FrameError("JPEG stream has no frame header (SOF) before its scan")


def j2k_header(stream: Stream) -> FrameHeader:
    """The SIZ of a JPEG 2000 codestream (bare or in a JP2 file); checks the EOC marker and the tiles."""
    frame = stream.read(0, 4096 + 64)
    start = 0 if frame.startswith(b"\xff\x4f\xff\x51") else frame.find(b"\xff\x4f\xff\x51", 0, 4096)
    if start < 0:
        raise FrameError("JPEG 2000 stream has no SIZ marker after SOC")
    _ends_with_eoi(stream, "JPEG 2000")
    siz = frame[start + 4:start + 4 + 38]
    if len(siz) < 38:
        raise FrameError("JPEG 2000 SIZ marker is truncated")
    _lsiz, _rsiz, xsiz, ysiz, xo, yo, _xt, _yt, _xto, _yto, csiz = struct.unpack(">HHIIIIIIIIH", siz)
    if xsiz <= xo or ysiz <= yo:
        raise FrameError("JPEG 2000 SIZ declares an empty image")
    comp = frame[start + 42:start + 43]
    precision = (comp[0] & 0x7F) + 1 if comp else 0
    _all_tiles(stream, start, xsiz, ysiz, _xt, _yt, _xto, _yto)
    return FrameHeader(ysiz - yo, xsiz - xo, csiz, precision)


def _all_tiles(stream: Stream, soc: int, xsiz: int, ysiz: int, xt: int, yt: int, xto: int, yto: int) -> None:
    """Every tile the SIZ grid has must be in the stream: OpenJPEG fills missing tiles with zeros silently."""
    if xt == 0 or yt == 0 or xto > xsiz or yto > ysiz:
        raise FrameError("JPEG 2000 SIZ declares an impossible tile grid")
    tiles = -(-(xsiz - xto) // xt) * -(-(ysiz - yto) // yt)
    if tiles > 65535:
        raise FrameError(f"JPEG 2000 SIZ declares {tiles} tiles (at most 65535)")
    seen: set[int] = set()
    pos, n = soc + 2, stream.length
    while pos + 4 <= n:
        marker, length = struct.unpack(">HH", stream.read(pos, 4))
        if marker == 0xFFD9:
            break
        if marker == 0xFF90:  # SOT: Lsot, Isot, Psot, TPsot, TNsot
            if pos + 12 > n:
                break
            isot, psot = struct.unpack(">HI", stream.read(pos + 4, 6))
            seen.add(isot)
            if psot == 0:
                break  # the last tile-part runs to EOC
            pos += psot
            continue
        if marker >> 8 != 0xFF or length < 2:
            raise FrameError(f"JPEG 2000 marker expected at byte {pos}")
        pos += 2 + length
    missing = tiles - len(seen & set(range(tiles)))
    if missing:
        raise FrameError(f"JPEG 2000 stream holds {len(seen)} of the {tiles} tiles its SIZ declares")


def rle_header(stream: Stream, segments: int) -> None:
    """The RLE header (PS3.5 G.5): the segment count the geometry needs, offsets inside the frame."""
    if stream.length < 64:
        raise FrameError("RLE frame shorter than its 64-byte header")
    header = struct.unpack("<16I", stream.read(0, 64))
    if header[0] != segments:
        raise FrameError(f"RLE frame has {header[0]} segments, the image geometry needs {segments}")
    offsets = header[1:1 + segments]
    if offsets[0] != 64 or any(b <= a for a, b in zip(offsets, offsets[1:], strict=False)) or offsets[-1] >= stream.length:
        raise FrameError("RLE segment offsets are not increasing inside the frame")
