"""Fault injection with real processes and real peers: kill -9 the node at each step, take the PACS away.

Each case runs the node as its own process (``python -m dicom_node.cli serve``),
sends the generated CT+MR phantom with DCMTK storescu and lets the node send
the fused series to Orthanc.  A first run is killed with SIGKILL at one point
(``FUSION_CRASH_AT``, fusion/environment.py: the node kills itself there, so a
window of a few milliseconds is hit every time); a second run recovers.  Per
case the test asserts:

* 0 acknowledged instances lost: every instance storescu saw answered Success
  is in the node's index after the crash;
* exactly one fused series (one set of UIDs) and one REG object at the PACS;
* no partial derived series ever visible in the node's index (Q/R serves the
  index) - checked right after the crash and at the end;
* nothing left in ``tmp/``, ``staging/`` or ``checkpoints/``.

The figures (tries, lost, duplicated, partial, time to recover) are printed
as ``FAULT-FIGURES {json}`` lines; docs/reliability.md has the table.
"""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from dicom_helpers import free_port, storescu
from peers import OrthancServer
from serve_process import pacs_pipeline_toml, start_serve

from fusion.environment import child_environment

REPO = Path(__file__).resolve().parents[1]
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
REG_CLASS = "1.2.840.10008.5.1.4.1.1.66.1"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from fusion_demo.samples import write_synthetic_pair

    ct, mr = write_synthetic_pair(tmp_path_factory.mktemp("pair"))
    uids = {p: pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for d in (ct, mr) for p in sorted(d.iterdir())}
    return ct, mr, uids


@dataclass
class Run:
    proc: subprocess.Popen
    log: Path


class NodeUnderTest:
    """The node's configuration, data folder and processes; a new process per :meth:`start`."""

    def __init__(self, workdir: Path, pacs_port: int):
        self.root = workdir / "node"
        self.port = free_port()
        self.config = workdir / "node.toml"
        self.runs = 0
        self.config.write_text(pacs_pipeline_toml(
            port=self.port, root=self.root, pacs_port=pacs_port,
            outbox="max_attempts = 1000\nbackoff_initial_s = 0.5\nbackoff_max_s = 1"))

    def start(self, crash_at: str | None = None) -> Run:
        self.runs += 1
        env = child_environment(REPO, FUSION_CRASH_AT=crash_at)
        log = self.config.parent / f"node-run{self.runs}.log"
        return Run(start_serve(self.config, self.port, log, env), log)

    def db(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.root / "node.sqlite", timeout=30)
        conn.row_factory = sqlite3.Row
        return conn

    def derived_series(self) -> dict[str, int]:
        """Derived series in the index (what Q/R serves) -> instance count."""
        with self.db() as c:
            return {r["series_uid"]: r["n"] for r in c.execute(
                "SELECT s.series_uid, COUNT(i.sop_instance_uid) AS n FROM series s JOIN instances i"
                " ON i.series_uid = s.series_uid WHERE s.origin = 'derived' GROUP BY s.series_uid")}

    def stored_uids(self) -> set[str]:
        with self.db() as c:
            return {r[0] for r in c.execute("SELECT sop_instance_uid FROM instances")}

    def job(self) -> dict | None:
        with self.db() as c:
            row = c.execute("SELECT * FROM jobs ORDER BY id LIMIT 1").fetchone()
        return dict(row) if row else None

    def delivered(self) -> bool:
        job = self.job()
        if job is not None and job["state"] == "failed":
            pytest.fail(f"job failed: {job['error']}")
        if job is None or job["state"] != "done":
            return False
        with self.db() as c:
            return not c.execute("SELECT 1 FROM outbox WHERE state <> 'sent' LIMIT 1").fetchone()

    def leftovers(self) -> list[str]:
        return [str(p.relative_to(self.root)) for d in ("tmp", "staging", "checkpoints")
                for p in (self.root / d).rglob("*") if p.is_file()] if self.root.exists() else []


def _send(node: NodeUnderTest, folders: list[Path]) -> tuple[int, set[Path]]:
    """storescu the folders; returns (exit code, the files storescu saw answered Success)."""
    done = storescu(node.port, *folders, verbose=True)
    acked, current = set(), None
    for line in (done.stdout + done.stderr).splitlines():
        m = re.search(r"Sending file: (.+)$", line)
        if m:
            current = Path(m.group(1).strip())
        elif "Received Store Response (Success)" in line and current is not None:
            acked.add(current)
    return done.returncode, acked


def _wait(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():
            return time.monotonic() - t0
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the node exited while waiting for {what}")
        time.sleep(0.3)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def _pacs_series(pacs: OrthancServer) -> dict[str, tuple[str, set[str]]]:
    """Series at the PACS by SOP Class of their instances: {series uid: (sop class, instance uids)}."""
    out: dict[str, tuple[str, set[str]]] = {}
    for iid in pacs.get("/instances"):
        tags = pacs.get(f"/instances/{iid}/tags?simplify")
        series = out.setdefault(tags["SeriesInstanceUID"], (tags["SOPClassUID"], set()))
        series[1].add(tags["SOPInstanceUID"])
    return out


def _check_outcome(node: NodeUnderTest, pacs: OrthancServer, pair, n_base: int) -> dict:
    ct, mr, uids = pair
    series = _pacs_series(pacs)
    sc = [s for s in series.values() if s[0] == SC_CLASS]
    reg = [s for s in series.values() if s[0] == REG_CLASS]
    lost = len(set(uids.values()) - node.stored_uids())
    figures = {"lost": lost, "sc_series": len(sc), "reg_series": len(reg),
               "duplicated": max(0, len(sc) - 1) + max(0, len(reg) - 1),
               "partial": sum(1 for s in sc if len(s[1]) != n_base), "leftovers": node.leftovers()}
    assert lost == 0, f"{lost} received instances missing from the node"
    assert len(sc) == 1 and len(sc[0][1]) == n_base, f"want one complete fused series, PACS has {series}"
    assert len(reg) == 1 and len(reg[0][1]) == 1
    derived = node.derived_series()
    assert sorted(derived.values()) == [1, n_base], f"derived series in the node's index: {derived}"
    job = node.job()
    assert job is not None
    result = json.loads(job["result"])
    assert result["sc_series_uid"] in series, "the series at the PACS is the job's one set of UIDs"
    assert not figures["leftovers"], f"left in tmp/staging/checkpoints: {figures['leftovers']}"
    return figures | {"interruptions": job["interruptions"], "retries": job["retries"],
                      "resumed": result.get("resumed", [])}


def _no_partial_visible(node: NodeUnderTest, n_base: int) -> None:
    """Right after a crash: the index holds no derived series, or the whole one (SC and REG)."""
    counts = sorted(node.derived_series().values())
    assert counts in ([], [1, n_base]), f"partial derived series visible after the crash: {counts}"


@pytest.fixture
def pacs(tmp_path):
    server = OrthancServer(tmp_path / "orthanc")
    yield server
    server.stop()


def _kill_case(tmp_path, pacs, pair, crash_at: str, *, resend: bool = False) -> dict:
    ct, mr, uids = pair
    n_base = len(list(ct.iterdir()))
    node = NodeUnderTest(tmp_path, pacs.dicom_port)
    first = node.start(crash_at)
    try:
        rc, acked = _send(node, [ct, mr])
        _wait(lambda: first.proc.poll() is not None, 600, f"the crash at {crash_at}")
    finally:
        if first.proc.poll() is None:
            first.proc.kill()
    assert first.proc.returncode == -signal.SIGKILL, f"the node was to die by SIGKILL at {crash_at}"
    stored = node.stored_uids()
    acked_lost = {uids[p] for p in acked if p in uids} - stored
    assert not acked_lost, f"{len(acked_lost)} acknowledged instances lost"
    _no_partial_visible(node, n_base)
    t0 = time.monotonic()
    second = node.start()
    try:
        if resend:
            rc, _ = _send(node, [ct, mr])
            assert rc == 0
        _wait(node.delivered, 600, "the fused series delivered after the restart", second.proc)
        recover_s = time.monotonic() - t0
    finally:
        second.proc.send_signal(signal.SIGTERM)
        try:
            second.proc.wait(60)
        except subprocess.TimeoutExpired:
            second.proc.kill()
    figures = _check_outcome(node, pacs, pair, n_base)
    figures.update(case=f"kill -9 at {crash_at}", tries=node.runs, acked_before_crash=len(acked),
                   recover_s=round(recover_s, 1))
    print("FAULT-FIGURES", json.dumps(figures))
    return figures


def test_baseline_no_fault(tmp_path, pacs, pair):
    """The reference the recovery times are compared with: one uninterrupted run, from start to delivered."""
    ct, mr, _ = pair
    node = NodeUnderTest(tmp_path, pacs.dicom_port)
    t0 = time.monotonic()
    run = node.start()
    try:
        assert _send(node, [ct, mr])[0] == 0
        _wait(node.delivered, 600, "the fused series delivered", run.proc)
        total = time.monotonic() - t0
    finally:
        run.proc.send_signal(signal.SIGTERM)
        run.proc.wait(60)
    figures = _check_outcome(node, pacs, pair, len(list(ct.iterdir())))
    assert figures["interruptions"] == 0 and figures["resumed"] == []
    print("FAULT-FIGURES", json.dumps(figures | {"case": "no fault (baseline)", "tries": 1, "recover_s": round(total, 1)}))

    # the operator's retry of the done job: refused without --new-version; with it, a second, marked series
    cli = [sys.executable, "-m", "dicom_node.cli", "jobs", "retry", "1", "--config", str(node.config)]
    env = child_environment(REPO, FUSION_CRASH_AT=None)
    refused = subprocess.run(cli, capture_output=True, text=True, env=env, cwd=REPO)
    assert refused.returncode == 1 and "--new-version" in refused.stderr
    assert subprocess.run([*cli, "--new-version"], capture_output=True, text=True, env=env, cwd=REPO).returncode == 0
    first_uid = json.loads(node.job()["result"])["sc_series_uid"]
    run = node.start()
    try:
        _wait(lambda: node.delivered() and node.job()["version"] == 2, 600, "version 2 delivered", run.proc)
    finally:
        run.proc.send_signal(signal.SIGTERM)
        run.proc.wait(60)
    descriptions = {}
    for sid in pacs.get("/series"):
        tags = pacs.get(f"/series/{sid}")["MainDicomTags"]
        descriptions[tags["SeriesInstanceUID"]] = tags.get("SeriesDescription", "")
    v2_uid = json.loads(node.job()["result"])["sc_series_uid"]
    assert v2_uid != first_uid and descriptions[v2_uid].endswith(" V2") and not descriptions[first_uid].endswith("V2")
    assert sum("REG" in d for d in descriptions.values()) == 2


@pytest.mark.slow
def test_kill_during_receive(tmp_path, pacs, pair):
    """Dies after the 30th instance was stored and before its answer; the scanner sends again."""
    figures = _kill_case(tmp_path, pacs, pair, "receive:30", resend=True)
    assert figures["acked_before_crash"] >= 29
    assert figures["interruptions"] == 0  # no job existed yet


@pytest.mark.slow
def test_kill_during_registration(tmp_path, pacs, pair):
    figures = _kill_case(tmp_path, pacs, pair, "register")
    assert figures["interruptions"] == 1 and figures["resumed"] == []


@pytest.mark.slow
def test_kill_during_fuse_resumes_after_registration(tmp_path, pacs, pair):
    figures = _kill_case(tmp_path, pacs, pair, "fuse")
    assert figures["interruptions"] == 1 and figures["resumed"] == ["register"]


@pytest.mark.slow
def test_kill_while_storing_derived_objects(tmp_path, pacs, pair):
    """Dies with 10 of the 41 derived files written: nothing of them visible, the rerun re-derives, no fuse."""
    figures = _kill_case(tmp_path, pacs, pair, "stage:10")
    assert figures["interruptions"] == 1 and figures["resumed"] == ["register", "fuse"]


def test_kill_between_queueing_and_done(tmp_path, pacs, pair):
    """Dies inside the one transaction that indexes, queues and marks done: it never happened, re-run gives the same UIDs."""
    figures = _kill_case(tmp_path, pacs, pair, "publish")
    assert figures["interruptions"] == 1 and figures["resumed"] == ["register", "fuse"]


@pytest.mark.slow
def test_kill_while_sending(tmp_path, pacs, pair):
    """Dies after the first instance reached the PACS: the restart sends the rest, the PACS has one series."""
    figures = _kill_case(tmp_path, pacs, pair, "send:5")
    assert figures["interruptions"] == 0  # the job was done; only the outbox resumed


@pytest.mark.slow
def test_pacs_down_then_back(tmp_path, pair):
    """The PACS is away while the job finishes and for 20 s more; everything arrives when it is back, no operator."""
    ct, mr, _ = pair
    workdir = tmp_path / "orthanc"
    pacs = OrthancServer(workdir)
    ports = (pacs.dicom_port, pacs.http_port)
    pacs.stop()
    node = NodeUnderTest(tmp_path, ports[0])
    run = node.start()
    try:
        assert _send(node, [ct, mr])[0] == 0
        _wait(lambda: (node.job() or {}).get("state") == "done", 600, "the job done", run.proc)
        time.sleep(20)
        with node.db() as c:
            assert c.execute("SELECT COUNT(*) FROM outbox WHERE state = 'sent'").fetchone()[0] == 0
            assert c.execute("SELECT COUNT(*) FROM outbox WHERE state = 'dead'").fetchone()[0] == 0
        pacs = OrthancServer(workdir, ports=ports)
        t0 = time.monotonic()
        _wait(node.delivered, 300, "delivery after the PACS came back", run.proc)
        recover_s = time.monotonic() - t0
    finally:
        run.proc.send_signal(signal.SIGTERM)
        run.proc.wait(60)
    try:
        figures = _check_outcome(node, pacs, pair, len(list(ct.iterdir())))
    finally:
        pacs.stop()
    print("FAULT-FIGURES", json.dumps(figures | {"case": "PACS down 20 s after the job, then back", "tries": 1,
                                                 "recover_s": round(recover_s, 1)}))
