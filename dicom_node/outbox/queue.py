"""Durable per-destination sending: an SQLite queue drained by the destination's sender, with retries, backoff and dead letters.

Every instance the node must deliver is a row of table ``outbox`` (one per
destination and SOP Instance UID).  Rows survive a restart: a row left
``sending`` by a crash goes back to ``pending`` when the next :class:`Outbox`
opens the database, and is sent again, which is harmless (C-STORE of the same
SOP Instance UID replaces or is ignored by the peer; STOW-RS likewise).

States::

    pending --(process_due: claimed)--> sending --(0x0000 / warning)--> sent
       ^                                   |
       |---(failure, attempts < max)-------|
                                           `--(attempts >= max, or unreadable file)--> dead
    dead/pending --(retry)--> pending (attempts reset, due now)

Each :meth:`Outbox.process_due` call hands every destination's due items (up
to :attr:`Outbox.batch_size`) to the sender of its ``kind`` (``senders.py``:
C-STORE for ``dicom``, STOW-RS for ``dicomweb``) and records each outcome as it
comes.  Logs name destinations, counts, statuses and UIDs, never patient names
or IDs.
"""

from __future__ import annotations

import builtins
import logging
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pydicom
from pydicom.errors import InvalidDicomError

from dicom_node import events
from dicom_node.config import NodeSettings
from dicom_node.index import db
from dicom_node.logs import fields
from dicom_node.net.scu import MAX_CONTEXTS
from dicom_node.net.statuses import hex_status
from dicom_node.outbox.senders import Outcome, Work, sender_for
from dicom_node.states import OutboxState, check_in

log = logging.getLogger("dicom_node.outbox")

STATES = tuple(s.value for s in OutboxState)

__all__ = ["MAX_CONTEXTS", "Outbox", "OutboxItem", "Queued", "STATES", "ensure_schema"]

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS outbox (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    destination      TEXT    NOT NULL,
    sop_instance_uid TEXT    NOT NULL,
    sop_class_uid    TEXT    NOT NULL,
    path             TEXT    NOT NULL,
    job_id           INTEGER NULL,
    state            TEXT    NOT NULL DEFAULT 'pending' {check_in('state', OutboxState)},
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  REAL    NOT NULL,
    last_status      INTEGER NULL,
    last_error       TEXT    NULL,
    created_at       REAL    NOT NULL,
    updated_at       REAL    NOT NULL,
    UNIQUE (destination, sop_instance_uid)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS outbox_job ON outbox (job_id);
"""


def ensure_schema(conn: sqlite3.Connection) -> None:
    """Create the ``outbox`` table and its indexes if missing (idempotent)."""
    conn.executescript(SCHEMA)


@dataclass(frozen=True)
class OutboxItem:
    id: int
    destination: str
    sop_instance_uid: str
    sop_class_uid: str
    path: Path
    job_id: int | None
    state: str
    attempts: int
    next_attempt_at: float
    last_status: int | None
    last_error: str | None
    created_at: float
    updated_at: float

    @classmethod
    def _from_row(cls, row: sqlite3.Row) -> OutboxItem:
        return cls(
            id=row["id"],
            destination=row["destination"],
            sop_instance_uid=row["sop_instance_uid"],
            sop_class_uid=row["sop_class_uid"],
            path=Path(row["path"]),
            job_id=row["job_id"],
            state=row["state"],
            attempts=row["attempts"],
            next_attempt_at=row["next_attempt_at"],
            last_status=row["last_status"],
            last_error=row["last_error"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
        )


class Queued(Protocol):
    """What the outbox needs of an instance to queue it: a store result has it (no header read again).

    Read-only members, so frozen dataclasses (``StoreResult``, :class:`QueuedFile`) qualify.
    """

    @property
    def sop_instance_uid(self) -> str: ...
    @property
    def sop_class_uid(self) -> str: ...
    @property
    def path(self) -> Path: ...


@dataclass(frozen=True)
class QueuedFile:
    sop_instance_uid: str
    sop_class_uid: str
    path: Path

    @classmethod
    def read(cls, path: Path) -> QueuedFile:
        """The UIDs from a file's header (for files the node did not just store itself)."""
        path = Path(path).resolve()
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
        except InvalidDicomError as exc:
            raise ValueError(f"{path}: not a DICOM file ({exc})") from None
        meta = getattr(ds, "file_meta", None)
        sop_class = ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta else None)
        sop_inst = ds.get("SOPInstanceUID") or (meta.get("MediaStorageSOPInstanceUID") if meta else None)
        if not sop_class or not sop_inst:
            raise ValueError(f"{path}: no SOP Class UID / SOP Instance UID in the header")
        return cls(str(sop_inst), str(sop_class), path)


class Outbox:
    """The node's outgoing queue on ``db_path``; see the module docstring.

    ``calling_ae`` overrides ``settings.node.ae_title`` as the calling AE
    title.  ``recover_interrupted=False`` skips the crash recovery done on
    construction (for read-only tools opened beside a running node).
    """

    #: most items carried by one association in one ``process_due`` call; the rest wait for the next call
    batch_size = 1000

    def __init__(
        self,
        db_path: Path,
        settings: NodeSettings,
        *,
        calling_ae: str | None = None,
        recover_interrupted: bool = True,
    ) -> None:
        self.db_path = Path(db_path)
        self.settings = settings
        self.calling_ae = calling_ae or settings.node.ae_title
        self._local = threading.local()
        self._conns: builtins.list = []
        self._conns_lock = threading.Lock()
        self._process_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.ensure_schema()
        if recover_interrupted:
            self._recover()

    # -- database -----------------------------------------------------------

    def _conn(self):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = db.connect(self.db_path)
            self._local.conn = conn
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    def _close_thread_conn(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            self._local.conn = None
            with self._conns_lock:
                if conn in self._conns:
                    self._conns.remove(conn)
            conn.close()

    def ensure_schema(self) -> None:
        ensure_schema(self._conn())

    def _recover(self) -> None:
        t = db.now()
        with db.transaction(self._conn()) as conn:
            n = conn.execute(
                "UPDATE outbox SET state='pending', updated_at=? WHERE state='sending'", (t,)
            ).rowcount
        if n:
            log.warning("outbox.recovered", extra=fields(items=n, reason="left 'sending' by an interrupted run"))

    def close(self) -> None:
        """Stop the worker and close the connections this object opened."""
        self.stop()
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            try:
                conn.close()
            except sqlite3.Error:  # pragma: no cover - best effort
                pass
        self._local = threading.local()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- queueing -----------------------------------------------------------

    def _check_destination(self, destination: str) -> Any:
        try:
            return self.settings.destination(destination)
        except KeyError:
            names = ", ".join(repr(d.name) for d in self.settings.destinations) or "none"
            raise ValueError(
                f"unknown destination {destination!r}; configured destinations: {names}"
            ) from None

    def enqueue(self, destination: str, items: Sequence[Queued | Path], job_id: int | None = None) -> int:
        """Queue instances for ``destination``; returns how many rows are new.

        ``items`` are store results (or anything with ``sop_instance_uid``,
        ``sop_class_uid`` and ``path``), or file paths whose headers are read.
        Idempotent on (destination, SOP Instance UID): an instance already
        queued, sent or dead is left as it is (revive dead ones with :meth:`retry`).
        """
        self._check_destination(destination)
        entries: builtins.list[tuple[str, str, str]] = []
        for item in items:
            q = QueuedFile.read(item) if isinstance(item, (str, Path)) else item
            entries.append((str(q.sop_instance_uid), str(q.sop_class_uid), str(Path(q.path).resolve())))

        t = db.now()
        new = 0
        with db.transaction(self._conn()) as conn:
            for sop_inst, sop_class, path in entries:
                new += conn.execute(
                    "INSERT INTO outbox (destination, sop_instance_uid, sop_class_uid, path, job_id, state,"
                    " attempts, next_attempt_at, created_at, updated_at)"
                    " VALUES (?, ?, ?, ?, ?, 'pending', 0, ?, ?, ?)"
                    " ON CONFLICT (destination, sop_instance_uid) DO NOTHING",
                    (destination, sop_inst, sop_class, path, job_id, t, t, t),
                ).rowcount
        log.info(
            "outbox.enqueued",
            extra=fields(destination=destination, job_id=job_id, new=new, already_queued=len(entries) - new,
                         sop_instance_uids=[e[0] for e in entries]),
        )
        if new:
            self._wake.set()
        return new

    def retry(self, ids: Sequence[int] | None = None, destination: str | None = None) -> int:
        """Put dead (or pending) items back to pending, attempts reset, due now; returns how many.

        ``ids`` and ``destination`` narrow the selection; with neither, every dead
        and pending item is reset.  Sent items are never touched.
        """
        where = ["state IN ('dead', 'pending')"]
        args: builtins.list = []
        if ids is not None:
            ids = [int(i) for i in ids]
            if not ids:
                return 0
            where.append(f"id IN ({','.join('?' * len(ids))})")
            args.extend(ids)
        if destination is not None:
            where.append("destination = ?")
            args.append(destination)
        t = db.now()
        with db.transaction(self._conn()) as conn:
            n = conn.execute(
                "UPDATE outbox SET state='pending', attempts=0, next_attempt_at=?, updated_at=?"
                f" WHERE {' AND '.join(where)}",
                [t, t, *args],
            ).rowcount
        log.info("outbox.requeued", extra=fields(items=n, ids=ids, destination=destination))
        if n:
            self._wake.set()
        return n

    # -- inspection ---------------------------------------------------------

    def list(self, state: str | None = None, destination: str | None = None,
             job_id: int | None = None) -> builtins.list[OutboxItem]:
        """Items ordered by id, optionally filtered by state, destination and job."""
        if state is not None and state not in STATES:
            raise ValueError(f"unknown state {state!r}; one of {', '.join(STATES)}")
        where, args = [], []
        for col, val in (("state", state), ("destination", destination), ("job_id", job_id)):
            if val is not None:
                where.append(f"{col} = ?")
                args.append(val)
        sql = "SELECT * FROM outbox" + (f" WHERE {' AND '.join(where)}" if where else "") + " ORDER BY id"
        return [OutboxItem._from_row(r) for r in self._conn().execute(sql, args)]

    def summary(self) -> dict[str, dict[str, int]]:
        """``{destination: {state: count}}`` for configured destinations and any with rows; all four states present."""
        out: dict[str, dict[str, int]] = {d.name: dict.fromkeys(STATES, 0) for d in self.settings.destinations}
        for r in self._conn().execute("SELECT destination, state, COUNT(*) AS n FROM outbox GROUP BY destination, state"):
            out.setdefault(r["destination"], dict.fromkeys(STATES, 0))[r["state"]] = r["n"]
        return out

    def wait_idle(self, timeout: float) -> bool:
        """True once no item is pending or sending (dead and sent do not count); False after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            n = self._conn().execute("SELECT COUNT(*) FROM outbox WHERE state IN ('pending', 'sending')").fetchone()[0]
            if n == 0:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    # -- sending ------------------------------------------------------------

    def process_due(self, now: float | None = None) -> dict[str, int]:
        """Send every due item, one association per destination; returns ``{sent, retried, dead}``.

        ``now`` (seconds, like :func:`dicom_node.index.db.now`) decides what is due and
        is the base of the backoff; by default the wall clock.
        """
        return self._process_due(now, cancel=None)

    def _process_due(self, now: float | None, cancel: threading.Event | None) -> dict[str, int]:
        counts = {"sent": 0, "retried": 0, "dead": 0}
        with self._process_lock:
            t = db.now() if now is None else now
            conn = self._conn()
            dests = [r[0] for r in conn.execute(
                "SELECT DISTINCT destination FROM outbox WHERE state='pending' AND next_attempt_at <= ? ORDER BY destination",
                (t,),
            )]
            for name in dests:
                if cancel is not None and cancel.is_set():
                    break
                for k, v in self._process_destination(name, now, cancel).items():
                    counts[k] += v
        return counts

    def _clock(self, now: float | None) -> float:
        return db.now() if now is None else now

    def _claim(self, destination: str, now: float | None) -> builtins.list[Work]:
        t = self._clock(now)
        with db.transaction(self._conn()) as conn:
            rows = conn.execute(
                "SELECT id, sop_instance_uid, sop_class_uid, path, attempts FROM outbox"
                " WHERE destination=? AND state='pending' AND next_attempt_at <= ? ORDER BY id LIMIT ?",
                (destination, t, self.batch_size),
            ).fetchall()
            if rows:
                ids = [r["id"] for r in rows]
                conn.execute(
                    f"UPDATE outbox SET state='sending', updated_at=? WHERE id IN ({','.join('?' * len(ids))})",
                    [db.now(), *ids],
                )
        return [Work(r["id"], r["sop_instance_uid"], r["sop_class_uid"], Path(r["path"]), r["attempts"]) for r in rows]

    def _release(self, items: Sequence[Work]) -> None:
        """Hand claimed but untried items back unchanged (still due)."""
        if not items:
            return
        ids = [w.id for w in items]
        with db.transaction(self._conn()) as conn:
            conn.execute(
                f"UPDATE outbox SET state='pending', updated_at=? WHERE state='sending' AND id IN ({','.join('?' * len(ids))})",
                [db.now(), *ids],
            )

    def _mark_sent(self, dest: str, w: Work, status: int) -> None:
        with db.transaction(self._conn()) as conn:
            conn.execute(
                "UPDATE outbox SET state='sent', attempts=attempts+1, last_status=?, last_error=NULL, updated_at=?"
                " WHERE id=?",
                (status, db.now(), w.id),
            )
        warning = status != 0x0000
        events.emit("outbox.sent", destination=dest, id=w.id, sop_instance_uid=w.sop_instance_uid)
        log.log(
            logging.WARNING if warning else logging.INFO,
            "outbox.sent",
            extra=fields(destination=dest, id=w.id, sop_instance_uid=w.sop_instance_uid,
                         status=hex_status(status), warning=warning),
        )

    def _mark_failed(self, dest: str, w: Work, status: int | None, error: str, now: float | None,
                     permanent: bool = False) -> str:
        """Record a failed attempt; returns the new state ('pending' or 'dead')."""
        cfg = self.settings.outbox
        attempts = w.attempts + 1
        t = self._clock(now)
        dead = permanent or attempts >= cfg.max_attempts
        delay = min(cfg.backoff_initial_s * 2 ** (attempts - 1), cfg.backoff_max_s)
        next_at = t if dead else t + delay
        with db.transaction(self._conn()) as conn:
            conn.execute(
                "UPDATE outbox SET state=?, attempts=?, next_attempt_at=?, last_status=?, last_error=?, updated_at=?"
                " WHERE id=?",
                ("dead" if dead else "pending", attempts, next_at, status, error, db.now(), w.id),
            )
        if dead:
            log.error("outbox.dead", extra=fields(destination=dest, id=w.id, sop_instance_uid=w.sop_instance_uid,
                                                  attempts=attempts, status=hex_status(status), error=error))
            events.emit("outbox.dead", destination=dest, id=w.id, sop_instance_uid=w.sop_instance_uid,
                        attempts=attempts, error=error)
            return "dead"
        log.warning("outbox.retry", extra=fields(destination=dest, id=w.id, sop_instance_uid=w.sop_instance_uid,
                                                 attempts=attempts, status=hex_status(status), error=error,
                                                 retry_in_s=delay, next_attempt_at=next_at))
        return "pending"

    def _record(self, dest: str, outcome: Outcome, now: float | None, counts: dict[str, int]) -> None:
        w = outcome.work
        if outcome.result == "sent":
            assert outcome.status is not None
            self._mark_sent(dest, w, outcome.status)
            counts["sent"] += 1
        elif outcome.result == "untried":
            self._release([w])
        else:
            state = self._mark_failed(dest, w, outcome.status, outcome.error or "failed",
                                      now, permanent=outcome.result == "permanent")
            counts["dead" if state == "dead" else "retried"] += 1

    def _process_destination(self, name: str, now: float | None, cancel: threading.Event | None) -> dict[str, int]:
        counts = {"sent": 0, "retried": 0, "dead": 0}
        items = self._claim(name, now)
        if not items:
            return counts
        pending = {w.id: w for w in items}
        try:
            try:
                dest = self.settings.destination(name)
            except KeyError:
                for w in items:
                    self._record(name, Outcome(w, "failed", None, f"destination {name!r} is not configured"), now, counts)
                return counts
            for outcome in sender_for(dest, self.settings, self.calling_ae).send(items, cancel):
                self._record(name, outcome, now, counts)
                pending.pop(outcome.work.id, None)
            self._release(builtins.list(pending.values()))  # a sender that said nothing of an item: untried
        except Exception as exc:
            # never leave claimed rows 'sending' behind an unexpected error: count it as a failed attempt
            log.exception("outbox.error", extra=fields(destination=name, items=len(items)))
            for w in pending.values():
                self._record(name, Outcome(w, "failed", None, f"internal error: {exc.__class__.__name__}: {exc}"),
                             now, counts)
        return counts

    # -- background worker --------------------------------------------------

    def start(self, poll_interval_s: float = 1.0) -> None:
        """Run :meth:`process_due` in a daemon thread until :meth:`stop`; new work wakes it at once."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(poll_interval_s,), name="outbox", daemon=True)
        self._thread.start()
        log.info("outbox.started", extra=fields(poll_interval_s=poll_interval_s))

    def _run(self, poll_interval_s: float) -> None:
        try:
            while not self._stop.is_set():
                self._wake.clear()
                busy = False
                try:
                    counts = self._process_due(None, cancel=self._stop)
                    busy = any(counts.values())
                except Exception:
                    log.exception("outbox.error")
                if busy:
                    continue  # more may be due (a batch limit, items released); re-check at once
                self._wake.wait(poll_interval_s)
        finally:
            self._close_thread_conn()

    def stop(self, timeout: float = 5.0) -> bool:
        """Ask the worker to finish (between two C-STOREs) and wait up to ``timeout`` s; True if it ended.

        Items it had claimed and not tried go back to pending; if it is stuck
        in a network call past ``timeout``, its rows stay 'sending' until it
        returns or the next start recovers them.
        """
        thread = self._thread
        if thread is None:
            return True
        self._stop.set()
        self._wake.set()
        thread.join(timeout)
        alive = thread.is_alive()
        if alive:
            log.warning("outbox.stop.timeout", extra=fields(timeout_s=timeout))
        else:
            self._thread = None
            log.info("outbox.stopped")
        return not alive
