"""The Storage SCP: C-STORE handled as a stream to disk, checked, then made durable.

A C-STORE is answered Success only after :meth:`Store.store_received` has
returned, i.e. the instance is fsynced, renamed into place and indexed (the
durability rule, docs/architecture.md).  Everything that can be wrong with an
incoming instance is checked before that (``dicom_node.dicom.validation``), and
each rejection is logged with its reason and the exact DIMSE status the sender
sees, so an operator can tell a misbehaving modality from a full disk.

Datasets are never held whole in memory: pynetdicom writes each incoming
dataset to a temporary file while it arrives (``<root>/tmp/spool``, ``spool.py``); the handler copies it behind our
own File Meta Information into the store's ``tmp`` folder and hands that file
to the store.

Each instance is read once (docs/ingest.md): the file's fsync starts on a
thread of its own as soon as it is written and runs while the intake check
reads it (CPU against disk); the check hands the header values it read to the
store, which indexes from them and renames the file only once that fsync has
returned, then fsyncs the folder and commits the row.  Success still comes
after all four.
"""

from __future__ import annotations

import logging
import shutil
import struct
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, BinaryIO

from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    EnhancedMRColorImageStorage,
    EnhancedMRImageStorage,
    EnhancedPETImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    LegacyConvertedEnhancedPETImageStorage,
    MRImageStorage,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    NuclearMedicineImageStorage,
    PositronEmissionTomographyImageStorage,
    SecondaryCaptureImageStorage,
    SpatialRegistrationStorage,
)
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import split_dataset

from dicom_node import audit, events
from dicom_node.config import LimitsConfig
from dicom_node.dicom import validation
from dicom_node.dicom.uids import UID_PATTERN
from dicom_node.index.disk import DiskGuard
from dicom_node.index.store import INDEXED_KEYWORDS, InvalidInstanceError, Store, StoreError
from dicom_node.logs import fields
from dicom_node.net import spool, statuses
from dicom_node.net.association import called_ae
from fusion.environment import crash_point

log = logging.getLogger("dicom_node.net.storage_scp")

# -- conformance: what the node accepts (the conformance statement is checked against these) --

#: transfer syntaxes accepted for every storage SOP class, in order of preference: of the syntaxes a
#: requestor proposes in one context, pynetdicom accepts the first of *this* list.  Explicit VR first, so
#: VRs (private elements included) survive and C-GET callers get what most PACS store; Implicit VR second,
#: the default every peer supports; compressed syntaxes only when the sender offers no uncompressed one
STORAGE_TRANSFER_SYNTAXES: tuple[str, ...] = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old modalities)
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless, Non-Hierarchical (Process 14)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, First-Order Prediction (Process 14, SV1)
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless Only
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
)

#: storage SOP classes the node accepts as SCP
STORAGE_SOP_CLASSES: tuple[str, ...] = (
    CTImageStorage,
    MRImageStorage,
    PositronEmissionTomographyImageStorage,
    NuclearMedicineImageStorage,
    SecondaryCaptureImageStorage,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    EnhancedMRColorImageStorage,
    EnhancedPETImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    LegacyConvertedEnhancedPETImageStorage,
    SpatialRegistrationStorage,
)

#: the status the sender sees for each kind of intake problem
_PROBLEM_STATUS = {
    validation.MISMATCH: statuses.DOES_NOT_MATCH_SOP_CLASS,
    validation.UNDECODABLE: statuses.CANNOT_UNDERSTAND,
    validation.OVER_LIMIT: statuses.OUT_OF_RESOURCES,
}


#: threads for the received files' fsyncs: a disk takes few at once, more associations queue behind them
_SYNC_THREADS = 4


def _c_store(event: evt.Event) -> C_STORE:
    """The request of an EVT_C_STORE event (pynetdicom types ``event.request`` as any DIMSE request)."""
    request = event.request
    assert isinstance(request, C_STORE), f"not a C-STORE event: {type(request).__name__}"
    return request


def write_part10(event: evt.Event, dest: Path, calling_ae: str) -> None:
    """Write the received dataset as a Part-10 file: preamble, our File Meta, then the bytes as received.

    The dataset bytes are copied untouched (compressed stays compressed,
    deflated stays deflated), streamed from pynetdicom's temporary file.
    """
    meta = FileMetaDataset(event.file_meta)
    if calling_ae:
        meta.SourceApplicationEntityTitle = calling_ae
    with open(dest, "wb") as out:
        out.write(b"\x00" * 128 + b"DICM")
        # pydicom types the destination as its DicomIO wrapper (it only calls write() on it)
        write_file_meta_info(DicomFileLike(out), meta, enforce_standard=True)
        try:
            src_path = event.dataset_path
        except AttributeError:
            src_path = None
        if src_path is None:
            # chunked receiving was switched off by someone else: the bytes are in memory already
            data = _c_store(event).DataSet
            assert data is not None  # not streamed to a file: pynetdicom kept the data set in memory
            out.write(data.getvalue())
            return
        with open(src_path, "rb") as src:
            offset = _spooled_dataset_offset(src)
            if offset is None:
                _, offset = split_dataset(Path(src_path))
            src.seek(offset)
            shutil.copyfileobj(src, out, 1 << 20)


#: how pynetdicom's spool file starts: preamble, "DICM", then (0002,0000) UL of length 4, explicit VR LE
_SPOOL_HEAD = struct.Struct("<128x4sHH2sHI")


def _spooled_dataset_offset(src: BinaryIO) -> int | None:
    """Where the dataset starts in pynetdicom's spool file, from its File Meta group length; None if not there.

    pynetdicom writes the spool file itself (preamble and a File Meta with
    its group length, ``write_file_meta_info``), so its first 144 bytes tell
    where the File Meta ends without parsing it (``split_dataset`` does);
    anything else falls back to parsing.
    """
    head = src.read(_SPOOL_HEAD.size)
    if len(head) != _SPOOL_HEAD.size:
        return None
    magic, group, element, vr, length, group_length = _SPOOL_HEAD.unpack(head)
    if magic != b"DICM" or (group, element, vr, length) != (2, 0, b"UL", 4):
        return None
    return _SPOOL_HEAD.size + group_length


def _loggable_uid(value: object) -> str:
    """The command's SOP Instance UID for the log, or a placeholder: a hostile sender can put anything there.

    Only a well-formed UID is written as it came; anything else (a patient ID,
    a path, bytes) is described by its length, so the log never carries it.
    """
    text = str(value or "").strip().rstrip("\x00")
    if 0 < len(text) <= 64 and UID_PATTERN.match(text):
        return text
    return f"<invalid UID, {len(text)} characters>"


class _Counts:
    __slots__ = ("stored", "duplicates", "rejected", "studies")

    def __init__(self) -> None:
        self.stored = self.duplicates = self.rejected = 0
        #: what the audit trail records at the end of the association, per study
        self.studies: dict[str, audit.Study] = {}


class StorageService:
    """C-STORE for the listener: every storage SOP class, streamed to the store."""

    def __init__(self, store: Store, limits: LimitsConfig | None = None, disk: DiskGuard | None = None) -> None:
        self.store = store
        #: decoding limits and the decode slots shared by every association (docs/reliability.md)
        self.gate = validation.DecodeGate(limits or LimitsConfig())
        #: refuses C-STORE (0xA700) while free space is below the retention reserve; None = never
        self.disk = disk
        self._counts: dict[int, _Counts] = {}
        self._audited: dict[int, _Counts] = {}
        self._lock = threading.Lock()
        self._in_flight = 0
        self._idle = threading.Condition(self._lock)
        #: fsyncs of received files, overlapped with their intake check (``_store``)
        self._syncs = ThreadPoolExecutor(max_workers=_SYNC_THREADS, thread_name_prefix="fsync")

    def wait_idle(self, timeout: float) -> bool:
        """True once no C-STORE is being written (a clean stop waits for this before aborting associations)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout)

    def apply_settings(self, cfg: Any) -> None:
        if self.disk is not None:
            self.disk.apply_settings(cfg.retention)

    # -- the listener's service protocol (dicom_node.net.listener.Service) --------------

    def configure(self, ae: AE) -> None:
        self.store.ensure_schema()  # before the first C-STORE: folders and index exist
        spool.attach(ae, self.store.tmp_dir / "spool")  # pynetdicom's spool files inside the root, 0600
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, list(STORAGE_TRANSFER_SYNTAXES))

    def handlers(self) -> list[tuple[Any, Any]]:
        return [(evt.EVT_C_STORE, self.on_store), *spool.HANDLERS,
                (evt.EVT_RELEASED, self._audit_end), (evt.EVT_ABORTED, self._audit_end),
                (evt.EVT_CONN_CLOSE, self._audit_end)]

    def summary(self, assoc: Any) -> dict[str, int]:
        """What this association stored; forgotten afterwards (the listener logs it at release/abort)."""
        with self._lock:
            c = self._counts.pop(id(assoc), None) or _Counts()
        return {"stored": c.stored, "duplicates": c.duplicates, "rejected": c.rejected}

    def _counts_for(self, assoc: Any) -> _Counts:
        with self._lock:
            counts = self._counts.setdefault(id(assoc), _Counts())
            self._audited.setdefault(id(assoc), counts)
            return counts

    def _audit_end(self, event: evt.Event) -> None:
        """One audit record per study this association sent us (``audit.py``), however it ended."""
        with self._lock:
            counts = self._audited.pop(id(event.assoc), None)
        if counts is None or not counts.studies:
            return
        assoc = event.assoc
        node_ae = called_ae(assoc) or assoc.acceptor.ae_title
        trail = audit.trail_for(self.store.root, assoc.acceptor.ae_title)
        participants = [audit.Participant(assoc.requestor.ae_title, assoc.requestor.address, True, audit.SOURCE_ROLE),
                        audit.Participant(node_ae, None, False, audit.DESTINATION_ROLE)]
        outcome = audit.SUCCESS if not counts.rejected else audit.MINOR_FAILURE
        for study in counts.studies.values():
            trail.record(audit.INSTANCES_TRANSFERRED, audit.CREATE, outcome, participants, audit.study_objects([study]),
                         description=f"received: {counts.rejected} instance(s) refused on this association"
                         if counts.rejected else None)

    # -- C-STORE ------------------------------------------------------------------------

    def on_store(self, event: evt.Event) -> int:
        calling_ae = event.assoc.requestor.ae_title
        sop_uid = _loggable_uid(_c_store(event).AffectedSOPInstanceUID)
        counts = self._counts_for(event.assoc)
        with self._lock:
            self._in_flight += 1
        try:
            status = self._guarded_store(event, calling_ae, sop_uid, counts)
        except Exception:
            # A bug must cost one instance, never the listener.
            log.exception("scp.store.error", extra=fields(sop_instance_uid=sop_uid, calling_ae=calling_ae,
                                                          status=statuses.hex_status(statuses.CANNOT_UNDERSTAND)))
            status = statuses.CANNOT_UNDERSTAND
            events.emit("scp.instance", outcome="error", bytes=0)
        finally:
            with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()
        if status != statuses.SUCCESS:
            counts.rejected += 1
        return status

    def _guarded_store(self, event: evt.Event, calling_ae: str, sop_uid: str, counts: _Counts) -> int:
        if self.disk is not None:
            short = self.disk.below_reserve()
            if short is not None:
                return self._reject(statuses.OUT_OF_RESOURCES, "disk below the reserve", short, sop_uid, calling_ae)
        return self._store(event, calling_ae, sop_uid, counts)

    def _reject(self, status: int, reason: str, detail: str, sop_uid: str, calling_ae: str) -> int:
        # detail is an exception text about tags and lengths; capped so a decoder cannot flood the log
        log.warning("scp.store.rejected", extra=fields(reason=reason, detail=detail[:300], sop_instance_uid=sop_uid,
                                                       calling_ae=calling_ae, status=statuses.hex_status(status)))
        events.emit("scp.instance", outcome="rejected", bytes=0)
        return status

    def _store(self, event: evt.Event, calling_ae: str, sop_uid: str, counts: _Counts) -> int:
        tmp = self.store.new_tmp_path(".dcm")
        synced: Future[int] | None = None
        try:
            try:
                write_part10(event, tmp, calling_ae)
            except OSError as exc:
                return self._reject(statuses.OUT_OF_RESOURCES, "cannot write temporary file",
                                    f"{exc}; check free space under {self.store.root}", sop_uid, calling_ae)
            # the file's fsync (disk) runs while it is checked (CPU); the store waits for it before the rename
            synced = self._syncs.submit(self.store.sync_file, tmp)
            intake = validation.check_instance(tmp, str(event.request.AffectedSOPClassUID),
                                               str(_c_store(event).AffectedSOPInstanceUID), self.gate,
                                               INDEXED_KEYWORDS)
            problem = intake.problem
            if problem is not None:
                return self._reject(_PROBLEM_STATUS[problem.kind], problem.reason, problem.detail, sop_uid, calling_ae)
            try:
                # the header the check read is the one indexed: the file is parsed once
                result = self.store.store_received(tmp, calling_ae, called_ae=called_ae(event.assoc),
                                                   header=intake.header, synced=synced.result)
            except StoreError as exc:
                return self._reject(statuses.OUT_OF_RESOURCES, "store failed", str(exc), sop_uid, calling_ae)
            except InvalidInstanceError as exc:
                return self._reject(statuses.DOES_NOT_MATCH_SOP_CLASS, str(exc), "", sop_uid, calling_ae)
        finally:
            if synced is not None:
                wait([synced])  # a refused file's fsync is not left running on a file about to be removed
            tmp.unlink(missing_ok=True)  # consumed on success; removed on every other path
        study = counts.studies.setdefault(result.study_uid, audit.Study(result.study_uid))
        study.patient_id = study.patient_id or result.patient_id
        study.add(result.sop_class_uid)
        crash_point("receive")  # fault tests: stored and indexed, not yet answered
        events.emit("scp.instance", outcome="duplicate" if result.duplicate else "stored",
                    bytes=_size(result.path))
        if result.duplicate:
            counts.duplicates += 1
            log.info("scp.store.duplicate", extra=fields(sop_instance_uid=sop_uid, series_uid=result.series_uid,
                                                         calling_ae=calling_ae))
        else:
            counts.stored += 1
            log.debug("scp.store.ok", extra=fields(sop_instance_uid=sop_uid, series_uid=result.series_uid,
                                                   calling_ae=calling_ae))
        return statuses.SUCCESS


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
