"""The node's DICOM listener: one AE on the plain port and/or the TLS port, with services plugged in.

The listener owns the association: who may associate (decided by
:class:`dicom_node.net.access.AccessPolicy` on EVT_REQUESTED, before
pynetdicom negotiates anything; a refused caller gets the A-ASSOCIATE-RJ named
in ``access.py`` and one ``scp.association.rejected`` log line with the rule
and the reason), Verification (C-ECHO), and the association's log lines.
What is done *on* an association lives in services (:class:`Service`): the
Storage SCP (``storage_scp.py``) and the Query/Retrieve SCP
(``query_retrieve.py``).  :func:`node_listener` builds the listener a node runs.

With ``[node.tls] enabled`` the same AE listens a second time, with TLS, on
its own port (``tls.py``); ``node.plain_enabled = false`` leaves only that one.
Before any of this, ``server.py`` decides what a bare connection gets: peers
outside ``node.allowed_addresses`` are closed at accept, TLS handshakes run in
the connection's own thread, and silent connections are closed after
``node.artim_timeout_s`` without ever holding an association slot.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from pynetdicom import AE, _config, evt

from dicom_node import events
from dicom_node.config import NodeSettings
from dicom_node.index.store import Store
from dicom_node.logs import fields
from dicom_node.net import statuses, tls
from dicom_node.net.access import REJECT_INTERNAL_ERROR, AccessPolicy, Decision
from dicom_node.net.association import Verification, called_ae, is_tls, no_delay, open_associations
from dicom_node.net.server import NodeAssociationServer

log = logging.getLogger("dicom_node.net.listener")

#: transfer syntaxes accepted for Verification
VERIFICATION_TRANSFER_SYNTAXES: tuple[str, ...] = (
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.2",
)

#: the Maximum Length we announce for the P-DATA PDUs we receive: 128 KiB, the most DCMTK sends
#: (ASC_MAXIMUMPDUSIZE), instead of pynetdicom's 16 KiB.  A 516 KiB CT slice then comes in 5 PDUs, not 33,
#: and each PDU costs pynetdicom a turn of its reactor (docs/ingest.md).  It bounds nothing on our side:
#: pynetdicom reads whatever length a PDU declares, so a hostile peer gains nothing from a larger value.
RECEIVE_PDU_BYTES = 128 * 1024

#: an event and its handler, as ``AE.start_server(evt_handlers=...)`` takes them
Handler = tuple[evt.EventType, Callable[..., Any]]


class Service(Protocol):
    """What a service on the listener provides (Storage SCP, Q/R SCP)."""

    def configure(self, ae: AE) -> None:
        """Add the presentation contexts (and roles) the service answers."""

    def handlers(self) -> list[Handler]:
        """pynetdicom event handlers, e.g. ``[(evt.EVT_C_STORE, self.on_store)]``."""
        ...


class Listener:
    """A running (or ready-to-start) AE bound to the configured address(es)."""

    def __init__(self, cfg: NodeSettings, services: Sequence[Service]) -> None:
        self.cfg = cfg
        self.services = list(services)
        self.policy = AccessPolicy.from_settings(cfg)
        #: running listeners by name: "plain" and/or "tls"
        self._servers: dict[str, Any] = {}
        self._ae: AE | None = None
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
        Services configure the AE in order: the Q/R service, which adds
        storage contexts with roles for C-GET, must come after the storage one.
        """
        node = self.cfg.node
        ae = AE(ae_title=node.ae_title)
        ae.add_supported_context(Verification, list(VERIFICATION_TRANSFER_SYNTAXES))
        ae.require_calling_aet = list(node.allowed_callers)
        ae.require_called_aet = False  # pipelines add called AE titles; the policy checks them
        # pynetdicom counts every acceptor thread, silent ones included; ours counts only callers that
        # sent an A-ASSOCIATE-RQ (association.open_associations), so pynetdicom's is only a backstop
        ae.maximum_associations = 10 * node.max_associations + 1000
        ae.network_timeout = node.network_timeout_s
        # on the acceptor this bounds the wait for the A-ASSOCIATE-RQ and PS3.8's ARTIM timer
        ae.acse_timeout = node.artim_timeout_s
        ae.dimse_timeout = node.network_timeout_s
        ae.maximum_pdu_size = RECEIVE_PDU_BYTES
        for service in self.services:
            service.configure(ae)
        return ae

    def start(self) -> Listener:
        """Listen in background threads; returns at once. Raises OSError when a port is taken."""
        # pynetdicom's process-wide switch (the only global this module touches): incoming
        # C-STORE datasets are written to a temporary file as they arrive instead of memory.
        _config.STORE_RECV_CHUNKED_DATASET = True
        node = self.cfg.node
        context = (tls.server_context(node.tls, on_failure=tls.log_failures(), handshake_timeout_s=None)
                   if node.tls.enabled else None)  # before listening: a bad key file fails the start
        self._ae = self.build_ae()
        handlers: list[evt.EventHandlerType] = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
        ]
        for service in self.services:
            handlers.extend(service.handlers())
        listeners: list[tuple[str, int, ssl.SSLContext | None]] = []
        if node.plain_enabled:
            listeners.append(("plain", node.port, None))
        if context is not None:
            listeners.append(("tls", node.tls.port, context))
        try:
            for name, port, ssl_context in listeners:
                try:
                    self._servers[name] = self._serve(self._ae, (node.host, port), handlers, ssl_context)
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

    def _serve(self, ae: AE, address: tuple[str, int], handlers: list[evt.EventHandlerType],
               tls_context: ssl.SSLContext | None) -> NodeAssociationServer:
        """``ae.start_server(block=False)`` with the node's accept rules (``server.py``): no handshake in the accepting thread."""
        server: NodeAssociationServer = ae.make_server(  # type: ignore[assignment]  # returns server_class
            address, evt_handlers=handlers, server_class=NodeAssociationServer,
            admit=self.policy.admits_address, artim_timeout_s=self.cfg.node.artim_timeout_s, tls_context=tls_context)
        thread = threading.Thread(target=server.serve_forever, name=f"AcceptorServer@{address[1]}", daemon=True)
        thread.start()
        ae._servers.append(server)  # what start_server does: ae.shutdown() stops it with the others
        return server

    def _bound(self, name: str) -> int | None:
        server = self._servers.get(name)
        return None if server is None else int(server.server_address[1])

    @property
    def port(self) -> int:
        """The bound plain port (the real one when the config asked for port 0); the TLS port when plain is off."""
        if not self._servers:
            raise RuntimeError("listener not started")
        port = self._bound("plain")
        if port is None:
            port = self._bound("tls")
        assert port is not None  # at least one listener runs (config validation)
        return port

    @property
    def tls_port(self) -> int | None:
        """The bound DICOM TLS port, None when TLS is not enabled."""
        if not self._servers:
            raise RuntimeError("listener not started")
        return self._bound("tls")

    def stop_accepting(self) -> None:
        """Close the listening sockets: no new association; open ones go on (the first step of a clean stop)."""
        servers, self._servers = self._servers, {}
        for server in servers.values():
            server.shutdown()
        if servers:
            log.info("scp.accepting.stopped", extra=fields(ae_title=self.cfg.node.ae_title,
                                                           open_associations=self.open_associations()))

    def open_associations(self) -> int:
        return len(self._ae.active_associations) if self._ae is not None else 0

    def drain(self, timeout: float) -> int:
        """Wait up to ``timeout`` s for open associations to end by themselves; returns how many are left.

        Then waits (at most 2 s more) for C-STOREs being written to finish, so
        what is aborted afterwards is never an instance half-way to the store.
        """
        deadline = time.monotonic() + timeout
        while self.open_associations() and time.monotonic() < deadline:
            time.sleep(0.05)
        for service in self.services:
            wait_idle = getattr(service, "wait_idle", None)
            if wait_idle is not None:
                wait_idle(2.0)
        return self.open_associations()

    def apply_settings(self, cfg: NodeSettings) -> None:
        """Take a reloaded configuration: access lists, association limit, Q/R settings (ports stay as bound)."""
        self.cfg = cfg
        self.policy = AccessPolicy.from_settings(cfg)
        if self._ae is not None:
            self._ae.require_calling_aet = list(cfg.node.allowed_callers)
            self._ae.maximum_associations = 2 * cfg.node.max_associations + 10
        for service in self.services:
            apply = getattr(service, "apply_settings", None)
            if apply is not None:
                apply(cfg)

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

    def __enter__(self) -> Listener:
        return self if self._servers else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- association events -----------------------------------------------------------

    def _on_requested(self, event: evt.Event) -> None:
        """Access control: accept, or send the policy's A-ASSOCIATE-RJ before anything is negotiated."""
        assoc = event.assoc
        try:
            rq = assoc.requestor.primitive
            assert rq is not None  # EVT_REQUESTED fires once the A-ASSOCIATE-RQ has been received
            decision = self.policy.decide(rq.calling_ae_title, rq.called_ae_title, assoc.requestor.address,
                                          open_associations(assoc))
        except Exception as exc:  # a bug must not let a caller in unchecked: fail closed, transient
            log.exception("scp.access.error", extra=fields(address=assoc.requestor.address))
            decision = Decision(REJECT_INTERNAL_ERROR, f"access decision failed: {type(exc).__name__}", "internal_error")
        if decision.rejection is None:
            return
        with self._lock:
            self._decisions[id(assoc)] = decision
        assoc.acse.send_reject(*decision.rejection)
        # what pynetdicom does after its own rejections: tell the handlers, then wait for the
        # DUL to deliver the A-ASSOCIATE-RJ and close, before the server drops the socket
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()

    def _on_accepted(self, event: evt.Event) -> None:
        # our responses are small PDUs written apart: Nagle must never hold one for the peer's
        # delayed ACK (~40 ms per C-STORE; the node's SCU side does the same, net/scu.py)
        no_delay(event.assoc)
        events.emit("scp.association", outcome="accepted")
        log.info("scp.association.accepted", extra=fields(calling_ae=event.assoc.requestor.ae_title,
                                                          called_ae=called_ae(event.assoc),
                                                          address=event.assoc.requestor.address,
                                                          tls=is_tls(event.assoc),
                                                          contexts=len(event.assoc.accepted_contexts)))

    def _on_rejected(self, event: evt.Event) -> None:
        events.emit("scp.association", outcome="rejected")
        assoc = event.assoc
        with self._lock:
            decision = self._decisions.pop(id(assoc), None)
        rj = getattr(assoc.acceptor, "primitive", None)
        log.warning("scp.association.rejected", extra=fields(
            calling_ae=assoc.requestor.ae_title or getattr(assoc.requestor.primitive, "calling_ae_title", None),
            called_ae=called_ae(assoc), address=assoc.requestor.address, tls=is_tls(assoc),
            rule=decision.rule if decision else "pynetdicom",
            reason=decision.why if decision else "rejected by pynetdicom's own checks",
            result=getattr(rj, "result", None), source=getattr(rj, "result_source", None),
            diagnostic=getattr(rj, "diagnostic", None)))

    def _closed_fields(self, assoc: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"calling_ae": assoc.requestor.ae_title}
        for service in self.services:
            summary = getattr(service, "summary", None)
            if summary is not None:
                out.update(summary(assoc))
        return out

    def _on_released(self, event: evt.Event) -> None:
        log.info("scp.association.released", extra=fields(**self._closed_fields(event.assoc)))

    def _on_aborted(self, event: evt.Event) -> None:
        log.warning("scp.association.aborted", extra=fields(**self._closed_fields(event.assoc)))

    def _on_conn_close(self, event: evt.Event) -> None:
        self._closed_fields(event.assoc)  # released/aborted took it already; this forgets connections that vanished

    def _on_echo(self, event: evt.Event) -> int:
        log.debug("scp.echo", extra=fields(calling_ae=event.assoc.requestor.ae_title))
        return statuses.SUCCESS


def node_listener(settings: NodeSettings, store: Store) -> Listener:
    """The listener a node runs: Verification and Storage, plus Query/Retrieve when ``[query_retrieve] enabled``."""
    from dicom_node.index.disk import DiskGuard
    from dicom_node.net.query_retrieve import QueryRetrieveService
    from dicom_node.net.storage_scp import StorageService

    services: list[Service] = [StorageService(store, settings.limits,
                                              DiskGuard(settings.storage.root, settings.retention))]
    if settings.query_retrieve.enabled:
        services.append(QueryRetrieveService(settings, store))
    return Listener(settings, services)
