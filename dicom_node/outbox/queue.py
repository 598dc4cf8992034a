"""Durable per-destination sending: a queue in the node's database drained by the destination's sender, with retries, backoff and dead letters.

Every instance the node must deliver is a row of table ``outbox`` (one per
destination and SOP Instance UID).  Rows survive a restart.  A row being
sent is *claimed* (``claim_owner``, ``claim_run``, ``claim_expires``:
``index/claims.py``), so several node processes can share one database and
never send one row at once; a row left ``sending`` by a process that died goes
back to ``pending`` when its claim is dead (at once for this node's own dead
run, after :data:`CLAIM_S` for another's) and is sent again, which is
harmless (C-STORE of the same SOP Instance UID replaces or is ignored by the
peer; STOW-RS likewise).

States::

    pending --(process_due: claimed)--> sending --(0x0000 / warning)--> sent
       ^                                   |
       |---(failure, within retry_for_s)---|
                                           `--(retry_for_s since the first failure, max_attempts,
                                               or unreadable file)--> dead
    dead/pending --(retry)--> pending (attempts reset, due now)

Retries are bounded by *time* (``outbox.retry_for_s``, 24 h by default) with
exponential backoff capped at ``backoff_max_s`` (:func:`retry_delay`), so an
outage of hours is bridged without an operator and delivery resumes at most
``backoff_max_s`` after the peer is back.  Each destination's health is kept in
table ``outbox_destinations``: failing for ``alert_after_s`` logs
``outbox.destination.down`` once per outage, the first success afterwards
``outbox.destination.up``.

Each :meth:`Outbox.process_due` call hands every destination's due items (up
to :attr:`Outbox.batch_size`) to the sender of its ``kind`` (``senders.py``:
C-STORE for ``dicom``, STOW-RS for ``dicomweb``) and records each outcome as it
comes.  Logs name destinations, counts, statuses and UIDs, never patient names
or IDs.
"""

from __future__ import annotations

import builtins
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pydicom
from pydicom.errors import InvalidDicomError

from dicom_node import audit, events
from dicom_node.config import NodeSettings, OutboxConfig
from dicom_node.index import db
from dicom_node.index.claims import new_run_id, node_identity, take_over
from dicom_node.logs import fields
from dicom_node.net.scu import MAX_CONTEXTS
from dicom_node.net.statuses import hex_status
from dicom_node.outbox.senders import Outcome, Work, sender_for
from dicom_node.states import OutboxState
from fusion.environment import crash_point

log = logging.getLogger("dicom_node.outbox")

STATES = tuple(s.value for s in OutboxState)

__all__ = ["MAX_CONTEXTS", "Outbox", "OutboxItem", "Queued", "STATES", "SeriesGroup", "attempt_schedule", "id_ranges", "parse_id_ranges",
           "gives_up", "retry_delay"]

#: seconds a claim on rows being sent lasts; renewed while the batch goes out (every third of it)
CLAIM_S = 120.0


def retry_delay(cfg: OutboxConfig, attempts: int) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt: doubling from ``backoff_initial_s``, capped."""
    exponent = min(max(attempts - 1, 0), 60)  # 2**60 s is far beyond any cap; avoids float overflow
    return float(min(cfg.backoff_initial_s * 2 ** exponent, cfg.backoff_max_s))


def gives_up(cfg: OutboxConfig, attempts: int, first_failed_at: float, now: float) -> bool:
    """True when an item that has failed ``attempts`` times, first at ``first_failed_at``, is dead at ``now``."""
    if cfg.max_attempts and attempts >= cfg.max_attempts:
        return True
    return now - first_failed_at >= cfg.retry_for_s


def attempt_schedule(cfg: OutboxConfig) -> builtins.list[float]:
    """Seconds after the first failure at which an always-failing item is tried again; the last one's failure is final.

    The operator's question "how long an outage does the outbox bridge, and how
    soon after the PACS is back does it deliver?" is answered by this list: the
    last value is when it gives up, the largest gap how late delivery can resume.
    """
    times: builtins.list[float] = []
    t, attempts = 0.0, 1
    while not gives_up(cfg, attempts, 0.0, t):
        t += retry_delay(cfg, attempts)
        times.append(t)
        attempts += 1
    return times


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
    series_uid: str | None = None
    first_failed_at: float | None = None

    @classmethod
    def _from_row(cls, row: db.Row) -> OutboxItem:
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
            series_uid=row["series_uid"],
            first_failed_at=row["first_failed_at"],
        )


@dataclass(frozen=True)
class SeriesGroup:
    """Outbox rows of one job's series to one destination in one state: one line of ``fusion-node outbox list``.

    A fused series of forty instances is one group, not forty lines.
    """

    destination: str
    job_id: int | None
    series_uid: str | None
    state: str
    ids: tuple[int, ...]
    max_attempts: int
    oldest: float  #: when the oldest row was queued
    last_update: float
    last_error: str | None  #: the newest row's error, if any has one

    @property
    def count(self) -> int:
        return len(self.ids)

    @property
    def retry_command(self) -> str:
        """The exact command that makes this group due again."""
        if self.series_uid is None:
            return f"fusion-node outbox retry {id_ranges(self.ids)}"
        return f"fusion-node outbox retry --series {self.series_uid} --destination {self.destination}"


def id_ranges(ids: Sequence[int]) -> str:
    """``1-40,45``: outbox ids as a retry command line takes them."""
    out: list[list[int]] = []
    for i in sorted(ids):
        if out and out[-1][1] == i - 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in out)


def parse_id_ranges(text: str) -> list[int]:
    """The ids of ``1-40,45`` (what :func:`id_ranges` writes); ValueError on anything else."""
    ids: list[int] = []
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        a, b = int(first), int(last or first)
        if b < a:
            raise ValueError(f"{part!r}: a range goes from the lower id to the higher")
        ids.extend(range(a, b + 1))
    return ids


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
    series_uid: str | None = None

    @classmethod
    def read(cls, path: Path) -> QueuedFile:
        """The UIDs from a file's header (for files the node did not just store itself)."""
        path = Path(path).resolve()
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID",
                                                                                 "SeriesInstanceUID"])
        except InvalidDicomError as exc:
            raise ValueError(f"{path}: not a DICOM file ({exc})") from None
        meta = getattr(ds, "file_meta", None)
        sop_class = ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta else None)
        sop_inst = ds.get("SOPInstanceUID") or (meta.get("MediaStorageSOPInstanceUID") if meta else None)
        if not sop_class or not sop_inst:
            raise ValueError(f"{path}: no SOP Class UID / SOP Instance UID in the header")
        series = ds.get("SeriesInstanceUID")
        return cls(str(sop_inst), str(sop_class), path, str(series) if series else None)


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
        database: db.Database | Path | str,
        settings: NodeSettings,
        *,
        calling_ae: str | None = None,
        recover_interrupted: bool = True,
        audit_trail: audit.AuditTrail | None = None,
        owner: str | None = None,
    ) -> None:
        self.database = db.Database.of(database)
        self.db_path = self.database.describe()
        self.settings = settings
        self.calling_ae = calling_ae or settings.node.ae_title
        here = self.database.path.parent if self.database.path else Path(settings.storage.root)
        #: who claims rows being sent (the node and its storage root) and this process's run
        self.owner = owner or node_identity(here)
        self.run_id = new_run_id()
        self._renewed_at = 0.0
        #: where deliveries are recorded; the node passes its store's, else beside the database
        self.audit = audit_trail or audit.AuditTrail(here / "audit", self.calling_ae)
        self._process_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.ensure_schema()
        if recover_interrupted:
            self._recover()

    # -- database -----------------------------------------------------------

    def _conn(self) -> db.Database:
        return self.database

    def ensure_schema(self) -> None:
        self.database.migrate()

    def _recover(self) -> int:
        """Put rows whose sender died back to pending (see the module docstring); returns how many."""
        t = db.now()
        n = len(take_over(
            self._conn(), "SELECT id, claim_owner, claim_run, claim_expires FROM outbox WHERE state='sending'", (),
            prefix="claim", me=self.owner, run=self.run_id, now=t,
            take=lambda c, row: c.execute("UPDATE outbox SET state='pending', claim_run=NULL, claim_expires=NULL,"
                                          " updated_at=? WHERE id=? AND state='sending'", (t, row["id"])).rowcount))
        if n:
            log.warning("outbox.recovered", extra=fields(items=n, reason="left 'sending' by a run that died"))
            self._wake.set()
        return n

    def _renew_claims(self, force: bool = False) -> None:
        """Keep this run's claims alive while a long batch goes out (cheap: at most every third of CLAIM_S)."""
        t = db.now()
        if not force and t - self._renewed_at < CLAIM_S / 3:
            return
        self._renewed_at = t
        self._conn().execute("UPDATE outbox SET claim_expires=? WHERE state='sending' AND claim_run=?",
                             (t + CLAIM_S, self.run_id))

    def close(self) -> None:
        """Stop the worker and close the connections this object opened."""
        self.stop()
        self.database.close()

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
        with db.transaction(self._conn()) as conn:
            new = self.enqueue_in(conn, destination, items, job_id)
        self.wake()
        return new

    def enqueue_in(self, conn: db.Connection, destination: str, items: Sequence[Queued | Path],
                   job_id: int | None = None) -> int:
        """:meth:`enqueue` inside the caller's open transaction on ``conn`` (the rows commit with it).

        The node queues a derived series in the transaction that indexes it
        (``Store.publish``), so it is sent only once it is complete.  Call
        :meth:`wake` after the commit.
        """
        self._check_destination(destination)
        entries: builtins.list[tuple[str, str, str, str | None]] = []
        for item in items:
            q = QueuedFile.read(item) if isinstance(item, (str, Path)) else item
            series = getattr(q, "series_uid", None)  # store results and QueuedFile carry it
            entries.append((str(q.sop_instance_uid), str(q.sop_class_uid), str(Path(q.path).resolve()),
                            str(series) if series else None))
        t = db.now()
        new = 0
        for sop_inst, sop_class, path, series in entries:
            new += conn.execute(
                "INSERT INTO outbox (destination, sop_instance_uid, sop_class_uid, path, job_id, state,"
                " attempts, next_attempt_at, created_at, updated_at, series_uid)"
                " VALUES (?, ?, ?, ?, ?, 'pending', 0, ?, ?, ?, ?)"
                " ON CONFLICT (destination, sop_instance_uid) DO NOTHING",
                (destination, sop_inst, sop_class, path, job_id, t, t, t, series),
            ).rowcount
        log.info(
            "outbox.enqueued",
            extra=fields(destination=destination, job_id=job_id, new=new, already_queued=len(entries) - new,
                         sop_instance_uids=[e[0] for e in entries]),
        )
        return new

    def wake(self) -> None:
        """Tell the worker that new rows are due (after the transaction that queued them committed)."""
        self._wake.set()

    def retry(self, ids: Sequence[int] | None = None, destination: str | None = None,
              series_uid: str | None = None) -> int:
        """Put dead (or pending) items back to pending, attempts and retry window reset, due now; returns how many.

        ``ids``, ``destination`` and ``series_uid`` narrow the selection; with
        none, every dead and pending item is reset.  Sent items are never touched.
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
        if series_uid is not None:
            where.append("series_uid = ?")
            args.append(series_uid)
        t = db.now()
        with db.transaction(self._conn()) as conn:
            n = conn.execute(
                "UPDATE outbox SET state='pending', attempts=0, first_failed_at=NULL, next_attempt_at=?, updated_at=?"
                f" WHERE {' AND '.join(where)}",
                [t, t, *args],
            ).rowcount
        log.info("outbox.requeued", extra=fields(items=n, ids=ids, destination=destination, series_uid=series_uid))
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

    def groups(self, state: str | None = None, destination: str | None = None) -> builtins.list[SeriesGroup]:
        """Rows grouped by (destination, job, series, state), dead first: the operator's view of the queue."""
        rows: dict[tuple[Any, ...], builtins.list[OutboxItem]] = {}
        for item in self.list(state=state, destination=destination):
            rows.setdefault((item.destination, item.job_id, item.series_uid, item.state), []).append(item)
        groups = []
        for (dest, job_id, series_uid, st), items in rows.items():
            newest = max(items, key=lambda i: i.updated_at)
            errors = [i for i in items if i.last_error]
            groups.append(SeriesGroup(
                dest, job_id, series_uid, st, tuple(i.id for i in items), max(i.attempts for i in items),
                min(i.created_at for i in items), newest.updated_at,
                max(errors, key=lambda i: i.updated_at).last_error if errors else None))
        return sorted(groups, key=lambda g: (g.state != "dead", g.destination, g.job_id or 0, g.oldest))

    def destination_health(self) -> dict[str, dict[str, Any]]:
        """``{destination: {failing_since, down_alerted, last_error}}`` for destinations that have failed."""
        return {r["destination"]: {"failing_since": r["failing_since"], "down_alerted": bool(r["down_alerted"]),
                                   "last_error": r["last_error"]}
                for r in self._conn().execute("SELECT * FROM outbox_destinations WHERE failing_since IS NOT NULL")}

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
                    "UPDATE outbox SET state='sending', updated_at=?, claim_owner=?, claim_run=?, claim_expires=?"
                    f" WHERE id IN ({','.join('?' * len(ids))})",
                    [db.now(), self.owner, self.run_id, db.now() + CLAIM_S, *ids],
                )
                self._renewed_at = db.now()
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
        crash_point("send")  # fault tests: sent and recorded, the rest of the batch not
        self._renew_claims()
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
        delay = retry_delay(cfg, attempts)
        with db.transaction(self._conn()) as conn:
            row = conn.execute("SELECT first_failed_at FROM outbox WHERE id=?", (w.id,)).fetchone()
            first = t if row is None or row["first_failed_at"] is None else float(row["first_failed_at"])
            dead = permanent or gives_up(cfg, attempts, first, t)
            next_at = t if dead else t + delay
            conn.execute(
                "UPDATE outbox SET state=?, attempts=?, next_attempt_at=?, last_status=?, last_error=?, updated_at=?,"
                " first_failed_at=? WHERE id=?",
                ("dead" if dead else "pending", attempts, next_at, status, error, db.now(), first, w.id),
            )
        if dead:
            log.error("outbox.dead", extra=fields(destination=dest, id=w.id, sop_instance_uid=w.sop_instance_uid,
                                                  attempts=attempts, status=hex_status(status), error=error,
                                                  failing_for_s=round(t - first, 1),
                                                  reason="permanent" if permanent else "retry window over"))
            events.emit("outbox.dead", destination=dest, id=w.id, sop_instance_uid=w.sop_instance_uid,
                        attempts=attempts, error=error)
            return "dead"
        log.warning("outbox.retry", extra=fields(destination=dest, id=w.id, sop_instance_uid=w.sop_instance_uid,
                                                 attempts=attempts, status=hex_status(status), error=error,
                                                 retry_in_s=delay, next_attempt_at=next_at))
        return "pending"

    def _destination_failed(self, dest: str, error: str, now: float | None) -> None:
        """Note that ``dest`` failed; the first time it has failed for ``alert_after_s``, alert once."""
        t = self._clock(now)
        with db.transaction(self._conn()) as conn:
            conn.execute("INSERT INTO outbox_destinations (destination, failing_since, last_error) VALUES (?, ?, ?)"
                         " ON CONFLICT (destination) DO UPDATE SET last_error = excluded.last_error,"
                         " failing_since = COALESCE(outbox_destinations.failing_since, excluded.failing_since)", (dest, t, error))
            row = conn.execute("SELECT failing_since, down_alerted FROM outbox_destinations WHERE destination=?",
                               (dest,)).fetchone()
            since = float(row["failing_since"])
            alert = not row["down_alerted"] and t - since >= self.settings.outbox.alert_after_s
            if alert:
                conn.execute("UPDATE outbox_destinations SET down_alerted=1 WHERE destination=?", (dest,))
        if alert:
            pending = self._conn().execute("SELECT COUNT(*) FROM outbox WHERE destination=? AND state IN"
                                           " ('pending', 'sending')", (dest,)).fetchone()[0]
            log.error("outbox.destination.down", extra=fields(
                destination=dest, failing_for_s=round(t - since, 1), failing_since=since, waiting=pending,
                error=error, gives_up_after_s=self.settings.outbox.retry_for_s))

    def _destination_ok(self, dest: str, now: float | None) -> None:
        row = self._conn().execute("SELECT failing_since, down_alerted FROM outbox_destinations WHERE destination=?",
                                   (dest,)).fetchone()
        if row is None or row["failing_since"] is None:
            return
        with db.transaction(self._conn()) as conn:
            conn.execute("UPDATE outbox_destinations SET failing_since=NULL, down_alerted=0, last_error=NULL"
                         " WHERE destination=?", (dest,))
        if row["down_alerted"]:
            log.warning("outbox.destination.up", extra=fields(
                destination=dest, was_down_for_s=round(self._clock(now) - float(row["failing_since"]), 1)))

    def _record(self, dest: str, outcome: Outcome, now: float | None, counts: dict[str, int]) -> None:
        w = outcome.work
        if outcome.result == "sent":
            assert outcome.status is not None
            self._mark_sent(dest, w, outcome.status)
            self._destination_ok(dest, now)
            counts["sent"] += 1
        elif outcome.result == "untried":
            self._release([w])
        else:
            state = self._mark_failed(dest, w, outcome.status, outcome.error or "failed",
                                      now, permanent=outcome.result == "permanent")
            if outcome.result != "permanent":  # a refused instance says nothing about the destination
                self._destination_failed(dest, outcome.error or "failed", now)
            counts["dead" if state == "dead" else "retried"] += 1

    def _audit_delivered(self, dest: Any, delivered: Sequence[tuple[Work, int]]) -> None:
        """One audit record per study delivered to ``dest`` in this batch (``audit.py``)."""
        if not delivered:
            return
        studies: dict[str, audit.Study] = {}
        warnings: dict[str, int] = {}
        for work, status in delivered:
            try:
                ds = pydicom.dcmread(work.path, stop_before_pixels=True, specific_tags=["StudyInstanceUID", "PatientID"])
                study_uid, patient_id = str(ds.get("StudyInstanceUID", "") or "unknown"), ds.get("PatientID")
            except (OSError, InvalidDicomError, ValueError):
                study_uid, patient_id = "unknown", None
            study = studies.setdefault(study_uid, audit.Study(study_uid, str(patient_id) if patient_id else None))
            study.add(work.sop_class_uid)
            warnings[study_uid] = warnings.get(study_uid, 0) + (status != 0x0000)
        trail = self.audit
        peer = getattr(dest, "ae_title", None) or getattr(dest, "url", dest.name)
        participants = [audit.Participant(self.calling_ae, None, True, audit.SOURCE_ROLE),
                        audit.Participant(str(peer), getattr(dest, "host", None), False, audit.DESTINATION_ROLE)]
        for uid, study in studies.items():
            trail.record(audit.INSTANCES_TRANSFERRED, audit.READ,
                         audit.MINOR_FAILURE if warnings[uid] else audit.SUCCESS, participants,
                         audit.study_objects([study]),
                         description=f"outbox: delivered to destination {dest.name!r}"
                                     + (f", {warnings[uid]} with a warning status" if warnings[uid] else ""))

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
            delivered: builtins.list[tuple[Work, int]] = []
            try:
                for outcome in sender_for(dest, self.settings, self.calling_ae).send(items, cancel):
                    self._record(name, outcome, now, counts)
                    pending.pop(outcome.work.id, None)
                    if outcome.result == "sent" and outcome.status is not None:
                        delivered.append((outcome.work, outcome.status))
            finally:
                self._audit_delivered(dest, delivered)
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
        last_recovery = time.monotonic()
        while not self._stop.is_set():
            self._wake.clear()
            busy = False
            try:
                if time.monotonic() - last_recovery >= CLAIM_S / 3:
                    last_recovery = time.monotonic()
                    self._recover()  # rows another node process left behind when it died
                counts = self._process_due(None, cancel=self._stop)
                busy = any(counts.values())
            except Exception:
                log.exception("outbox.error")
            if busy:
                continue  # more may be due (a batch limit, items released); re-check at once
            self._wake.wait(poll_interval_s)

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
