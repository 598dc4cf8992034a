"""Retention: which series the node may delete, and deleting them (``fusion-node purge``, and periodically in ``serve``).

A series is *eligible* only when nothing the node still has to do needs it:

- a **received** series whose every job is ``done`` and whose fused objects were
  delivered to every destination (no outbox row of the job pending, sending or
  dead), older than ``received_max_age_days`` (since its last instance);
- a **derived** series (fused SC, REG) whose instances were all sent, older than
  ``derived_max_age_days`` (since it was delivered);
- a series **never fused** - unmatched, partner timed out, or its job failed -
  older than ``unfused_max_age_days``.

Never eligible: a series still open or settled (being received or about to
pair), one a queued or running job uses, one with an outbox row not yet sent.
Age is waived (oldest first, until enough is free) while the disk is below
``min_free_percent``; below ``reserve_free_percent`` the Storage SCP refuses
C-STORE with 0xA700 (``index/disk.py``).

A purge deletes the index rows first (series, instances, their sent outbox
rows, a study left empty) in one transaction, then the files: a crash in
between leaves orphan files, never an index row without its file.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dicom_node import logs
from dicom_node.config import NodeSettings
from dicom_node.index import db
from dicom_node.index.disk import DiskSpace, disk_space
from dicom_node.index.store import Store

log = logging.getLogger("dicom_node.workflow.retention")

DAY_S = 86400.0


@dataclass(frozen=True)
class Verdict:
    """One series and what retention decides about it."""

    series_uid: str
    study_uid: str
    origin: str
    state: str
    instances: int
    size_bytes: int
    #: seconds since the series last changed (last instance, or delivery for derived ones)
    age_s: float
    #: may go once old enough (or the disk is short)
    eligible_by_state: bool
    #: goes now (eligible by state, and old enough or the disk is short)
    purge: bool
    #: why it goes, or why it stays
    reason: str
    #: past its age limit (False for a series that goes only because the disk is short)
    old_enough: bool = False

    @property
    def age_days(self) -> float:
        return self.age_s / DAY_S


@dataclass
class PurgeReport:
    dry_run: bool
    free_before: DiskSpace
    below_watermark: bool
    purged: list[Verdict] = field(default_factory=list)
    kept: list[Verdict] = field(default_factory=list)

    @property
    def bytes_purged(self) -> int:
        return sum(v.size_bytes for v in self.purged)


class Retention:
    """Decides and purges for one node's store; ``space`` measures the disk (the store root's file system)."""

    def __init__(self, settings: NodeSettings, store: Store,
                 space: Callable[[], DiskSpace] | None = None) -> None:
        self.settings = settings
        self.store = store
        self._space = space or (lambda: disk_space(self.store.root))
        self._lock = threading.Lock()
        self._last_run: float | None = None

    def _conn(self) -> db.Database:
        return db.connect(self.store.database)

    # -- deciding ---------------------------------------------------------------------

    def verdicts(self, now: float | None = None, *, below_watermark: bool = False) -> list[Verdict]:
        """Every received and derived series with its verdict, oldest first."""
        t = db.now() if now is None else now
        conn = self._conn()
        rows = conn.execute(
            "SELECT s.series_uid, s.study_uid, s.origin, s.state, s.last_received, s.first_received,"
            " COUNT(i.sop_instance_uid) AS n, COALESCE(SUM(i.size_bytes), 0) AS size"
            " FROM series s LEFT JOIN instances i ON i.series_uid = s.series_uid"
            " GROUP BY s.series_uid ORDER BY COALESCE(s.last_received, s.first_received, 0), s.series_uid"
        ).fetchall()
        out = []
        for r in rows:
            uid = r["series_uid"]
            undelivered = conn.execute(
                "SELECT COUNT(*) FROM outbox WHERE state != 'sent' AND (series_uid = ? OR sop_instance_uid IN"
                " (SELECT sop_instance_uid FROM instances WHERE series_uid = ?))", (uid, uid)).fetchone()[0]
            sent_at = conn.execute(
                "SELECT MAX(updated_at) FROM outbox WHERE state = 'sent' AND (series_uid = ? OR sop_instance_uid"
                " IN (SELECT sop_instance_uid FROM instances WHERE series_uid = ?))", (uid, uid)).fetchone()[0]
            changed = max(x for x in (r["last_received"], r["first_received"], sent_at, 0.0) if x is not None)
            age = max(0.0, t - changed)
            ok, limit_days, reason = self._rule(conn, r, undelivered or 0)
            old_enough = limit_days is not None and age >= limit_days * DAY_S
            purge = ok and (old_enough or below_watermark)
            if ok and not purge:
                reason = f"{reason}; kept until {limit_days:g} days old (now {age / DAY_S:.2f})"
            elif ok and not old_enough:
                reason = f"{reason}; disk below retention.min_free_percent"
            out.append(Verdict(uid, r["study_uid"], r["origin"], r["state"], r["n"], r["size"], age, ok, purge, reason,
                               old_enough))
        return out

    def _rule(self, conn: db.Database, r: db.Row, undelivered: int) -> tuple[bool, float | None, str]:
        """(eligible by state, age limit in days, reason) for one series."""
        cfg = self.settings.retention
        uid, state = r["series_uid"], r["state"]
        if undelivered:
            return False, None, f"{undelivered} outbox item(s) not yet delivered"
        if r["origin"] == "derived":
            return True, cfg.derived_max_age_days, "derived and delivered"
        if state in ("open", "settled"):
            return False, None, f"series {state} (still arriving or about to pair)"
        job_states = [(j["id"], j["state"]) for j in conn.execute(
            "SELECT id, state FROM jobs WHERE base_series_uid = ? OR overlay_series_uid = ?", (uid, uid))]
        pending = [i for i, s in job_states if s in ("queued", "running")]
        if pending:
            return False, None, f"job(s) {pending} queued or running need it"
        if state in ("unmatched", "timed_out"):
            return True, cfg.unfused_max_age_days, f"never fused ({state})"
        done = [i for i, s in job_states if s == "done"]
        if not done:
            failed = [i for i, s in job_states if s == "failed"]
            return True, cfg.unfused_max_age_days, (f"never fused (job(s) {failed} failed)" if failed
                                                    else "never fused (no job)")
        marks = ",".join("?" * len(done))
        left = conn.execute(f"SELECT COUNT(*) FROM outbox WHERE job_id IN ({marks}) AND state != 'sent'",
                            done).fetchone()[0]
        if left:
            return False, None, f"fusion of job(s) {done} not yet delivered ({left} item(s))"
        return True, cfg.received_max_age_days, f"fused (job(s) {done}) and delivered"

    # -- purging ----------------------------------------------------------------------

    def due(self, interval_s: float) -> bool:
        """True when the periodic purge should run: the interval passed, or the disk is below the watermark."""
        last = self._last_run
        if last is None or time.monotonic() - last >= interval_s:
            return True
        return self._space().free_percent < self.settings.retention.min_free_percent

    def purge(self, now: float | None = None, *, dry_run: bool = False) -> PurgeReport:
        """Delete (or, with ``dry_run``, only list) what retention allows; see the module docstring."""
        with self._lock:
            self._last_run = time.monotonic()
            space = self._space()
            cfg = self.settings.retention
            below = space.free_percent < cfg.min_free_percent
            verdicts = self.verdicts(now, below_watermark=below)
            report = PurgeReport(dry_run, space, below)
            need = max(0.0, cfg.min_free_percent / 100.0 * space.total_bytes - space.free_bytes) if below else 0.0
            freed = 0
            for v in verdicts:
                if not v.purge:
                    report.kept.append(v)
                    continue
                if not v.old_enough and freed >= need:
                    # enough room made: the rest wait for their age (kept, eligible)
                    report.kept.append(Verdict(**{**v.__dict__, "purge": False,
                                                  "reason": v.reason.replace("disk below retention.min_free_percent",
                                                                             "enough space freed")}))
                    continue
                if not dry_run:
                    self._delete(v)
                report.purged.append(v)
                freed += v.size_bytes
            if report.purged or below:
                log.info("retention.purged" if not dry_run else "retention.planned", extra=logs.fields(
                    series=len(report.purged), instances=sum(v.instances for v in report.purged),
                    bytes=report.bytes_purged, below_watermark=below, free_percent=round(space.free_percent, 2),
                    series_uids=[v.series_uid for v in report.purged]))
            return report

    def _delete(self, v: Verdict) -> None:
        with db.transaction(self._conn()) as c:
            paths = [self.store.root / p["path"] for p in c.execute(
                "SELECT path FROM instances WHERE series_uid = ?", (v.series_uid,))]
            # re-checked inside the transaction: a new instance or outbox row since the decision keeps the series
            if c.execute(
                    "SELECT COUNT(*) FROM outbox WHERE state != 'sent' AND (series_uid = ? OR sop_instance_uid IN"
                    " (SELECT sop_instance_uid FROM instances WHERE series_uid = ?))",
                    (v.series_uid, v.series_uid)).fetchone()[0]:
                return
            row = c.execute("SELECT state, instance_count FROM series WHERE series_uid = ?", (v.series_uid,)).fetchone()
            if row is None or row["state"] != v.state or len(paths) != v.instances:
                return
            c.execute("DELETE FROM outbox WHERE state = 'sent' AND sop_instance_uid IN"
                      " (SELECT sop_instance_uid FROM instances WHERE series_uid = ?)", (v.series_uid,))
            c.execute("DELETE FROM instances WHERE series_uid = ?", (v.series_uid,))
            c.execute("DELETE FROM series WHERE series_uid = ?", (v.series_uid,))
            if c.execute("SELECT 1 FROM series WHERE study_uid = ? LIMIT 1", (v.study_uid,)).fetchone() is None:
                c.execute("DELETE FROM studies WHERE study_uid = ?", (v.study_uid,))
        folders: set[Path] = set()
        for p in paths:
            p.unlink(missing_ok=True)
            folders.add(p.parent)
        for folder in folders:
            for d in (folder, folder.parent):
                try:
                    if d != self.store.instances_dir:
                        d.rmdir()  # only when empty
                except OSError:
                    pass
        log.info("retention.series.purged", extra=logs.fields(
            series_uid=v.series_uid, origin=v.origin, state=v.state, instances=v.instances, bytes=v.size_bytes,
            age_days=round(v.age_days, 2), reason=v.reason))
