"""Matching a Query/Retrieve identifier against the store's index (PS3.4 C.2.2.2, C.4.1–C.4.3).

Kept apart from the network code (``qr.py``) so that the matching rules can be
read, tested and reasoned about on their own: everything here takes the node's
database (``index/db.py``: SQLite or PostgreSQL) and a decoded pydicom
identifier, and only ever reads.

Matching, per PS3.4 C.2.2.2:

* universal: an empty key (or ``*`` alone) matches everything and is returned;
* single value: exact, case-sensitive, except Person Names (below);
* wildcards ``*`` and ``?`` on text VRs (LO, SH, CS ...), turned into SQLite
  ``GLOB`` patterns (GLOB is case-sensitive and uses the same two wildcards;
  ``[``, GLOB's only other special character, is escaped), or into PostgreSQL
  ``LIKE`` patterns (case-sensitive there; ``%``, ``_`` and the backslash escaped);
* ranges on DA and TM: ``A-``, ``-B``, ``A-B`` (inclusive; a partial time as upper
  bound covers its whole hour or minute);
* a list of UIDs (a multi-valued UI key) matches any of them;
* ``""`` (two quotes) matches entities whose value is empty (empty value matching);
* Person Names match case-insensitively (Unicode case folding, so ``müller*``
  finds ``Müller^Jörg``), and a key with a single component group is matched
  against every component group of the stored name, so ``山田*`` finds
  ``Yamada^Tarou=山田^太郎=やまだ^たろう``.  PS3.4 C.2.2.2.1 leaves both choices to
  the SCP; we pick the ones a person at a workstation expects.  Person Names
  are matched in Python on the rows the other keys selected, so the rule is
  the same on both databases.

Hierarchy (PS3.4 C.4.1.2.1, C.4.2.2.1): Patient Root has PATIENT > STUDY > SERIES
> IMAGE, Study Root STUDY > SERIES > IMAGE; a query below the top needs the
unique key of every level above with one value, otherwise :class:`IdentifierError`
(the caller answers 0xA900).  Sequence keys are not matched; they come back empty.

Character sets: the index holds patient and study text decoded to Unicode.
Each answer is encoded in the first of (1) the caller's own character set (the
Specific Character Set of its request; the default repertoire when it sent
none), (2) the study's stored character set, (3) ISO_IR 192, that represents
every text value of that answer exactly.  PS3.4 C.4.1.1.3.2 lets the SCP answer
in another character set than the request's; trying the caller's first means a
Latin-1 or UTF-8 workstation gets what it asked for, falling back to the
study's own set keeps e.g. ISO 2022 IR 87 studies intact for callers that did
not ask for anything, and UTF-8 can carry any text at all.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence

from dicom_node.dicom import charset
from dicom_node.errors import NodeError
from dicom_node.index import db

Model = Literal["PATIENT", "STUDY"]

#: levels of each information model, top first (PS3.4 C.6.1.1 and C.6.2.1)
MODEL_LEVELS: dict[str, tuple[str, ...]] = {
    "PATIENT": ("PATIENT", "STUDY", "SERIES", "IMAGE"),
    "STUDY": ("STUDY", "SERIES", "IMAGE"),
}

#: the unique key of each level
UNIQUE_KEYS: dict[str, str] = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}

_DEPTH = {"PATIENT": 0, "STUDY": 1, "SERIES": 2, "IMAGE": 3}
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_DATE = re.compile(r"^\d{8}$")
_TIME = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")
#: keys the SCP fills in itself, never matched
_OWN_KEYS = {"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle", "InstanceAvailability"}
#: every instance the index lists is on the node's own disk (PS3.4 C.4.1.1.3.2)
INSTANCE_AVAILABILITY = "ONLINE"


class IdentifierError(NodeError, ValueError):
    """The identifier does not fit the information model; the caller answers 0xA900 with this text.

    The message names the key and what a valid request carries, because it
    ends up in the response's Error Comment and in the operator's log.
    """


@dataclass(frozen=True)
class _Attr:
    keyword: str
    #: level the attribute belongs to (its value is available at this level and below)
    level: str
    #: SQL expression; ``{p}`` stands for the patient source (``p`` at PATIENT level, else ``st``)
    expr: str
    #: how it is matched and returned: uid, text, pn, date, time, int, count (return only), modalities
    kind: str


_PATIENT_KEY = "COALESCE({p}.patient_id, '')"
_ATTRS: dict[str, _Attr] = {a.keyword: a for a in (
    _Attr("PatientID", "PATIENT", _PATIENT_KEY, "text"),
    _Attr("PatientName", "PATIENT", "{p}.patient_name", "pn"),
    _Attr("PatientBirthDate", "PATIENT", "{p}.patient_birth_date", "date"),
    _Attr("PatientSex", "PATIENT", "{p}.patient_sex", "text"),
    _Attr("NumberOfPatientRelatedStudies", "PATIENT",
          "(SELECT COUNT(*) FROM studies x WHERE COALESCE(x.patient_id, '') = " + _PATIENT_KEY + ")", "count"),
    _Attr("NumberOfPatientRelatedSeries", "PATIENT",
          "(SELECT COUNT(*) FROM series y JOIN studies x ON x.study_uid = y.study_uid"
          " WHERE COALESCE(x.patient_id, '') = " + _PATIENT_KEY + ")", "count"),
    _Attr("NumberOfPatientRelatedInstances", "PATIENT",
          "(SELECT COUNT(*) FROM instances z JOIN series y ON y.series_uid = z.series_uid"
          " JOIN studies x ON x.study_uid = y.study_uid WHERE COALESCE(x.patient_id, '') = " + _PATIENT_KEY + ")",
          "count"),
    _Attr("StudyInstanceUID", "STUDY", "st.study_uid", "uid"),
    _Attr("StudyDate", "STUDY", "st.study_date", "date"),
    _Attr("StudyTime", "STUDY", "st.study_time", "time"),
    _Attr("AccessionNumber", "STUDY", "st.accession_number", "text"),
    _Attr("StudyID", "STUDY", "st.study_id", "text"),
    _Attr("StudyDescription", "STUDY", "st.study_description", "text"),
    _Attr("ReferringPhysicianName", "STUDY", "st.referring_physician_name", "pn"),
    _Attr("ModalitiesInStudy", "STUDY",
          "(SELECT {modalities} FROM series y WHERE y.study_uid = st.study_uid)", "modalities"),
    _Attr("NumberOfStudyRelatedSeries", "STUDY",
          "(SELECT COUNT(*) FROM series y WHERE y.study_uid = st.study_uid)", "count"),
    _Attr("NumberOfStudyRelatedInstances", "STUDY",
          "(SELECT COUNT(*) FROM instances z JOIN series y ON y.series_uid = z.series_uid"
          " WHERE y.study_uid = st.study_uid)", "count"),
    _Attr("SeriesInstanceUID", "SERIES", "s.series_uid", "uid"),
    _Attr("Modality", "SERIES", "s.modality", "text"),
    _Attr("SeriesNumber", "SERIES", "s.series_number", "int"),
    _Attr("SeriesDescription", "SERIES", "s.series_description", "text"),
    _Attr("SeriesDate", "SERIES", "s.series_date", "date"),
    _Attr("SeriesTime", "SERIES", "s.series_time", "time"),
    _Attr("BodyPartExamined", "SERIES", "s.body_part", "text"),
    _Attr("FrameOfReferenceUID", "SERIES", "s.frame_of_reference_uid", "uid"),
    _Attr("NumberOfSeriesRelatedInstances", "SERIES",
          "(SELECT COUNT(*) FROM instances z WHERE z.series_uid = s.series_uid)", "count"),
    _Attr("SOPInstanceUID", "IMAGE", "i.sop_instance_uid", "uid"),
    _Attr("SOPClassUID", "IMAGE", "i.sop_class_uid", "uid"),
    _Attr("InstanceNumber", "IMAGE", "i.instance_number", "int"),
    _Attr("Rows", "IMAGE", "i.rows", "int"),
    _Attr("Columns", "IMAGE", "i.columns", "int"),
    _Attr("NumberOfFrames", "IMAGE", "i.number_of_frames", "int"),
)}

#: the study's modalities as one comma-separated value, per engine
_MODALITIES = {"sqlite": "GROUP_CONCAT(DISTINCT y.modality)", "postgresql": "STRING_AGG(DISTINCT y.modality, ',')"}


def _expr(attr: _Attr, p: str, dialect: str = "sqlite") -> str:
    return attr.expr.format(p=p, modalities=_MODALITIES[dialect])


_PATIENTS_CTE = (
    "WITH p AS (SELECT COALESCE(patient_id, '') AS patient_id, MAX(patient_name) AS patient_name,"
    " MAX(patient_birth_date) AS patient_birth_date, MAX(patient_sex) AS patient_sex,"
    " MAX(specific_character_set) AS specific_character_set FROM studies GROUP BY COALESCE(patient_id, '')) "
)
_FROM = {
    "PATIENT": ("p", "FROM p", "p.patient_id"),
    "STUDY": ("st", "FROM studies st", "st.study_date, st.study_time, st.study_uid"),
    "SERIES": ("st", "FROM series s JOIN studies st ON st.study_uid = s.study_uid",
               "s.series_number IS NULL, s.series_number, s.series_uid"),
    "IMAGE": ("st", "FROM instances i JOIN series s ON s.series_uid = i.series_uid"
                    " JOIN studies st ON st.study_uid = s.study_uid",
              "i.instance_number IS NULL, i.instance_number, i.sop_instance_uid"),
}

def supported_keys(level: str) -> list[str]:
    """Keywords matched and returned at ``level`` (attributes of this level and the levels above)."""
    return [k for k, a in _ATTRS.items() if _DEPTH[a.level] <= _DEPTH[level]]


# -- reading the identifier ----------------------------------------------------------


def _values(elem: DataElement) -> list[str]:
    """The key's values as text; [] for universal matching."""
    value = elem.value
    if value is None or value == "" or elem.VR == "SQ":
        return []
    if isinstance(value, (MultiValue, list, tuple)):
        values = [str(v).strip() for v in value]
    else:
        values = [str(value).strip()]
    if all(v == "" for v in values):
        return []
    return values


def _single(identifier: Dataset, keyword: str, level: str) -> str:
    """The one value of an upper-level unique key (PS3.4 C.4.1.2.1: present, single-valued, no wildcards)."""
    if keyword not in identifier:
        raise IdentifierError(f"{keyword} is required at {level} level (unique key above)")
    values = _values(identifier[keyword])
    if len(values) != 1 or any(c in values[0] for c in "*?") or values[0] == '""':
        raise IdentifierError(f"{keyword}: one value, no wildcards, at {level} level")
    if keyword != "PatientID" and not _UID.match(values[0]):
        raise IdentifierError(f"{keyword} is not a valid UID")
    return values[0]


def _level(identifier: Dataset, model: str) -> str:
    if model not in MODEL_LEVELS:
        raise IdentifierError(f"unknown information model {model!r}")
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    if not level:
        raise IdentifierError("QueryRetrieveLevel (0008,0052) is missing")
    if level not in MODEL_LEVELS[model]:
        allowed = ", ".join(MODEL_LEVELS[model])
        raise IdentifierError(f"QueryRetrieveLevel {level} is not part of the {model.title()} Root model ({allowed})")
    return level


def _upper_keys(identifier: Dataset, model: str, level: str) -> dict[str, str]:
    """Unique keys of the levels above ``level``, checked."""
    keys: dict[str, str] = {}
    for upper in MODEL_LEVELS[model][: MODEL_LEVELS[model].index(level)]:
        keyword = UNIQUE_KEYS[upper]
        keys[keyword] = _single(identifier, keyword, level)
    return keys


# -- building SQL conditions ---------------------------------------------------------


def _glob(pattern: str) -> str:
    """A DICOM wildcard value as a SQLite GLOB pattern (``*`` and ``?`` carry over; ``[`` is escaped)."""
    return pattern.replace("[", "[[]")


def _like(pattern: str) -> str:
    """A DICOM wildcard value as a ``LIKE ... ESCAPE '\\'`` pattern (PostgreSQL's LIKE is case-sensitive)."""
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def _is_universal(values: Sequence[str]) -> bool:
    return not values or all(set(v) <= {"*"} for v in values)


def _time_bound(value: str, upper: bool, keyword: str) -> str:
    text = value.replace(":", "")
    if not _TIME.match(text):
        raise IdentifierError(f"{keyword} {value!r} is not a time or time range (HHMMSS, HHMM-HHMM, ...)")
    hms = text.split(".")[0]
    return hms + ("5959"[len(hms) - 2:] if upper else "0000"[len(hms) - 2:])


class _Where:
    """Conditions and their parameters, built from one identifier."""

    def __init__(self, dialect: str = "sqlite") -> None:
        self.dialect = dialect
        self.clauses: list[str] = []
        self.params: list[Any] = []
        #: Person Name conditions, matched in Python: (SQL expression, the key's values: any may match)
        self.names: list[tuple[str, list[str]]] = []

    def add(self, clause: str, *params: Any) -> None:
        self.clauses.append(clause)
        self.params.extend(params)

    def sql(self) -> str:
        return (" WHERE " + " AND ".join(self.clauses)) if self.clauses else ""


def _one_text(expr: str, value: str, dialect: str) -> tuple[str, list[Any]]:
    if value == '""':
        return f"({expr} IS NULL OR {expr} = '')", []
    if "*" in value or "?" in value:
        if dialect == "sqlite":
            return f"{expr} GLOB ?", [_glob(value)]
        return f"{expr} LIKE ? ESCAPE '\\'", [_like(value)]
    return f"{expr} = ?", [value]


def _condition(attr: _Attr, expr: str, values: list[str], where: _Where) -> None:
    """Add the matching condition for one key with a value (universal keys never get here)."""
    kw, kind = attr.keyword, attr.kind
    if kind == "count":
        return  # return keys only (PS3.4 C.6.1.1.x: matching on them is not supported)
    if values == ['""'] and kind != "modalities":
        where.add(f"({expr} IS NULL OR {expr} = '')")  # empty value matching (PS3.4 C.2.2.2.1.1)
        return
    if kind == "uid":
        for v in values:
            if not _UID.match(v):
                raise IdentifierError(f"{kw} {v!r} is not a UID; UID keys take exact values or a list, no wildcards")
        where.add(f"{expr} IN ({', '.join('?' * len(values))})", *values)
        return
    if kind == "int":
        try:
            numbers = [int(v) for v in values]
        except ValueError:
            raise IdentifierError(f"{kw} takes whole numbers, not {values!r}") from None
        where.add(f"{expr} IN ({', '.join('?' * len(numbers))})", *numbers)
        return
    if kind == "date":
        if len(values) != 1:
            raise IdentifierError(f"{kw} takes one date or one date range")
        v = values[0]
        lo, dash, hi = v.partition("-")
        lo, hi = lo.strip(), hi.strip()
        for part in (lo, hi) if dash else (lo,):
            if part and not _DATE.match(part):
                raise IdentifierError(f"{kw} {v!r} is not a date or date range "
                                      "(YYYYMMDD, YYYYMMDD-, -YYYYMMDD, YYYYMMDD-YYYYMMDD)")
        if not dash:
            where.add(f"{expr} = ?", lo)
            return
        if not lo and not hi:
            raise IdentifierError(f"{kw} range {v!r} has neither start nor end")
        if lo:
            where.add(f"{expr} >= ?", lo)
        if hi:
            where.add(f"{expr} <= ?", hi)
        return
    if kind == "time":
        if len(values) != 1:
            raise IdentifierError(f"{kw} takes one time or one time range")
        v = values[0]
        lo, dash, hi = v.partition("-")
        lo, hi = lo.strip(), hi.strip()
        if not dash:
            _time_bound(lo, False, kw)  # validates
            where.add(f"{expr} = ?", lo)
            return
        if not lo and not hi:
            raise IdentifierError(f"{kw} range {v!r} has neither start nor end")
        norm = f"substr(replace({expr}, ':', '') || '000000', 1, 6)"
        if lo:
            where.add(f"{expr} IS NOT NULL AND {norm} >= ?", _time_bound(lo, False, kw))
        if hi:
            where.add(f"{expr} IS NOT NULL AND {norm} <= ?", _time_bound(hi, True, kw))
        return
    if kind == "modalities":
        parts, params = [], []
        for v in values:
            clause, p = _one_text("y.modality", v, where.dialect)
            parts.append(clause)
            params.extend(p)
        where.add("EXISTS (SELECT 1 FROM series y WHERE y.study_uid = st.study_uid AND (" + " OR ".join(parts) + "))",
                  *params)
        return
    if kind == "pn":
        where.names.append((expr, values))
        return
    # text: one value, or (beyond the standard, harmless) any of several
    parts, params = [], []
    for v in values:
        clause, p = _one_text(expr, v, where.dialect)
        parts.append(clause)
        params.extend(p)
    where.add("(" + " OR ".join(parts) + ")" if len(parts) > 1 else parts[0], *params)


# -- Person Name matching ------------------------------------------------------------


def _pn_groups(value: str) -> list[str]:
    """Component groups with trailing empty components dropped (``A^B^^`` equals ``A^B``)."""
    groups = [g.rstrip("^").strip() for g in value.split("=")]
    while len(groups) > 1 and not groups[-1]:
        groups.pop()
    return groups


def _pn_regex(pattern: str) -> re.Pattern[str]:
    parts = (".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern.casefold())
    return re.compile("".join(parts), re.DOTALL)


def _pn_matcher():
    """``match(stored, key)`` for one query, its compiled patterns cached (``""`` matches an empty name)."""
    cache: dict[str, list[re.Pattern[str] | None]] = {}

    def match(stored: str | None, key: str) -> int:
        if key == '""':
            return int(not stored)
        patterns = cache.get(key)
        if patterns is None:
            patterns = cache[key] = [_pn_regex(g) if g else None for g in _pn_groups(key)]
        groups = [g.casefold() for g in _pn_groups(stored or "")]
        if len(patterns) == 1:  # one group in the key: any of the stored groups may match
            return int(patterns[0] is None or any(patterns[0].fullmatch(g) for g in groups))
        for i, pat in enumerate(patterns):  # groups given: each one that is not empty must match its own
            if pat is None:
                continue
            if i >= len(groups) or not pat.fullmatch(groups[i]):
                return 0
        return 1

    return match


# -- character sets ------------------------------------------------------------------


def choose_charset(texts: dict[str, str], requested: Any, stored: Any) -> list[str] | None:
    """The character set to answer in (see the module docstring), as terms; None = default repertoire."""
    return charset.terms(charset.choose(texts, [requested, stored]))


# -- C-FIND --------------------------------------------------------------------------


@dataclass(frozen=True)
class FindQuery:
    """A checked C-FIND identifier, ready to run against the index."""

    model: str
    level: str
    #: keys (keyword -> values) that restrict the result, upper unique keys included
    matching: dict[str, list[str]]
    #: elements of the request to answer, in request order (tag, keyword or None, VR)
    returned: tuple[tuple[int, str | None, str], ...]
    #: the request's Specific Character Set (None when absent)
    requested_charset: Any
    #: the caller asked for Instance Availability
    availability: bool = False

    @classmethod
    def parse(cls, identifier: Dataset, model: str) -> FindQuery:
        """Check the identifier against the model; raises :class:`IdentifierError`."""
        level = _level(identifier, model)
        upper = _upper_keys(identifier, model, level)
        available = set(supported_keys(level))
        matching: dict[str, list[str]] = {k: [v] for k, v in upper.items()}
        returned: list[tuple[int, str | None, str]] = []
        for elem in identifier:
            if elem.tag.group in (0x0000, 0x0002) or elem.tag.is_private:
                continue
            keyword = elem.keyword or keyword_for_tag(elem.tag) or None
            if keyword in _OWN_KEYS:
                continue
            returned.append((int(elem.tag), keyword, elem.VR))
            if keyword in available and keyword not in matching:
                values = _values(elem)
                if not _is_universal(values):
                    matching[keyword] = values
        unique = UNIQUE_KEYS[level]
        if unique not in {r[1] for r in returned}:
            unique_tag = tag_for_keyword(unique)
            assert unique_tag is not None  # UNIQUE_KEYS are all data dictionary keywords
            returned.append((int(unique_tag), unique, dictionary_VR(unique)))
        query = cls(model, level, matching, tuple(returned), identifier.get("SpecificCharacterSet"),
                    "InstanceAvailability" in identifier)
        query._sql()  # every key value is checked here, before anything is answered
        return query

    def _sql(self, dialect: str = "sqlite") -> tuple[str, list[Any], list[tuple[str, list[str]]]]:
        """The SELECT, its parameters, and the Person Name conditions as ``(column alias, values)``."""
        p, source, order = _FROM[self.level]
        cols = {}
        for _, keyword, _vr in self.returned:
            attr = _ATTRS.get(keyword or "")
            if attr is not None and _DEPTH[attr.level] <= _DEPTH[self.level]:
                cols[keyword] = _expr(attr, p, dialect)
        cols["__charset"] = f"{p}.specific_character_set"
        where = _Where(dialect)
        for keyword, values in self.matching.items():
            attr = _ATTRS[keyword]
            _condition(attr, _expr(attr, p, dialect), values, where)
        names = []
        for n, (expr, values) in enumerate(where.names):
            cols[f"__pn{n}"] = expr
            names.append((f"__pn{n}", values))
        select = ", ".join(f'{expr} AS "{name}"' for name, expr in cols.items())
        sql = ((_PATIENTS_CTE if self.level == "PATIENT" else "")
               + f"SELECT {select} {source}{where.sql()} ORDER BY {order}")
        return sql, where.params, names

    def rows(self, conn: db.Database | db.Connection) -> list[db.Row]:
        """All matching index rows (read at once, so no read transaction stays open while answers go out)."""
        sql, params, names = self._sql(conn.dialect)
        rows = conn.execute(sql, params).fetchall()
        if names:
            match = _pn_matcher()
            rows = [r for r in rows if all(any(match(r[col], v) for v in values) for col, values in names)]
        return rows

    def response(self, row: db.Row, retrieve_ae_title: str | None) -> Dataset:
        """One pending answer: the requested keys filled from ``row``, in a character set that carries them."""
        ds = Dataset()
        names = set(row.keys())
        texts: dict[str, str] = {}
        for tag, keyword, vr in self.returned:
            if keyword in names:
                attr = _ATTRS[keyword]
                value = row[keyword]
                if attr.kind in ("count", "int"):
                    setattr(ds, keyword, int(value) if value is not None else None)
                elif attr.kind == "modalities":
                    setattr(ds, keyword, sorted(m for m in (value or "").split(",") if m))
                else:
                    text = "" if value is None else str(value)
                    if attr.kind == "text" and "\\" in text:
                        setattr(ds, keyword, text.split("\\"))
                    else:
                        setattr(ds, keyword, text)
                    if attr.kind in ("text", "pn") and text:
                        texts[keyword] = text
            else:
                # not an attribute this level answers: returned empty (PS3.4 C.2.2.1.2)
                ds.add_new(tag, vr, DicomSequence([]) if vr == "SQ" else None)
        ds.QueryRetrieveLevel = self.level
        if retrieve_ae_title:
            ds.RetrieveAETitle = retrieve_ae_title
        if self.availability:
            ds.InstanceAvailability = INSTANCE_AVAILABILITY
        terms = choose_charset(texts, self.requested_charset, row["__charset"])
        if terms is not None:
            ds.SpecificCharacterSet = terms if len(terms) > 1 else terms[0]
        return ds


def find(conn: db.Database | db.Connection, identifier: Dataset, model: str,
         retrieve_ae_title: str | None = None) -> Iterator[Dataset]:
    """Check ``identifier`` (:class:`IdentifierError` at once), run it, and return one answer per match."""
    query = FindQuery.parse(identifier, model)
    rows = query.rows(conn)
    return (query.response(row, retrieve_ae_title) for row in rows)


# -- C-GET / C-MOVE ------------------------------------------------------------------


@dataclass(frozen=True)
class RetrieveItem:
    """One instance to send in a C-GET or C-MOVE sub-operation."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    #: path relative to the store root, as the index keeps it
    path: str
    series_uid: str
    origin: str


def _uid_list(identifier: Dataset, keyword: str, level: str) -> list[str]:
    if keyword not in identifier:
        raise IdentifierError(f"{keyword} is required for a {level} level retrieve")
    values = _values(identifier[keyword])
    if not values or any(c in v for v in values for c in "*?") or '""' in values:
        raise IdentifierError(f"{keyword} must hold one or more values without wildcards for a {level} level retrieve")
    if keyword != "PatientID":
        bad = [v for v in values if not _UID.match(v)]
        if bad:
            raise IdentifierError(f"{keyword} holds a value that is not a UID")
    return values


def retrieve_items(conn: db.Database | db.Connection, identifier: Dataset, model: str) -> list[RetrieveItem]:
    """The instances a C-GET/C-MOVE identifier names (PS3.4 C.4.2.2.1 / C.4.3.2.1), in series order.

    The identifier holds QueryRetrieveLevel, the unique keys of the levels
    above with one value each, and the unique key of its level with one or
    more values; other keys are ignored.
    """
    level = _level(identifier, model)
    upper = _upper_keys(identifier, model, level)
    wanted = _uid_list(identifier, UNIQUE_KEYS[level], level)
    where = _Where()
    for keyword, value in upper.items():
        where.add(f"{_expr(_ATTRS[keyword], 'st')} = ?", value)
    expr = _expr(_ATTRS[UNIQUE_KEYS[level]], "st")
    where.add(f"{expr} IN ({', '.join('?' * len(wanted))})", *wanted)
    sql = ("SELECT i.sop_instance_uid, i.sop_class_uid, i.transfer_syntax_uid, i.path, i.series_uid, s.origin "
           + _FROM["IMAGE"][1] + where.sql()
           + " ORDER BY st.study_uid, s.series_number IS NULL, s.series_number, s.series_uid, "
           + _FROM["IMAGE"][2])
    return [RetrieveItem(*row) for row in conn.execute(sql, where.params).fetchall()]


def matching_keys(identifier: Dataset) -> list[str]:
    """Keywords of the keys with values (for logs: names only, never the values, which may identify a patient)."""
    out = []
    for elem in identifier:
        if elem.tag.group in (0x0000, 0x0002) or elem.keyword in _OWN_KEYS:
            continue
        if not _is_universal(_values(elem)):
            out.append(elem.keyword or str(elem.tag))
    return out
