"""Durable instance store: Part-10 files on disk plus a SQLite index of patient/study/series/instance.

The durability rule of the node (docs/architecture.md) lives here: an instance counts as
stored only once its file is fsynced, renamed into place, its directory entry
fsynced, and its index row committed.  The SCP answers Success only after
:meth:`Store.store_received` returns, so a power cut can never lose an
acknowledged instance.

Files live at ``root/instances/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm``;
temporary files are written to ``root/tmp`` so that the final ``os.replace``
stays on one filesystem and is atomic.  The index stores paths relative to
``root`` so a data folder can be moved as a whole.

Re-sending an instance is harmless: the SOP Instance UID is the key, a second
copy is discarded and reported as a duplicate.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian

from dicom_node.dicom.uids import InvalidInstanceError, check_uid
from dicom_node.errors import NodeError
from dicom_node.index import db
from dicom_node.logs import fields, scrub
from dicom_node.states import SeriesState

log = logging.getLogger("dicom_node.index.store")

REOPEN_REASON = "new instance after settle"

class StoreError(NodeError):
    """The disk or the index failed; the instance is not stored and the sender should retry.

    The SCP answers 0xA700 (Out of Resources) for it.
    """


@dataclass(frozen=True)
class StoreResult:
    sop_instance_uid: str
    series_uid: str
    study_uid: str
    path: Path
    duplicate: bool = False
    sop_class_uid: str = ""
    #: the instance's Patient ID, for the audit trail only (never logged)
    patient_id: str | None = None


@dataclass(frozen=True)
class InstanceRecord:
    sop_instance_uid: str
    series_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    instance_number: int | None
    rows: int | None
    columns: int | None
    number_of_frames: int | None
    #: absolute path of the Part-10 file
    path: Path
    size_bytes: int
    received_at: float
    calling_ae: str | None
    #: the Called AE Title it was sent to (the node's or a pipeline's); None for derived or older instances
    called_ae: str | None = None


@dataclass(frozen=True)
class SeriesRecord:
    """One series with its study and patient fields joined.

    Patient identifiers are left out of ``repr`` so that logging a record by
    accident does not leak them.
    """

    series_uid: str
    study_uid: str
    modality: str | None
    series_description: str | None
    series_number: int | None
    series_date: str | None
    series_time: str | None
    frame_of_reference_uid: str | None
    body_part: str | None
    announced_count: int | None
    instance_count: int
    first_received: float | None
    last_received: float | None
    state: str
    state_reason: str | None
    state_changed: float | None
    origin: str
    patient_id: str | None = field(default=None, repr=False)
    patient_name: str | None = field(default=None, repr=False)
    patient_birth_date: str | None = field(default=None, repr=False)
    patient_sex: str | None = None
    study_date: str | None = None
    study_time: str | None = None
    accession_number: str | None = field(default=None, repr=False)
    study_description: str | None = None
    study_id: str | None = None
    referring_physician_name: str | None = field(default=None, repr=False)
    specific_character_set: str | None = None


@dataclass(frozen=True)
class StoreCounts:
    studies: int
    series: int
    instances: int
    bytes: int
    #: series per state, e.g. {"open": 2, "settled": 5}
    series_by_state: dict[str, int]


_STUDY_COLS = (
    "patient_id", "patient_name", "patient_birth_date", "patient_sex", "study_date", "study_time",
    "accession_number", "study_description", "study_id", "referring_physician_name", "specific_character_set",
)
_SERIES_SELECT = "SELECT s.*, " + ", ".join(f"st.{c}" for c in _STUDY_COLS) + (
    " FROM series s LEFT JOIN studies st ON st.study_uid = s.study_uid"
)


def _text(ds: Dataset, keyword: str) -> str | None:
    """A header value as text, None when absent or empty (NULL keeps COALESCE upserts simple)."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple, MultiValue)):
        return "\\".join(str(v) for v in value) or None
    return str(value).strip() or None


def _int(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


#: the study columns and the header keyword each is taken from
_STUDY_KEYWORDS: dict[str, str] = {
    "patient_id": "PatientID", "patient_name": "PatientName", "patient_birth_date": "PatientBirthDate",
    "patient_sex": "PatientSex", "study_date": "StudyDate", "study_time": "StudyTime",
    "accession_number": "AccessionNumber", "study_description": "StudyDescription", "study_id": "StudyID",
    "referring_physician_name": "ReferringPhysicianName", "specific_character_set": "SpecificCharacterSet",
}

#: every header attribute :meth:`Store.store_received` reads: what a caller's ``header`` must hold where present
INDEXED_KEYWORDS: frozenset[str] = frozenset({
    *_STUDY_KEYWORDS.values(), "Modality", "SeriesDescription", "SeriesNumber", "SeriesDate", "SeriesTime",
    "FrameOfReferenceUID", "BodyPartExamined", "ImagesInAcquisition", "InstanceNumber", "Rows", "Columns",
    "NumberOfFrames", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID",
})


def _index_values(ds: Dataset) -> dict[str, Any]:
    """Every header value the index rows take, read at once (before the file is moved: deferred values are read)."""
    values: dict[str, Any] = {col: _text(ds, kw) for col, kw in _STUDY_KEYWORDS.items()}
    values.update(
        modality=_text(ds, "Modality"), series_description=_text(ds, "SeriesDescription"),
        series_number=_int(ds, "SeriesNumber"), series_date=_text(ds, "SeriesDate"),
        series_time=_text(ds, "SeriesTime"), frame_of_reference_uid=_text(ds, "FrameOfReferenceUID"),
        body_part=_text(ds, "BodyPartExamined"), announced_count=_int(ds, "ImagesInAcquisition"),
        instance_number=_int(ds, "InstanceNumber"), rows=_int(ds, "Rows"), columns=_int(ds, "Columns"),
        number_of_frames=_int(ds, "NumberOfFrames"))
    return values


def completed_file_meta(ds: Dataset) -> FileMetaDataset:
    """A copy of ``ds.file_meta`` completed for the Part-10 file the store writes of a dataset the node made.

    Media Storage SOP Class/Instance from the dataset; Explicit VR Little Endian unless it says otherwise.
    """
    meta = FileMetaDataset(getattr(ds, "file_meta", None) or FileMetaDataset())
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if "TransferSyntaxUID" not in meta:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs(path: Path) -> None:
    """mkdir -p that fsyncs each parent whose entries changed, so new folders survive a power cut."""
    missing: list[Path] = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue  # another thread made it; it fsynced the parent
        _fsync_dir(d.parent)


def _fsync_file(path: Path) -> int:
    """fsync a finished file and return its size."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


#: the list of files a publish moves, written into the staging folder before its transaction
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class StagedSeries:
    """A derived series written under ``staging/``, not yet visible: the input of :meth:`Store.publish`."""

    folder: Path
    files: list[Path]


def _write_durably(path: Path, text: str) -> None:
    tmp = path.with_suffix(".part")
    tmp.write_text(text)
    _fsync_file(tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class Store:
    """Instance files plus their index. Safe to share between threads (one SQLite connection per thread)."""

    def __init__(self, root: Path, database: db.Database | Path | str, *, work: str = "") -> None:
        self.root = Path(root)
        #: this node process's own subfolder of tmp/ and staging/ when several share the root (``storage.instance``)
        self.work = work
        self.database = db.Database.of(database)
        #: the database as an operator names it (the SQLite file, or the URL without its password)
        self.db_path = self.database.describe()

    # -- plumbing ---------------------------------------------------------------------

    @property
    def tmp_dir(self) -> Path:
        """Where partial files are written; on the same filesystem as the instances, so rename is atomic."""
        return self.root / "tmp" / self.work if self.work else self.root / "tmp"

    @property
    def instances_dir(self) -> Path:
        return self.root / "instances"

    @property
    def staging_dir(self) -> Path:
        """Where a derived series is written before it becomes visible (:meth:`stage`, :meth:`publish`)."""
        return self.root / "staging" / self.work if self.work else self.root / "staging"

    def new_tmp_path(self, suffix: str = ".part") -> Path:
        """A fresh, unique, empty file under :attr:`tmp_dir` for data about to be handed to :meth:`store_received`.

        Created here with mode 0600 (writers truncate it, the mode stays), so a
        received instance is never readable by other users, not even while it
        is written; the folder is 0700.
        """
        self.tmp_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.tmp_dir / f"{uuid.uuid4().hex}{suffix}"
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        return path

    def clear_tmp(self) -> int:
        """Remove everything under :attr:`tmp_dir` (partial files of a crash, spool folders); returns the count.

        Only safe before anything writes there: the node calls it at start-up.
        """
        removed = 0
        if not self.tmp_dir.is_dir():
            return 0
        for entry in self.tmp_dir.iterdir():
            removed += sum(1 for p in entry.rglob("*") if not p.is_dir()) if entry.is_dir() else 1
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        if removed:
            log.info("store.tmp.cleared", extra=fields(files=removed))
        return removed

    def _conn(self) -> db.Database:
        return self.database

    def close(self) -> None:
        """Close the pooled connections (the object stays usable: the pool opens new ones)."""
        self.database.close()

    def ensure_schema(self) -> None:
        """Create the folders and bring the schema up to date (``index/migrations``); harmless when it is."""
        try:
            _make_dirs(self.instances_dir)
            _make_dirs(self.tmp_dir)
            os.chmod(self.tmp_dir, 0o700)  # partial instances: the node's user only
            self.database.migrate()
        except (db.Error, OSError) as exc:
            raise StoreError(f"cannot prepare the store under {self.root} (database {self.db_path}): {db.error_text(exc)}; "
                             "check permissions, free space and that the database server is reachable") from exc

    @staticmethod
    def sync_file(path: Path) -> int:
        """fsync a file written for :meth:`store_received` and return its size (for its ``synced``)."""
        return _fsync_file(path)

    def relative_path(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
        return Path("instances") / study_uid / series_uid / f"{sop_instance_uid}.dcm"

    # -- writing ----------------------------------------------------------------------

    def store_received(self, tmp_path: Path, calling_ae: str, origin: str = "received", *,
                       called_ae: str | None = None, header: Dataset | None = None,
                       synced: Callable[[], int] | None = None) -> StoreResult:
        """Move a complete Part-10 file into the store and index it; idempotent on SOP Instance UID.

        ``tmp_path`` should lie under :attr:`tmp_dir` (same filesystem).  The
        file is consumed either way: moved into place, or deleted when the
        instance is already stored.  Raises :class:`InvalidInstanceError` for a
        file that is not a storable instance (left in place for the caller)
        and :class:`StoreError` when the disk or the index fails.
        ``called_ae`` is the Called AE Title it was sent to; a duplicate keeps
        the one of its first arrival.  ``header`` is the file's header when the
        caller has read it already (the intake check did; it must hold
        :data:`INDEXED_KEYWORDS` where the file has them, and the File Meta):
        the file is then not parsed a second time.  ``synced`` waits for
        an fsync of the file the caller started earlier (:meth:`sync_file`, on
        another thread while it checked the file) and returns the file's size;
        without it the file is fsynced here.  Either way it is durable before
        it is renamed into place.
        """
        if origin not in ("received", "derived"):
            raise ValueError("origin is 'received' or 'derived'")
        tmp_path = Path(tmp_path)
        if header is not None:
            ds = header
        else:
            try:
                ds = dcmread(tmp_path, stop_before_pixels=True)
            except Exception as exc:
                raise InvalidInstanceError(f"cannot read the DICOM header: {scrub(str(exc))}") from exc
        study_uid = check_uid(ds.get("StudyInstanceUID"), "StudyInstanceUID")
        series_uid = check_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID")
        sop_uid = check_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID")
        sop_class = check_uid(ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID"), "SOPClassUID")
        tsyntax = str(ds.file_meta.get("TransferSyntaxUID") or "")
        if not tsyntax:
            raise InvalidInstanceError("the file has no Transfer Syntax UID in its file meta information")

        rel = self.relative_path(study_uid, series_uid, sop_uid)
        final = self.root / rel
        conn = self._conn()
        # every value the index takes, read now: a value the header deferred is read from the file, still here
        values = _index_values(ds)

        # Fast path: a re-send of a stored instance needs no write lock at all.  Only looked up when its file
        # is there (every indexed instance has its file); the check under the write lock below decides.
        try:
            if final.exists() and conn.execute("SELECT 1 FROM instances WHERE sop_instance_uid = ?",
                                               (sop_uid,)).fetchone():
                return self._discard_duplicate(tmp_path, sop_uid, series_uid, study_uid, final, sop_class,
                                               values["patient_id"])
        except db.Error as exc:
            raise StoreError(f"index lookup failed: {db.error_text(exc)}; check the database {self.db_path}") from exc

        try:
            size = synced() if synced is not None else _fsync_file(tmp_path)  # slow: before taking the write lock
            _make_dirs(final.parent)
        except OSError as exc:
            raise StoreError(f"cannot write {final.parent}: {exc}; check free space and permissions under {self.root}") from exc

        now = db.now()
        placed = False
        try:
            # the series' own lock: receivers of other series index at the same time (PostgreSQL)
            with self.database.transaction(key=series_uid) as tx:
                # Checked again under the lock: another association may have stored it meanwhile.
                if tx.execute("SELECT 1 FROM instances WHERE sop_instance_uid = ?", (sop_uid,)).fetchone():
                    duplicate = True
                else:
                    duplicate = False
                    os.replace(tmp_path, final)
                    placed = True
                    _fsync_dir(final.parent)
                    self._index(tx, values, study_uid, series_uid, sop_uid, sop_class, tsyntax, rel, size, now,
                                calling_ae, origin, called_ae)
        except (db.Error, OSError) as exc:
            if placed:
                # No index row refers to it (the transaction rolled back); an unindexed file
                # would only confuse an operator, and the sender will retry.
                try:
                    final.unlink()
                except OSError:
                    pass
            raise StoreError(f"storing instance {sop_uid} failed: {db.error_text(exc)}; check free space and the database {self.db_path}") from exc
        if duplicate:
            return self._discard_duplicate(tmp_path, sop_uid, series_uid, study_uid, final, sop_class,
                                           values["patient_id"])
        log.debug("store.instance.stored", extra=fields(sop_instance_uid=sop_uid, series_uid=series_uid,
                                                          size_bytes=size, origin=origin))
        return StoreResult(sop_uid, series_uid, study_uid, final, duplicate=False, sop_class_uid=sop_class,
                           patient_id=values["patient_id"])

    def _discard_duplicate(self, tmp_path: Path, sop_uid: str, series_uid: str, study_uid: str, final: Path,
                           sop_class: str, patient_id: str | None = None) -> StoreResult:
        try:
            tmp_path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:  # a leftover temp file is untidy, not a failure to store
            log.warning("store.tmp.unlink_failed", extra=fields(path=str(tmp_path), error=str(exc)))
        log.debug("store.instance.duplicate", extra=fields(sop_instance_uid=sop_uid, series_uid=series_uid))
        return StoreResult(sop_uid, series_uid, study_uid, final, duplicate=True, sop_class_uid=sop_class,
                           patient_id=patient_id)

    def _index(self, conn: db.Connection, values: dict[str, Any], study_uid: str, series_uid: str, sop_uid: str,
               sop_class: str, tsyntax: str, rel: Path, size: int, now: float, calling_ae: str, origin: str,
               called_ae: str | None = None) -> None:
        """The instance's rows, from :func:`_index_values` of its header."""
        study = {c: values[c] for c in _STUDY_KEYWORDS}
        cols = ", ".join(study)
        conn.execute(
            f"INSERT INTO studies (study_uid, {cols}) VALUES (?, {', '.join('?' * len(study))}) "
            "ON CONFLICT(study_uid) DO UPDATE SET "
            + ", ".join(f"{c} = COALESCE(studies.{c}, excluded.{c})" for c in study),
            (study_uid, *study.values()),
        )
        row = conn.execute("SELECT state FROM series WHERE series_uid = ?", (series_uid,)).fetchone()
        if row is None:
            conn.execute(
                "INSERT INTO series (series_uid, study_uid, modality, series_description, series_number, series_date,"
                " series_time, frame_of_reference_uid, body_part, announced_count, instance_count, first_received,"
                " last_received, state, state_reason, state_changed, origin)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?, 'open', 'first instance', ?, ?)",
                (series_uid, study_uid, values["modality"], values["series_description"],
                 values["series_number"], values["series_date"], values["series_time"],
                 values["frame_of_reference_uid"], values["body_part"],
                 values["announced_count"], now, now, now, origin),
            )
        else:
            reopen = row["state"] != SeriesState.OPEN
            conn.execute(
                "UPDATE series SET instance_count = instance_count + 1, last_received = ?,"
                " announced_count = COALESCE(announced_count, ?),"
                " frame_of_reference_uid = COALESCE(frame_of_reference_uid, ?)"
                + (", state = 'open', state_reason = ?, state_changed = ?" if reopen else "")
                + " WHERE series_uid = ?",
                (now, values["announced_count"], values["frame_of_reference_uid"],
                 *((REOPEN_REASON, now) if reopen else ()), series_uid),
            )
            if reopen:
                log.info("store.series.reopened", extra=fields(series_uid=series_uid, previous_state=row["state"],
                                                                reason=REOPEN_REASON))
        conn.execute(
            "INSERT INTO instances (sop_instance_uid, series_uid, sop_class_uid, transfer_syntax_uid, instance_number,"
            " rows, columns, number_of_frames, path, size_bytes, received_at, calling_ae, called_ae)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (sop_uid, series_uid, sop_class, tsyntax, values["instance_number"], values["rows"],
             values["columns"], values["number_of_frames"], rel.as_posix(), size, now, calling_ae,
             (called_ae or "").strip() or None),
        )

    def store_dataset(self, ds: Dataset, origin: str = "derived", calling_ae: str | None = None) -> StoreResult:
        """Store a dataset the node made itself (a derived series) through the same atomic path.

        ``ds.file_meta`` is completed when parts are missing (Explicit VR Little
        Endian unless the dataset says otherwise); the dataset is not modified otherwise.
        """
        meta = completed_file_meta(ds)
        tmp = self.new_tmp_path()
        saved_meta = getattr(ds, "file_meta", None)
        try:
            ds.file_meta = meta
            ds.save_as(tmp, enforce_file_format=True)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StoreError(f"cannot write {tmp}: {exc}; check free space and permissions under {self.root}") from exc
        except Exception:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            if saved_meta is not None:
                ds.file_meta = saved_meta
        try:
            return self.store_received(tmp, calling_ae or "", origin=origin)
        except InvalidInstanceError:
            tmp.unlink(missing_ok=True)
            raise

    # -- derived series: all or nothing ------------------------------------------------

    def stage(self, name: str, datasets: Sequence[Dataset],
              on_file: Callable[[int], None] | None = None) -> StagedSeries:
        """Write a derived series' files under ``staging/<name>/`` (fsynced), invisible to everyone.

        Nothing of it is indexed, queryable or queued until :meth:`publish`;
        a crash leaves only the staging folder, removed by :meth:`clean_staging`.
        ``on_file(i)`` is called after each file (progress, and the tests' crash hook).
        """
        folder = self.staging_dir / name
        if folder.exists():
            shutil.rmtree(folder)
        _make_dirs(folder)
        files: list[Path] = []
        try:
            for i, ds in enumerate(datasets):
                meta = completed_file_meta(ds)
                saved_meta = getattr(ds, "file_meta", None)
                path = folder / f"{i:05d}.dcm"
                try:
                    ds.file_meta = meta
                    ds.save_as(path, enforce_file_format=True)
                finally:
                    if saved_meta is not None:
                        ds.file_meta = saved_meta
                _fsync_file(path)
                files.append(path)
                if on_file is not None:
                    on_file(i)
            _fsync_dir(folder)
        except OSError as exc:
            shutil.rmtree(folder, ignore_errors=True)
            raise StoreError(f"cannot write {folder}: {exc}; check free space and permissions under {self.root}") from exc
        return StagedSeries(folder, files)

    def publish(self, staged: StagedSeries, also: Callable[[db.Connection, list[StoreResult]], None] | None = None,
                *, calling_ae: str = "") -> list[StoreResult]:
        """Move staged files into the store and index them in ONE transaction, with ``also(conn, stored)``.

        ``also`` runs inside the same transaction (the node queues the outbox
        rows and marks the job done there), so the series, its Q/R visibility,
        its sending and the job's state change together or not at all.  Before
        the commit a manifest in the staging folder lists the files moved, so
        :meth:`clean_staging` can take back the files of a transaction that
        never committed.  An instance already stored (a re-run with the same
        UIDs) is kept as it is.
        """
        entries = []
        for path in staged.files:
            ds = dcmread(path, stop_before_pixels=True)
            study_uid = check_uid(ds.get("StudyInstanceUID"), "StudyInstanceUID")
            series_uid = check_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID")
            sop_uid = check_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID")
            sop_class = check_uid(ds.get("SOPClassUID"), "SOPClassUID")
            rel = self.relative_path(study_uid, series_uid, sop_uid)
            entries.append((path, ds, study_uid, series_uid, sop_uid, sop_class, rel))
        manifest = staged.folder / MANIFEST
        _write_durably(manifest, json.dumps([e[6].as_posix() for e in entries]))
        stored: list[StoreResult] = []
        try:
            for d in {(self.root / e[6]).parent for e in entries}:
                _make_dirs(d)
            with db.transaction(self.database) as tx:
                now = db.now()
                for path, ds, study_uid, series_uid, sop_uid, sop_class, rel in entries:
                    final = self.root / rel
                    if tx.execute("SELECT 1 FROM instances WHERE sop_instance_uid = ?", (sop_uid,)).fetchone():
                        stored.append(StoreResult(sop_uid, series_uid, study_uid, final, True, sop_class))
                        continue
                    size = path.stat().st_size
                    os.replace(path, final)
                    self._index(tx, _index_values(ds), study_uid, series_uid, sop_uid, sop_class,
                                str(ds.file_meta.TransferSyntaxUID), rel, size, now, calling_ae, "derived")
                    stored.append(StoreResult(sop_uid, series_uid, study_uid, final, False, sop_class))
                for d in {r.path.parent for r in stored}:
                    _fsync_dir(d)
                if also is not None:
                    also(tx, stored)
        except (db.Error, OSError) as exc:
            self.clean_staging(staged.folder.name)
            raise StoreError(f"publishing {staged.folder.name} failed: {db.error_text(exc)}; check free space and the database "
                             f"{self.db_path}") from exc
        except BaseException:
            self.clean_staging(staged.folder.name)
            raise
        shutil.rmtree(staged.folder, ignore_errors=True)
        log.info("store.series.published", extra=fields(
            staged=staged.folder.name, instances=len(stored), already_stored=sum(r.duplicate for r in stored),
            series_uids=sorted({r.series_uid for r in stored})))
        return stored

    def clean_staging(self, name: str | None = None) -> int:
        """Remove staged series that were never published (all, or the one called ``name``); returns how many.

        Files a cut-off :meth:`publish` already moved into ``instances/``
        (listed in its manifest) are deleted unless the index has them, so no
        unindexed half series stays on disk.  Also empties ``tmp/``:
        partial received files whose C-STORE was never answered.  Run at
        start-up, before anything else writes.
        """
        folders = [self.staging_dir / name] if name else (
            sorted(p for p in self.staging_dir.iterdir() if p.is_dir()) if self.staging_dir.exists() else [])
        conn = self._conn()
        n = 0
        for folder in folders:
            if not folder.exists():
                continue
            manifest = folder / MANIFEST
            moved = 0
            if manifest.exists():
                try:
                    rels = json.loads(manifest.read_text())
                except ValueError:
                    rels = []
                for rel in rels:
                    if not conn.execute("SELECT 1 FROM instances WHERE path = ?", (rel,)).fetchone():
                        try:
                            (self.root / rel).unlink()
                            moved += 1
                        except FileNotFoundError:
                            pass
            shutil.rmtree(folder, ignore_errors=True)
            n += 1
            log.warning("store.staging.cleaned", extra=fields(staged=folder.name, unindexed_files_removed=moved))
        if name is None and self.tmp_dir.exists():
            parts = [p for p in self.tmp_dir.iterdir() if p.is_file()]
            for p in parts:
                p.unlink(missing_ok=True)
            if parts:
                log.warning("store.tmp.cleaned", extra=fields(files=len(parts)))
        return n

    # -- reading ----------------------------------------------------------------------

    def _query(self, sql: str, params: tuple = ()) -> list[db.Row]:
        try:
            return self._conn().execute(sql, params).fetchall()
        except db.Error as exc:
            raise StoreError(f"index query failed: {db.error_text(exc)}; check the database {self.db_path}") from exc

    @staticmethod
    def _series(row: db.Row) -> SeriesRecord:
        return SeriesRecord(**{k: row[k] for k in row.keys()})

    def _instance(self, row: db.Row) -> InstanceRecord:
        data = {k: row[k] for k in row.keys()}
        data["path"] = self.root / data["path"]
        return InstanceRecord(**data)

    def get_series(self, uid: str) -> SeriesRecord | None:
        rows = self._query(_SERIES_SELECT + " WHERE s.series_uid = ?", (uid,))
        return self._series(rows[0]) if rows else None

    def list_series(self, state: str | None = None, origin: str | None = None) -> list[SeriesRecord]:
        """Series filtered by state and/or origin, oldest first (by first instance received)."""
        where, params = [], []
        if state is not None:
            where.append("s.state = ?")
            params.append(state)
        if origin is not None:
            where.append("s.origin = ?")
            params.append(origin)
        sql = _SERIES_SELECT + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY s.first_received, s.series_uid"
        return [self._series(r) for r in self._query(sql, tuple(params))]

    def get_instance(self, sop_instance_uid: str) -> InstanceRecord | None:
        rows = self._query("SELECT * FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,))
        return self._instance(rows[0]) if rows else None

    def instances(self, series_uid: str) -> list[InstanceRecord]:
        """The series' instances by InstanceNumber (missing numbers last), then UID."""
        rows = self._query(
            "SELECT * FROM instances WHERE series_uid = ?"
            " ORDER BY instance_number IS NULL, instance_number, sop_instance_uid",
            (series_uid,),
        )
        return [self._instance(r) for r in rows]

    def called_aes(self, series_uid: str) -> frozenset[str]:
        """The Called AE Titles the series' instances were sent to (empty for derived or pre-migration ones)."""
        rows = self._query("SELECT DISTINCT called_ae FROM instances WHERE series_uid = ? AND called_ae IS NOT NULL",
                           (series_uid,))
        return frozenset(r["called_ae"] for r in rows)

    def set_series_state(self, uid: str, state: str, reason: str, *, expected_state: str | None = None,
                         unchanged_since: float | None = None) -> bool:
        """Change a series' state and record why; returns whether the change was made.

        ``expected_state`` and ``unchanged_since`` make it a compare-and-set, so a
        settle sweep that read a series a moment ago does not settle it over an
        instance that just arrived: the change applies only while the state is
        still ``expected_state`` and no instance arrived after ``unchanged_since``
        (compare with the ``last_received`` the caller read).
        Raises KeyError for an unknown series.
        """
        sql = "UPDATE series SET state = ?, state_reason = ?, state_changed = ? WHERE series_uid = ?"
        params: list[Any] = [state, reason, db.now(), uid]
        if expected_state is not None:
            sql += " AND state = ?"
            params.append(expected_state)
        if unchanged_since is not None:
            sql += " AND (last_received IS NULL OR last_received <= ?)"
            params.append(unchanged_since)
        try:
            with db.transaction(self.database) as tx:
                changed = tx.execute(sql, tuple(params)).rowcount
                if not changed and not tx.execute("SELECT 1 FROM series WHERE series_uid = ?", (uid,)).fetchone():
                    raise KeyError(uid)
        except db.Error as exc:
            raise StoreError(f"cannot update series state: {db.error_text(exc)}; check the database {self.db_path}") from exc
        if changed:  # the decision itself is logged once by whoever made it (pairing.*, settle)
            log.debug("store.series.state", extra=fields(series_uid=uid, state=state, reason=reason))
        return bool(changed)

    def counts(self) -> StoreCounts:
        """Totals for ``fusion-node status``."""
        (row,) = self._query(
            "SELECT (SELECT COUNT(*) FROM studies) AS studies, (SELECT COUNT(*) FROM series) AS series,"
            " (SELECT COUNT(*) FROM instances) AS instances, (SELECT COALESCE(SUM(size_bytes), 0) FROM instances) AS bytes"
        )
        by_state = {r["state"]: r["n"] for r in self._query("SELECT state, COUNT(*) AS n FROM series GROUP BY state")}
        return StoreCounts(row["studies"], row["series"], row["instances"], row["bytes"], by_state)
