"""Query/Retrieve SCP: C-FIND, C-GET and C-MOVE on the node's own AE, for received and derived series.

A service of the listener (:func:`dicom_node.net.listener.node_listener` plugs it in).
Matching lives in ``dicom_node.index.matching``; this module is the DIMSE side: statuses, sub-operations,
transfer syntaxes, C-CANCEL and logs.

Sub-operations send the stored Part-10 files.  Each goes out in its stored
transfer syntax when the peer accepted that; uncompressed little-endian data
is re-encoded by pynetdicom into whichever uncompressed little-endian syntax
the peer took; big-endian data is byte-swapped to Explicit VR Little Endian
and compressed data decompressed when the peer accepted only uncompressed
syntaxes (the SOP Instance UID stays: it is the same instance).  Anything
that still cannot go is counted as a failed sub-operation, listed in Failed
SOP Instance UID List, and logged with its reason.

C-MOVE destinations are the AE titles under ``[[destinations]]`` in the
config, limited to ``query_retrieve.move_destinations`` when that is set (reached over DICOM TLS when the destination has ``[destinations.tls]``):
a move to any other AE title is answered 0xA801, because the node never sends
patient data to an address a caller made up.  pynetdicom sends a C-MOVE's
final status only after it associated with the destination, so a C-MOVE with
a bad identifier opens (and releases, unused) an association to its known
destination to be answered 0xA900; if that destination is down the caller
sees 0xA801 instead.

Logs carry counts, levels, AE titles, UIDs and the *names* of the keys used,
never key values (they may be patient names or IDs).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian
from pynetdicom import AE, build_context, evt
from pynetdicom.status import code_to_category

from dicom_node import audit
from dicom_node.config import DicomDestination, NodeSettings
from dicom_node.index import db
from dicom_node.index.matching import FindQuery, IdentifierError, RetrieveItem, matching_keys, retrieve_items
from dicom_node.index.store import Store
from dicom_node.logs import fields
from dicom_node.net import scu, statuses, tls
from dicom_node.net.access import QueryRetrieveAccess
from dicom_node.net.association import Verification, called_ae, no_delay
from dicom_node.net.scu import MAX_CONTEXTS
from dicom_node.net.storage_scp import STORAGE_SOP_CLASSES, STORAGE_TRANSFER_SYNTAXES

log = logging.getLogger("dicom_node.net.query_retrieve")

# The Query/Retrieve Information Model SOP classes (PS3.4 C.6), spelled out: pynetdicom.sop_class builds
# its names at run time (mypy cannot see them) and pydicom.uid has no Q/R models.  Same values, same names.
#: Patient Root Query/Retrieve Information Model - FIND
PatientRootQueryRetrieveInformationModelFind = UID("1.2.840.10008.5.1.4.1.2.1.1")
#: Patient Root Query/Retrieve Information Model - MOVE
PatientRootQueryRetrieveInformationModelMove = UID("1.2.840.10008.5.1.4.1.2.1.2")
#: Patient Root Query/Retrieve Information Model - GET
PatientRootQueryRetrieveInformationModelGet = UID("1.2.840.10008.5.1.4.1.2.1.3")
#: Study Root Query/Retrieve Information Model - FIND
StudyRootQueryRetrieveInformationModelFind = UID("1.2.840.10008.5.1.4.1.2.2.1")
#: Study Root Query/Retrieve Information Model - MOVE
StudyRootQueryRetrieveInformationModelMove = UID("1.2.840.10008.5.1.4.1.2.2.2")
#: Study Root Query/Retrieve Information Model - GET
StudyRootQueryRetrieveInformationModelGet = UID("1.2.840.10008.5.1.4.1.2.2.3")

# -- conformance: what the Q/R SCP offers (the conformance statement is checked against these) --

#: C-FIND SOP classes: Patient Root and Study Root Query/Retrieve Information Model - FIND
FIND_SOP_CLASSES: tuple[str, ...] = (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)
#: C-GET SOP classes: Patient Root and Study Root - GET (the caller receives C-STOREs on its own association)
GET_SOP_CLASSES: tuple[str, ...] = (
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelGet,
)
#: C-MOVE SOP classes: Patient Root and Study Root - MOVE (to configured destinations only)
MOVE_SOP_CLASSES: tuple[str, ...] = (
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelMove,
)
#: transfer syntaxes accepted for the Q/R SOP classes (identifiers are small; uncompressed only)
QR_TRANSFER_SYNTAXES: tuple[str, ...] = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian
)

_MODELS: dict[str, str] = {
    PatientRootQueryRetrieveInformationModelFind: "PATIENT",
    StudyRootQueryRetrieveInformationModelFind: "STUDY",
    PatientRootQueryRetrieveInformationModelGet: "PATIENT",
    StudyRootQueryRetrieveInformationModelGet: "STUDY",
    PatientRootQueryRetrieveInformationModelMove: "PATIENT",
    StudyRootQueryRetrieveInformationModelMove: "STUDY",
}

#: every Q/R SOP class: rejected at negotiation for callers [query_retrieve] does not list
_QR_SOP_CLASSES: frozenset[str] = frozenset(map(str, (*FIND_SOP_CLASSES, *GET_SOP_CLASSES, *MOVE_SOP_CLASSES)))

_SWAP_WIDTH = {"OW": 2, "OL": 4, "OF": 4, "OD": 8, "OV": 8}
#: what a C-MOVE that sends nothing proposes: contexts any destination accepts at least one of
_ANY_STORAGE_CONTEXTS = [build_context(Verification),
                         *(build_context(sop, [ExplicitVRLittleEndian, "1.2.840.10008.1.2"])
                           for sop in STORAGE_SOP_CLASSES)]


def _status(code: int, comment: str | None = None) -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[:64]  # LO
    return ds


# -- transfer syntaxes of sub-operations ------------------------------------------------


def _swap_to_little_endian(ds: Dataset) -> None:
    """Byte-swap the raw OW/OL/OF/OD/OV values of a dataset read from Explicit VR Big Endian.

    pydicom decodes numeric VRs to numbers (re-encoded correctly on write) but keeps
    these as the raw bytes it read, so they must be swapped by hand.
    """
    for elem in ds.iterall():
        width = _SWAP_WIDTH.get(elem.VR)
        if width and isinstance(elem.value, (bytes, bytearray)) and len(elem.value) % width == 0:
            elem.value = np.frombuffer(elem.value, dtype=f">u{width}").astype(f"<u{width}").tobytes()


class _Prepared:
    __slots__ = ("dataset", "action", "reason")

    def __init__(self, dataset: Dataset, action: str, reason: str | None = None) -> None:
        self.dataset = dataset
        #: as-stored | converted (pynetdicom re-encodes) | byte-swapped | decompressed | unsendable
        self.action = action
        self.reason = reason


def prepare_instance(path: Path, item: RetrieveItem, accepted: list[UID]) -> _Prepared:
    """Read one stored file and make it sendable under one of the ``accepted`` transfer syntaxes.

    An unsendable instance comes back with ``action="unsendable"`` and a reason; its
    dataset still carries the SOP Instance UID, so pynetdicom counts the sub-operation
    as failed and lists it in Failed SOP Instance UID List.
    """
    try:
        ds = dcmread(path)
    except (OSError, InvalidDicomError) as exc:
        stub = Dataset()
        stub.SOPInstanceUID = item.sop_instance_uid  # no SOPClassUID: pynetdicom fails the sub-operation
        return _Prepared(stub, "unsendable", f"cannot read the stored file {path}: {exc}")
    ts = UID(str(ds.file_meta.get("TransferSyntaxUID", item.transfer_syntax_uid)))
    if not accepted:
        return _Prepared(ds, "unsendable", "the peer accepted no presentation context for"
                         f" {UID(item.sop_class_uid).name} (as Storage SCP)")
    if ts in accepted:
        return _Prepared(ds, "as-stored")
    uncompressed_le = [a for a in accepted if not a.is_compressed and a.is_little_endian]
    if not ts.is_compressed and ts.is_little_endian and uncompressed_le:
        return _Prepared(ds, "converted")
    if ts == ExplicitVRBigEndian and uncompressed_le:
        _swap_to_little_endian(ds)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.set_original_encoding(False, True, ds.original_character_set)
        return _Prepared(ds, "byte-swapped")
    if ts.is_compressed and uncompressed_le:
        try:
            ds.decompress(generate_instance_uid=False)
        except Exception as exc:  # noqa: BLE001 - decoder errors come in many types
            return _Prepared(ds, "unsendable", f"cannot decompress {ts.name} for a peer that accepted only"
                             f" uncompressed data: {exc.__class__.__name__}: {exc}")
        return _Prepared(ds, "decompressed")
    names = ", ".join(a.name for a in accepted)
    return _Prepared(ds, "unsendable", f"stored as {ts.name}; the peer accepted only {names}")


def storage_contexts(items: list[RetrieveItem]) -> list[Any]:
    """Presentation contexts to propose to a C-MOVE destination for ``items``.

    Per SOP class: one context with the uncompressed little-endian syntaxes (any
    instance can be sent that way, decompressed if need be) and one per stored
    compressed or big-endian syntax, so that a destination that takes those gets
    the instance exactly as stored.
    """
    base: dict[str, None] = {}
    extra: dict[tuple[str, str], None] = {}
    for it in items:
        base[it.sop_class_uid] = None
        ts = UID(it.transfer_syntax_uid)
        if ts.is_compressed or not ts.is_little_endian:
            extra[(it.sop_class_uid, str(ts))] = None
    contexts = [build_context(sop, [ExplicitVRLittleEndian, "1.2.840.10008.1.2"]) for sop in base]
    for sop, syntax in extra:
        if len(contexts) >= MAX_CONTEXTS:
            break  # the rest go decompressed through the uncompressed context
        contexts.append(build_context(sop, [syntax]))
    return contexts[:MAX_CONTEXTS]


class _SubOps:
    """What happened to the C-STORE sub-operations of one C-GET/C-MOVE (from the peer's responses)."""

    def __init__(self) -> None:
        self.yielded = 0
        self.responses: Counter[str] = Counter()
        self.actions: Counter[str] = Counter()
        self.assoc: Any = None

    def on_dimse_recv(self, event: evt.Event) -> None:
        msg = event.message
        if type(msg).__name__ == "C_STORE_RSP":
            status = msg.command_set.get("Status")
            category = code_to_category(int(status)) if status is not None else "Failure"
            self.responses[category] += 1

    def on_established(self, event: evt.Event) -> None:
        self.assoc = event.assoc
        no_delay(event.assoc)

    def counts(self) -> dict[str, int]:
        answered = sum(self.responses.values())
        return {
            "completed": self.responses["Success"],
            "warning": self.responses["Warning"],
            # a sub-operation pynetdicom could not even send has no response
            "failed": self.responses["Failure"] + max(0, self.yielded - answered),
        }


class QueryRetrieveService:
    """The C-FIND/C-GET/C-MOVE handlers for one node (settings + store)."""

    def __init__(self, settings: NodeSettings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.access = QueryRetrieveAccess(settings.query_retrieve)
        self.audit = audit.trail_for(store.root, settings.node.ae_title)

    def apply_settings(self, settings: NodeSettings) -> None:
        """A reloaded configuration: C-MOVE destinations follow at once (``enabled`` needs a restart)."""
        self.settings = settings

    # -- wiring -------------------------------------------------------------------------

    def handlers(self) -> list[tuple[Any, Callable[..., Any]]]:
        """The listener's event handlers for this service."""
        return [(evt.EVT_REQUESTED, self.on_requested),
                (evt.EVT_C_FIND, self.on_find), (evt.EVT_C_GET, self.on_get), (evt.EVT_C_MOVE, self.on_move)]

    def on_requested(self, event: evt.Event) -> None:
        """Authorization: a caller not in ``[query_retrieve]``'s lists gets no Q/R presentation context.

        Runs after the listener's access check (bound after it).  The caller
        may still store and echo; its C-FIND/C-GET/C-MOVE contexts are
        rejected (abstract syntax not supported), the one refusal every SCU
        understands and one that needs no sub-association to a destination.
        """
        assoc = event.assoc
        if assoc.is_rejected or assoc.is_aborted:
            return
        rq = assoc.requestor.primitive
        proposed = {str(cx.abstract_syntax) for cx in (rq.presentation_context_definition_list if rq else [])}
        asked = proposed & _QR_SOP_CLASSES
        if not asked:
            return  # a modality that only stores: nothing to decide
        decision = self.access.decide(rq.calling_ae_title if rq else "", assoc.requestor.address)
        if decision.allowed:
            return
        assoc.acceptor.supported_contexts = [cx for cx in assoc.acceptor.supported_contexts
                                             if str(cx.abstract_syntax) not in _QR_SOP_CLASSES]
        log.warning("qr.refused", extra=fields(
            calling_ae=(rq.calling_ae_title if rq else "").strip(), address=assoc.requestor.address,
            rule=decision.rule, reason=decision.why, contexts_refused=len(asked),
            action="add the workstation to [query_retrieve] allowed_callers / allowed_addresses"))

    def configure(self, ae: AE) -> None:
        """Add the Q/R contexts, and accept the SCP role for storage so C-GET callers receive on their association.

        Must run after the storage contexts were added (``Listener.build_ae``
        calls it last): adding a storage context again without roles would reset them.
        """
        for uid in (*FIND_SOP_CLASSES, *GET_SOP_CLASSES, *MOVE_SOP_CLASSES):
            ae.add_supported_context(uid, list(QR_TRANSFER_SYNTAXES))
        # C-MOVE opens associations from this AE: an unreachable destination must not hold the caller for minutes
        ae.connection_timeout = min(self.settings.node.network_timeout_s, scu.CONNECT_TIMEOUT_S)
        for uid in STORAGE_SOP_CLASSES:
            # scu_role=True keeps senders that propose role selection able to C-STORE to us;
            # scp_role=True lets a C-GET caller act as Storage SCP on the same association
            ae.add_supported_context(uid, list(STORAGE_TRANSFER_SYNTAXES), scu_role=True, scp_role=True)

    def _index(self) -> contextlib.AbstractContextManager[db.Connection]:
        """A read-only connection for one request (a query must never change the index)."""
        return self.store.database.read_only()

    def _destination(self, ae_title: str) -> DicomDestination | None:
        for dest in self._move_destinations():
            if dest.ae_title.strip() == ae_title:
                return dest
        return None

    def _move_destinations(self) -> list[DicomDestination]:
        """The destinations a C-MOVE may name: ``query_retrieve.move_destinations``, or all when that is empty."""
        names = set(self.settings.query_retrieve.move_destinations)
        return [d for d in self.settings.dicom_destinations() if not names or d.name in names]

    @staticmethod
    def _connect_args(dest: DicomDestination, **kwargs: Any) -> dict[str, Any]:
        """``ae.associate`` keyword arguments for the sub-association; DICOM TLS as configured for the destination.

        Raises :class:`tls.TLSConfigError` for unusable certificate settings.
        """
        args = scu.tls_args(dest)
        if args is not None:
            kwargs["tls_args"] = args
        return kwargs

    # -- C-FIND -------------------------------------------------------------------------

    def on_find(self, event: evt.Event) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        started = time.monotonic()
        calling = event.assoc.requestor.ae_title
        model = _MODELS.get(str(event.request.AffectedSOPClassUID), "STUDY")
        where: dict[str, Any] = dict(calling_ae=calling, model=model.lower())
        try:
            identifier = event.identifier
            query = FindQuery.parse(identifier, model)
        except IdentifierError as exc:
            log.warning("qr.find.rejected", extra=fields(**where, reason=str(exc),
                                                         status=statuses.hex_status(statuses.DOES_NOT_MATCH_SOP_CLASS)))
            yield _status(statuses.DOES_NOT_MATCH_SOP_CLASS, str(exc)), None
            return
        except Exception as exc:  # noqa: BLE001 - an undecodable identifier
            log.warning("qr.find.rejected", extra=fields(**where, reason=f"cannot decode the identifier: {type(exc).__name__}",
                                                         status=statuses.hex_status(statuses.CANNOT_UNDERSTAND)))
            yield _status(statuses.CANNOT_UNDERSTAND, "cannot decode the identifier"), None
            return
        where.update(query_level=query.level, keys=matching_keys(identifier))
        log.info("qr.find", extra=fields(**where))
        try:
            with self._index() as conn:
                rows = query.rows(conn)
        except db.Error as exc:
            log.error("qr.find.failed", extra=fields(**where, reason=f"index unreadable: {db.error_text(exc)}",
                                                     database=str(self.store.db_path)))
            yield _status(statuses.CANNOT_UNDERSTAND, "the node's index cannot be read; tell its operator"), None
            return
        ae_title = self.settings.node.ae_title
        answered: list[Dataset] = []
        try:
            for sent, row in enumerate(rows):
                if event.is_cancelled:
                    log.info("qr.find.cancelled", extra=fields(**where, matches=len(rows), sent=sent))
                    yield statuses.CANCEL, None
                    return
                response = query.response(row, ae_title)
                answered.append(response)
                yield statuses.PENDING, response
            log.info("qr.find.done", extra=fields(**where, matches=len(rows),
                                                  duration_ms=round((time.monotonic() - started) * 1000)))
        finally:
            self._audit_find(event, query.level, where.get("keys", []), len(rows), answered)

    # -- C-GET / C-MOVE -----------------------------------------------------------------

    # -- audit trail (audit.py) ---------------------------------------------------------

    def _caller(self, event: evt.Event, *, role: dict[str, str] | None = None) -> audit.Participant:
        assoc = event.assoc
        return audit.Participant(assoc.requestor.ae_title, assoc.requestor.address, True, role)

    def _node(self, event: evt.Event, role: dict[str, str] | None = None) -> audit.Participant:
        return audit.Participant(called_ae(event.assoc) or self.settings.node.ae_title, None, False, role)

    #: most studies one Query record names (a C-FIND for everything should not make a record of megabytes)
    AUDIT_MAX_STUDIES = 1000

    def _audit_find(self, event: evt.Event, level: str, keys: list[str], matches: int,
                    answered: list[Dataset]) -> None:
        studies: dict[str, audit.Study] = {}
        patients: set[str] = set()
        for ds in answered[:self.AUDIT_MAX_STUDIES]:
            pid = str(ds.get("PatientID", "") or "") or None
            uid = str(ds.get("StudyInstanceUID", "") or "")
            if uid:
                studies.setdefault(uid, audit.Study(uid, pid))
            elif pid:
                patients.add(pid)
        objects = [*audit.study_objects(studies.values()),
                   *({"ParticipantObjectTypeCode": 1, "ParticipantObjectTypeCodeRole": 1,
                      "ParticipantObjectIDTypeCode": {"code": "2", "codeSystemName": "RFC-3881",
                                                      "displayName": "Patient Number"},
                      "ParticipantObjectID": p} for p in sorted(patients - {s.patient_id for s in studies.values()}))]
        self.audit.record(audit.QUERY, audit.EXECUTE, audit.SUCCESS, [self._caller(event), self._node(event)], objects,
                          query={"sop_class_uid": str(event.request.AffectedSOPClassUID), "query_level": level,
                                 "keys": keys, "matches": matches, "answered": len(answered)})

    def _studies_of(self, items: list[RetrieveItem]) -> dict[str, audit.Study]:
        """Per study (with its Patient ID), the instances of ``items`` by SOP class."""
        by_series: dict[str, tuple[str, str | None]] = {}
        series = sorted({i.series_uid for i in items})
        try:
            with self._index() as conn:
                for start in range(0, len(series), 500):
                    chunk = series[start:start + 500]
                    rows = conn.execute(
                        "SELECT s.series_uid, st.study_uid, st.patient_id FROM series s "
                        f"JOIN studies st ON st.study_uid = s.study_uid WHERE s.series_uid IN ({', '.join('?' * len(chunk))})",
                        chunk).fetchall()
                    by_series.update({r[0]: (r[1], r[2]) for r in rows})
        except db.Error:
            pass  # the record then names series' studies as unknown; the retrieve itself went on
        studies: dict[str, audit.Study] = {}
        for item in items:
            study_uid, patient_id = by_series.get(item.series_uid, ("unknown", None))
            studies.setdefault(study_uid, audit.Study(study_uid, patient_id)).add(item.sop_class_uid)
        return studies

    def _audit_retrieve(self, event: evt.Event, items: list[RetrieveItem], subops: _SubOps,
                        destination: audit.Participant | None) -> None:
        sent = items[:subops.yielded]
        if not sent:
            return
        counts = subops.counts()
        outcome = (audit.SUCCESS if not counts["failed"] and not counts["warning"] else
                   audit.SERIOUS_FAILURE if counts["failed"] >= len(sent) else audit.MINOR_FAILURE)
        if destination is None:  # C-GET: the caller receives on its own association
            participants = [self._node(event, audit.SOURCE_ROLE), self._caller(event, role=audit.DESTINATION_ROLE)]
        else:  # C-MOVE: the caller asked, the node sent to the destination
            participants = [self._caller(event), self._node(event, audit.SOURCE_ROLE), destination]
        for study in self._studies_of(sent).values():
            self.audit.record(audit.INSTANCES_TRANSFERRED, audit.READ, outcome, participants,
                              audit.study_objects([study]),
                              description=f"{'C-GET' if destination is None else 'C-MOVE'}: "
                                          f"{counts['completed']} completed, {counts['warning']} warning, "
                                          f"{counts['failed']} failed")

    def _items(self, event: evt.Event, model: str) -> tuple[list[RetrieveItem], Dataset | None, str, str | None]:
        """(items, failure status or None, why, query level): the instances the identifier names."""
        try:
            identifier = event.identifier
        except Exception as exc:  # noqa: BLE001 - whatever pydicom raises for a broken identifier
            why = f"cannot decode the identifier: {type(exc).__name__}"  # its text may quote key values
            return [], _status(statuses.DOES_NOT_MATCH_SOP_CLASS, "cannot decode the identifier"), why, None
        level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper() or None
        try:
            with self._index() as conn:
                return retrieve_items(conn, identifier, model), None, "", level
        except IdentifierError as exc:
            return [], _status(statuses.DOES_NOT_MATCH_SOP_CLASS, str(exc)), str(exc), level
        except db.Error as exc:
            why = f"index unreadable: {db.error_text(exc)} (database {self.store.db_path})"
            return [], _status(statuses.UNABLE_TO_CALCULATE_MATCHES,
                               "the node's index cannot be read; tell its operator"), why, level

    def _sub_operations(self, event: evt.Event, items: list[RetrieveItem], subops: _SubOps,
                        accepted: Callable[[str], list[UID]], op: str,
                        where: dict[str, Any]) -> Iterator[tuple[int, Dataset | None]]:
        """Yield (Pending, dataset) per instance; honours C-CANCEL between sub-operations."""
        for n, item in enumerate(items):
            if event.is_cancelled:
                log.info(f"qr.{op}.cancelled", extra=fields(**where, instances=len(items), sent=n, **subops.counts()))
                subops.yielded = n  # the rest are reported remaining by pynetdicom
                yield statuses.CANCEL, None
                return
            prepared = prepare_instance(self.store.root / item.path, item, accepted(item.sop_class_uid))
            subops.actions[prepared.action] += 1
            if prepared.reason:
                log.warning(f"qr.{op}.unsendable", extra=fields(**where, sop_instance_uid=item.sop_instance_uid,
                                                                 series_uid=item.series_uid, reason=prepared.reason))
            subops.yielded = n + 1
            yield statuses.PENDING, prepared.dataset

    def on_get(self, event: evt.Event) -> Iterator[Any]:
        started = time.monotonic()
        calling = event.assoc.requestor.ae_title
        model = _MODELS.get(str(event.request.AffectedSOPClassUID), "STUDY")
        items, failure, why, level = self._items(event, model)
        where = dict(calling_ae=calling, model=model.lower(), query_level=level)
        if failure is not None:
            log.warning("qr.get.rejected", extra=fields(**where, reason=why, status=f"0x{int(failure.Status):04X}"))
            yield 1  # pynetdicom takes a final status only after the number of sub-operations
            yield failure, None
            return
        log.info("qr.get", extra=fields(**where, instances=len(items),
                                        series=len({i.series_uid for i in items}),
                                        derived=sum(i.origin == "derived" for i in items)))
        if not items:
            log.info("qr.get.done", extra=fields(**where, instances=0, completed=0, warning=0, failed=0))
            yield 0
            return
        assoc = event.assoc
        no_delay(assoc)
        subops = _SubOps()

        def accepted(sop_class: str) -> list[UID]:
            return scu.accepted_syntaxes(assoc, sop_class)

        assoc.bind(evt.EVT_DIMSE_RECV, subops.on_dimse_recv)
        try:
            yield len(items)
            yield from self._sub_operations(event, items, subops, accepted, "get", where)
        finally:
            assoc.unbind(evt.EVT_DIMSE_RECV, subops.on_dimse_recv)
            self._audit_retrieve(event, items, subops, None)
            log.info("qr.get.done", extra=fields(**where, instances=len(items), **subops.counts(),
                                                 sent_as=dict(subops.actions),
                                                 duration_ms=round((time.monotonic() - started) * 1000)))

    def on_move(self, event: evt.Event) -> Iterator[Any]:
        started = time.monotonic()
        calling = event.assoc.requestor.ae_title
        model = _MODELS.get(str(event.request.AffectedSOPClassUID), "STUDY")
        dest_ae = (event.move_destination or "").strip()
        where: dict[str, Any] = dict(calling_ae=calling, model=model.lower(), destination_ae=dest_ae)
        dest = self._destination(dest_ae)
        if dest is None:
            log.warning("qr.move.unknown_destination", extra=fields(
                **where, status=statuses.hex_status(statuses.MOVE_DESTINATION_UNKNOWN),
                known=[d.ae_title for d in self._move_destinations()],
                action="add the AE title with host and port under [[destinations]] in the node config "
                       "(and its name to query_retrieve.move_destinations when that list is set)"))
            yield None, None  # pynetdicom answers 0xA801
            return
        where["destination"] = dest.name
        try:
            self._connect_args(dest)  # a TLS destination with unusable certificate files: say so now
        except tls.TLSConfigError as exc:
            log.error("qr.move.failed", extra=fields(**where, status=statuses.hex_status(statuses.MOVE_DESTINATION_UNKNOWN),
                                                     reason=f"TLS configuration of destination {dest.name!r}: {exc}"))
            yield None, None
            return
        items, failure, why, level = self._items(event, model)
        where["query_level"] = level
        if failure is not None:
            log.warning("qr.move.rejected", extra=fields(**where, reason=why, status=f"0x{int(failure.Status):04X}"))
            # pynetdicom sends a final status only after it associated with the destination: an
            # association that sends nothing is the only way to answer 0xA900 / 0xA701 at all
            yield dest.host, dest.port, self._connect_args(dest, contexts=_ANY_STORAGE_CONTEXTS)
            yield 1
            yield failure, None
            return
        log.info("qr.move", extra=fields(**where, instances=len(items), series=len({i.series_uid for i in items}),
                                         derived=sum(i.origin == "derived" for i in items)))
        subops = _SubOps()
        if not items:
            log.info("qr.move.done", extra=fields(**where, instances=0, completed=0, warning=0, failed=0))
            yield dest.host, dest.port
            yield 0
            return

        def accepted(sop_class: str) -> list[UID]:
            if subops.assoc is None:
                return []
            return scu.accepted_syntaxes(subops.assoc, sop_class)

        connect = self._connect_args(dest, contexts=storage_contexts(items),
                                     evt_handlers=[(evt.EVT_ESTABLISHED, subops.on_established),
                                                   (evt.EVT_DIMSE_RECV, subops.on_dimse_recv)])
        yield dest.host, dest.port, connect
        try:
            yield len(items)
            yield from self._sub_operations(event, items, subops, accepted, "move", where)
        finally:
            if subops.assoc is None:
                reason = ("could not associate with the destination (down, refused, or rejected our AE title);"
                          " check its host/port in the config and that it accepts this node's AE title")
                context = connect.get("tls_args", (None,))[0]
                if dest.tls is not None and getattr(context, "last_failure", None):
                    reason = tls.describe_failure(context.last_failure, dest.host, dest.tls)
                log.error("qr.move.failed", extra=fields(
                    **where, host=dest.host, port=dest.port, tls=dest.tls is not None,
                    status=statuses.hex_status(statuses.MOVE_DESTINATION_UNKNOWN), reason=reason))
            else:
                self._audit_retrieve(event, items, subops, audit.Participant(
                    dest.ae_title, dest.host, False, audit.DESTINATION_ROLE))
                log.info("qr.move.done", extra=fields(**where, instances=len(items), **subops.counts(),
                                                      sent_as=dict(subops.actions),
                                                      duration_ms=round((time.monotonic() - started) * 1000)))
