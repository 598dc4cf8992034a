"""Two node processes on one PostgreSQL queue and one storage root, the way a large site runs receivers.

The CT goes to node A and the MR to node B (two receivers); the pair meets in
the shared index and makes one job.  The node that claims it is killed with
SIGKILL in the middle of the job; the other takes the job over (its lease is
dead: run out, or at once here, where both nodes share a host and the dead
run's pid is gone), resumes it and delivers.  Once with the jobs in the
nodes' own threads, once on a Dask scheduler with two workers (the task the
dead node submitted is dropped with its client; the survivor submits it
again under the same key).  Asserted: no received instance lost,
exactly one fused series (one set of UIDs) and one REG object at the PACS
(Orthanc), the job done once with one interruption.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from dicom_helpers import free_port, storescu
from peers import OrthancServer
from serve_process import pacs_pipeline_toml, start_serve

from dicom_node.index import db

REPO = Path(__file__).resolve().parents[1]
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
REG_CLASS = "1.2.840.10008.5.1.4.1.1.66.1"


def _config(folder: Path, *, instance: str, port: int, root: Path, url: str, pacs_port: int,
            scheduler: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"node-{instance}.toml"
    path.write_text(pacs_pipeline_toml(
        port=port, root=root, pacs_port=pacs_port, storage=f'database_url = "{url}"\ninstance = "{instance}"',
        sections=f'[executor]\nkind = "dask"\nscheduler = "{scheduler}"' if scheduler else ""))
    return path


def _send(port: int, folder: Path) -> None:
    done = storescu(port, folder)
    assert done.returncode == 0, done.stderr[-2000:]


def _wait(predicate, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():
            return time.monotonic() - t0
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["local", "dask"])
def test_two_nodes_share_one_queue_and_survive_the_death_of_the_one_fusing(tmp_path, postgres_server, executor):
    from fusion_demo.samples import write_synthetic_pair

    ct, mr = write_synthetic_pair(tmp_path / "pair")
    received = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
                for d in (ct, mr) for p in d.iterdir()}
    n_base = len(list(ct.iterdir()))
    url = postgres_server.create_database()
    database = db.Database(url)
    pacs = OrthancServer(tmp_path / "orthanc")
    root = tmp_path / "shared-store"
    cluster = None
    if executor == "dask":
        pytest.importorskip("distributed", reason="the Dask executor needs the [dask] extra")
        from dask_cluster import DaskCluster

        cluster = DaskCluster(tmp_path / "dask", workers=2)
    ports = {"a": free_port(), "b": free_port()}
    procs = {name: start_serve(_config(tmp_path, instance=name, port=port, root=root, url=url, pacs_port=pacs.dicom_port,
                                  scheduler=cluster.address if cluster else ""),
                          port, tmp_path / f"node-{name}.log") for name, port in ports.items()}
    try:
        _send(ports["a"], ct)   # two receivers: the CT through A ...
        _send(ports["b"], mr)   # ... the MR through B; they meet in the shared index

        def running() -> dict | None:
            row = database.execute("SELECT * FROM jobs WHERE state = 'running' AND stage IN"
                                   " ('register', 'prepare', 'fuse', 'remote')").fetchone()
            return dict(row) if row else None

        _wait(lambda: running() is not None, 240, "a node to start the job")
        job = running()
        assert job is not None
        pid = int(job["lease_run"].split("-")[0])
        victim = next(name for name, p in procs.items() if p.pid == pid)
        os.kill(pid, signal.SIGKILL)
        procs[victim].wait(10)
        survivor = next(name for name in procs if name != victim)
        t_kill = time.monotonic()

        def delivered() -> bool:
            row = database.execute("SELECT state, error FROM jobs WHERE id = ?", (job["id"],)).fetchone()
            if row["state"] == "failed":
                pytest.fail(f"job failed: {row['error']}")
            return row["state"] == "done" and not database.execute(
                "SELECT 1 FROM outbox WHERE state <> 'sent'").fetchone()

        _wait(delivered, 240, f"node {survivor} to take the job over and deliver")
        takeover_s = time.monotonic() - t_kill
        assert procs[survivor].poll() is None, "the surviving node kept serving"
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
        if cluster is not None:
            cluster.close()
    try:
        stored = {r[0] for r in database.execute("SELECT sop_instance_uid FROM instances")}
        assert received <= stored, f"{len(received - stored)} received instances lost"
        series: dict[str, tuple[str, set[str]]] = {}
        for iid in pacs.get("/instances"):
            tags = pacs.get(f"/instances/{iid}/tags?simplify")
            series.setdefault(tags["SeriesInstanceUID"], (tags["SOPClassUID"], set()))[1].add(tags["SOPInstanceUID"])
        sc = [s for s in series.values() if s[0] == SC_CLASS]
        reg = [s for s in series.values() if s[0] == REG_CLASS]
        assert len(sc) == 1 and len(sc[0][1]) == n_base, f"want one complete fused series at the PACS: {series}"
        assert len(reg) == 1 and len(reg[0][1]) == 1
        jobs = [dict(r) for r in database.execute("SELECT * FROM jobs")]
        assert len(jobs) == 1, "the pair made one job across the two receivers"
        done = jobs[0]
        assert done["state"] == "done" and done["interruptions"] == 1
        result = json.loads(done["result"])
        assert result["sc_series_uid"] in series
        sent = database.execute("SELECT COUNT(*) FROM outbox WHERE state = 'sent'").fetchone()[0]
        assert sent == n_base + 1, "each derived instance queued and sent once"
        if executor == "dask":
            assert result["executor"]["kind"] == "dask", result.get("executor")
        print("SHARED-QUEUE-FIGURES", json.dumps({"executor": executor, "victim": victim, "survivor": survivor,
                                                  "takeover_to_delivered_s": round(takeover_s, 1),
                                                  "resumed": result.get("resumed", [])}))
    finally:
        database.close()
        pacs.stop()
