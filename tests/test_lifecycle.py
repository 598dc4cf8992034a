"""The lifecycle of a real ``fusion-node serve`` process: SIGTERM during a receive and during a job, SIGHUP reloads.

Each case runs the real command from a TOML file, signals it from the test
and reads its JSON log and database afterwards.  The SIGTERM bound under test
is ``node.shutdown_timeout_s`` plus :data:`EXIT_SLACK_S` (interpreter exit).
"""

from __future__ import annotations

import signal
import threading
import time

import pydicom
import pytest
from dicom_helpers import dcmtk, free_port, make_image, run_tool
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification
from serve_process import PIPELINE, ServeProcess, node_toml

#: seconds past ``shutdown_timeout_s`` the process may take to exit (Python and thread teardown)
EXIT_SLACK_S = 2.0

def _echo(port: int, calling: str = "SCANNER") -> bool:
    r = run_tool("echoscu", "-aet", calling, "-aec", "FUSIONNODE", "127.0.0.1", port, timeout=20)
    return r.returncode == 0


def test_sigterm_during_receive_keeps_every_acknowledged_instance(tmp_path):
    """A sender streams 200 images; SIGTERM after 40: every Success it got is stored, the node exits 0 in the bound."""
    bound = 4.0
    node = ServeProcess(tmp_path, node_toml(shutdown_timeout_s=bound))
    series = pydicom.uid.generate_uid()
    images = [make_image(series_uid=series, study_uid="1.2.826.0.1.3680043.8.498.77", instance_number=i + 1,
                         rows=64, columns=64) for i in range(200)]
    acked: list[str] = []
    refused: list[int] = []
    forty = threading.Event()

    def sender() -> None:
        ae = AE(ae_title="SCANNER")
        ae.dimse_timeout = ae.acse_timeout = ae.network_timeout = 5
        ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", node.port, ae_title="FUSIONNODE")
        assert assoc.is_established
        for ds in images:
            if not assoc.is_established:
                break
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code == 0x0000:
                acked.append(str(ds.SOPInstanceUID))
                if len(acked) == 40:
                    forty.set()
            elif code is not None:
                refused.append(code)
        if assoc.is_established:
            assoc.release()
        forty.set()

    thread = threading.Thread(target=sender, daemon=True)
    try:
        thread.start()
        assert forty.wait(60)
        t_term = node.signal(signal.SIGTERM)
        rc = node.wait_exit(bound + EXIT_SLACK_S + 30)
        took = time.monotonic() - t_term
        thread.join(60)
    finally:
        node.stop()
    assert rc == 0, node.log_path.read_text()[-2000:]
    assert took <= bound + EXIT_SLACK_S, f"SIGTERM to exit took {took:.2f} s, bound {bound + EXIT_SLACK_S} s"
    assert len(acked) >= 40 and not refused
    with node.db() as db:
        stored = {r[0] for r in db.execute("SELECT sop_instance_uid FROM instances")}
        paths = [r[0] for r in db.execute("SELECT path FROM instances")]
    missing = set(acked) - stored
    assert not missing, f"{len(missing)} acknowledged instance(s) lost"
    assert all((tmp_path / "data" / p).is_file() for p in paths)
    left = [p for p in (tmp_path / "data" / "tmp").rglob("*") if not p.is_dir()]  # the empty spool folder may stay
    assert not left, f"nothing left in the temporary folder: {left}"
    stopped = node.events("node.stopped")
    assert len(stopped) == 1 and stopped[0]["seconds"] <= bound
    assert node.events("scp.accepting.stopped"), "the listener stopped accepting first"
    print(f"SIGTERM during receive: exit after {took:.2f} s (bound {bound} + {EXIT_SLACK_S} s); "
          f"{len(acked)} acknowledged, {len(stored)} stored")


def test_sigterm_refuses_new_associations_while_draining(tmp_path):
    """While an open association drains, a new caller cannot associate; an idle node stops at once."""
    node = ServeProcess(tmp_path, node_toml(shutdown_timeout_s=6.0))
    try:
        ae = AE(ae_title="SCANNER")
        ae.add_requested_context(Verification)
        held = ae.associate("127.0.0.1", node.port, ae_title="FUSIONNODE")
        assert held.is_established
        t0 = node.signal(signal.SIGTERM)
        node.wait_event("scp.accepting.stopped", 5)
        assert not _echo(node.port), "a new association was accepted after SIGTERM"
        assert held.send_c_echo().Status == 0x0000, "the open association still works while draining"
        held.release()
        rc = node.wait_exit(10)
        took = time.monotonic() - t0
    finally:
        node.stop()
    assert rc == 0
    assert took < 6.0, f"an association released during the drain should end the wait ({took:.2f} s)"


def _send_pair(port: int, pair_dirs) -> None:
    cmd = [dcmtk("storescu"), "-aet", "SCANNER", "-aec", "FUSIONNODE", "+sd", "127.0.0.1", str(port),
           *map(str, pair_dirs)]
    import subprocess

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.slow
def test_sigterm_during_a_job_queues_it_and_the_restart_completes_it(tmp_path):
    from fusion_demo.samples import write_synthetic_pair

    bound = 6.0
    pair = write_synthetic_pair(tmp_path / "input")
    node = ServeProcess(tmp_path, node_toml(shutdown_timeout_s=bound, pipelines=PIPELINE))
    try:
        _send_pair(node.port, pair)
        node.wait_event("job.started", 60)
        t_term = node.signal(signal.SIGTERM)
        rc = node.wait_exit(bound + EXIT_SLACK_S + 10)
        took = time.monotonic() - t_term
    finally:
        node.stop()
    assert rc == 0, node.log_path.read_text()[-3000:]
    assert took <= bound + EXIT_SLACK_S, f"SIGTERM to exit took {took:.2f} s during a job"
    with node.db() as db:
        (job,) = db.execute("SELECT * FROM jobs").fetchall()
        assert job["state"] == "queued", "the interrupted job goes back to the queue, never stays running"
        assert job["attempts"] == 0, "a clean stop is not counted as an attempt"
        assert db.execute("SELECT COUNT(*) FROM series WHERE origin='derived'").fetchone()[0] == 0
    interrupted = node.events("job.interrupted") + node.events("job.released")
    assert interrupted, "the log says the job was stopped and queued"
    stop_s = node.events("node.stopped")[0]["seconds"]

    again = ServeProcess(tmp_path)
    try:
        done = again.wait_event("job.done", 600)
        assert done["job_id"] == job["id"]
        again.signal(signal.SIGTERM)
        assert again.wait_exit(bound + EXIT_SLACK_S + 10) == 0
    finally:
        again.stop()
    with again.db() as db:
        (job,) = db.execute("SELECT * FROM jobs").fetchall()
        assert job["state"] == "done" and job["attempts"] == 1
        assert db.execute("SELECT COUNT(*) FROM instances i JOIN series s USING (series_uid)"
                          " WHERE s.origin='derived'").fetchone()[0] == 41  # 40 SC + 1 REG
    print(f"SIGTERM during a job ({interrupted[0]['event']}): exit after {took:.2f} s, node.stopped {stop_s} s "
          f"(bound {bound} + {EXIT_SLACK_S} s)")


def test_sighup_applies_a_changed_config_and_survives_a_broken_one(tmp_path):
    port = free_port()
    node = ServeProcess(tmp_path, node_toml(port=port))
    try:
        assert _echo(port, "SCANNER")
        # a changed file: an access list (applied live) and the port (needs a restart)
        assert not node.events("scp.echo"), "a debug event, not logged at INFO"
        node.config.write_text(node_toml(port=free_port(), extra='allowed_callers = ["OTHER"]',
                                         pipelines='[logging]\nlevel = "DEBUG"'))
        node.signal(signal.SIGHUP)
        rec = node.wait_event("config.reloaded", 10)
        assert {"node.allowed_callers", "logging.level"} <= set(rec["applied"]) and "node.port" in rec["restart_needed"]
        assert node.events("config.reload.restart_needed")[0]["keys"] == ["node.port"]
        assert not _echo(port, "SCANNER"), "the new access list applies at once"
        assert _echo(port, "OTHER"), "on the port it was started with"
        node.wait_event("scp.echo", 5, calling_ae="OTHER")  # the new log level applies too
        # a broken file: logged, the running configuration kept, the node alive
        node.config.write_text("[node\nport = 'x'")
        node.signal(signal.SIGHUP)
        failed = node.wait_event("config.reload.failed", 10)
        assert "not valid TOML" in failed["error"]
        node.config.write_text(node_toml(port=port, extra='max_associations = 0'))  # an invalid value
        node.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while len(node.events("config.reload.failed")) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "max_associations" in node.events("config.reload.failed")[1]["error"]
        assert node.proc.poll() is None, "SIGHUP never kills the node"
        assert _echo(port, "OTHER") and not _echo(port, "SCANNER"), "the last good configuration still runs"
        t0 = node.signal(signal.SIGTERM)
        assert node.wait_exit(15) == 0
        took = time.monotonic() - t0
    finally:
        node.stop()
    assert took < 5.0 + EXIT_SLACK_S


def test_sighup_while_receiving_loses_nothing(tmp_path):
    """Reloads in the middle of a transfer: every instance is acknowledged and stored."""
    node = ServeProcess(tmp_path, node_toml())
    images = [make_image(instance_number=i + 1, rows=32, columns=32) for i in range(120)]
    stop = threading.Event()

    def hup() -> None:
        while not stop.is_set():
            node.signal(signal.SIGHUP)
            time.sleep(0.05)

    t = threading.Thread(target=hup, daemon=True)
    try:
        ae = AE(ae_title="SCANNER")
        ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", node.port, ae_title="FUSIONNODE")
        t.start()
        statuses = [assoc.send_c_store(ds).Status for ds in images]
        assoc.release()
        stop.set()
        t.join()
        assert node.proc.poll() is None
        node.signal(signal.SIGTERM)
        assert node.wait_exit(15) == 0
    finally:
        stop.set()
        node.stop()
    assert statuses == [0] * len(images)
    assert len(node.events("config.reloaded")) >= 3
    with node.db() as db:
        assert db.execute("SELECT COUNT(*) FROM instances").fetchone()[0] == len(images)


@pytest.fixture(autouse=True)
def _dcmtk_present():
    dcmtk("echoscu")
