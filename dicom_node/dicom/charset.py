"""Specific Character Set (PS3.5 6.1): one rule for every object the node writes and every C-FIND answer.

The rule: a character set is used for a set of text values only when every
value can be written in it *and* reads back exactly (pydicom writes, pydicom
reads).  Otherwise the next candidate is tried, and ISO_IR 192 (UTF-8), which
holds any text, is the last resort.  Derived objects try the base's set
(``dicom_node.dicom.derived``); C-FIND answers try the caller's, then the
study's (``dicom_node.index.matching``).

With ISO 2022 code extensions (several terms, e.g. ``["", "ISO 2022 IR 87"]``)
each character needs only to be in one of the declared sets: pydicom switches
sets with escape sequences inside a value.  The default repertoire (no set,
``ISO_IR 6``) is checked as strict ASCII (pydicom itself would write it as
Latin-1 and hide non-ASCII text).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from io import BytesIO
from typing import Any

from pydicom.charset import custom_encoders, python_encoding
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pynetdicom.dsutils import decode, encode

#: holds every text value: the set written when no candidate does
FALLBACK = "ISO_IR 192"

#: terms that mean the default repertoire (ASCII)
DEFAULT_REPERTOIRE = frozenset({"", "ISO_IR 6", "ISO 2022 IR 6"})

#: text values to check: ``{keyword: text}`` or ``(keyword, text)`` pairs (a keyword may repeat)
Texts = Mapping[str, str] | Iterable[tuple[str, str]]

#: VRs whose values are text in the object's character set
TEXT_VRS = frozenset({"LO", "SH", "ST", "LT", "UT", "UC", "PN"})


def terms(value: Any) -> list[str] | None:
    """Specific Character Set as a list of terms; None for the default repertoire (absent, empty, ISO_IR 6)."""
    if value is None or value == "":
        return None
    items = value.split("\\") if isinstance(value, str) else [str(v) for v in value]
    items = [t.strip() for t in items]
    if all(t in DEFAULT_REPERTOIRE for t in items):
        return None
    return items


def codecs(value: Any) -> list[str] | None:
    """Python codecs of a character set (default repertoire = ``ascii``); None when a term is unknown."""
    found = terms(value)
    if found is None:
        return ["ascii"]
    out = []
    for t in found:
        if t in DEFAULT_REPERTOIRE:
            out.append("ascii")
        elif t in python_encoding:
            out.append(python_encoding[t])
        else:
            return None
    return out


def known(value: Any) -> bool:
    """Every term is a defined term pydicom can write (a misspelt term was decoded with a guess)."""
    return codecs(value) is not None


def _fits(text: str, codec: str) -> bool:
    encoder = custom_encoders.get(codec)  # pydicom's strict JIS X 0201/0208/0212 encoders
    try:
        if encoder is not None:
            encoder(text)
        else:
            text.encode(codec)
    except (UnicodeError, LookupError, ValueError):
        return False
    return True


def encodable(text: str, value: Any) -> bool:
    """Whether ``text`` can be written in character set ``value``."""
    found = codecs(value)
    if found is None:
        return False
    if any(_fits(text, c) for c in found):
        return True
    return len(found) > 1 and all(any(_fits(ch, c) for c in found) for ch in text)


def _as_text(value: Any) -> str:
    if isinstance(value, (MultiValue, list, tuple)):
        return "\\".join(str(v) for v in value)
    return str(value)


def round_trips(texts: Iterable[tuple[str, str]], value: Any) -> bool:
    """Write each ``(keyword, text)`` element in ``value`` and read it back: only an exact result counts."""
    found = terms(value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns (quoting values) instead of failing
        for keyword, text in texts:
            ds = Dataset()
            if found is not None:
                ds.SpecificCharacterSet = found if len(found) > 1 else found[0]
            try:
                setattr(ds, keyword, text)
                raw = encode(ds, True, True)
                if raw is None:
                    return False
                back = decode(BytesIO(raw), True, True)
                if _as_text(back[keyword].value) != text:
                    return False
            except Exception:  # noqa: BLE001 - a value pydicom cannot write or read back means "not this set"
                return False
    return True


def represents(texts: Texts, value: Any) -> bool:
    """The rule of this module: every value encodable in ``value`` and read back exactly."""
    if not known(value):
        return False
    pairs = list(texts.items()) if isinstance(texts, Mapping) else list(texts)
    non_ascii = [(k, v) for k, v in pairs if v and not v.isascii()]
    if not non_ascii:
        return True
    return all(encodable(v, value) for _, v in non_ascii) and round_trips(non_ascii, value)


def choose(texts: Texts, candidates: Sequence[Any]) -> Any:
    """The first candidate character set that represents ``texts``, else :data:`FALLBACK`.

    Candidates are Specific Character Set values (a string, a list of terms,
    or None for the default repertoire); the chosen one is returned as given.
    """
    for candidate in candidates:
        if represents(texts, candidate):
            return candidate
    return FALLBACK


def text_elements(ds: Dataset) -> Iterator[tuple[str, str]]:
    """``(keyword, text)`` of every text value in ``ds``, sequence items included (for :func:`choose`)."""
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value or ():
                yield from text_elements(item)
        elif elem.VR in TEXT_VRS and elem.value not in (None, "") and elem.keyword:
            values = elem.value if elem.VM > 1 else [elem.value]
            yield elem.keyword, "\\".join(str(v) for v in values if v is not None)
