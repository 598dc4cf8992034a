"""The running node: one object that starts and stops every part in the right order.

Parts (each with one responsibility): the Storage SCP writes instances to the
store; the settle/pair sweep turns complete series into jobs; the executor
runs jobs; the outbox sends what jobs produced.  They talk only through the
SQLite file, so any of them can be restarted without losing work.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from dicom_node import logs
from dicom_node.config import NodeSettings
from dicom_node.jobs import Executor, Job, JobQueue
from dicom_node.outbox import Outbox
from dicom_node.pairing import Pairing
from dicom_node.store import Store

log = logging.getLogger("dicom_node.service")


class Node:
    def __init__(self, settings: NodeSettings):
        self.settings = settings
        db_path = settings.storage.database_path
        self.store = Store(settings.storage.root, db_path)
        self.store.ensure_schema()
        self.jobs = JobQueue(db_path)
        self.jobs.ensure_schema()
        self.outbox = Outbox(db_path, settings)
        self.pairing = Pairing(settings, self.store, self.jobs)
        self._models: dict[str, Any] = {}
        self.executor = Executor(self.jobs, self._run_job, workers=settings.workers)
        self._server: Any = None
        self._stop = threading.Event()
        self._sweeper: threading.Thread | None = None

    def _run_job(self, job: Job) -> dict:
        from dicom_node.pipeline import run_job

        return run_job(job, self.settings, self.store, self.outbox, self._models)

    @property
    def port(self) -> int:
        return self._server.port if self._server else self.settings.node.port

    @property
    def tls_port(self) -> int | None:
        """The DICOM TLS port while running with TLS enabled, else None."""
        return self._server.tls_port if self._server else None

    def start(self) -> "Node":
        from dicom_node.qr import QueryRetrieveService
        from dicom_node.scp import StorageServer

        self.jobs.recover()
        if self.settings.query_retrieve.enabled:
            server = QueryRetrieveService(self.settings, self.store).server()
        else:
            server = StorageServer(self.settings, self.store)
        self._server = server.start()
        self.executor.start()
        self.outbox.start()
        self._sweeper = threading.Thread(target=self._sweep_loop, name="settle-sweep", daemon=True)
        self._sweeper.start()
        log.info("node.started", extra=logs.fields(ae_title=self.settings.node.ae_title, port=self.port,
                                                    pipelines=[p.name for p in self.settings.pipelines]))
        return self

    def _sweep_loop(self) -> None:
        while not self._stop.wait(self.settings.settle.sweep_interval_s):
            try:
                self.pairing.sweep()
            except Exception:  # noqa: BLE001 - a bad sweep must not stop the next one
                log.exception("pairing.sweep.failed")

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.stop()
        if self._sweeper is not None:
            self._sweeper.join(10)
        self.executor.stop()
        self.outbox.stop()
        log.info("node.stopped")

    def wait(self) -> None:
        """Block until ``stop()`` is called (from a signal handler)."""
        self._stop.wait()

    def status(self) -> dict:
        return {"series": self.store.counts(), "jobs": self.jobs.counts(), "outbox": self.outbox.summary()}
