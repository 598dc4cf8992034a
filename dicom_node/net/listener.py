"""The node's DICOM listener: Verification and Storage SCP, streamed to disk.

A C-STORE is answered Success only after :meth:`Store.store_received` has
returned, i.e. the instance is fsynced, renamed into place and indexed
(DESIGN.md, durability rule).  Everything that can be wrong with an incoming
instance is checked before that, and each rejection is logged with its reason
and the exact DIMSE status the sender sees, so an operator can tell a
misbehaving modality from a full disk.

Datasets are never held whole in memory: pynetdicom writes each incoming
dataset to a temporary file while it arrives; the handler copies it behind
our own File Meta Information into the store's ``tmp`` folder and hands that
file to the store.

Other services on the same AE/port (Q/R, see ``qr.py``) plug in through
``StorageServer(extra_handlers=..., configure=...)``.

Who may associate is decided by :class:`dicom_node.access.AccessPolicy` on
EVT_REQUESTED, before pynetdicom negotiates anything; a refused caller gets
the A-ASSOCIATE-RJ result/source/reason named in ``access.py`` and one
``scp.association.rejected`` log line with the rule and the reason.  With
``[node.tls] enabled`` the same AE listens a second time, with TLS, on its own
port (``tls.py``); ``node.plain_enabled = false`` leaves only that one.
"""

from __future__ import annotations

import logging
import shutil
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.pixels import pixel_array
from pydicom.uid import UID
from pynetdicom import AE, _config, evt
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import (
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
    Verification,
)

from dicom_node import tls
from dicom_node.access import REJECT_INTERNAL_ERROR, AccessPolicy, Decision
from dicom_node.config import NodeSettings
from dicom_node.logs import fields
from dicom_node.store import InvalidInstanceError, Store, StoreError, check_uid

log = logging.getLogger("dicom_node.scp")

# -- conformance: what the node accepts (docs/conformance statement is checked against these) --

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

#: transfer syntaxes accepted for Verification
VERIFICATION_TRANSFER_SYNTAXES: tuple[str, ...] = (
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.2",
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

# -- DIMSE statuses the Storage SCP answers with (PS3.4 Annex B.2.3) --

STATUS_SUCCESS = 0x0000
#: Refused: Out of Resources — disk full, database unavailable; the sender should retry later
STATUS_OUT_OF_RESOURCES = 0xA700
#: Error: Data Set does not match SOP Class — missing/mismatched UIDs
STATUS_DATASET_MISMATCH = 0xA900
#: Error: Cannot understand — unparseable dataset, undecodable pixel data, unexpected failure
STATUS_CANNOT_UNDERSTAND = 0xC000

_PIXEL_DATA = 0x7FE00010


@dataclass(frozen=True)
class Rejection:
    """Why an instance is refused and what the sender is told."""

    status: int
    reason: str
    detail: str = ""


def _expected_pixel_bytes(ds: Any) -> int:
    rows, cols = int(ds.Rows), int(ds.Columns)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.BitsAllocated)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if str(ds.get("PhotometricInterpretation", "")).strip() == "YBR_FULL_422":
        # native YBR_FULL_422 stores two samples per pixel pair (PS3.3 C.7.6.3.1.2)
        samples = 2
    total_bits = rows * cols * samples * bits * frames
    return (total_bits + 7) // 8


def validate_instance(path: Path, affected_sop_class: str, affected_sop_instance: str) -> Rejection | None:
    """Check a received Part-10 file before it is stored; ``None`` means it may be stored.

    Reads only the header (large elements are deferred); compressed pixel data
    is checked by decoding its first frame with the installed plugins, so a
    series that could never be fused is refused at the door, not at 3 a.m. in
    the pipeline.
    """
    path = Path(path)
    try:
        ds = dcmread(path, stop_before_pixels=True)
        tsyntax = UID(str(ds.file_meta.TransferSyntaxUID))
        # force lazy decoding of what we use now, so parse errors surface here
        values = {kw: ds.get(kw) for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")}
    except Exception as exc:
        return Rejection(STATUS_CANNOT_UNDERSTAND, "dataset cannot be parsed", f"{type(exc).__name__}: {exc}")

    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        try:
            check_uid(values[kw], kw)
        except InvalidInstanceError as exc:
            return Rejection(STATUS_DATASET_MISMATCH, str(exc))
    if str(values["SOPClassUID"] or "").strip() != str(affected_sop_class):
        return Rejection(STATUS_DATASET_MISMATCH, "SOPClassUID differs from the command's Affected SOP Class UID")
    if str(values["SOPInstanceUID"]).strip() != str(affected_sop_instance):
        return Rejection(STATUS_DATASET_MISMATCH, "SOPInstanceUID differs from the command's Affected SOP Instance UID")

    try:
        return _check_pixels(path, ds, tsyntax)
    except Exception as exc:
        return Rejection(STATUS_CANNOT_UNDERSTAND, "pixel data undecodable", f"{type(exc).__name__}: {exc}")


def _check_pixels(path: Path, header: Any, tsyntax: UID) -> Rejection | None:
    if tsyntax.is_encapsulated:
        if not _pixel_data_follows(path):
            return None
        try:
            pixel_array(path, index=0)
        except Exception as exc:
            return Rejection(STATUS_CANNOT_UNDERSTAND, "pixel data undecodable", f"{type(exc).__name__}: {exc}")
        return None

    # Native: compare the declared length (read without loading the value) with the geometry.
    ds = dcmread(path, defer_size=1024)
    raw = ds.get_item(_PIXEL_DATA, keep_deferred=True)
    if raw is None:
        return None
    length = getattr(raw, "length", None)
    if length is None:  # small enough to have been read: it is a DataElement
        length = len(raw.value or b"")
    if length == 0xFFFFFFFF:
        return Rejection(STATUS_CANNOT_UNDERSTAND, "pixel data undecodable",
                         "native pixel data with undefined length")
    expected = _expected_pixel_bytes(header)
    if length < expected:
        return Rejection(STATUS_CANNOT_UNDERSTAND, "pixel data undecodable",
                         f"pixel data has {length} bytes, the image geometry needs {expected}")
    value_tell = getattr(raw, "value_tell", None)
    if not tsyntax.is_deflated and value_tell is not None and value_tell + length > path.stat().st_size:
        return Rejection(STATUS_CANNOT_UNDERSTAND, "pixel data undecodable",
                         "pixel data is truncated (the file ends before its declared length)")
    return None


def _pixel_data_follows(path: Path) -> bool:
    """Whether top-level Pixel Data follows the header, without reading it (encapsulated = explicit LE)."""
    with open(path, "rb") as fp:
        dcmread(fp, stop_before_pixels=True)
        tag = fp.read(4)
    return len(tag) == 4 and (int.from_bytes(tag[:2], "little") << 16 | int.from_bytes(tag[2:], "little")) == _PIXEL_DATA


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
        write_file_meta_info(out, meta, enforce_standard=True)
        try:
            src_path = event.dataset_path
        except AttributeError:
            src_path = None
        if src_path is None:
            # chunked receiving was switched off by someone else: the bytes are in memory already
            out.write(event.request.DataSet.getvalue())
            return
        _, offset = split_dataset(Path(src_path))
        with open(src_path, "rb") as src:
            src.seek(offset)
            shutil.copyfileobj(src, out, 1 << 20)


class _AssocStats:
    __slots__ = ("calling_ae", "stored", "duplicates", "rejected")

    def __init__(self, calling_ae: str) -> None:
        self.calling_ae = calling_ae
        self.stored = self.duplicates = self.rejected = 0

    def as_fields(self) -> dict[str, Any]:
        return {"calling_ae": self.calling_ae, "stored": self.stored, "duplicates": self.duplicates,
                "rejected": self.rejected}


class _StartMethod:
    """Lets ``start`` be called on the class, ``StorageServer.start(cfg, store)``, or on an instance."""

    def __get__(self, obj: "StorageServer | None", cls: type) -> Callable[..., "StorageServer"]:
        if obj is None:
            return lambda cfg, store, **kwargs: cls(cfg, store, **kwargs)._start()
        return obj._start


HandlerList = Sequence[tuple[Any, Callable[..., Any]]]


class StorageServer:
    """A running (or ready-to-start) Verification + Storage SCP bound to one address."""

    def __init__(self, cfg: NodeSettings, store: Store, *, extra_handlers: HandlerList = (),
                 configure: Callable[[AE], None] | None = None) -> None:
        self.cfg = cfg
        self.store = store
        self.policy = AccessPolicy.from_settings(cfg)
        self._extra_handlers = list(extra_handlers)
        self._configure = configure
        #: running listeners by name: "plain" and/or "tls"
        self._servers: dict[str, Any] = {}
        self._ae: AE | None = None
        self._stats: dict[int, _AssocStats] = {}
        self._decisions: dict[int, Decision] = {}
        self._lock = threading.Lock()

    # -- lifecycle --------------------------------------------------------------------

    def build_ae(self) -> AE:
        """The configured AE (contexts, timeouts), not yet listening.

        Access control is not configured on the AE: :meth:`_on_requested`
        decides (``access.py``).  pynetdicom's own calling-AE check is kept as
        a second line with the same node list; its association ceiling is set
        above ours, because it also counts associations it is still tearing
        down after a rejection and would refuse callers the policy admits.
        """
        node = self.cfg.node
        ae = AE(ae_title=node.ae_title)
        ae.add_supported_context(Verification, list(VERIFICATION_TRANSFER_SYNTAXES))
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, list(STORAGE_TRANSFER_SYNTAXES))
        ae.require_calling_aet = list(node.allowed_callers)
        ae.require_called_aet = False  # pipelines add called AE titles; the policy checks them
        ae.maximum_associations = 2 * node.max_associations + 10
        ae.network_timeout = node.network_timeout_s
        ae.acse_timeout = node.network_timeout_s
        ae.dimse_timeout = node.network_timeout_s
        if self._configure is not None:
            self._configure(ae)
        return ae

    def _start(self) -> "StorageServer":
        """Listen in background threads; returns at once. Raises OSError when a port is taken."""
        # pynetdicom's process-wide switch (the only global this module touches): incoming
        # C-STORE datasets are written to a temporary file as they arrive instead of memory.
        _config.STORE_RECV_CHUNKED_DATASET = True
        self.store.ensure_schema()
        node = self.cfg.node
        context = (tls.server_context(node.tls, on_failure=tls.log_failures(),
                                      handshake_timeout_s=min(node.network_timeout_s, tls.HANDSHAKE_TIMEOUT_S))
                   if node.tls.enabled else None)  # before listening: a bad key file fails the start
        self._ae = self.build_ae()
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
            *self._extra_handlers,
        ]
        listeners: list[tuple[str, int, ssl.SSLContext | None]] = []
        if node.plain_enabled:
            listeners.append(("plain", node.port, None))
        if context is not None:
            listeners.append(("tls", node.tls.port, context))
        try:
            for name, port, ssl_context in listeners:
                try:
                    self._servers[name] = self._ae.start_server((node.host, port), block=False,
                                                                evt_handlers=handlers, ssl_context=ssl_context)
                except OSError as exc:
                    key = "[node] port" if name == "plain" else "[node.tls] port"
                    raise OSError(f"cannot listen on {node.host}:{port} ({name}): {exc}; "
                                  f"pick a free port in {key} or stop the other listener") from exc
        except BaseException:
            self.stop()
            raise
        log.info("scp.started", extra=fields(
            ae_title=node.ae_title, host=node.host, port=self._bound("plain"), tls_port=self._bound("tls"),
            called_ae_titles=list(self.policy.called_ae_titles), allowed_callers=len(node.allowed_callers),
            allowed_addresses=len(node.allowed_addresses), max_associations=node.max_associations))
        return self

    #: ``server.start()`` on an instance, or ``StorageServer.start(cfg, store)`` on the class
    #: (both styles are used in the node); either way it returns the running server.
    start = _StartMethod()

    def _bound(self, name: str) -> int | None:
        server = self._servers.get(name)
        return None if server is None else int(server.server_address[1])

    @property
    def port(self) -> int:
        """The bound plain port (the real one when the config asked for port 0); the TLS port when plain is off."""
        if not self._servers:
            raise RuntimeError("server not started")
        port = self._bound("plain")
        return port if port is not None else int(self._bound("tls"))  # type: ignore[arg-type]

    @property
    def tls_port(self) -> int | None:
        """The bound DICOM TLS port, None when TLS is not enabled."""
        if not self._servers:
            raise RuntimeError("server not started")
        return self._bound("tls")

    def stop(self) -> None:
        """Stop listening and abort open associations (their unanswered stores are retried by the senders)."""
        servers, self._servers = self._servers, {}
        for server in servers.values():
            server.shutdown()
        if servers:
            log.info("scp.stopped", extra=fields(ae_title=self.cfg.node.ae_title))
        if self._ae is not None:
            self._ae.shutdown()
            self._ae = None

    def __enter__(self) -> "StorageServer":
        return self if self._servers else self._start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- association events -----------------------------------------------------------

    def _stats_for(self, assoc: Any) -> _AssocStats:
        with self._lock:
            stats = self._stats.get(id(assoc))
            if stats is None:
                stats = self._stats[id(assoc)] = _AssocStats(assoc.requestor.ae_title)
            return stats

    def _pop_stats(self, assoc: Any) -> _AssocStats:
        with self._lock:
            return self._stats.pop(id(assoc), None) or _AssocStats(assoc.requestor.ae_title)

    def _on_requested(self, event: evt.Event) -> None:
        """Access control: accept, or send the policy's A-ASSOCIATE-RJ before anything is negotiated."""
        assoc = event.assoc
        try:
            rq = assoc.requestor.primitive
            decision = self.policy.decide(rq.calling_ae_title, rq.called_ae_title, assoc.requestor.address,
                                          _open_associations(assoc))
        except Exception as exc:  # a bug must not let a caller in unchecked: fail closed, transient
            log.exception("scp.access.error", extra=fields(address=assoc.requestor.address))
            decision = Decision(REJECT_INTERNAL_ERROR, f"access decision failed: {type(exc).__name__}", "internal_error")
        if decision.accepted:
            return
        with self._lock:
            self._decisions[id(assoc)] = decision
        assoc.acse.send_reject(*decision.rejection)
        # what pynetdicom does after its own rejections: tell the handlers, then wait for the
        # DUL to deliver the A-ASSOCIATE-RJ and close, before the server drops the socket
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()

    def _on_accepted(self, event: evt.Event) -> None:
        stats = self._stats_for(event.assoc)
        log.info("scp.association.accepted", extra=fields(calling_ae=stats.calling_ae,
                                                          called_ae=_called_ae(event.assoc),
                                                          address=event.assoc.requestor.address,
                                                          tls=_is_tls(event.assoc),
                                                          contexts=len(event.assoc.accepted_contexts)))

    def _on_rejected(self, event: evt.Event) -> None:
        assoc = event.assoc
        with self._lock:
            decision = self._decisions.pop(id(assoc), None)
        rj = getattr(assoc.acceptor, "primitive", None)
        result = getattr(rj, "result", None)
        source = getattr(rj, "result_source", None)
        reason = getattr(rj, "diagnostic", None)
        log.warning("scp.association.rejected", extra=fields(
            calling_ae=assoc.requestor.ae_title or getattr(assoc.requestor.primitive, "calling_ae_title", None),
            called_ae=_called_ae(assoc), address=assoc.requestor.address, tls=_is_tls(assoc),
            rule=decision.rule if decision else "pynetdicom",
            reason=decision.why if decision else "rejected by pynetdicom's own checks",
            result=result, source=source, diagnostic=reason))

    def _on_released(self, event: evt.Event) -> None:
        log.info("scp.association.released", extra=fields(**self._pop_stats(event.assoc).as_fields()))

    def _on_aborted(self, event: evt.Event) -> None:
        log.warning("scp.association.aborted", extra=fields(**self._pop_stats(event.assoc).as_fields()))

    def _on_conn_close(self, event: evt.Event) -> None:
        with self._lock:  # released/aborted already popped it; this catches connections that just vanished
            self._stats.pop(id(event.assoc), None)

    def _on_echo(self, event: evt.Event) -> int:
        log.debug("scp.echo", extra=fields(calling_ae=event.assoc.requestor.ae_title))
        return STATUS_SUCCESS

    # -- C-STORE ----------------------------------------------------------------------

    def _on_store(self, event: evt.Event) -> int:
        calling_ae = event.assoc.requestor.ae_title
        sop_uid = str(event.request.AffectedSOPInstanceUID)
        stats = self._stats_for(event.assoc)
        try:
            status = self._store(event, calling_ae, sop_uid, stats)
        except Exception:
            # A bug must cost one instance, never the listener.
            log.exception("scp.store.error", extra=fields(sop_instance_uid=sop_uid, calling_ae=calling_ae,
                                                          status=STATUS_CANNOT_UNDERSTAND))
            status = STATUS_CANNOT_UNDERSTAND
        if status != STATUS_SUCCESS:
            stats.rejected += 1
        return status

    def _reject(self, rej: Rejection, sop_uid: str, calling_ae: str) -> int:
        # detail is an exception text about tags and lengths; capped so a decoder cannot flood the log
        log.warning("scp.store.rejected", extra=fields(reason=rej.reason, detail=rej.detail[:300], sop_instance_uid=sop_uid,
                                                       calling_ae=calling_ae, status=f"0x{rej.status:04X}"))
        return rej.status

    def _store(self, event: evt.Event, calling_ae: str, sop_uid: str, stats: _AssocStats) -> int:
        tmp = self.store.new_tmp_path(".dcm")
        try:
            try:
                write_part10(event, tmp, calling_ae)
            except OSError as exc:
                return self._reject(Rejection(STATUS_OUT_OF_RESOURCES, "cannot write temporary file",
                                              f"{exc}; check free space under {self.store.root}"), sop_uid, calling_ae)
            rejection = validate_instance(tmp, str(event.request.AffectedSOPClassUID), sop_uid)
            if rejection is not None:
                return self._reject(rejection, sop_uid, calling_ae)
            try:
                result = self.store.store_received(tmp, calling_ae, called_ae=_called_ae(event.assoc))
            except StoreError as exc:
                return self._reject(Rejection(STATUS_OUT_OF_RESOURCES, "store failed", str(exc)), sop_uid, calling_ae)
            except InvalidInstanceError as exc:
                return self._reject(Rejection(STATUS_DATASET_MISMATCH, str(exc)), sop_uid, calling_ae)
        finally:
            tmp.unlink(missing_ok=True)  # consumed on success; removed on every other path
        if result.duplicate:
            stats.duplicates += 1
            log.info("scp.store.duplicate", extra=fields(sop_instance_uid=sop_uid, series_uid=result.series_uid,
                                                         calling_ae=calling_ae))
        else:
            stats.stored += 1
            log.debug("scp.store.ok", extra=fields(sop_instance_uid=sop_uid, series_uid=result.series_uid,
                                                   calling_ae=calling_ae))
        return STATUS_SUCCESS


def _called_ae(assoc: Any) -> str | None:
    """The Called AE Title the peer asked for (the node's or a pipeline's), as sent, without padding."""
    primitive = getattr(assoc.requestor, "primitive", None)
    title = getattr(primitive, "called_ae_title", None)
    return (title.strip() or None) if isinstance(title, str) else None


def _is_tls(assoc: Any) -> bool:
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    return isinstance(sock, ssl.SSLSocket)


def _open_associations(assoc: Any) -> int:
    """Associations this AE has accepted or is negotiating, ``assoc`` not included.

    Ones already rejected, released or aborted whose threads are still
    winding down do not count: they hold no slot a caller could use.
    """
    return sum(1 for a in assoc.ae.active_associations
               if a is not assoc and a.is_acceptor and not (a.is_rejected or a.is_released or a.is_aborted))


def start(cfg: NodeSettings, store: Store, **kwargs: Any) -> StorageServer:
    """Start the Verification + Storage SCP in the background and return it (``.port``, ``.stop()``)."""
    return StorageServer(cfg, store, **kwargs).start()
