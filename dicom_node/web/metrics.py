"""Prometheus metrics of one node, in a registry of its own (no process-wide globals).

Counters and histograms are fed by the node's events (``dicom_node.events``):
instances received by outcome and their bytes, associations, per-stage job
durations, and the latency a referring physician feels - from the last
image of a job's inputs arriving to the last derived instance delivered to a
destination.  Gauges (series/jobs/outbox by state, outbox depth and oldest
age per destination, dead letters) are read from the database at scrape
time, so they are right after a restart and agree with the CLI.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dicom_node import events
from dicom_node.index import db
from dicom_node.states import JobState, OutboxState, SeriesState

log = logging.getLogger("dicom_node.web.metrics")

#: seconds; a fused series takes from seconds (small stacks on a GPU) to many minutes (CIRS on CPU)
STAGE_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800)
LATENCY_BUCKETS = (5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _DatabaseGauges(Collector):
    """Gauges computed from the node's tables on each scrape (one short read transaction)."""

    def __init__(self, database: db.Database, destinations: list[str]) -> None:
        self._database = database
        self._destinations = destinations

    def collect(self) -> Iterator[Metric]:
        series = GaugeMetricFamily("fusion_series", "Received series by state", labels=["state"])
        jobs = GaugeMetricFamily("fusion_jobs", "Fusion jobs by state", labels=["state"])
        outbox = GaugeMetricFamily("fusion_outbox_items", "Outbox items by destination and state",
                                   labels=["destination", "state"])
        depth = GaugeMetricFamily("fusion_outbox_depth", "Items waiting to be sent (pending or sending)",
                                  labels=["destination"])
        oldest = GaugeMetricFamily("fusion_outbox_oldest_age_seconds",
                                   "Age of the oldest item waiting to be sent (0 when none waits)",
                                   labels=["destination"])
        dead = GaugeMetricFamily("fusion_outbox_dead_letters", "Items given up on (state dead), by destination",
                                 labels=["destination"])
        conn = self._database
        now = time.time()
        counts = dict.fromkeys((s.value for s in SeriesState), 0)
        for r in conn.execute("SELECT state, COUNT(*) AS n FROM series WHERE origin='received' GROUP BY state"):
            counts[r["state"]] = r["n"]
        for state, n in counts.items():
            series.add_metric([state], n)
        counts = dict.fromkeys((s.value for s in JobState), 0)
        for r in conn.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state"):
            counts[r["state"]] = r["n"]
        for state, n in counts.items():
            jobs.add_metric([state], n)
        per: dict[str, dict[str, int]] = {d: dict.fromkeys((s.value for s in OutboxState), 0)
                                          for d in self._destinations}
        ages: dict[str, float] = dict.fromkeys(self._destinations, 0.0)
        for r in conn.execute("SELECT destination, state, COUNT(*) AS n, MIN(created_at) AS first "
                              "FROM outbox GROUP BY destination, state"):
            per.setdefault(r["destination"], dict.fromkeys((s.value for s in OutboxState), 0))
            per[r["destination"]][r["state"]] = r["n"]
            if r["state"] in ("pending", "sending"):
                ages[r["destination"]] = max(ages.get(r["destination"], 0.0), now - r["first"])
        for dest, states in per.items():
            for state, n in states.items():
                outbox.add_metric([dest, state], n)
            depth.add_metric([dest], states["pending"] + states["sending"])
            oldest.add_metric([dest], round(ages.get(dest, 0.0), 3))
            dead.add_metric([dest], states["dead"])
        yield from (series, jobs, outbox, depth, oldest, dead)


class NodeMetrics:
    """The node's registry and the event listener that feeds its counters."""

    def __init__(self, database: db.Database | Path | str, destinations: list[str]) -> None:
        self.database = db.Database.of(database)
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.instances = Counter("fusion_instances_received", "C-STORE requests by outcome "
                                 "(stored, duplicate, rejected, error)", ["outcome"], registry=r)
        self.bytes = Counter("fusion_received_bytes", "Bytes of instances stored (duplicates included)", registry=r)
        self.associations = Counter("fusion_associations", "Associations by outcome (accepted, rejected)",
                                    ["outcome"], registry=r)
        self.jobs_finished = Counter("fusion_jobs_finished", "Jobs finished by outcome (done, failed)",
                                     ["pipeline", "outcome"], registry=r)
        self.stage_seconds = Histogram("fusion_job_stage_seconds", "Seconds per job stage",
                                       ["pipeline", "stage"], buckets=STAGE_BUCKETS, registry=r)
        self.latency = Histogram("fusion_delivery_latency_seconds",
                                 "Last input image received -> last derived instance delivered, per job and destination",
                                 ["destination"], buckets=LATENCY_BUCKETS, registry=r)
        self.sent = Counter("fusion_outbox_sent", "Instances delivered, by destination", ["destination"], registry=r)
        self.dead = Counter("fusion_outbox_dead", "Instances given up on since start, by destination",
                            ["destination"], registry=r)
        self.doubtful = Counter("fusion_registrations_doubtful", "Registrations the quality check doubted",
                                ["pipeline", "policy"], registry=r)
        for outcome in ("stored", "duplicate", "rejected", "error"):
            self.instances.labels(outcome)
        for outcome in ("accepted", "rejected"):
            self.associations.labels(outcome)
        for d in destinations:
            self.sent.labels(d)
            self.dead.labels(d)
        r.register(_DatabaseGauges(self.database, destinations))
        self._delivered: set[tuple[int, str]] = set()
        self._unsubscribe: Any = None

    def start(self) -> NodeMetrics:
        self._unsubscribe = events.subscribe(self.on_event)
        return self

    def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def _conn(self) -> db.Database:
        return self.database

    def on_event(self, event: str, f: dict[str, Any]) -> None:
        if event == "scp.instance":
            self.instances.labels(f["outcome"]).inc()
            if f.get("bytes"):
                self.bytes.inc(f["bytes"])
        elif event == "scp.association":
            self.associations.labels(f["outcome"]).inc()
        elif event == "job.done":
            self.jobs_finished.labels(f["pipeline"], "done").inc()
            for stage, seconds in (f.get("seconds") or {}).items():
                self.stage_seconds.labels(f["pipeline"], stage).observe(float(seconds))
        elif event == "job.failed":
            self.jobs_finished.labels(f["pipeline"], "failed").inc()
        elif event == "registration.doubtful":
            self.doubtful.labels(f["pipeline"], f["policy"]).inc()
        elif event == "outbox.dead":
            self.dead.labels(f["destination"]).inc()
        elif event == "outbox.sent":
            self.sent.labels(f["destination"]).inc()
            self._maybe_delivered(int(f["id"]), f["destination"])

    def _maybe_delivered(self, item_id: int, destination: str) -> None:
        """When the last of a job's items reaches a destination, observe the job's latency once."""
        conn = self._conn()
        row = conn.execute("SELECT job_id FROM outbox WHERE id = ?", (item_id,)).fetchone()
        if row is None or row["job_id"] is None or (row["job_id"], destination) in self._delivered:
            return
        job_id = row["job_id"]
        left = conn.execute("SELECT COUNT(*) AS n FROM outbox WHERE job_id = ? AND destination = ? AND state != 'sent'",
                            (job_id, destination)).fetchone()["n"]
        if left:
            return
        last = conn.execute(
            "SELECT MAX(s.last_received) AS t FROM jobs j JOIN series s "
            "ON s.series_uid IN (j.base_series_uid, j.overlay_series_uid) WHERE j.id = ?", (job_id,)).fetchone()["t"]
        self._delivered.add((job_id, destination))
        if last is not None:
            self.latency.labels(destination).observe(max(0.0, time.time() - last))
