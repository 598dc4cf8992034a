"""Durable fusion job queue (a table in the node's SQLite file) and its local executor.

A job is keyed by its inputs (pipeline + the exact set of SOP instances of
both series), so the same pair settling twice enqueues one job.  Jobs left
``running`` by a crash go back to ``queued`` on start-up, up to a limit, so a
restart resumes work instead of losing it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicom_node import events, logs
from dicom_node.errors import NodeError
from dicom_node.index import db
from dicom_node.states import JobState, check_in

log = logging.getLogger("dicom_node.workflow.jobs")

MAX_INTERRUPTIONS = 3

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    pipeline TEXT NOT NULL,
    base_series_uid TEXT NOT NULL,
    overlay_series_uid TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'queued' {check_in('state', JobState)},
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    error TEXT,
    result TEXT,
    stage TEXT,
    progress_done INTEGER,
    progress_total INTEGER,
    stage_started_at REAL,
    progress_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
"""

#: progress columns a database written before they existed lacks: (name, declaration)
_PROGRESS_COLUMNS = (("stage", "TEXT"), ("progress_done", "INTEGER"), ("progress_total", "INTEGER"),
                     ("stage_started_at", "REAL"), ("progress_at", "REAL"))


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
        return cls(**d)


def input_key(pipeline: str, base_instances: Sequence[str], overlay_instances: Sequence[str]) -> str:
    """Identity of a job's inputs: the pipeline and both series' SOP instance UIDs."""
    h = hashlib.sha256(pipeline.encode())
    for group in (sorted(base_instances), sorted(overlay_instances)):
        h.update(b"\x00" + "\n".join(group).encode())
    return h.hexdigest()


class JobQueue:
    def __init__(self, db_path: Path):
        self._db_path = Path(db_path)
        self._local = threading.local()

    @property
    def conn(self):
        c = getattr(self._local, "conn", None)
        if c is None:
            c = self._local.conn = db.connect(self._db_path)
        return c

    def ensure_schema(self) -> None:
        self.conn.executescript(_SCHEMA)
        have = {r["name"] for r in self.conn.execute("PRAGMA table_info(jobs)")}
        if all(c in have for c, _ in _PROGRESS_COLUMNS):
            return
        with db.transaction(self.conn) as c:
            have = {r["name"] for r in c.execute("PRAGMA table_info(jobs)")}  # again under the lock
            for column, decl in _PROGRESS_COLUMNS:
                if column not in have:
                    c.execute(f"ALTER TABLE jobs ADD COLUMN {column} {decl}")
                    log.info("jobs.schema.migrated", extra=logs.fields(added_column=column))

    def set_progress(self, job_id: int, stage: str, done: int | None = None, total: int | None = None) -> None:
        """Record where a running job is; a new stage name restarts the stage clock (the ETA's basis).

        Without counts the last slice counts stay (after ``fuse``: "40/40 slices").
        """
        t = db.now()
        self.conn.execute(
            "UPDATE jobs SET stage_started_at = CASE WHEN stage IS ? THEN stage_started_at ELSE ? END, "
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
            cur = c.execute(
                "INSERT INTO jobs (key, pipeline, base_series_uid, overlay_series_uid, created_at) VALUES (?, ?, ?, ?, ?)",
                (key, pipeline, base_series_uid, overlay_series_uid, db.now()),
            )
            assert cur.lastrowid is not None  # sqlite3 sets it after every successful INSERT
            return int(cur.lastrowid), True

    def claim(self) -> Job | None:
        """Take the oldest queued job and mark it running (atomic across threads and processes)."""
        with db.transaction(self.conn) as c:
            row = c.execute("SELECT id FROM jobs WHERE state = 'queued' ORDER BY id LIMIT 1").fetchone()
            if row is None:
                return None
            c.execute(
                "UPDATE jobs SET state = 'running', attempts = attempts + 1, started_at = ?, stage = NULL, "
                "progress_done = NULL, progress_total = NULL, stage_started_at = ?, progress_at = ? WHERE id = ?",
                (t := db.now(), t, t, row["id"]),
            )
            return Job.from_row(c.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone())

    def finish(self, job_id: int, result: dict) -> None:
        self.conn.execute(
            "UPDATE jobs SET state = 'done', finished_at = ?, result = ?, error = NULL WHERE id = ?",
            (db.now(), json.dumps(result, default=str), job_id),
        )

    def fail(self, job_id: int, error: str, result: dict | None = None) -> None:
        self.conn.execute(
            "UPDATE jobs SET state = 'failed', finished_at = ?, error = ?, result = ? WHERE id = ?",
            (db.now(), error, json.dumps(result, default=str) if result else None, job_id),
        )

    def requeue(self, job_id: int) -> None:
        """Put a failed or finished job back in the queue (operator's retry)."""
        self.conn.execute("UPDATE jobs SET state = 'queued', error = NULL WHERE id = ?", (job_id,))

    def recover(self) -> int:
        """Jobs a crash left running go back to the queue; after MAX_INTERRUPTIONS they fail."""
        with db.transaction(self.conn) as c:
            c.execute(
                "UPDATE jobs SET state = 'failed', error = 'interrupted ' || attempts || ' times; not retried again' "
                "WHERE state = 'running' AND attempts >= ?",
                (MAX_INTERRUPTIONS,),
            )
            n = c.execute("UPDATE jobs SET state = 'queued' WHERE state = 'running'").rowcount
        if n:
            log.warning("jobs.recovered", extra=logs.fields(count=n))
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
        return {r["state"]: r["n"] for r in self.conn.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")}


class Executor:
    """Worker threads that claim jobs and run them; a failing job never stops the worker."""

    def __init__(self, queue: JobQueue, run: Callable[[Job], dict], workers: int = 1, poll_s: float = 0.5):
        self._queue, self._run, self._workers, self._poll = queue, run, workers, poll_s
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for i in range(self._workers):
            t = threading.Thread(target=self._loop, name=f"fusion-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout)

    def run_one(self) -> bool:
        """Claim and run one job; False when the queue is empty."""
        job = self._queue.claim()
        if job is None:
            return False
        log.info("job.started", extra=logs.fields(job_id=job.id, pipeline=job.pipeline, attempt=job.attempts))
        try:
            result = self._run(job)
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
        self._queue.finish(job.id, result)
        scalars = {k: v for k, v in result.items() if isinstance(v, (int, float, str)) and k not in ("job_id", "pipeline")}
        log.info("job.done", extra=logs.fields(job_id=job.id, pipeline=job.pipeline, **scalars))
        events.emit("job.done", job_id=job.id, pipeline=job.pipeline, seconds=result.get("seconds") or {})
        return True

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self.run_one():
                self._stop.wait(self._poll)
