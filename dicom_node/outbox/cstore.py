"""The sender for ``kind = "dicom"`` destinations: one association per batch, one C-STORE per instance.

Presentation contexts: each file's own transfer syntax, plus both
uncompressed little-endian syntaxes for uncompressed data (pynetdicom
re-encodes between them), at most 128 per association; items beyond that
wait for the next batch.  Every C-STORE response status is checked.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context, evt
from pynetdicom.status import code_to_category

from dicom_node.config import DicomDestination, NodeSettings
from dicom_node.logs import fields
from dicom_node.net import scu, tls
from dicom_node.net.statuses import hex_status
from dicom_node.outbox.senders import Outcome, Work, outcome_for_status

log = logging.getLogger("dicom_node.outbox.cstore")


def _context_key(sop_class: str, ts: UID) -> tuple[str, str]:
    """Files sharing a key share a presentation context.

    Uncompressed little-endian data (explicit, implicit, deflated) can be
    re-encoded by pynetdicom into whichever of them the peer accepts, so all of
    it shares one context; a compressed or big-endian syntax needs its own.
    """
    if not ts.is_compressed and ts.is_little_endian:
        return sop_class, "le"
    return sop_class, str(ts)


class CStoreSender:
    def __init__(self, destination: DicomDestination, settings: NodeSettings, calling_ae: str) -> None:
        self.dest = destination
        self.settings = settings
        self.calling_ae = calling_ae

    def send(self, batch: list[Work], cancel: threading.Event | None) -> Iterator[Outcome]:
        dest = self.dest
        # Read each file's transfer syntax; unreadable files are dead at once (retrying cannot help).
        readable: list[tuple[Work, UID]] = []
        for w in batch:
            try:
                meta = read_file_meta_info(w.path)
                readable.append((w, UID(meta.get("TransferSyntaxUID") or ImplicitVRLittleEndian)))
            except (OSError, InvalidDicomError) as exc:
                yield Outcome(w, "permanent", None, f"cannot read {w.path}: {exc.__class__.__name__}: {exc}")

        contexts: dict[tuple[str, str], list[str]] = {}
        sendable: list[Work] = []
        for w, ts in readable:
            key = _context_key(w.sop_class_uid, ts)
            if key not in contexts:
                if len(contexts) >= scu.MAX_CONTEXTS:
                    yield Outcome(w, "untried")
                    continue
                contexts[key] = []
            syntaxes = contexts[key]
            if str(ts) not in syntaxes:
                syntaxes.insert(0 if key[1] == "le" else len(syntaxes), str(ts))
            sendable.append(w)
        if not sendable:
            return
        requested = []
        for (sop_class, kind), syntaxes in contexts.items():
            if kind == "le":
                syntaxes += [ts for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) if ts not in syntaxes]
            requested.append(build_context(sop_class, syntaxes))

        where = dict(destination=dest.name, ae_title=dest.ae_title, host=dest.host, port=dest.port,
                     tls=dest.tls is not None)
        try:
            tls_arguments = scu.tls_args(dest)
        except tls.TLSConfigError as exc:
            log.error("outbox.association.failed", extra=fields(**where, items=len(sendable), reason=str(exc)))
            yield from (Outcome(w, "failed", None, f"TLS configuration: {exc}") for w in sendable)
            return
        ae = scu.requestor_ae(self.calling_ae, self.settings.node.network_timeout_s)
        try:
            assoc = ae.associate(dest.host, dest.port, contexts=requested, ae_title=dest.ae_title,
                                 evt_handlers=[(evt.EVT_CONN_OPEN, scu.on_open_no_delay)], tls_args=tls_arguments)
        except Exception as exc:  # noqa: BLE001 - bad address, DNS, socket errors: all mean "not reached"
            log.error("outbox.association.failed", extra=fields(**where, items=len(sendable), reason=str(exc)))
            yield from (Outcome(w, "failed", None, f"association failed: {exc}") for w in sendable)
            return
        if not assoc.is_established:
            reason = scu.association_failure(assoc, dest, tls_arguments)
            log.error("outbox.association.failed", extra=fields(**where, items=len(sendable), reason=reason))
            yield from (Outcome(w, "failed", None, reason) for w in sendable)
            return

        statuses: dict[str, int] = {}
        counts = {"sent": 0, "retried": 0, "dead": 0}
        try:
            for i, w in enumerate(sendable):
                if cancel is not None and cancel.is_set():
                    yield from (Outcome(x, "untried") for x in sendable[i:])
                    break
                if not assoc.is_established:
                    reason = "association aborted by the peer or the network" if assoc.is_aborted else "association closed"
                    log.error("outbox.association.failed", extra=fields(**where, items=len(sendable) - i, reason=reason))
                    yield from (Outcome(x, "failed", None, reason) for x in sendable[i:])
                    break
                outcome = self._send_one(assoc, w)
                if outcome.status is not None:
                    code = str(hex_status(outcome.status))
                    statuses[code] = statuses.get(code, 0) + 1
                counts["sent" if outcome.result == "sent" else "retried"] += 1
                yield outcome
        finally:
            if assoc.is_established:
                assoc.release()
        log.info("outbox.association.done", extra=fields(**where, **counts, statuses=statuses))

    @staticmethod
    def _send_one(assoc: Any, w: Work) -> Outcome:
        try:
            ds = pydicom.dcmread(w.path)
        except (OSError, InvalidDicomError) as exc:
            return Outcome(w, "permanent", None, f"cannot read {w.path}: {exc.__class__.__name__}: {exc}")
        try:
            rsp = assoc.send_c_store(ds)
        except ValueError as exc:  # no accepted context for this SOP class / transfer syntax, or encoding failed
            return Outcome(w, "failed", None, f"not sent: {exc}")
        except Exception as exc:  # noqa: BLE001 - association gone, encoding errors ...: a failed attempt
            return Outcome(w, "failed", None, f"not sent: {exc.__class__.__name__}: {exc}")
        status = rsp.get("Status") if rsp is not None else None
        if status is None:
            return outcome_for_status(w, None)
        comment = rsp.get("ErrorComment")
        if code_to_category(int(status)) in ("Success", "Warning"):
            comment = None
        return outcome_for_status(w, int(status), str(comment) if comment else None)
