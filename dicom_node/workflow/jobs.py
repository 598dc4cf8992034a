"""Durable fusion job queue (a table in the node's database) and its executor threads.

A job is keyed by its inputs (pipeline + the exact set of SOP instances of
both series), so the same pair settling twice enqueues one job.  What a job
makes is named by its inputs too (:func:`output_seed`: the key, the method
and its parameters, the job's ``version``), so a re-run makes the same
objects with the same UIDs.

A running job holds a *lease*: ``lease_owner`` (the node, stable across its
restarts), ``lease_run`` (this process) and ``lease_expires``, renewed by a
heartbeat thread.  A job whose lease ran out belongs to a node that died: any
node takes it over; a restarted node takes back its own dead jobs at once.
Such a take-over counts as an *interruption*; an operator's ``jobs retry`` is
counted apart (``retries``), so retrying never uses up the interruption limit.
Stage outputs are checkpointed (``checkpoint``: the registration and its
figures; ``workflow/checkpoint.py``), so an interrupted job resumes after its
last finished stage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicom_node import events, logs
from dicom_node.errors import NodeError
from dicom_node.index import db
from dicom_node.index.claims import new_run_id, node_identity, take_over

log = logging.getLogger("dicom_node.workflow.jobs")

MAX_INTERRUPTIONS = 3
#: seconds a running job's lease lasts without a heartbeat; the heartbeat renews it every third of that
LEASE_S = 30.0
#: the version of the rule that names derived objects: part of every output seed
OUTPUT_RULE = "derived-objects-1"

class JobStateError(NodeError):
    """The job cannot be retried in its state (or does not exist); the message says what to do."""


@dataclass(frozen=True)
class Job:
    id: int
    key: str
    pipeline: str
    base_series_uid: str
    overlay_series_uid: str
    state: str
    attempts: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    error: str | None
    result: dict | None
    #: 1, then +1 for each operator's ``jobs retry --new-version``: part of the output UIDs and descriptions
    version: int = 1
    #: times a node died (or stopped) while running it
    interruptions: int = 0
    #: times an operator retried it
    retries: int = 0
    lease_owner: str | None = None
    lease_run: str | None = None
    lease_expires: float | None = None
    #: stage outputs kept for a resume (``workflow/checkpoint.py``)
    checkpoint: dict | None = None
    #: the stage a running job is in (load, register, prepare, fuse, encode, store), and its slices done/total
    stage: str | None = None
    progress_done: int | None = None
    progress_total: int | None = None
    stage_started_at: float | None = None
    #: when the job last reported progress: a running job silent for long is stuck or its worker died
    progress_at: float | None = None

    @classmethod
    def from_row(cls, row: Any) -> Job:
        d = dict(row)
        d["result"] = json.loads(d["result"]) if d["result"] else None
        d["checkpoint"] = json.loads(d["checkpoint"]) if d.get("checkpoint") else None
        return cls(**d)


class JobInterrupted(NodeError):
    """The node is stopping: the job stopped at a stage boundary and goes back to the queue (not a failure)."""


def input_key(pipeline: str, base_instances: Sequence[str], overlay_instances: Sequence[str]) -> str:
    """Identity of a job's inputs: the pipeline and both series' SOP instance UIDs."""
    h = hashlib.sha256(pipeline.encode())
    for group in (sorted(base_instances), sorted(overlay_instances)):
        h.update(b"\x00" + "\n".join(group).encode())
    return h.hexdigest()


def output_seed(job: Job, pipeline: Any) -> str:
    """What names a job's derived objects: its inputs, the method and its parameters, and the version.

    The same inputs fused the same way give the same UIDs (``dicom.uids.derived_uid``);
    a changed parameter or an explicit new version gives new ones.
    """
    params = {"method": pipeline.method, "trio": list(pipeline.trio), "feature_source": pipeline.feature_source,
              "ct_window": list(pipeline.ct_window), "palette": pipeline.palette,
              "registration": pipeline.registration.model_dump(mode="json")}
    doc = json.dumps({"rule": OUTPUT_RULE, "key": job.key, "pipeline": job.pipeline, "params": params,
                      "version": job.version}, sort_keys=True, default=str)
    return hashlib.sha256(doc.encode()).hexdigest()


class JobQueue:
    """The job table. ``owner`` names this node for leases (:func:`node_identity`); each process is one run."""

    def __init__(self, database: db.Database | Path | str, owner: str | None = None, lease_s: float = LEASE_S):
        self.database = db.Database.of(database)
        self.owner = owner or node_identity(self.database.path.parent if self.database.path else Path.cwd())
        self.run_id = new_run_id()
        self.lease_s = float(lease_s)

    @property
    def conn(self) -> db.Database:
        return self.database

    def ensure_schema(self) -> None:
        self.database.migrate()

    def set_progress(self, job_id: int, stage: str, done: int | None = None, total: int | None = None) -> None:
        """Record where a running job is; a new stage name restarts the stage clock (the ETA's basis).

        Without counts the last slice counts stay (after ``fuse``: "40/40 slices").
        """
        t = db.now()
        self.conn.execute(
            "UPDATE jobs SET stage_started_at = CASE WHEN COALESCE(stage, '') = ? THEN stage_started_at ELSE ? END, "
            "stage = ?, progress_done = COALESCE(?, progress_done), progress_total = COALESCE(?, progress_total), "
            "progress_at = ? WHERE id = ?",
            (stage, t, stage, done, total, t, job_id),
        )

    def enqueue(self, key: str, pipeline: str, base_series_uid: str, overlay_series_uid: str) -> tuple[int, bool]:
        """Add a job unless one with the same inputs exists; returns ``(id, created)``."""
        with db.transaction(self.conn) as c:
            row = c.execute("SELECT id FROM jobs WHERE key = ?", (key,)).fetchone()
            if row:
                return row["id"], False
            new = c.execute(
                "INSERT INTO jobs (key, pipeline, base_series_uid, overlay_series_uid, created_at)"
                " VALUES (?, ?, ?, ?, ?) RETURNING id",
                (key, pipeline, base_series_uid, overlay_series_uid, db.now()),
            ).fetchone()
            assert new is not None  # RETURNING gives the row it inserted
            return int(new["id"]), True

    def claim(self) -> Job | None:
        """Take the oldest queued job and mark it running under this run's lease (atomic across processes).

        Dead nodes' jobs (lease expired) are taken over first (:meth:`recover`).
        """
        self.recover()
        t = db.now()
        with db.transaction(self.conn) as c:
            row = c.execute("SELECT id FROM jobs WHERE state = 'queued' ORDER BY id LIMIT 1").fetchone()
            if row is None:
                return None
            c.execute(
                "UPDATE jobs SET state = 'running', attempts = attempts + 1, started_at = ?, lease_owner = ?,"
                " lease_run = ?, lease_expires = ?, stage = NULL, progress_done = NULL, progress_total = NULL,"
                " stage_started_at = ?, progress_at = ? WHERE id = ?",
                (t, self.owner, self.run_id, t + self.lease_s, t, t, row["id"]),
            )
            return Job.from_row(c.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone())

    def _mine(self) -> str:
        return " AND state = 'running' AND lease_run = ?"

    def finish(self, job_id: int, result: dict, conn: db.Connection | None = None) -> bool:
        """Mark the job done, only while this run holds it; ``conn`` puts it in the caller's transaction."""
        return bool((conn or self.conn).execute(
            "UPDATE jobs SET state = 'done', finished_at = ?, result = ?, error = NULL, lease_expires = NULL"
            " WHERE id = ?" + self._mine(),
            (db.now(), json.dumps(result, default=str), job_id, self.run_id),
        ).rowcount)

    def fail(self, job_id: int, error: str, result: dict | None = None) -> None:
        self.conn.execute(
            "UPDATE jobs SET state = 'failed', finished_at = ?, error = ?, result = ?, lease_expires = NULL"
            " WHERE id = ?" + self._mine(),
            (db.now(), error, json.dumps(result, default=str) if result else None, job_id, self.run_id),
        )

    def save_checkpoint(self, job_id: int, checkpoint: dict[str, Any]) -> None:
        """Keep a finished stage's output on the job (only while this run holds it)."""
        self.conn.execute("UPDATE jobs SET checkpoint = ? WHERE id = ?" + self._mine(),
                          (json.dumps(checkpoint, default=str), job_id, self.run_id))

    def release(self, job_id: int) -> bool:
        """A running job the node stopped cleanly goes back to the queue with its checkpoint.

        Neither an attempt nor an interruption is counted: the stop was asked for.
        """
        n = self.conn.execute(
            "UPDATE jobs SET state = 'queued', attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END, started_at = NULL,"
            " lease_run = NULL, lease_expires = NULL WHERE id = ?" + self._mine(), (job_id, self.run_id)).rowcount
        return n > 0

    def heartbeat(self) -> int:
        """Renew the leases of this run's running jobs; returns how many."""
        return self.conn.execute(
            "UPDATE jobs SET lease_expires = ? WHERE state = 'running' AND lease_run = ?",
            (db.now() + self.lease_s, self.run_id),
        ).rowcount

    def recover(self, now: float | None = None) -> int:
        """Take over the running jobs of dead runs; returns how many went back to the queue.

        A run is dead when its lease ran out (any node's), or at once when it
        was this node's and its process is gone (a restart after kill -9 or a
        power cut: the same host and root, a pid that no longer runs).  Each one
        counts an interruption and goes back to the queue with its checkpoint,
        so it resumes; after :data:`MAX_INTERRUPTIONS` it fails.
        """
        t = db.now() if now is None else now

        def requeue(c: db.Connection, r: Any) -> int:
            fail = r["interruptions"] + 1 >= MAX_INTERRUPTIONS
            return c.execute(
                "UPDATE jobs SET interruptions = interruptions + 1, lease_run = NULL, lease_expires = NULL,"
                " state = ?, finished_at = ?, error = ? WHERE id = ? AND state = 'running'",
                ("failed" if fail else "queued", t if fail else None,
                 f"interrupted {r['interruptions'] + 1} times (the node died or stopped while running it); not "
                 "resumed again: check the node log, then `fusion-node jobs retry` it" if fail else None,
                 r["id"])).rowcount

        rows = take_over(self.conn, "SELECT id, lease_owner, lease_run, lease_expires, interruptions FROM jobs "
                                    "WHERE state = 'running'", (), prefix="lease", me=self.owner, run=self.run_id,
                         now=t, take=requeue)
        for r in rows:
            log.warning("job.taken_over", extra=logs.fields(
                job_id=r["id"], previous_owner=r["lease_owner"], own=r["lease_owner"] == self.owner,
                interruptions=r["interruptions"] + 1))
        n = sum(1 for r in rows if r["interruptions"] + 1 < MAX_INTERRUPTIONS)
        if rows:
            log.warning("jobs.recovered", extra=logs.fields(count=n, failed=len(rows) - n))
        return n

    def get(self, job_id: int) -> Job | None:
        row = self.conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job.from_row(row) if row else None

    def list(self, state: str | None = None) -> list[Job]:
        q = "SELECT * FROM jobs"
        args: tuple[str, ...] = ()
        if state:
            q, args = q + " WHERE state = ?", (state,)
        return [Job.from_row(r) for r in self.conn.execute(q + " ORDER BY id", args)]

    def counts(self) -> dict[str, int]:
        """Jobs per state; ``running_lease_expired`` counts running jobs whose node stopped renewing (died)."""
        out = {r["state"]: r["n"] for r in self.conn.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")}
        stale = self.conn.execute("SELECT COUNT(*) FROM jobs WHERE state = 'running' AND COALESCE(lease_expires, 0) < ?",
                                  (db.now(),)).fetchone()[0]
        if stale:
            out["running_lease_expired"] = stale
        return out


def retry_job(queue: JobQueue, job_id: int, *, new_version: bool = False) -> Job:
    """The operator's retry (the CLI's ``jobs retry``; an HTTP API should call this too).

    A failed job is queued again with the same version, so it makes the same
    UIDs (a PACS that got part of it keeps one copy).  A done job runs again
    only with ``new_version``: version + 1, new UIDs, "v2" in the
    descriptions.  A queued or running job, or an unknown id, is an error.
    Returns the job as queued.
    """
    with db.transaction(queue.conn) as c:
        row = c.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobStateError(f"no job {job_id}; `fusion-node jobs list` shows the jobs")
        job = Job.from_row(row)
        if job.state in ("queued", "running"):
            raise JobStateError(f"job {job_id} is {job.state}; it cannot be retried until it is done or failed "
                                f"(`fusion-node jobs show {job_id}` shows its lease)")
        if job.state == "done" and not new_version:
            raise JobStateError(f"job {job_id} is done and its series were sent; running it again would make the "
                                "same objects. To make a new, separately marked version, add --new-version")
        bump = 1 if new_version else 0
        c.execute(
            "UPDATE jobs SET state = 'queued', error = NULL, retries = retries + 1, version = version + ?,"
            " checkpoint = CASE WHEN ? = 1 THEN NULL ELSE checkpoint END, lease_owner = NULL, lease_run = NULL,"
            " lease_expires = NULL WHERE id = ?",
            (bump, bump, job_id),
        )
        out = Job.from_row(c.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())
    log.info("job.retried", extra=logs.fields(job_id=job_id, previous_state=job.state, version=out.version,
                                               retries=out.retries))
    return out


class Executor:
    """Worker threads that claim jobs and run them; a failing job never stops the worker."""

    def __init__(self, queue: JobQueue, run: Callable[[Job], dict], workers: int = 1, poll_s: float = 0.5):
        self._queue, self._run, self._workers, self._poll = queue, run, workers, poll_s
        self._stop = threading.Event()
        #: set when the node stops: a running job checks it between stages and raises :class:`JobInterrupted`
        self.cancel = threading.Event()
        self._threads: list[threading.Thread] = []
        self._running: dict[int, int] = {}  # thread ident -> job id
        self._running_lock = threading.Lock()

    def start(self) -> None:
        for i in range(self._workers):
            t = threading.Thread(target=self._loop, name=f"fusion-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        hb = threading.Thread(target=self._heartbeat_loop, name="job-heartbeat", daemon=True)
        hb.start()
        self._threads.append(hb)

    def _heartbeat_loop(self) -> None:
        """Renew this run's leases while it lives: a job whose lease runs out belongs to a dead node."""
        while not self._stop.wait(self._queue.lease_s / 3):
            try:
                self._queue.heartbeat()
            except db.Error:
                log.exception("job.heartbeat.failed")

    def request_stop(self) -> None:
        """Claim no more jobs and ask the running ones to stop at their next stage boundary."""
        self._stop.set()
        self.cancel.set()

    def stop(self, timeout: float = 30.0) -> list[int]:
        """Stop within ``timeout`` s; returns the ids of jobs still running then, which are put back in the queue.

        A job that does not reach a stage boundary in time is released by force
        (the process is about to exit; its thread is a daemon), so it is queued,
        never left ``running``, and the restarted node runs it again.
        """
        self.request_stop()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self._threads = [t for t in self._threads if t.is_alive()]
        with self._running_lock:
            stuck = list(self._running.values())
        for job_id in stuck:
            if self._queue.release(job_id):
                log.warning("job.released", extra=logs.fields(job_id=job_id, reason="node stopping; the job did "
                                                              "not reach a stage boundary in time", timeout_s=timeout))
        return stuck

    def run_one(self) -> bool:
        """Claim and run one job; False when the queue is empty."""
        job = self._queue.claim()
        if job is None:
            return False
        log.info("job.started", extra=logs.fields(job_id=job.id, pipeline=job.pipeline, attempt=job.attempts))
        with self._running_lock:
            self._running[threading.get_ident()] = job.id
        try:
            return self._run_claimed(job)
        finally:
            with self._running_lock:
                self._running.pop(threading.get_ident(), None)

    def _run_claimed(self, job: Job) -> bool:
        try:
            result = self._run(job)
        except JobInterrupted as exc:
            self._queue.release(job.id)
            log.warning("job.interrupted", extra=logs.fields(job_id=job.id, pipeline=job.pipeline,
                                                            reason=exc.operator_message, state="queued"))
            return True
        except Exception as exc:  # noqa: BLE001 - every failure is recorded on the job
            partial: dict[str, Any] | None
            if isinstance(exc, NodeError):
                reason, partial = exc.operator_message, exc.result
            else:
                reason, partial = f"{type(exc).__name__}: {exc}", None
            self._queue.fail(job.id, reason, partial)
            log.error("job.failed", extra=logs.fields(job_id=job.id, pipeline=job.pipeline, reason=reason,
                                                       trace=traceback.format_exc(limit=8)))
            events.emit("job.failed", job_id=job.id, pipeline=job.pipeline, reason=reason, attempt=job.attempts)
            return True
        self._queue.finish(job.id, result)  # no-op when the run already marked it done with its outputs
        scalars = {k: v for k, v in result.items() if isinstance(v, (int, float, str)) and k not in ("job_id", "pipeline")}
        log.info("job.done", extra=logs.fields(job_id=job.id, pipeline=job.pipeline, **scalars))
        events.emit("job.done", job_id=job.id, pipeline=job.pipeline, seconds=result.get("seconds") or {})
        return True

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self.run_one():
                self._stop.wait(self._poll)
