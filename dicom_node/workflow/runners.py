"""Where a job's stages run: in the node's process, or on the workers of a Dask scheduler.

The executor threads (``jobs.Executor``) claim jobs from the job table as
always - leases, renewals, interruptions, retries and a stop that puts the
running jobs back in the queue do not change.  What a *runner* changes is
where ``pipeline.run_pipeline`` runs:

* :class:`LocalRunner` (``[executor] kind = "local"``, the default): in this
  process, exactly as before; the embedded node never imports Dask.
* :class:`DaskRunner` (``kind = "dask"``): the job is submitted to the Dask
  scheduler at ``[executor] scheduler`` and the executor thread waits for its
  result; ``workers`` is then the number of jobs in flight.  The code that
  runs on a worker is ``workflow/remote.py``; a worker is a plain
  ``dask worker --nthreads 1 --no-nanny`` process (``fusion-node worker``
  checks the shared storage, then starts one).

Decisions, and why:

* **Series reach the worker over a shared storage path.**  Every worker must
  see the node's ``[storage] root`` at the *same absolute path* (NFS, CephFS,
  a bind mount): the task carries the instance files' paths, never pixels, so
  a 400-slice pair costs the scheduler a few kilobytes.  The worker reads the
  instances there and writes there what the node would have written: the QC
  pictures under ``<root>/qc`` and the fused checkpoint under
  ``<root>/checkpoints``.  A worker that does not see the files fails the job
  with a message saying so.
* **The node, not the worker, stores and sends.**  The worker returns the
  derived objects as Part-10 bytes (not pickled pydicom objects: the bytes
  are what the store writes anyway, and they do not depend on the two sides'
  pydicom internals) with the result record; the node turns them back into
  datasets and ``Node.deliver`` stages them, indexes them, queues them for the
  destinations and marks the job done in one transaction.  So the index, the
  outbox and the lease stay in one process, a worker needs no database and no
  PACS credentials (it is sent only the job's pipeline, ``uid_root`` and
  ``device``), and "exactly one fused series" rests on the same transaction
  as in the embedded node.
* **One Dask task per job version** (:func:`task_key`).  The key is made of
  the job's input key and version, so two nodes, or a node restarted while its
  task still ran, submitting the same job share one task instead of computing
  it twice.  The derived UIDs follow from the job (``jobs.output_seed``) and
  the store and outbox are idempotent on the SOP Instance UID, so even a task
  that ran twice cannot make a second series.
* **A worker that dies mid-job**: the scheduler gives the task to another
  worker (the node keeps waiting; its lease is renewed as usual).  The new
  attempt starts from the checkpoints the node had when it submitted, plus a
  fused stack the dead worker already saved on the shared storage.  When the
  task has been on more workers that died than the scheduler's
  ``distributed.scheduler.allowed-failures`` (3 by default) allows, Dask
  gives up (``KilledWorker``) and the job *fails* with a message saying so:
  a job that kills every worker it lands on is most likely too large for
  them, and putting it back in the queue would kill the next ones.
  ``fusion-node jobs retry`` runs it again.
* **A stopping node** releases its future and raises ``JobInterrupted``: the
  job goes back to the queue, not failed.  The worker, seeing the task no
  longer wanted, stops at its next stage boundary or fused slice.
* **A scheduler that cannot be reached** within ``connect_timeout_s`` puts
  the job back in the queue (:class:`SchedulerUnavailable`); the node tries
  again with the next claim, and the job never fails because of it.
* **Each worker fuses on its own hardware**: with ``device = "auto"`` a
  worker uses its ``FUSION_DEVICE``, else its GPU if it has one; a node that
  names "cpu" or "cuda" means it for every worker.  ``[executor] resources``
  (e.g. ``{GPU = 1}``) keeps jobs to workers started with ``--resources``.
* **The Dask network is trusted.**  Dask's protocol carries pickles: whoever
  reaches the scheduler can run code on the workers and, through results, in
  the node; the derived objects (patient data) travel on it too.  Keep the
  scheduler and workers on a private network, or use ``tls://`` addresses
  with Dask's own TLS settings (``distributed.comm.tls`` in its configuration
  files), which the node's client picks up.
* **Progress**: the worker publishes its stages and fused slices on a Dask
  event topic; the node writes them into the job row, so the status page's
  bar moves as for a local job.  Until a worker starts it the job's stage is
  ``remote``.  The result record gains ``executor``: the scheduler, the
  worker that finished it, and how many workers started it.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from dicom_node import logs
from dicom_node.config import ExecutorConfig, NodeSettings
from dicom_node.workflow.checkpoint import Checkpoints
from dicom_node.workflow.jobs import Job, JobInterrupted
from dicom_node.workflow.pipeline import JobInputs, JobOutputs, StageProgress, run_pipeline
from dicom_node.workflow.stages import JobError, Registration

if TYPE_CHECKING:
    from distributed import Client

log = logging.getLogger("dicom_node.workflow.runners")

__all__ = ["DaskRunner", "LocalRunner", "Runner", "SchedulerUnavailable", "runner_for", "task_key"]


class SchedulerUnavailable(JobInterrupted):
    """The Dask scheduler did not answer: the job goes back to the queue (not a failure)."""


class Runner(Protocol):
    """Runs one claimed job's stages and returns what they made; stores and sends nothing."""

    kind: str

    def run(self, job: Job, inputs: JobInputs, settings: NodeSettings, checkpoints: Checkpoints,
            cancel: threading.Event, report: StageProgress) -> JobOutputs: ...

    def close(self) -> None: ...


class LocalRunner:
    """The stages in this process (the embedded default), with the VGG16 models cached between jobs."""

    kind = "local"

    def __init__(self, root: Path):
        self._qc_dir = Path(root) / "qc"
        #: VGG16 models per device, loaded once and shared by the jobs
        self.models: dict[str, Any] = {}

    def run(self, job: Job, inputs: JobInputs, settings: NodeSettings, checkpoints: Checkpoints,
            cancel: threading.Event, report: StageProgress) -> JobOutputs:
        return run_pipeline(inputs, settings, self._qc_dir, self.models, checkpoints, cancel=cancel, report=report)

    def close(self) -> None:
        self.models.clear()


def task_key(job: Job) -> str:
    """The Dask key of a job version: the same job submitted twice (two nodes, a restart) is one task."""
    return f"fusion-job-{job.key[:24]}-v{job.version}"


class DaskRunner:
    """Submits each job to a Dask scheduler and waits for its result (see the module docstring)."""

    kind = "dask"

    def __init__(self, cfg: ExecutorConfig, root: Path):
        self._cfg = cfg
        # the path the workers must see: as the node names it (no symlinks resolved: the mount is what is shared)
        self._root = Path(os.path.abspath(root))
        self._lock = threading.Lock()
        self._client: Client | None = None
        #: task key -> the events of that task (filled on the client's event loop, read by the waiting thread)
        self._waiters: dict[str, queue.Queue[dict[str, Any]]] = {}

    # -- the connection -------------------------------------------------------------------------

    def _connect(self, job: Job, cancel: threading.Event) -> Client:
        """The client, connected (again) if need be; :class:`SchedulerUnavailable` after ``connect_timeout_s``."""
        with self._lock:
            if self._client is not None and self._client.status == "running":
                return self._client
            if self._client is not None:
                self._close_client()
            from distributed import Client

            from dicom_node.workflow import remote

            address = self._cfg.scheduler
            deadline = time.monotonic() + self._cfg.connect_timeout_s
            while True:
                left = deadline - time.monotonic()
                try:
                    client = Client(address, timeout=max(1.0, min(2.0, left)), set_as_default=False,
                                    name="dicom-fusion-node")
                    break
                except (OSError, TimeoutError) as exc:
                    if cancel.is_set():
                        raise JobInterrupted(f"job {job.id}: the node is stopping; not submitted to the Dask "
                                             "scheduler, queued again") from None
                    if deadline - time.monotonic() <= 0:
                        log.warning("executor.dask.unreachable", extra=logs.fields(
                            scheduler=address, timeout_s=self._cfg.connect_timeout_s, error=str(exc)))
                        raise SchedulerUnavailable(
                            f"job {job.id}: the Dask scheduler at {address} did not answer within "
                            f"{self._cfg.connect_timeout_s:g} s; the job stays queued. Start the scheduler "
                            "(`dask scheduler`) or correct [executor] scheduler") from None
            try:
                client.register_plugin(remote.FusionWorkerPlugin())
                client.subscribe_topic(remote.PROGRESS_TOPIC, self._on_event)
                workers = len(client.scheduler_info().get("workers", {}))
            except Exception:
                client.close()
                raise
            self._client = client
            log.info("executor.dask.connected", extra=logs.fields(scheduler=address, workers=workers))
            if not workers:
                log.warning("executor.dask.no_workers", extra=logs.fields(
                    scheduler=address, hint="jobs wait at the scheduler until a worker joins "
                                            "(`dask worker <scheduler> --nthreads 1`)"))
            return client

    def _close_client(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        try:
            client.close(timeout=5)
        except Exception:  # closing a broken connection must not stop the node
            log.debug("executor.dask.close_failed", exc_info=True)

    def close(self) -> None:
        """Disconnect (node stopping); a connect still in progress is left to the exiting process."""
        if self._lock.acquire(timeout=3.0):
            try:
                self._close_client()
            finally:
                self._lock.release()

    def _lost(self, client: Client) -> None:
        """Forget a client whose scheduler went away: the next job connects afresh."""
        log.warning("executor.dask.lost", extra=logs.fields(scheduler=self._cfg.scheduler, status=str(client.status)))
        with self._lock:
            if self._client is client:
                self._close_client()

    def _interrupted(self, job: Job, client: Client, cancel: threading.Event, exc: Exception) -> JobInterrupted:
        """The scheduler went away under a job: reconnect for the next one; this one goes back to the queue."""
        self._lost(client)
        cancel.wait(1.0)  # no tight claim/release loop while the scheduler is away
        return JobInterrupted(f"job {job.id}: lost the Dask scheduler at {self._cfg.scheduler} "
                              f"({type(exc).__name__}: {exc}); queued again")

    def _on_event(self, event: tuple[float, Any]) -> None:
        """A worker's message (on the client's event loop): handed to the thread waiting for that task."""
        msg = event[1]
        if isinstance(msg, dict):
            box = self._waiters.get(str(msg.get("key")))
            if box is not None:
                box.put(msg)

    # -- one job --------------------------------------------------------------------------------

    def run(self, job: Job, inputs: JobInputs, settings: NodeSettings, checkpoints: Checkpoints,
            cancel: threading.Event, report: StageProgress) -> JobOutputs:
        from distributed import KilledWorker

        from dicom_node.workflow import remote

        client = self._connect(job, cancel)
        key = task_key(job)
        box: queue.Queue[dict[str, Any]] = queue.Queue()
        self._waiters[key] = box
        seen = _Attempts()
        report("remote", None, None)
        request = remote.job_request(key, inputs, settings, self._root, checkpoints.document)
        try:
            future = client.submit(remote.run_job, request, key=key, pure=False,
                                   resources=dict(self._cfg.resources) or None)
        except Exception as exc:  # noqa: BLE001 - a closed or broken client: the job goes back to the queue
            self._waiters.pop(key, None)
            raise self._interrupted(job, client, cancel, exc) from None
        log.info("job.remote.submitted", extra=logs.fields(job_id=job.id, key=key, scheduler=self._cfg.scheduler))
        try:
            while True:
                self._drain(job, box, seen, checkpoints, report)
                if cancel.is_set():
                    raise JobInterrupted(f"job {job.id}: the node is stopping; its Dask task was released, "
                                         "queued again")
                try:
                    reply = future.result(timeout=0.25)
                    break
                except TimeoutError:
                    continue
                except KilledWorker as exc:
                    raise JobError(
                        f"job {job.id}: every Dask worker that ran it died ({exc.allowed_failures + 1} in turn; the "
                        "scheduler's distributed.scheduler.allowed-failures is " f"{exc.allowed_failures}). The job "
                        "may be too large for the workers' memory: check the worker logs (out of memory?), then "
                        f"`fusion-node jobs retry {job.id}`") from None
                except Exception as exc:
                    if future.status == "error":  # the task's own error (a JobError says what to do): the job's
                        raise
                    # the scheduler restarted, dropped the task or the connection: not the job's fault
                    raise self._interrupted(job, client, cancel, exc) from None
            self._drain(job, box, seen, checkpoints, report)
        finally:
            self._waiters.pop(key, None)
            try:
                future.release()
            except Exception:  # a lost connection has released it already
                log.debug("executor.dask.release_failed", exc_info=True)
        outputs = remote.outputs_from_reply(reply)
        outputs.result["executor"] = {"kind": "dask", "scheduler": self._cfg.scheduler, "key": key,
                                      "worker": reply.get("worker"), "attempts": max(1, seen.count)}
        log.info("job.remote.done", extra=logs.fields(job_id=job.id, key=key, worker=reply.get("worker"),
                                                      attempts=max(1, seen.count)))
        return outputs

    def _drain(self, job: Job, box: queue.Queue[dict[str, Any]], seen: _Attempts, checkpoints: Checkpoints,
               report: StageProgress) -> None:
        """Apply the worker's messages in this (the executor's) thread: progress, checkpoints, who runs it."""
        while True:
            try:
                msg = box.get_nowait()
            except queue.Empty:
                return
            kind = msg.get("kind")
            if kind == "started":
                seen.count += 1
                log.info("job.remote.started", extra=logs.fields(job_id=job.id, worker=msg.get("worker"),
                                                                 attempt=seen.count))
            elif kind == "stage":
                report(str(msg.get("stage")), msg.get("done"), msg.get("total"))
            elif kind == "checkpoint" and isinstance(msg.get("doc"), dict):
                doc = msg["doc"]
                try:
                    Registration.from_json(doc["registration"])  # a usable registration, or none kept
                    checkpoints.store_document(doc)
                except Exception:  # a checkpoint lost costs a recomputation, never the job
                    log.exception("job.checkpoint.failed", extra=logs.fields(job_id=job.id, stage="register"))


@dataclass
class _Attempts:
    """How many workers started the task (each worker death makes another start)."""

    count: int = 0


def runner_for(settings: NodeSettings, root: Path) -> Runner:
    """The runner ``[executor] kind`` names."""
    if settings.executor.kind == "dask":
        return DaskRunner(settings.executor, root)
    return LocalRunner(root)
