"""A node with its HTTP side: what ``fusion-node serve`` runs.

:class:`RunningNode` starts the metrics and notifications (listening to the
node's events) before the node, the node itself, the HTTP server (uvicorn in
a thread of its own, on a socket bound here so a taken port is an error at
start-up, not a log line), and the readiness thread, whose first round is
the start-up self-check of the weights and the destinations.  Stopping goes
in the reverse order.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

from dicom_node import logs
from dicom_node.config import NodeSettings
from dicom_node.errors import NodeError
from dicom_node.web.app import WebContext, create_app, http_token
from dicom_node.web.metrics import NodeMetrics
from dicom_node.web.notify import Notifier
from dicom_node.web.readiness import Readiness
from dicom_node.workflow.node import Node

log = logging.getLogger("dicom_node.web.runtime")


class WebError(NodeError):
    """The HTTP side cannot start; the message says what to change."""


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        raise WebError(f"cannot listen for HTTP on {host}:{port}: {exc.strerror or exc}; "
                       "free the port or set [http] port (or enabled = false)") from None
    sock.listen(64)
    sock.set_inheritable(True)
    return sock


class HttpServer:
    """uvicorn serving one Starlette app from a background thread."""

    def __init__(self, ctx: WebContext) -> None:
        import uvicorn

        cfg = ctx.settings.http
        self._sock = _bind(cfg.host, cfg.port)
        self.host, self.port = cfg.host, self._sock.getsockname()[1]
        self.scheme = "https" if cfg.certificate else "http"
        # uvicorn's own records go through the node's handler, errors only (no access log: it would show URLs)
        uv = logging.getLogger("uvicorn")
        uv.handlers[:] = logging.getLogger("dicom_node").handlers
        uv.setLevel(logging.WARNING)
        uv.propagate = False
        config = uvicorn.Config(create_app(ctx), log_config=None, access_log=False, lifespan="off",
                                ssl_certfile=str(cfg.certificate) if cfg.certificate else None,
                                ssl_keyfile=str(cfg.private_key) if cfg.private_key else None,
                                timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="http", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}/"

    def start(self, timeout: float = 15.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise WebError(f"the HTTP server on {self.url} did not start; see the log above")
            time.sleep(0.02)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self._sock.close()


class RunningNode:
    """The node, its metrics, notifications, readiness checks and HTTP server, started and stopped together."""

    def __init__(self, node: Node) -> None:
        self.node = node
        settings: NodeSettings = node.settings
        self.settings = settings
        database = node.store.database
        self.metrics = NodeMetrics(database, [d.name for d in settings.destinations])
        self.notifier = Notifier(settings, database)
        self.readiness = Readiness(settings, database)
        self.http: HttpServer | None = None
        self._node_started = False
        self._ctx = WebContext(settings, node.store, node.jobs, node.outbox,
                               self.metrics, self.readiness, http_token(settings) if settings.http.enabled else None)

    @property
    def url(self) -> str | None:
        return self.http.url if self.http is not None else None

    def start(self) -> RunningNode:
        self.metrics.start()
        self.notifier.start()
        try:
            self.node.start()
            self._node_started = True
            if self.settings.http.enabled:
                self.http = HttpServer(self._ctx)
                self.http.start()
        except BaseException:
            self.stop()
            raise
        self.readiness.start()
        log.info("http.started" if self.http else "http.disabled", extra=logs.fields(url=self.url))
        return self

    def stop(self) -> None:
        self.readiness.stop()
        if self.http is not None:
            self.http.stop()
        if self._node_started:
            self.node.stop()
            self._node_started = False
        self.notifier.stop()
        self.metrics.stop()


def start_node(settings: NodeSettings) -> RunningNode:
    """What ``fusion-node serve`` starts: the node with its HTTP side."""
    return RunningNode(Node(settings)).start()
