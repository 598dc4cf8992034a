"""The running node: one object that starts and stops every part in the right order.

Parts (each with one responsibility): the listener receives instances into the
store; the settle/pair sweep turns complete series into jobs; the executor
runs jobs (``pipeline.run_pipeline``, in this process or on Dask workers:
``runners.py``) and the node stores and queues what a job produced; the
outbox sends it.  The parts talk only through the database
file, so any of them can be restarted without losing work.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from dicom_node import audit, logs
from dicom_node.config import NodeSettings
from dicom_node.index import db
from dicom_node.index.store import Store
from dicom_node.net.listener import Listener, node_listener
from dicom_node.outbox import Outbox
from dicom_node.workflow import checkpoint
from dicom_node.workflow.checkpoint import Checkpoints
from dicom_node.workflow.heartbeat import Heartbeat, heartbeat_path
from dicom_node.workflow.jobs import Executor, Job, JobQueue, node_identity, output_seed
from dicom_node.workflow.lifecycle import Reload, reload_settings
from dicom_node.workflow.pairing import Pairing
from dicom_node.workflow.pipeline import JobInputs, JobOutputs, pipeline_named
from dicom_node.workflow.retention import Retention
from dicom_node.workflow.runners import runner_for
from dicom_node.workflow.settle import Settler

log = logging.getLogger("dicom_node.workflow.node")


class Node:
    def __init__(self, settings: NodeSettings):
        self.settings = settings
        #: one database (SQLite file or PostgreSQL) and its connection pool, shared by every part
        database = db.Database(settings.storage.database_location)
        owner = node_identity(settings.storage.root)
        self.store = Store(settings.storage.root, database, work=settings.storage.instance)
        self.store.ensure_schema()
        self.store.clear_tmp()  # a crash's partial files and spool folders: nothing writes there yet
        self.jobs = JobQueue(database, owner=owner)
        self.outbox = Outbox(database, settings, audit_trail=audit.trail_for(self.store.root, settings.node.ae_title),
                             owner=owner)
        self.settler = Settler(settings, self.store)
        self.pairing = Pairing(settings, self.store, self.jobs)
        #: where the jobs' stages run: this process, or Dask workers ([executor])
        self.runner = runner_for(settings, self.store.root)
        self.executor = Executor(self.jobs, self._run_job, workers=settings.workers)
        self.retention = Retention(settings, self.store)
        self._listener: Listener | None = None
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._sweeper: threading.Thread | None = None
        self._retainer: threading.Thread | None = None
        self._stopped = False
        self._heartbeat: Heartbeat | None = None

    def _run_job(self, job: Job) -> dict[str, Any]:
        """Run the job's stages (resuming from its checkpoints), then make its objects visible and queued at once."""
        pipeline = pipeline_named(self.settings, job.pipeline)
        offset = [p.name for p in self.settings.pipelines].index(pipeline.name)
        seed = output_seed(job, pipeline)
        inputs = JobInputs(job.id, job.pipeline, [i.path for i in self.store.instances(job.base_series_uid)],
                           [i.path for i in self.store.instances(job.overlay_series_uid)], version=job.version,
                           uid_seed=seed, series_offset=offset)
        checkpoints = Checkpoints(self.jobs, job, self.store.root, seed)
        outputs = self.runner.run(job, inputs, self.settings, checkpoints, cancel=self.executor.cancel,
                                  report=lambda stage, done, total: self._progress(job.id, stage, done, total))
        self._progress(job.id, "store")
        result = self.deliver(job, outputs)
        checkpoints.discard_files()
        return result

    def _progress(self, job_id: int, stage: str, done: int | None = None, total: int | None = None) -> None:
        """Record a job's stage and slices (the status page's bar); a progress write must never cost the job."""
        try:
            self.jobs.set_progress(job_id, stage, done, total)
        except Exception:
            log.exception("job.progress.failed", extra=logs.fields(job_id=job_id, stage=stage))

    def deliver(self, job: Job, outputs: JobOutputs) -> dict[str, Any]:
        """Store a job's derived objects, queue them and mark the job done, all in one transaction.

        The files are staged first (``Store.stage``), then one transaction
        indexes them, queues them for the pipeline's destinations and marks
        the job done (``Store.publish``): a crash at any point leaves either
        nothing visible (the staged files are removed at start-up and the job
        resumes) or everything.  Returns the result record with the timings added.
        """
        from fusion.environment import crash_point

        result = dict(outputs.result)
        seconds = dict(result.get("seconds") or {})
        t0 = time.perf_counter()
        staged = self.store.stage(f"job-{job.id}-v{job.version}", outputs.derived.datasets,
                                  on_file=lambda i: crash_point("stage"))
        t1 = time.perf_counter()
        destinations = pipeline_named(self.settings, result["pipeline"]).destinations

        def queue_and_finish(conn: Any, stored: list[Any]) -> None:
            for dest in destinations:
                self.outbox.enqueue_in(conn, dest, stored, job_id=job.id)
            seconds.update(store=round(t1 - t0, 3), queue=round(time.perf_counter() - t1, 3))
            result["seconds"] = seconds
            crash_point("publish")
            self.jobs.finish(job.id, result, conn)

        self.store.publish(staged, queue_and_finish)
        self.outbox.wake()
        return result

    @property
    def port(self) -> int:
        return self._listener.port if self._listener else self.settings.node.port

    @property
    def tls_port(self) -> int | None:
        """The DICOM TLS port while running with TLS enabled, else None."""
        return self._listener.tls_port if self._listener else None

    def start(self) -> Node:
        # before anything writes: derived series never published and partial received files go,
        # fused checkpoints of jobs that will not resume go, this node's dead jobs are taken back
        self.store.clean_staging()
        checkpoint.clean(self.jobs, self.store.root)
        self.jobs.recover()
        self._listener = node_listener(self.settings, self.store).start()
        self.executor.start()
        self.outbox.start()
        self._sweeper = threading.Thread(target=self._sweep_loop, name="settle-sweep", daemon=True)
        self._sweeper.start()
        self._retainer = threading.Thread(target=self._retention_loop, name="retention", daemon=True)
        self._retainer.start()
        self._heartbeat = Heartbeat(heartbeat_path(self.settings.storage.database_path,
                                                    self.settings.storage.instance), {
            "ae_title": self.settings.node.ae_title, "ports": {"dicom": self.port, "dicom_tls": self.tls_port}}).start()
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

    def _retention_loop(self) -> None:
        """The periodic purge (``[retention]``); also at once when the disk is below the watermark."""
        while not self._stop.wait(min(self.settings.retention.interval_s, 60.0)):
            cfg = self.settings.retention
            if not cfg.enabled:
                continue
            try:
                if self.retention.due(cfg.interval_s):
                    self.retention.purge()
            except Exception:
                log.exception("retention.failed")

    def request_stop(self) -> None:
        """Ask :meth:`wait` to return (safe from a signal handler)."""
        self._stop.set()

    def request_reload(self) -> None:
        """Ask :meth:`wait` to return so the caller reloads the configuration (safe from a signal handler)."""
        self._reload.set()

    def apply_settings(self, settings: NodeSettings) -> None:
        """Run with a reloaded configuration (restart keys already merged: ``lifecycle.merge_live``)."""
        self.settings = settings
        self.outbox.settings = settings
        self.settler = Settler(settings, self.store)
        self.pairing = Pairing(settings, self.store, self.jobs)
        self.retention.settings = settings
        logs.set_level(settings.logging.level)
        if self._listener is not None:
            self._listener.apply_settings(settings)

    def reload(self, path: Path) -> Reload | None:
        """Re-read the TOML file and apply what can be applied live; a bad file keeps the running config."""
        result = reload_settings(self.settings, path)
        if result is not None:
            self.apply_settings(result.settings)
        return result

    def stop(self, timeout: float | None = None) -> dict[str, Any]:
        """A clean stop within ``timeout`` s (default ``node.shutdown_timeout_s``); returns what it found.

        In order, overlapping where they can: the running jobs are asked to stop
        at their next stage boundary (they go back to the queue); the listener
        stops accepting, open associations get the time left to finish (C-STOREs
        being written always finish), the rest are aborted; the executor is
        joined (a job still inside a stage then is released by force); the
        outbox stops between two sends.  The process exits right after.
        """
        if self._stopped:
            return {}
        self._stopped = True
        budget = self.settings.node.shutdown_timeout_s if timeout is None else timeout
        t0 = time.monotonic()
        deadline = t0 + budget
        log.info("node.stopping", extra=logs.fields(timeout_s=budget))
        self._stop.set()
        self.executor.request_stop()
        aborted = 0
        if self._listener is not None:
            self._listener.stop_accepting()
            aborted = self._listener.drain(max(0.0, deadline - time.monotonic() - 1.5))
            self._listener.stop()
        for thread in (self._sweeper, self._retainer):
            if thread is not None:
                thread.join(max(0.1, min(2.0, deadline - time.monotonic() - 1.0)))
        released = self.executor.stop(max(0.1, deadline - time.monotonic() - 0.7))
        self.runner.close()
        self.outbox.stop(max(0.2, deadline - time.monotonic()))
        if self._heartbeat is not None:
            self._heartbeat.stop()  # marked stopped cleanly: `fusion-node status` tells this from a crash
        report = {"seconds": round(time.monotonic() - t0, 3), "associations_aborted": aborted,
                  "jobs_released": released}
        log.info("node.stopped", extra=logs.fields(**report))
        return report

    def wait(self, timeout: float | None = None) -> str:
        """Block until a stop ("stop") or reload ("reload") is requested, or ``timeout`` s pass ("timeout")."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._stop.is_set():
                return "stop"
            if self._reload.is_set():
                self._reload.clear()
                return "reload"
            if deadline is not None and time.monotonic() >= deadline:
                return "timeout"
            self._stop.wait(0.2)

    def status(self) -> dict[str, Any]:
        return {"series": self.store.counts(), "jobs": self.jobs.counts(), "outbox": self.outbox.summary()}
