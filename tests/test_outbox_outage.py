"""The outbox across an outage: retries bounded by time, down/up alerts, dead letters by series, a real PACS away and back.

The defaults must bridge a PACS maintenance window of hours without an
operator (``outbox.retry_for_s`` = 24 h, backoff capped at 300 s); the
schedule test shows it for a 1 h outage, and the Orthanc test runs the same
outage scaled down by :data:`SCALE` (every time setting divided by it).
"""

from __future__ import annotations

import time

import pydicom
import pytest
from dicom_helpers import json_logs
from peers import OrthancServer
from test_outbox import make_sc, uids

from dicom_node.config import DicomDestination, NodeConfig, NodeSettings, OutboxConfig
from dicom_node.outbox import Outbox
from dicom_node.outbox.queue import attempt_schedule, gives_up, retry_delay

HOUR = 3600.0
#: the real-PACS test runs the 1 h outage with every time setting divided by this
SCALE = 300.0


def test_default_schedule_bridges_a_one_hour_outage():
    cfg = OutboxConfig()
    assert (cfg.retry_for_s, cfg.backoff_max_s, cfg.max_attempts) == (86400.0, 300.0, 0)
    times = attempt_schedule(cfg)
    gaps = [b - a for a, b in zip([0.0, *times], times)]
    assert gaps[:7] == [5, 10, 20, 40, 80, 160, 300], "doubling from 5 s, capped at 300 s"
    assert max(gaps) == cfg.backoff_max_s
    assert times[-1] >= 24 * HOUR, "an item is tried for at least 24 h before it is dead"
    # an outage of 1 h starting at any moment of an item's life: the item is alive when the PACS
    # returns, and the next attempt comes at most backoff_max_s later
    for start in (0.0, 1.0, 100.0, 1000.0, 5 * HOUR, 22.9 * HOUR):
        end = start + HOUR
        assert not gives_up(cfg, len([t for t in times if t <= end]) + 1, 0.0, end)
        nxt = min(t for t in times if t >= end)
        assert nxt - end <= cfg.backoff_max_s
    # the old defaults (6 attempts, doubling from 5 s) gave up 155 s after the first failure
    assert attempt_schedule(OutboxConfig(max_attempts=6, backoff_max_s=600))[-1] == 155.0


def test_retry_delay_and_time_bound():
    cfg = OutboxConfig(backoff_initial_s=2, backoff_max_s=30, retry_for_s=100)
    assert [retry_delay(cfg, n) for n in (1, 2, 3, 4, 5, 6, 1000)] == [2, 4, 8, 16, 30, 30, 30]
    assert not gives_up(cfg, 50, 0.0, 99.9) and gives_up(cfg, 2, 0.0, 100.0)
    assert gives_up(OutboxConfig(max_attempts=3), 3, 0.0, 1.0), "a count limit still applies when set"


def _settings(port: int, **outbox) -> NodeSettings:
    return NodeSettings(node=NodeConfig(ae_title="FUSIONTEST", network_timeout_s=5),
                        destinations=[DicomDestination(name="pacs", ae_title="ORTHANC", host="127.0.0.1", port=port)],
                        outbox=OutboxConfig(**outbox))


def test_time_bound_dead_letters_grouped_by_series_and_retried_by_series(tmp_path):
    from test_outbox import _free_port

    port = _free_port()  # nothing listens
    a, b = make_sc(tmp_path / "a", 3), make_sc(tmp_path / "b", 2)
    ob = Outbox(tmp_path / "node.sqlite", _settings(port, retry_for_s=20, backoff_initial_s=4, backoff_max_s=8))
    ob.enqueue("pacs", a + b, job_id=1)
    t0 = time.time() + 5
    with json_logs("dicom_node.outbox") as logs:
        for dt, expect in ((0, "retried"), (4, "retried"), (12, "retried"), (20, "dead")):
            counts = ob.process_due(now=t0 + dt)
            assert counts[expect] == 5, (dt, counts)
    dead = logs.events("outbox.dead")
    assert len(dead) == 5 and {d["reason"] for d in dead} == {"retry window over"}
    assert all(d["failing_for_s"] == 20.0 for d in dead)
    groups = [g for g in ob.groups() if g.state == "dead"]
    series_a = {str(pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID) for p in a}
    assert sorted(g.count for g in groups) == [2, 3] and {g.series_uid for g in groups} >= series_a
    g_a = next(g for g in groups if g.series_uid in series_a)
    assert "connection failed" in (g_a.last_error or "")
    assert g_a.retry_command == f"fusion-node outbox retry --series {g_a.series_uid} --destination pacs"
    assert ob.retry(series_uid=g_a.series_uid) == 3
    assert {i.state for i in ob.list() if i.series_uid == g_a.series_uid} == {"pending"}
    assert all(i.attempts == 0 and i.first_failed_at is None for i in ob.list(state="pending"))
    assert len(ob.list(state="dead")) == 2
    ob.close()


def test_destination_down_alert_once_per_outage_and_up(tmp_path):
    from test_outbox import Storescp, _free_port

    port = _free_port()
    files = make_sc(tmp_path / "out", 2)
    ob = Outbox(tmp_path / "node.sqlite", _settings(port, alert_after_s=10, backoff_initial_s=1, backoff_max_s=4))
    ob.enqueue("pacs", files)
    t0 = time.time()
    with json_logs("dicom_node.outbox") as logs:
        for dt in (0, 1, 3, 7, 11, 15):
            ob.process_due(now=t0 + dt)
        assert len(logs.events("outbox.destination.down")) == 1, "alerted once, not per attempt"
        down = logs.events("outbox.destination.down")[0]
        assert down["destination"] == "pacs" and down["failing_for_s"] == 11.0 and down["waiting"] == 2
        assert ob.destination_health()["pacs"]["down_alerted"]
        scp = Storescp(tmp_path / "received", port)
        try:
            assert ob.process_due(now=time.time() + 20)["sent"] == 2
        finally:
            scp.stop()
        assert len(logs.events("outbox.destination.up")) == 1
        assert ob.destination_health() == {}
    ob.close()


@pytest.mark.slow
def test_orthanc_down_for_a_scaled_hour_then_back_everything_delivered(tmp_path):
    """Defaults divided by SCALE: a 12 s outage with a 1 s backoff cap is the 1 h outage with the 300 s cap."""
    orthanc = OrthancServer(tmp_path / "orthanc")
    files = make_sc(tmp_path / "fused", 41)
    d = OutboxConfig()
    ob = Outbox(tmp_path / "node.sqlite", _settings(orthanc.dicom_port, retry_for_s=d.retry_for_s / SCALE,
                                                    backoff_initial_s=d.backoff_initial_s / SCALE,
                                                    backoff_max_s=d.backoff_max_s / SCALE,
                                                    alert_after_s=d.alert_after_s / SCALE))
    outage = HOUR / SCALE
    try:
        with json_logs("dicom_node.outbox") as logs:
            ob.start(poll_interval_s=0.2)
            orthanc.down()
            t_down = time.monotonic()
            ob.enqueue("pacs", files, job_id=1)
            time.sleep(outage)
            assert ob.summary()["pacs"]["dead"] == 0 and ob.summary()["pacs"]["sent"] == 0
            orthanc.up()
            t_up = time.monotonic()
            assert ob.wait_idle(60), ob.summary()
            delivered_after = time.monotonic() - t_up
            ob.stop()
        assert orthanc.sop_instance_uids() == uids(files), "every instance at the PACS, no operator action"
        assert ob.summary()["pacs"] == {"pending": 0, "sending": 0, "sent": 41, "dead": 0}
        assert len(logs.events("outbox.destination.down")) == 1 and len(logs.events("outbox.destination.up")) == 1
        retries = logs.events("outbox.retry")
        assert retries and max(r["retry_in_s"] for r in retries) == pytest.approx(d.backoff_max_s / SCALE)
        # the scaled figure: delivery resumes within one backoff cap (+ the send) of the PACS returning
        assert delivered_after <= d.backoff_max_s / SCALE + 10
        print(f"outage {time.monotonic() - t_down - delivered_after:.1f} s (= 1 h / {SCALE:g}); 41/41 delivered "
              f"{delivered_after:.2f} s after the PACS returned (cap {d.backoff_max_s / SCALE:g} s = 300 s / {SCALE:g})")
    finally:
        ob.close()
        orthanc.stop()


def test_cli_outbox_list_by_series_and_retry_series(tmp_path, capsys):
    """`fusion-node outbox list` shows dead letters per series with the exact retry command, which works."""
    from test_outbox import _free_port

    from dicom_node.cli import main

    port = _free_port()
    (tmp_path / "node.toml").write_text(f'''
[storage]
root = "data"
[outbox]
retry_for_s = 1
[[destinations]]
name = "pacs"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = {port}
''')
    from dicom_node.config import load_config

    settings = load_config(tmp_path / "node.toml")
    files = make_sc(tmp_path / "out", 4)
    series = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    with Outbox(settings.storage.database_path, settings) as ob:
        ob.enqueue("pacs", files)
        t = time.time()
        ob.process_due(now=t)
        ob.process_due(now=t + 10)
        assert len(ob.list(state="dead")) == 4
    assert main(["outbox", "list", "--config", str(tmp_path / "node.toml")]) == 0
    out = capsys.readouterr().out
    (row,) = [line for line in out.splitlines() if line.startswith("pacs") and " dead " in line]
    assert row.split()[2:4] == ["dead", "4"] and series in row and "connection failed" in row
    assert "4 dead letter(s) in 1 series" in out
    hint = f"fusion-node outbox retry --series {series} --destination pacs"
    assert f"  {hint}" in out and "destination pacs failing since" in out
    argv = hint.split()[1:] + ["--config", str(tmp_path / "node.toml")]
    assert main(argv) == 0
    assert "4 item(s) due again" in capsys.readouterr().out
    assert main(["outbox", "list", "--items", "--state", "pending", "--config", str(tmp_path / "node.toml")]) == 0
    assert capsys.readouterr().out.count("pending") == 4
