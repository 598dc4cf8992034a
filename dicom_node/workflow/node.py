"""The running node: one object that starts and stops every part in the right order.

Parts (each with one responsibility): the listener receives instances into the
store; the settle/pair sweep turns complete series into jobs; the executor
runs jobs (``pipeline.run_pipeline``) and the node stores and queues what a
job produced; the outbox sends it.  The parts talk only through the database
file, so any of them can be restarted without losing work.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from dicom_node import logs
from dicom_node.config import NodeSettings
from dicom_node.index.store import Store
from dicom_node.net.listener import Listener, node_listener
from dicom_node.outbox import Outbox
from dicom_node.workflow.jobs import Executor, Job, JobQueue
from dicom_node.workflow.pairing import Pairing
from dicom_node.workflow.pipeline import JobInputs, JobOutputs, pipeline_named, run_pipeline
from dicom_node.workflow.settle import Settler

log = logging.getLogger("dicom_node.workflow.node")


class Node:
    def __init__(self, settings: NodeSettings):
        self.settings = settings
        db_path = settings.storage.database_path
        self.store = Store(settings.storage.root, db_path)
        self.store.ensure_schema()
        self.jobs = JobQueue(db_path)
        self.jobs.ensure_schema()
        self.outbox = Outbox(db_path, settings)
        self.settler = Settler(settings, self.store)
        self.pairing = Pairing(settings, self.store, self.jobs)
        #: VGG16 models per device, loaded once and shared by the jobs
        self._models: dict[str, Any] = {}
        self.executor = Executor(self.jobs, self._run_job, workers=settings.workers)
        self._listener: Listener | None = None
        self._stop = threading.Event()
        self._sweeper: threading.Thread | None = None

    def _run_job(self, job: Job) -> dict[str, Any]:
        """Run the job's stages, then store its objects and queue them for the pipeline's destinations."""
        inputs = JobInputs(job.id, job.pipeline, [i.path for i in self.store.instances(job.base_series_uid)],
                           [i.path for i in self.store.instances(job.overlay_series_uid)])
        outputs = run_pipeline(inputs, self.settings, self.store.root / "qc", self._models,
                               report=lambda stage, done, total: self._progress(job.id, stage, done, total))
        self._progress(job.id, "store")
        return self.deliver(job.id, outputs)

    def _progress(self, job_id: int, stage: str, done: int | None = None, total: int | None = None) -> None:
        """Record a job's stage and slices (the status page's bar); a progress write must never cost the job."""
        try:
            self.jobs.set_progress(job_id, stage, done, total)
        except Exception:
            log.exception("job.progress.failed", extra=logs.fields(job_id=job_id, stage=stage))

    def deliver(self, job_id: int, outputs: JobOutputs) -> dict[str, Any]:
        """Store a job's derived objects and queue them; returns the result record with those timings added."""
        result = dict(outputs.result)
        seconds = dict(result.get("seconds") or {})
        t0 = time.perf_counter()
        stored = [self.store.store_dataset(ds, origin="derived") for ds in outputs.derived.datasets]
        t1 = time.perf_counter()
        for dest in pipeline_named(self.settings, result["pipeline"]).destinations:
            self.outbox.enqueue(dest, stored, job_id=job_id)
        seconds.update(store=round(t1 - t0, 3), queue=round(time.perf_counter() - t1, 3))
        result["seconds"] = seconds
        return result

    @property
    def port(self) -> int:
        return self._listener.port if self._listener else self.settings.node.port

    @property
    def tls_port(self) -> int | None:
        """The DICOM TLS port while running with TLS enabled, else None."""
        return self._listener.tls_port if self._listener else None

    def start(self) -> Node:
        self.jobs.recover()
        self._listener = node_listener(self.settings, self.store).start()
        self.executor.start()
        self.outbox.start()
        self._sweeper = threading.Thread(target=self._sweep_loop, name="settle-sweep", daemon=True)
        self._sweeper.start()
        log.info("node.started", extra=logs.fields(ae_title=self.settings.node.ae_title, port=self.port,
                                                    pipelines=[p.name for p in self.settings.pipelines]))
        return self

    def sweep(self, now: float | None = None) -> list[int]:
        """One pass: settle what is due, then pair; returns the new job ids."""
        self.settler.settle_due(now)
        return self.pairing.pair_settled(now)

    def _sweep_loop(self) -> None:
        while not self._stop.wait(self.settings.settle.sweep_interval_s):
            try:
                self.sweep()
            except Exception:
                log.exception("pairing.sweep.failed")

    def request_stop(self) -> None:
        """Ask :meth:`wait` to return (safe from a signal handler)."""
        self._stop.set()

    def stop(self) -> None:
        self._stop.set()
        if self._listener is not None:
            self._listener.stop()
        if self._sweeper is not None:
            self._sweeper.join(10)
        self.executor.stop()
        self.outbox.stop()
        log.info("node.stopped")

    def wait(self) -> None:
        """Block until :meth:`request_stop` or :meth:`stop` is called."""
        self._stop.wait()

    def status(self) -> dict[str, Any]:
        return {"series": self.store.counts(), "jobs": self.jobs.counts(), "outbox": self.outbox.summary()}
