"""The accepting side of the listener: what happens between a TCP connect and an A-ASSOCIATE-RQ.

pynetdicom's ``ThreadedAssociationServer`` runs the TLS handshake in the one
accepting thread and starts an association (a thread that waits up to the
ACSE timeout for an A-ASSOCIATE-RQ) for every connection, whoever it comes
from.  A few silent or instantly-closed connections were enough to keep
every modality out: one silent TLS peer stalled every TLS caller for the
handshake timeout, and ten idle sockets held all association slots for the
network timeout (issue 11).

Here, instead:

* a peer outside ``node.allowed_addresses`` is closed in the accepting
  thread, before any thread, TLS handshake or association exists
  (``scp.connection.dropped``);
* everything else gets its own thread at once; the TLS handshake runs there,
  bounded by ``node.artim_timeout_s``, so handshakes never wait for each other;
* a connection must send its first bytes within ``node.artim_timeout_s``
  (the role PS3.8's ARTIM timer plays for an A-ASSOCIATE-RQ), else it is
  closed (``scp.connection.idle``); one that closes before sending anything
  is forgotten at once.  Only then is a pynetdicom association created, and
  it counts against ``node.max_associations`` only once its A-ASSOCIATE-RQ
  has arrived (:func:`dicom_node.net.association.open_associations`).
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from dicom_node.logs import fields

log = logging.getLogger("dicom_node.net.listener")


def _first_bytes(sock: socket.socket, timeout_s: float) -> str:
    """Wait for the peer's first bytes: "data", "closed" (it hung up first) or "idle" (nothing in time)."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return "data"
    try:
        readable, _, _ = select.select([sock], [], [], timeout_s)
    except (OSError, ValueError):
        return "closed"
    if not readable:
        return "idle"
    if isinstance(sock, ssl.SSLSocket):  # no MSG_PEEK through TLS; the association sees a close itself
        return "data"
    try:
        return "data" if sock.recv(1, socket.MSG_PEEK) else "closed"
    except OSError:
        return "closed"


class NodeRequestHandler(RequestHandler):
    """Runs in the connection's own thread: TLS handshake, first bytes, then pynetdicom's association."""

    server: NodeAssociationServer

    def handle(self) -> None:
        server = self.server
        sock: socket.socket = self.request
        address = str(self.client_address[0])
        started = time.monotonic()
        try:
            sock.settimeout(server.artim_timeout_s)
            if server.tls_context is not None:
                # a failure is logged by the context (scp.tls.refused, with the reason)
                sock = server.tls_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                self.request = sock
                sock.do_handshake()
            left = max(0.0, server.artim_timeout_s - (time.monotonic() - started))
            outcome = _first_bytes(sock, left)
            if outcome != "data":
                if outcome == "idle":
                    log.info("scp.connection.idle", extra=fields(
                        address=address, tls=server.tls_context is not None,
                        waited_s=round(time.monotonic() - started, 2), artim_timeout_s=server.artim_timeout_s))
                else:
                    log.debug("scp.connection.closed", extra=fields(address=address))
                _close(sock)
                return
            sock.settimeout(None)  # what pynetdicom expects of an accepted socket: blocking, it selects first
        except (OSError, ValueError):
            _close(sock)
            return
        super().handle()


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class NodeAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the node's accept rules (module docstring).

    ``admit(address)`` decides at accept whether a peer address may connect
    at all; ``tls_context`` (not pynetdicom's ``ssl_context``, which would
    handshake in the accepting thread) secures the connection in its own thread.
    """

    #: connections the kernel queues while the accepting thread is busy (socketserver's default is 5)
    request_queue_size = 128
    #: connection threads do not keep the process alive at shutdown (associations are aborted by the AE)
    daemon_threads = True

    def __init__(self, *args: Any, admit: Callable[[str], bool], artim_timeout_s: float,
                 tls_context: ssl.SSLContext | None = None, **kwargs: Any) -> None:
        self.admit = admit
        self.artim_timeout_s = artim_timeout_s
        self.tls_context = tls_context
        kwargs["request_handler"] = NodeRequestHandler
        super().__init__(*args, **kwargs)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        address = str(client_address[0])
        if self.admit(address):
            return True
        log.warning("scp.connection.dropped", extra=fields(
            address=address, rule="address", reason=f"address {address} is not in node.allowed_addresses",
            tls=self.tls_context is not None))
        return False

    def service_actions(self) -> None:
        """Nothing: pynetdicom runs a full ``gc.collect()`` here every 59 polls or connections.

        That ran in the accepting thread, so in a large process a burst of
        connections could stall the next caller for seconds (measured: 2.7 s
        behind 50 connections under load).  Python's own collector frees
        finished associations; nothing else needs it.
        """

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver prints a traceback to stderr; one structured line instead, without values
        log.error("scp.connection.error", extra=fields(address=str(client_address[0])), exc_info=True)
