"""Durable job queue: idempotent on inputs, survives a crash, failures recorded."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dicom_node.workflow.jobs import (
    MAX_INTERRUPTIONS,
    Executor,
    JobQueue,
    JobStateError,
    input_key,
    output_seed,
    retry_job,
)
from fusion.environment import child_environment


def _queue(location) -> JobQueue:
    """A job queue on ``db_location``: each test below runs on SQLite and on PostgreSQL."""
    q = JobQueue(location)
    q.ensure_schema()
    return q


def test_input_key_depends_on_inputs_not_order():
    k = input_key("p", ["1.2", "1.3"], ["2.1"])
    assert k == input_key("p", ["1.3", "1.2"], ["2.1"])
    assert k != input_key("p", ["1.2", "1.3", "1.4"], ["2.1"])  # a late slice is new input
    assert k != input_key("q", ["1.2", "1.3"], ["2.1"])
    assert k != input_key("p", ["2.1"], ["1.2", "1.3"])  # roles matter


def test_same_inputs_enqueue_once(db_location, tmp_path):
    q = _queue(db_location)
    a = q.enqueue("k1", "p", "b", "o")
    b = q.enqueue("k1", "p", "b", "o")
    assert a == (a[0], True) and b == (a[0], False)
    assert len(q.list()) == 1


def test_claim_is_exclusive_across_threads(db_location, tmp_path):
    q = _queue(db_location)
    for i in range(20):
        q.enqueue(f"k{i}", "p", "b", "o")
    claimed, lock = [], threading.Lock()

    def worker():
        wq = JobQueue(db_location)
        while (job := wq.claim()) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(claimed) == sorted(j.id for j in q.list())


def _die_holding_a_job(location) -> None:
    """Another process of this node claims the next job and dies with it (os._exit: no clean-up)."""
    code = ("import os, sys; from dicom_node.workflow.jobs import JobQueue; "
            "q = JobQueue(sys.argv[1]); assert q.claim() is not None; os._exit(0)")
    subprocess.run([sys.executable, "-c", code, str(location)], check=True,
                   env=child_environment(Path(__file__).resolve().parents[1]))


def test_restart_resumes_running_jobs_and_gives_up_after_limit(db_location, tmp_path):
    q = _queue(db_location)
    job_id, _ = q.enqueue("k", "p", "b", "o")
    _die_holding_a_job(db_location)
    assert q.get(job_id).state == "running" and q.get(job_id).lease_expires > time.time()
    fresh = _queue(db_location)  # the same node (same root) restarted: takes its job back at once, lease or not
    assert fresh.recover() == 1 and fresh.get(job_id).state == "queued"
    assert fresh.get(job_id).interruptions == 1 and fresh.get(job_id).retries == 0
    for _ in range(MAX_INTERRUPTIONS - 1):
        _die_holding_a_job(db_location)
        _queue(db_location).recover()
    job = fresh.get(job_id)
    assert job.state == "failed" and "interrupted 3 times" in job.error and job.interruptions == MAX_INTERRUPTIONS


def test_operator_retries_do_not_use_up_interruptions(db_location, tmp_path):
    """The measured bug: a job retried twice was failed by the next restart (one shared counter)."""
    q = _queue(db_location)
    job_id, _ = q.enqueue("k", "p", "b", "o")
    for _ in range(3):
        job = q.claim()
        q.fail(job.id, "boom")
        retry_job(q, job_id)
    assert q.get(job_id).retries == 3 and q.get(job_id).interruptions == 0
    _die_holding_a_job(db_location)
    assert _queue(db_location).recover() == 1
    assert q.get(job_id).state == "queued" and q.get(job_id).interruptions == 1


def test_lease_heartbeat_and_takeover_by_another_node(db_location, tmp_path):
    a = JobQueue(db_location, owner="host-a", lease_s=0.6)
    a.ensure_schema()
    b = JobQueue(db_location, owner="host-b", lease_s=0.6)
    job_id, _ = a.enqueue("k", "p", "b", "o")
    job = a.claim()
    assert job.lease_owner == "host-a" and job.lease_run == a.run_id and job.lease_expires > time.time()
    assert b.claim() is None and b.recover() == 0  # a's lease is live: not b's to take
    for _ in range(3):  # a's heartbeat keeps it alive past several lease lengths
        time.sleep(0.3)
        assert a.heartbeat() == 1
        assert b.recover() == 0
    time.sleep(0.8)  # a died: no heartbeat
    assert b.counts() == {"running": 1, "running_lease_expired": 1}  # what `status` shows
    taken = b.claim()
    assert taken is not None and taken.id == job_id and taken.lease_owner == "host-b"
    assert taken.interruptions == 1
    assert not a.finish(job_id, {"late": True})  # the dead run's late finish changes nothing
    assert b.finish(job_id, {"ok": True}) and b.get(job_id).state == "done"


def test_retry_guards(db_location, tmp_path):
    q = _queue(db_location)
    job_id, _ = q.enqueue("k", "p", "b", "o")
    with pytest.raises(JobStateError, match="no job 99"):
        retry_job(q, 99)
    with pytest.raises(JobStateError, match="is queued"):
        retry_job(q, job_id)
    q.claim()
    with pytest.raises(JobStateError, match="is running"):
        retry_job(q, job_id)
    q.save_checkpoint(job_id, {"version": 1, "registration": {"matrix": []}})
    q.fail(job_id, "boom")
    again = retry_job(q, job_id)  # failed: same version (same UIDs), checkpoint kept
    assert again.state == "queued" and again.version == 1 and again.retries == 1 and again.checkpoint
    q.claim()
    assert q.finish(job_id, {"instances": 3})
    with pytest.raises(JobStateError, match="--new-version"):
        retry_job(q, job_id)
    v2 = retry_job(q, job_id, new_version=True)
    assert v2.state == "queued" and v2.version == 2 and v2.retries == 2 and v2.checkpoint is None


def test_output_seed_follows_inputs_parameters_and_version(db_location, tmp_path):
    from dicom_node.config import parse_config

    def pipeline(**kw):
        return parse_config({"pipelines": [{"name": "p", "base": {"modality": ["CT"]},
                                            "overlay": {"modality": ["MR"]}, **kw}]}).pipelines[0]

    q = _queue(db_location)
    job_id, _ = q.enqueue(input_key("p", ["1.1"], ["2.1"]), "p", "b", "o")
    job = q.get(job_id)
    seed = output_seed(job, pipeline())
    assert seed == output_seed(q.get(job_id), pipeline())
    assert seed != output_seed(job, pipeline(method="wls"))
    assert seed != output_seed(job, pipeline(feature_source="image"))
    assert seed != output_seed(dataclasses.replace(job, version=2), pipeline())
    assert seed != output_seed(dataclasses.replace(job, key=input_key("p", ["1.1", "1.2"], ["2.1"])), pipeline())


def test_executor_records_success_and_failure(db_location, tmp_path):
    q = _queue(db_location)
    ok, _ = q.enqueue("ok", "p", "b", "o")
    bad, _ = q.enqueue("bad", "p", "b", "o")

    def run(job):
        if job.key == "bad":
            raise ValueError("overlay has 1 slice")
        return {"seconds": {"fuse": 1.5}, "instances": 3}

    ex = Executor(q, run)
    while ex.run_one():
        pass
    assert q.get(ok).state == "done" and q.get(ok).result["instances"] == 3
    assert q.get(bad).state == "failed" and "overlay has 1 slice" in q.get(bad).error
    retry_job(q, bad)
    assert q.get(bad).state == "queued"


def test_cli_jobs_retry_guards_and_counters(tmp_path, capsys):
    """`fusion-node jobs retry`: an unknown or running job is an error (non-zero exit), a done one needs --new-version."""
    from dicom_node.cli import main

    root = tmp_path / "data"
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[storage]\nroot = "{root}"\n')
    q = JobQueue(root / "node.sqlite")
    q.ensure_schema()
    job_id, _ = q.enqueue("k", "p", "b", "o")
    q.claim()
    assert main(["jobs", "retry", "42", "--config", str(cfg)]) == 2  # an unknown id is bad input
    assert "no job 42" in capsys.readouterr().err
    assert main(["jobs", "retry", str(job_id), "--config", str(cfg)]) == 1
    assert "is running" in capsys.readouterr().err
    q.finish(job_id, {"instances": 3})
    assert main(["jobs", "retry", str(job_id), "--config", str(cfg)]) == 1
    assert "--new-version" in capsys.readouterr().err
    assert main(["jobs", "retry", str(job_id), "--new-version", "--config", str(cfg)]) == 0
    assert "version 2" in capsys.readouterr().out
    assert main(["jobs", "list", "--config", str(cfg)]) == 0
    header, row = capsys.readouterr().out.splitlines()
    cells = dict(zip(header.split(), row.split()))
    assert cells["STATE"] == "queued" and cells["VER"] == "2" and cells["INTERRUPTED"] == "0" and cells["RETRIED"] == "1"
    assert main(["jobs", "show", str(job_id), "--json", "--config", str(cfg)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == 2 and shown["retries"] == 1 and shown["interruptions"] == 0 and "lease" in shown
    assert main(["jobs", "show", str(job_id), "--config", str(cfg)]) == 0
    assert "version 2" in capsys.readouterr().out


def test_checkpoints_resume_only_the_same_job_version_and_parameters(db_location, tmp_path):
    import numpy as np

    from dicom_node.workflow import checkpoint
    from dicom_node.workflow.checkpoint import Checkpoints
    from dicom_node.workflow.stages import FusedStack, Registration

    q = _queue(db_location)
    job_id, _ = q.enqueue("k", "p", "b", "o")
    job = q.claim()
    ck = Checkpoints(q, job, tmp_path, "seed-1")
    assert ck.registration() is None and ck.fused() is None
    reg = Registration(((1.0, 0, 0, 2.5), (0, 1.0, 0, 0), (0, 0, 1.0, 0), (0, 0, 0, 1.0)), {"registration_metric": -0.5},
                       {"ok": True})
    ck.save_registration(reg, 6.5)
    fused = FusedStack(np.arange(24, dtype=np.uint8).reshape(2, 3, 4), "dmf", ("cbf", "tif", "wls"), "image", "cpu")
    ck.save_fused(fused)
    again = Checkpoints(q, q.get(job_id), tmp_path, "seed-1")  # the next run of the job
    assert again.registration() == (reg, 6.5)
    got = again.fused()
    assert got is not None and np.array_equal(got.pixels, fused.pixels) and got.trio == fused.trio
    changed = Checkpoints(q, q.get(job_id), tmp_path, "seed-2")  # the pipeline's parameters changed
    assert changed.registration() is None and changed.fused() is None
    assert checkpoint.clean(q, tmp_path) == 0  # running: kept
    q.fail(job_id, "boom")
    assert checkpoint.clean(q, tmp_path) == 1 and not list(checkpoint.folder(tmp_path).iterdir())
