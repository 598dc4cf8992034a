"""The command line as an operator meets it: the real ``fusion-node`` run as a subprocess.

Tables by default and JSON with ``--json``; ``status`` tells a live node from a dead one (the
heartbeat); a wrong config path or a missing store is an error, never an empty store; global
options after the subcommand; one line instead of a traceback for bad input and closed pipes;
the documented exit codes.  Logs: console on a terminal, JSON otherwise, a rotated file, and
third-party records under ``lib.<package>`` without their text.
"""

from __future__ import annotations

import io
import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dicom_helpers import make_image

import dicom_node
from dicom_node import logs
from dicom_node.cli import EXIT_BROKEN_PIPE, EXIT_NOT_RUNNING, EXIT_RESOURCE, EXIT_USAGE

REPO = Path(__file__).resolve().parents[1]
CANARY_NAME, CANARY_ID = "CANARY^PATIENT", "CANARY-ID-4711"


def cli(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m dicom_node.cli ARGS`` from the checkout's root (so this checkout's code runs)."""
    return subprocess.run([sys.executable, "-m", "dicom_node.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def _popen(*args: str | Path, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dicom_node.cli", *map(str, args)], cwd=REPO, **kw)


def _config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "node.toml"
    path.write_text(f"""
[node]
ae_title = "OPSNODE"
host = "127.0.0.1"
port = 0

[http]
port = 0
[storage]
root = "data"

[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = 9

{extra}
""")
    return path


def _no_traceback(result: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, result.stderr


def _populate(cfg_path: Path, jobs: int = 0) -> None:
    """A store with two series (CT with 3 images, MR with 2) and ``jobs`` jobs, written by the node's own parts."""
    from dicom_node.config import load_config
    from dicom_node.index.store import Store
    from dicom_node.workflow.jobs import JobQueue

    cfg = load_config(cfg_path)
    store = Store(cfg.storage.root, cfg.storage.database_path)
    store.ensure_schema()
    study = "1.2.826.0.1.3680043.8.498.77"
    ct, mr = study + ".1", study + ".2"
    for i in range(3):
        store.store_dataset(make_image(study_uid=study, series_uid=ct, sop_uid=f"{ct}.{i + 1}", instance_number=i + 1,
                                       patient_name=CANARY_NAME, patient_id=CANARY_ID), origin="received")
    for i in range(2):
        store.store_dataset(make_image(study_uid=study, series_uid=mr, sop_uid=f"{mr}.{i + 1}", modality="MR",
                                       sop_class="1.2.840.10008.5.1.4.1.1.4", instance_number=i + 1,
                                       patient_name=CANARY_NAME, patient_id=CANARY_ID), origin="received")
    queue = JobQueue(cfg.storage.database_path)
    queue.ensure_schema()
    for n in range(jobs):
        queue.enqueue(f"key-{n}", "mr-ct", ct, mr)


# -- version, usage errors, no silent empty store -------------------------------------------------


def test_version():
    result = cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"fusion-node {dicom_node.__version__}"


def test_missing_config_is_an_error_not_an_empty_store(tmp_path):
    result = cli("status", "--config", tmp_path / "nope.toml")
    assert result.returncode == EXIT_USAGE and "config file not found" in result.stderr
    _no_traceback(result)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", [["status"], ["series", "list"], ["jobs", "list"], ["outbox", "list"],
                                     ["jobs", "show", "1"], ["trigger", "1.2.3"]])
def test_absent_store_is_an_error_and_is_not_created(tmp_path, command):
    cfg = _config(tmp_path)
    result = cli(*command, "--config", cfg)
    assert result.returncode == EXIT_RESOURCE, result.stderr
    assert "no node database at" in result.stderr and str(tmp_path / "data") in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    _no_traceback(result)
    assert not (tmp_path / "data").exists()  # nothing created by looking


@pytest.mark.parametrize("args", [
    ["status", "--log-level", "LOUD"],          # bad level after the subcommand
    ["--log-level", "LOUD", "status"],          # and before it
    ["jobs", "show", "abc"],                    # an id that is no number
    ["jobs", "explode"],                        # an unknown action
    ["series", "list", "--state", "sleeping"],  # an unknown state
    ["fuse"],                                   # missing arguments
])
def test_bad_input_is_one_message_no_traceback(tmp_path, args):
    result = cli(*args, "--config", _config(tmp_path))
    assert result.returncode == EXIT_USAGE, result.stderr
    _no_traceback(result)
    assert "error:" in result.stderr


def test_unknown_job_id_is_named(tmp_path):
    cfg = _config(tmp_path)
    _populate(cfg, jobs=1)
    for action in ("show", "retry"):
        result = cli("jobs", action, "42", "--config", cfg)
        assert result.returncode == EXIT_USAGE and "no job 42" in result.stderr
        _no_traceback(result)


# -- tables, --json, global options after the subcommand -------------------------------------------


def test_series_list_table_and_json_without_patient_data(tmp_path):
    cfg = _config(tmp_path)
    _populate(cfg)
    table = cli("series", "list", "--config", cfg)
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split()[:4] == ["SERIES", "UID", "MOD", "IMAGES"]
    assert len(rows) == 2 and {r.split()[1] for r in rows} == {"CT", "MR"}
    assert {r.split()[2] for r in rows} == {"3", "2"} and all(" open " in r for r in rows)
    as_json = cli("--json", "series", "list", "--config", cfg)  # global option before the subcommand
    docs = json.loads(as_json.stdout)
    assert sorted((d["modality"], d["instance_count"], d["state"]) for d in docs) == [("CT", 3, "open"), ("MR", 2, "open")]
    assert all(d["last_received"].endswith("Z") for d in docs)
    for out in (table.stdout, as_json.stdout):
        assert CANARY_NAME not in out and CANARY_ID not in out
    only_mr = json.loads(cli("series", "list", "--state", "open", "--json", "--config", cfg).stdout)
    assert len(only_mr) == 2
    assert json.loads(cli("series", "list", "--state", "paired", "--json", "--config", cfg).stdout) == []


def test_jobs_and_outbox_tables_and_json(tmp_path):
    from dicom_node.config import load_config
    from dicom_node.outbox import Outbox

    cfg = _config(tmp_path)
    _populate(cfg, jobs=2)
    settings = load_config(cfg)
    with Outbox(settings.storage.database_path, settings, recover_interrupted=False) as outbox:
        outbox.ensure_schema()
        files = sorted((settings.storage.root / "instances").rglob("*.dcm"))
        outbox.enqueue("pacs", files, job_id=1)
    jobs = cli("jobs", "list", "--config", cfg)
    header, *rows = jobs.stdout.splitlines()
    assert header.split()[:5] == ["ID", "STATE", "PIPELINE", "BASE", "OVERLAY"]
    assert [r.split()[:5] for r in rows] == [["1", "queued", "mr-ct", "CT/3", "MR/2"],
                                              ["2", "queued", "mr-ct", "CT/3", "MR/2"]]
    docs = json.loads(cli("jobs", "list", "--config", cfg, "--json").stdout)
    assert [(d["id"], d["state"], d["base_series"]) for d in docs] == [(1, "queued", "CT/3"), (2, "queued", "CT/3")]
    shown = cli("jobs", "show", "2", "--config", cfg)
    assert shown.stdout.startswith("job 2: queued") and "base     CT/3" in shown.stdout
    assert json.loads(cli("jobs", "show", "2", "--json", "--config", cfg).stdout)["id"] == 2
    # the outbox: one line per destination, job, series and state, not one per instance
    grouped = cli("outbox", "list", "--config", cfg)
    header, *rows = grouped.stdout.splitlines()
    assert header.split()[:4] == ["DESTINATION", "JOB", "STATE", "ITEMS"] and len(rows) == 2  # the fixture's 2 series
    assert [r.split()[:4] for r in rows] == [["pacs", "1", "pending", "3"], ["pacs", "1", "pending", "2"]]
    assert " 1-3 " in rows[0] and " 4-5 " in rows[1]
    per_instance = json.loads(cli("outbox", "list", "--instances", "--json", "--config", cfg).stdout)
    assert len(per_instance) == 5 and {i["state"] for i in per_instance} == {"pending"}
    # the id lists the table prints are what `outbox retry` takes
    assert cli("outbox", "retry", "1-3,5", "--config", cfg).stdout.startswith("4 item(s) due again")
    bad = cli("outbox", "retry", "3-1", "--config", cfg)
    assert bad.returncode == 2 and "not an outbox id list" in bad.stderr


def test_outbox_id_ranges_round_trip():
    from dicom_node.outbox.queue import id_ranges, parse_id_ranges

    assert id_ranges([5, 1, 2, 3, 9, 10]) == "1-3,5,9-10"
    assert parse_id_ranges("1-3,5,9-10") == [1, 2, 3, 5, 9, 10]
    assert parse_id_ranges(id_ranges(range(1, 41))) == list(range(1, 41))
    with pytest.raises(ValueError):
        parse_id_ranges("x")


def test_closed_pipe_ends_quietly(tmp_path):
    """`fusion-node jobs list | head -1` with more output than a pipe holds: no BrokenPipeError traceback."""
    cfg = _config(tmp_path)
    _populate(cfg, jobs=3000)  # ~300 kB of table, well over a 64 kB pipe buffer
    proc = _popen("jobs", "list", "--config", cfg, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.readline()
    proc.stdout.close()  # what `head -1` does after its line
    err = proc.stderr.read().decode()
    rc = proc.wait(60)
    assert first.split()[:2] == [b"ID", b"STATE"]
    assert rc == EXIT_BROKEN_PIPE and "Traceback" not in err and err == "", err
    shell = subprocess.run(f"{sys.executable} -m dicom_node.cli jobs list --config {cfg} | head -1", shell=True,
                           capture_output=True, text=True, timeout=120, cwd=REPO)
    assert shell.stdout.split()[:2] == ["ID", "STATE"] and shell.stderr == ""


# -- status knows whether the node is alive -------------------------------------------------------


def _serve(cfg: Path, *extra: str) -> subprocess.Popen:
    return _popen("serve", "--config", cfg, *extra, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_running(cfg: Path, proc: subprocess.Popen, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        result = cli("status", "--json", "--config", cfg)
        if result.returncode == 0:
            return json.loads(result.stdout)
        time.sleep(0.5)
    raise AssertionError("the node never reported itself running")


@pytest.mark.slow
def test_status_tells_a_live_node_from_a_stopped_and_a_dead_one(tmp_path):
    cfg = _config(tmp_path)
    before = cli("status", "--config", cfg)
    assert before.returncode == EXIT_RESOURCE  # never started: no database, said so
    proc = _serve(cfg)
    try:
        doc = _wait_running(cfg, proc)
        assert doc["node"]["running"] is True and doc["node"]["pid"] == proc.pid
        assert doc["node"]["last_seen_s"] < 15 and doc["node"]["ports"]["dicom"] > 0
        assert doc["jobs"] == {"queued": 0, "running": 0, "done": 0, "failed": 0}
        assert doc["outbox"]["pacs"]["pending"] == 0
        human = cli("status", "--config", cfg)
        assert human.returncode == 0
        assert human.stdout.startswith(f"node:     running (pid {proc.pid}, last seen ")
        assert "pacs" in human.stdout and "PENDING" in human.stdout and "StoreCounts(" not in human.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    stopped = cli("status", "--config", cfg)
    assert stopped.returncode == EXIT_NOT_RUNNING
    assert stopped.stdout.startswith("node:     not running (stopped cleanly")
    # a node that dies without stopping: its pid is gone, status says so at once
    proc = _serve(cfg)
    try:
        _wait_running(cfg, proc)
    finally:
        proc.kill()
        proc.wait(30)
    dead = cli("status", "--json", "--config", cfg)
    assert dead.returncode == EXIT_NOT_RUNNING
    node = json.loads(dead.stdout)["node"]
    assert node["running"] is False and f"pid {proc.pid} is gone" in node["summary"]


def test_heartbeat_goes_stale_when_the_node_stops_beating(tmp_path):
    """A node frozen (or on another host, where its pid cannot be checked) is 'not running' after the limit."""
    from dicom_node.workflow.heartbeat import STALE_AFTER_S, Heartbeat, read_liveness

    path = tmp_path / "node.heartbeat.json"
    beat = Heartbeat(path, {"ports": {"dicom": 11112}}, interval_s=0.1).start()
    time.sleep(0.3)
    assert read_liveness(path).running
    beat._stop.set()
    beat._thread.join()  # beats stop without the clean "stopped" record: a hang, not a stop
    later = time.time() + STALE_AFTER_S + 1
    stale = read_liveness(path, now=later)
    assert not stale.running and "no heartbeat" in stale.summary


# -- logs ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_serve_logs_json_when_piped_console_when_asked_and_to_a_rotated_file(tmp_path):
    cfg = _config(tmp_path, extra='[logging]\nfile = "logs/node.log"\nfile_max_bytes = 10000\nfile_backup_count = 2\n')
    proc = _serve(cfg)
    try:
        _wait_running(cfg, proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert lines and "node.started" in {d["event"] for d in lines}  # stderr is a pipe: JSON
    assert len(lines) == len(err.splitlines())
    file_lines = [json.loads(line) for line in (tmp_path / "logs" / "node.log").read_text().splitlines()]
    assert {"node.started", "node.stopped"} <= {d["event"] for d in file_lines}
    proc = _serve(cfg, "--log-format", "console")  # option after the subcommand
    try:
        _wait_running(cfg, proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    started = [line for line in err.splitlines() if " node.started " in line]
    assert started and not started[0].startswith("{") and " INFO " in started[0] and "ae_title=OPSNODE" in started[0]


def test_log_file_rotates_at_its_size(tmp_path):
    log_file = tmp_path / "node.log"
    logs.configure("INFO", "json", file=log_file, file_max_bytes=10_000, file_backup_count=2, stream=io.StringIO())
    log = logging.getLogger("dicom_node.test")
    for i in range(400):
        log.info("test.record", extra=logs.fields(i=i, pad="x" * 50))
    rotated = sorted(p.name for p in tmp_path.iterdir())
    assert rotated == ["node.log", "node.log.1", "node.log.2"]
    assert all(p.stat().st_size <= 10_000 for p in tmp_path.iterdir())
    assert json.loads(log_file.read_text().splitlines()[-1])["i"] == 399


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_third_party_records_get_a_stable_event_and_no_raw_text(fmt):
    out = io.StringIO()
    logs.configure("INFO", fmt, stream=out)
    logging.getLogger("pynetdicom.assoc").warning("Association rejected for %s (%s)", CANARY_NAME, CANARY_ID)
    logging.getLogger("pynetdicom.acse").error("TCP connection lost to %s", CANARY_ID)
    logging.getLogger("pydicom").error("Invalid value for VR PN: %r", CANARY_NAME.encode())
    logging.getLogger("uvicorn.error").warning("Unknown request from %s", CANARY_NAME)
    logging.getLogger("httpx").warning("Request for %s failed", CANARY_ID)  # through the root logger
    text = out.getvalue()
    assert CANARY_NAME not in text and CANARY_ID not in text and "CANARY" not in text
    lines = text.splitlines()
    assert len(lines) == 5
    if fmt == "json":
        docs = [json.loads(line) for line in lines]
        assert [d["event"] for d in docs] == ["lib.pynetdicom.warning", "lib.pynetdicom.error", "lib.pydicom.error",
                                              "lib.uvicorn.warning", "lib.httpx.warning"]
        assert [d["level"] for d in docs] == ["warning", "error", "error", "warning", "warning"]
        assert docs[0]["logger"] == "pynetdicom.assoc" and "detail" not in docs[0]
    else:
        assert [line.split()[2] for line in lines] == ["lib.pynetdicom.warning", "lib.pynetdicom.error",
                                                       "lib.pydicom.error", "lib.uvicorn.warning", "lib.httpx.warning"]
    # our own records keep their event and fields
    out.truncate(0)
    out.seek(0)
    logging.getLogger("dicom_node.x").info("job.done", extra=logs.fields(job_id=7))
    own = out.getvalue().strip()
    assert (json.loads(own)["event"] == "job.done") if fmt == "json" else (" job.done job_id=7" in own)


def test_auto_format_follows_the_terminal():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert logs.choose_format("auto", Tty()) == "console"
    assert logs.choose_format("auto", io.StringIO()) == "json"
    assert logs.choose_format("json", Tty()) == "json"


def test_each_pairing_decision_is_logged_once(tmp_path):
    """Settling a pair twice makes one job and one `pairing.job.created`; the second look is no decision."""
    from dicom_helpers import json_logs
    from test_pairing import _series, _Sweep

    from dicom_node.config import parse_config
    from dicom_node.index.store import Store
    from dicom_node.workflow.jobs import JobQueue

    settings = parse_config({"pipelines": [{"name": "ct-mr", "base": {"modality": ["CT"]},
                                            "overlay": {"modality": ["MR"]}}]})
    store = Store(tmp_path / "data", tmp_path / "node.sqlite")
    store.ensure_schema()
    jobs = JobQueue(tmp_path / "node.sqlite")
    jobs.ensure_schema()
    sweep = _Sweep(settings, store, jobs)
    with json_logs("dicom_node") as captured:
        ct = _series(store, "CT", 3, study="1.1", patient="P")
        mr = _series(store, "MR", 3, study="1.1", patient="P")
        t = store.get_series(mr).last_received + 60
        assert len(sweep.sweep(now=t)) == 1
        sweep.trigger(ct)  # both settle again with the same instances: the job exists already
        sweep.trigger(mr)
        assert sweep.pair_settled(now=t + 1) == []
    events = [d["event"] for d in captured.events()]
    assert events.count("pairing.job.created") == 1 and "pairing.job.exists" not in events
    assert "store.series.state" not in events  # the state change is the pairing's decision, logged by it
