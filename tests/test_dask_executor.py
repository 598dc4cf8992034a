"""The Dask executor with the real engine on loopback: a scheduler and two workers as separate processes.

The node (in this process) receives the generated CT+MR phantom pair from
DCMTK's storescu, submits the job to the scheduler, a worker fuses it from
the shared storage root (here: the same machine, so the same path), and the
node stores the result and sends it to DCMTK's storescp.  What arrives is
compared with a local run of the same job; a worker is SIGKILLed mid-job; the
node is stopped while a worker runs its job.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from dask_cluster import DaskCluster
from dicom_helpers import dcmtk, free_port, json_logs, wait_listening

from fusion import environment

REPO = Path(__file__).resolve().parents[1]
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"

pytest.importorskip("distributed", reason="the Dask executor needs the [dask] extra (pip install '.[dask]')")


@pytest.fixture
def cluster(tmp_path):
    c = DaskCluster(tmp_path / "dask", root=tmp_path / "node")
    yield c
    c.close()


def _kill_the_worker_running(node, cluster) -> str:
    """SIGKILL the worker registering the node's job (mid-job: its stages reach the job row through the scheduler)."""
    from dicom_node.workflow.runners import task_key

    job = _wait(lambda: (j := _job(node)) and j.stage == "register" and j, 120, "the job registering on a worker",
                poll=0.05)
    victim = cluster.running(task_key(job))
    assert victim is not None, "the scheduler has the task on a worker"
    cluster.kill(cluster.worker_names()[victim])
    return victim


class Storescp:
    """DCMTK's storescp as the PACS, writing what it receives into ``folder``."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.port = folder, free_port()
        self._log = open(folder.parent / "storescp.log", "wb")
        self.proc = subprocess.Popen([dcmtk("storescp"), "-od", str(folder), "-aet", "PACS", str(self.port)],
                                     stdout=self._log, stderr=subprocess.STDOUT)
        wait_listening(self.port, self.proc, folder.parent / "storescp.log")

    def received(self) -> list[pydicom.Dataset]:
        return [pydicom.dcmread(p) for p in sorted(self.folder.iterdir()) if p.is_file()]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._log.close()


@pytest.fixture
def pacs(tmp_path):
    p = Storescp(tmp_path / "pacs")
    yield p
    p.stop()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from fusion_demo.samples import write_synthetic_pair

    return write_synthetic_pair(tmp_path_factory.mktemp("pair"))


def _settings(tmp_path: Path, scheduler: str | None, pacs_port: int | None, connect_timeout_s: float = 30,
              method: str = "dmf"):
    from dicom_node.config import parse_config

    raw = {
        "device": "cpu",
        "node": {"ae_title": "FUSIONNODE", "host": "127.0.0.1", "port": 0, "shutdown_timeout_s": 5},
        "storage": {"root": str(tmp_path / "node")},
        "settle": {"quiet_seconds": 1, "sweep_interval_s": 0.3},
        "outbox": {"max_attempts": 3, "backoff_initial_s": 1},
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port or 104}],
        # DMF on image gradients: ~8 s on a quiet machine, a fuse stage of 40 slices to be stopped in;
        # TIF alone (~5 s, fuse 0.2 s) where nothing is stopped
        "pipelines": [{"name": "ct-mr", "match": "study", "method": method, "feature_source": "image",
                       "destinations": ["pacs"] if pacs_port else [],
                       "base": {"modality": ["CT"], "min_instances": 10},
                       "overlay": {"modality": ["MR"], "min_instances": 10}}],
    }
    if scheduler is not None:
        raw["executor"] = {"kind": "dask", "scheduler": scheduler, "connect_timeout_s": connect_timeout_s}
    return parse_config(raw)


def _send(node, pair) -> None:
    cmd = [dcmtk("storescu"), "-aet", "SCANNER", "-aec", "FUSIONNODE", "+sd", "127.0.0.1", str(node.port),
           *map(str, pair)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def _wait(predicate, timeout: float, what: str, poll: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    pytest.fail(f"{what} not within {timeout} s")


def _job(node):
    jobs = node.jobs.list()
    return jobs[0] if jobs else None


def _done_and_sent(node):
    job = _job(node)
    if job is not None and job.state == "failed":
        pytest.fail(f"job failed: {job.error}")
    return job if job is not None and job.state == "done" and node.outbox.wait_idle(0.1) else None


def _derived_instances(node) -> int:
    """Derived instances in the node's index (the SQLite file, read as an operator would)."""
    import sqlite3

    with sqlite3.connect(node.settings.storage.database_path) as conn:
        return conn.execute("SELECT COUNT(*) FROM instances i JOIN series s USING (series_uid)"
                            " WHERE s.origin = 'derived'").fetchone()[0]


def _sc(datasets: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    return [d for d in datasets if d.SOPClassUID == SC_CLASS]


def test_a_dask_worker_fuses_the_pair_as_a_local_run_would(tmp_path, cluster, pacs, pair):
    """The default run's representative: node -> scheduler -> a worker -> node -> storescp, same objects as locally."""
    from dicom_node.workflow.jobs import output_seed
    from dicom_node.workflow.node import Node
    from dicom_node.workflow.pipeline import JobInputs, pipeline_named, run_pipeline
    from dicom_node.workflow.runners import task_key

    settings = _settings(tmp_path, cluster.address, pacs.port, method="tif")
    with json_logs("dicom_node.workflow", level=logging.INFO) as log:
        node = Node(settings).start()
        try:
            _send(node, pair)
            job = _wait(lambda: _done_and_sent(node), 120, "the fused series at the PACS")
        finally:
            node.stop()
    from dicom_node.workflow.remote import PLUGIN_NAME

    executor = job.result["executor"]
    assert executor["kind"] == "dask" and executor["attempts"] == 1 and executor["key"] == task_key(job)
    plugins = cluster.client.run(lambda dask_worker: sorted(dask_worker.plugins))
    assert all(PLUGIN_NAME in names for names in plugins.values()), f"the node registered its plugin: {plugins}"
    assert executor["worker"] in cluster.worker_names(), "the worker that ran it is one of the cluster's"
    started = log.events("job.remote.started")
    assert [e["worker"] for e in started] == [executor["worker"]]
    # the worker wrote the QC sheet where the node keeps them (the shared root)
    assert list((Path(settings.storage.root) / "qc").iterdir()), "QC picture under <root>/qc"

    arrived = pacs.received()
    sc = _sc(arrived)
    assert len(sc) == 40 and len({d.SeriesInstanceUID for d in sc}) == 1
    assert len(arrived) == 41, "40 SC images and one REG object"

    # the same job in this process (what kind = "local" runs): the same UIDs (deterministic) and pixels
    pipeline = pipeline_named(settings, job.pipeline)
    inputs = JobInputs(job.id, job.pipeline, [i.path for i in node.store.instances(job.base_series_uid)],
                       [i.path for i in node.store.instances(job.overlay_series_uid)], version=job.version,
                       uid_seed=output_seed(job, pipeline), series_offset=0)
    local = run_pipeline(inputs, settings, tmp_path / "local-qc")
    by_uid = {d.SOPInstanceUID: d for d in arrived}
    assert set(by_uid) == {d.SOPInstanceUID for d in local.derived.datasets}, "derived UIDs equal local vs dask"
    assert local.result["sc_series_uid"] == job.result["sc_series_uid"]
    for k in ("translation_mm", "rotation_deg", "method", "trio", "instances"):
        assert local.result[k] == job.result[k], k
    # Pixels: not bit-identical, and no two local runs are either: the registration runs multi-threaded
    # (fusion/registration/rigid.py: ~1e-7 mm drift on a synthetic pair), which moves a few values across a
    # rounding step.  Measured on this pair: with DMF, local vs local up to 0.11 % of a slice's pixels
    # (32 of 40 slices touched), local vs dask 0.39 %; with TIF (here) 0.001 % of the series.  Bound: 1 %.
    differing = total = 0
    for ds in local.derived.sc:
        remote = by_uid[ds.SOPInstanceUID]
        assert remote.SeriesInstanceUID == ds.SeriesInstanceUID and remote.InstanceNumber == ds.InstanceNumber
        a, b = remote.pixel_array, ds.pixel_array
        assert a.shape == b.shape and a.dtype == b.dtype
        differing += int((a != b).sum())
        total += a.size
    assert differing / total < 0.01, f"{differing / total:.4%} of the pixels differ between local and dask"


@pytest.mark.slow
def test_a_worker_killed_mid_job_the_other_worker_finishes_it_once(tmp_path, cluster, pacs, pair):
    from dicom_node.workflow.node import Node

    node = Node(_settings(tmp_path, cluster.address, pacs.port, method="tif")).start()
    try:
        _send(node, pair)
        names = cluster.worker_names()
        victim = _kill_the_worker_running(node, cluster)
        done = _wait(lambda: _done_and_sent(node), 120, "the job finished on the other worker")
    finally:
        node.stop()
    executor = done.result["executor"]
    assert executor["attempts"] == 2, executor
    assert executor["worker"] != victim and executor["worker"] in names
    assert done.state == "done" and done.interruptions == 0, "the node never lost the job: no interruption"
    sc = _sc(pacs.received())
    assert len(sc) == 40 and len({d.SOPInstanceUID for d in sc}) == 40
    assert len({d.SeriesInstanceUID for d in sc}) == 1, "exactly one fused series at the PACS"
    assert _derived_instances(node) == 41, "the node stored one SC series and one REG object"


@pytest.mark.slow
def test_a_node_stopping_while_a_worker_runs_its_job_queues_it_again(tmp_path, cluster, pair):
    """Stopped mid-fuse: queued (not failed), the worker stops too; the restarted node resumes after the
    registration the worker finished (its checkpoint reached the job row through the node)."""
    from dicom_node.workflow.node import Node
    from dicom_node.workflow.remote import PROGRESS_TOPIC
    from dicom_node.workflow.runners import task_key

    settings = _settings(tmp_path, cluster.address, None)
    node = Node(settings).start()
    try:
        _send(node, pair)
        _wait(lambda: (j := _job(node)) and j.stage == "fuse" and j, 120, "the job fusing on a worker", poll=0.05)
    finally:
        report = node.stop()
    job = node.jobs.get(_job(node).id)
    assert job.state == "queued", f"stopped, not failed: {job.state} {job.error}"
    assert job.attempts == 0 and job.interruptions == 0, "a clean stop is neither an attempt nor an interruption"
    assert report["seconds"] < 5.5
    assert job.checkpoint and job.checkpoint.get("registration"), "the worker's registration is in the job row"
    # the worker saw its task released and stopped at its next boundary (it did not fuse on for nobody)
    key = task_key(job)
    released = _wait(lambda: [m for _, m in cluster.client.get_events(PROGRESS_TOPIC)
                              if m["key"] == key and m["kind"] == "released"], 30, "the worker's 'released'", poll=0.2)
    assert released[0]["stage"] in ("fuse", "encode")
    _wait(lambda: sum(cluster.executing().values()) == 0, 10, "the worker idle again", poll=0.2)
    assert _derived_instances(node) == 0

    again = Node(settings).start()  # the restart: the same job, the same Dask key, resumed after "register"
    try:
        done = _wait(lambda: (j := _job(again)) and j.state == "done" and j, 120, "the resumed job done")
    finally:
        again.stop()
    assert done.result["resumed"] == ["register"] and done.result["executor"]["key"] == key
    assert _derived_instances(again) == 41


def test_an_unreachable_scheduler_keeps_the_job_queued(tmp_path, pair):
    """No scheduler: the job is claimed, not submitted within connect_timeout_s, and goes back to the queue."""
    from dicom_node.workflow.node import Node

    dead = f"tcp://127.0.0.1:{free_port()}"
    with json_logs("dicom_node.workflow", level=logging.INFO) as log:
        node = Node(_settings(tmp_path, dead, None, connect_timeout_s=1, method="tif")).start()
        try:
            _send(node, pair)
            _wait(lambda: log.events("executor.dask.unreachable"), 60, "executor.dask.unreachable")
            _wait(lambda: log.events("job.interrupted"), 10, "the job put back")
        finally:
            node.stop()
    job = node.jobs.get(_job(node).id)
    assert job.state == "queued" and job.error is None
    assert "did not answer" in log.events("job.interrupted")[0]["reason"]


def test_executor_config_is_validated():
    from dicom_node.config import ConfigError, parse_config

    assert parse_config({}).executor.kind == "local"
    with pytest.raises(ConfigError, match=r"executor: .*kind = \"dask\" needs scheduler"):
        parse_config({"executor": {"kind": "dask"}})
    with pytest.raises(ConfigError, match="not a Dask scheduler address"):
        parse_config({"executor": {"kind": "dask", "scheduler": "http://10.0.0.5/"}})
    with pytest.raises(ConfigError, match="executor.kind"):
        parse_config({"executor": {"kind": "ray", "scheduler": "tcp://10.0.0.5:8786"}})
    cfg = parse_config({"executor": {"kind": "dask", "scheduler": "tcp://10.0.0.5:8786", "resources": {"GPU": 1}}})
    assert cfg.executor.scheduler == "tcp://10.0.0.5:8786" and cfg.executor.resources == {"GPU": 1.0}
    assert parse_config({"executor": {"kind": "dask", "scheduler": "sched.example.org:8786"}}).executor.scheduler


def test_the_embedded_default_never_imports_dask(tmp_path):
    code = ("import sys\nfrom dicom_node.config import parse_config\nfrom dicom_node.workflow.node import Node\n"
            f"n = Node(parse_config({{'storage': {{'root': {str(tmp_path / 'n')!r}}}}}))\n"
            "print(type(n.runner).__name__, 'dask' in sys.modules or 'distributed' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=environment.child_environment(pythonpath=REPO),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["LocalRunner", "False"]


@pytest.fixture
def gpu_cluster(tmp_path):
    """Two workers, only ``w0`` offering the resource GPU=1 (a GPU worker beside a CPU worker)."""
    c = DaskCluster(tmp_path / "dask", resources={"w0": "GPU=1"})
    yield c
    c.close()


@pytest.mark.slow
def test_two_nodes_submitting_the_same_job_share_one_task(tmp_path, gpu_cluster, pair):
    """Two nodes (own job tables, own Dask clients) holding the same job: the scheduler runs it once,
    on the worker that offers the resource the job asks for ([executor] resources)."""
    cluster = gpu_cluster
    import threading

    from dicom_node.workflow.checkpoint import Checkpoints
    from dicom_node.workflow.jobs import JobQueue, input_key, output_seed
    from dicom_node.workflow.pipeline import JobInputs, pipeline_named
    from dicom_node.workflow.remote import PROGRESS_TOPIC
    from dicom_node.workflow.runners import DaskRunner, task_key

    settings = _settings(tmp_path, cluster.address, None, method="tif")
    settings = settings.model_copy(update={"executor": settings.executor.model_copy(update={"resources": {"GPU": 1}})})
    pipeline = pipeline_named(settings, "ct-mr")
    files = [sorted(d.iterdir()) for d in pair]
    uids = [[pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in f] for f in files]
    key = input_key("ct-mr", *uids)
    root = tmp_path / "shared"
    outputs, errors = {}, []

    queues = {}
    for name in ("node-a", "node-b"):  # the schemas one after the other (migrations are not for two threads)
        queues[name] = JobQueue(tmp_path / f"{name}.sqlite", owner=name)
        queues[name].ensure_schema()

    def node(name: str) -> None:
        try:
            q = queues[name]
            q.enqueue(key, "ct-mr", "base", "overlay")
            job = q.claim()
            seed = output_seed(job, pipeline)
            inputs = JobInputs(job.id, job.pipeline, files[0], files[1], uid_seed=seed)
            runner = DaskRunner(settings.executor, root)
            try:
                outputs[name] = (task_key(job), runner.run(job, inputs, settings, Checkpoints(q, job, root, seed),
                                                           threading.Event(), lambda *a: None))
            finally:
                runner.close()
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=node, args=(n,)) for n in ("node-a", "node-b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    (ka, a), (kb, b) = outputs["node-a"], outputs["node-b"]
    assert ka == kb
    starts = [m for _, m in cluster.client.get_events(PROGRESS_TOPIC) if m["key"] == ka and m["kind"] == "started"]
    assert len(starts) == 1, f"the task ran {len(starts)} times"
    assert a.result["executor"]["worker"] == b.result["executor"]["worker"] == starts[0]["worker"]
    assert cluster.worker_names()[starts[0]["worker"]] == "w0", "the job ran on the worker with GPU=1"
    assert [d.SOPInstanceUID for d in a.derived.datasets] == [d.SOPInstanceUID for d in b.derived.datasets]
    assert [d.PixelData for d in a.derived.sc] == [d.PixelData for d in b.derived.sc], "one result, both nodes"


def test_fusion_node_worker_checks_the_shared_storage_and_names_the_scheduler(tmp_path):
    def cli(config: Path, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dicom_node.cli", "worker", "--config", str(config), *args],
                              cwd=REPO, env=environment.child_environment(pythonpath=REPO), capture_output=True,
                              text=True, timeout=120)

    root = tmp_path / "node"
    config = tmp_path / "node.toml"
    config.write_text(f'[storage]\nroot = "{root}"\n[executor]\nkind = "dask"\nscheduler = "tcp://10.0.0.5:8786"\n')
    unmounted = cli(config, "--print")
    assert unmounted.returncode == 3 and "does not see the node's storage" in unmounted.stderr
    (root / "instances").mkdir(parents=True)
    out = cli(config, "--print", "--name", "gpu-01", "--resources", "GPU=1")
    assert out.returncode == 0, out.stderr
    cmd = out.stdout.split()
    assert cmd[1:4] == ["-m", "distributed.cli.dask_worker", "tcp://10.0.0.5:8786"]
    assert " ".join(cmd[4:]) == ("--nthreads 1 --preload dicom_node.workflow.remote --no-nanny --name gpu-01 "
                                 "--resources GPU=1")
    assert "--no-nanny" not in cli(config, "--print", "--nanny").stdout
    config.write_text(f'[storage]\nroot = "{root}"\n')
    local = cli(config, "--print")
    assert local.returncode == 2 and "no Dask scheduler" in local.stderr


@pytest.mark.slow
def test_when_dask_gives_up_on_dying_workers_the_job_fails_saying_why(tmp_path, pair):
    """allowed-failures = 0: the first worker death is one too many (KilledWorker); the job fails, not queued."""
    from dicom_node.workflow.node import Node

    cluster = DaskCluster(tmp_path / "dask", allowed_failures=0)
    try:
        node = Node(_settings(tmp_path, cluster.address, None, method="tif")).start()
        try:
            _send(node, pair)
            _kill_the_worker_running(node, cluster)
            job = _wait(lambda: (j := _job(node)) and j.state == "failed" and j, 60, "the job failed")
        finally:
            node.stop()
    finally:
        cluster.close()
    assert "every Dask worker that ran it died" in job.error and f"jobs retry {job.id}" in job.error
    assert job.attempts == 1 and job.interruptions == 0


@pytest.mark.slow
def test_a_job_error_on_the_worker_fails_the_job_with_its_message_and_figures(tmp_path, cluster, pair):
    """The registration refused on the worker: the node records the worker's JobError as a local run would."""
    from dicom_node.config import parse_config
    from dicom_node.workflow.node import Node

    raw = _settings(tmp_path, cluster.address, None, method="tif").model_dump(mode="json")
    raw["pipelines"][0]["registration"]["quality"]["min_similarity"] = 0.99  # no registration reaches it
    node = Node(parse_config(raw)).start()
    try:
        _send(node, pair)
        job = _wait(lambda: (j := _job(node)) and j.state == "failed" and j, 120, "the job failed")
    finally:
        node.stop()
    assert job.error.startswith("registration rejected") and "at least 0.990 required" in job.error, job.error
    assert job.result and "registration_quality" in job.result, "the figures measured on the worker are kept"


@pytest.mark.slow
@pytest.mark.weights
def test_a_worker_keeps_its_vgg16_model_for_the_next_job(tmp_path, cluster, pair, vgg_weights):
    """VGG-feature DMF on a worker: the model it loaded stays in the worker's plugin (loaded once per worker)."""
    from dicom_node.config import parse_config
    from dicom_node.workflow.node import Node
    from dicom_node.workflow.remote import PLUGIN_NAME

    raw = _settings(tmp_path, cluster.address, None).model_dump(mode="json")
    raw["pipelines"][0]["feature_source"] = "vgg"
    node = Node(parse_config(raw)).start()
    try:
        _send(node, pair)
        job = _wait(lambda: (j := _job(node)) and j.state in ("done", "failed") and j, 300, "the VGG job")
    finally:
        node.stop()
    assert job.state == "done", job.error
    models = cluster.client.run(lambda dask_worker: sorted(dask_worker.plugins[PLUGIN_NAME].models))
    assert models[job.result["executor"]["worker"]] == ["cpu"], models
    assert sum(1 for m in models.values() if m) == 1, "only the worker that ran the job loaded a model"


def test_a_worker_picks_its_own_device_when_the_node_says_auto(monkeypatch):
    from dicom_node.config import NodeSettings, parse_config
    from dicom_node.workflow.remote import _on_this_worker, worker_settings

    node = parse_config({"device": "auto", "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "h", "port": 104}],
                         "node": {"ae_title": "NODE"},
                         "pipelines": [{"name": "p", "ae_title": "FUSIONNODE", "destinations": ["pacs"],
                                        "base": {"modality": ["CT"]}, "overlay": {"modality": ["MR"]}}]})
    # what the worker is sent: no destinations or routing, and it validates there on its own
    sent = NodeSettings.model_validate(worker_settings(node, "p"))
    assert sent.destinations == [] and sent.pipelines[0].ae_title is None and sent.uid_root == node.uid_root
    monkeypatch.setenv("FUSION_DEVICE", "cpu")
    assert _on_this_worker(sent).device == "cpu"
    monkeypatch.setenv("FUSION_DEVICE", "cuda")
    assert _on_this_worker(sent.model_copy(update={"device": "cpu"})).device == "cpu", "the node's choice stands"
    monkeypatch.delenv("FUSION_DEVICE")
    assert _on_this_worker(sent).device == "auto"
