"""Durable job queue: idempotent on inputs, survives a crash, failures recorded."""

from __future__ import annotations

import threading

from dicom_node.workflow.jobs import MAX_INTERRUPTIONS, Executor, JobQueue, input_key


def _queue(tmp_path) -> JobQueue:
    q = JobQueue(tmp_path / "node.sqlite")
    q.ensure_schema()
    return q


def test_input_key_depends_on_inputs_not_order():
    k = input_key("p", ["1.2", "1.3"], ["2.1"])
    assert k == input_key("p", ["1.3", "1.2"], ["2.1"])
    assert k != input_key("p", ["1.2", "1.3", "1.4"], ["2.1"])  # a late slice is new input
    assert k != input_key("q", ["1.2", "1.3"], ["2.1"])
    assert k != input_key("p", ["2.1"], ["1.2", "1.3"])  # roles matter


def test_same_inputs_enqueue_once(tmp_path):
    q = _queue(tmp_path)
    a = q.enqueue("k1", "p", "b", "o")
    b = q.enqueue("k1", "p", "b", "o")
    assert a == (a[0], True) and b == (a[0], False)
    assert len(q.list()) == 1


def test_claim_is_exclusive_across_threads(tmp_path):
    q = _queue(tmp_path)
    for i in range(20):
        q.enqueue(f"k{i}", "p", "b", "o")
    claimed, lock = [], threading.Lock()

    def worker():
        wq = JobQueue(tmp_path / "node.sqlite")
        while (job := wq.claim()) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(claimed) == sorted(j.id for j in q.list())


def test_restart_resumes_running_jobs_and_gives_up_after_limit(tmp_path):
    q = _queue(tmp_path)
    job_id, _ = q.enqueue("k", "p", "b", "o")
    q.claim()  # "crash" while running
    fresh = _queue(tmp_path)
    assert fresh.recover() == 1 and fresh.get(job_id).state == "queued"
    for _ in range(MAX_INTERRUPTIONS - 1):
        fresh.claim()
        fresh.recover()
    assert fresh.get(job_id).state == "failed" and "interrupted" in fresh.get(job_id).error


def test_executor_records_success_and_failure(tmp_path):
    q = _queue(tmp_path)
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
    q.requeue(bad)
    assert q.get(bad).state == "queued"
