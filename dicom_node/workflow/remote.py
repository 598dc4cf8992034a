"""What runs on a Dask worker: one fusion job's stages, and the worker's cache of VGG16 models.

Imported by the Dask workers (the package must be installed there, the same
version as the node's: ``pip install 'dicom-fusion-node[dask]'``) and by the
node's ``runners.DaskRunner``, which alone imports it - the embedded node never
imports Dask.  A worker is a plain Dask worker process, one job at a time::

    dask worker tcp://SCHEDULER:8786 --nthreads 1 --no-nanny --preload dicom_node.workflow.remote

(``fusion-node worker --config node.toml`` checks that the storage root is
mounted, then runs exactly that).  ``--no-nanny``: a nanny starts the worker
with ``OMP_NUM_THREADS=1``, one core for torch; :class:`FusionWorkerPlugin`
logs ``worker.threads.limited`` when it finds that.  Each worker needs the
VGG16 weights for VGG-feature pipelines (``fusion-node models fetch`` there).

It must see the node's ``[storage] root`` at the same absolute path
(``runners.py`` says why).  The node registers :class:`FusionWorkerPlugin` on
every worker when it connects; the scheduler hands it to workers that join
later.

Messages from the task to the node go on the Dask event topic
:data:`PROGRESS_TOPIC`, each a small dict with the task ``key`` and a ``kind``:
``started`` (which worker), ``stage`` (stage name, slices done/total),
``checkpoint`` (a finished registration, which the node saves in the job row
under its lease) and ``released`` (the task stopped at a stage boundary
because no node wants it any more).
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distributed import Worker, WorkerPlugin, get_worker

from dicom_node import logs
from dicom_node.config import NodeSettings
from dicom_node.workflow.checkpoint import Checkpoints
from dicom_node.workflow.jobs import JobInterrupted
from dicom_node.workflow.pipeline import JobInputs, JobOutputs, pipeline_named, run_pipeline
from dicom_node.workflow.stages import DerivedObjects, JobError

log = logging.getLogger("dicom_node.workflow.remote")

#: the name the worker plugin is registered under (one per worker, shared by every node)
PLUGIN_NAME = "dicom-fusion-node"
#: the Dask event topic the tasks report on
PROGRESS_TOPIC = "dicom-fusion-node.progress"


class FusionWorkerPlugin(WorkerPlugin):
    """The worker's state between jobs: the VGG16 models per device, loaded by the first job that needs one.

    Registered idempotently: a second node (or a restarted one) connecting
    keeps the models the worker has already loaded.
    """

    name = PLUGIN_NAME
    idempotent = True

    def __init__(self) -> None:
        self.models: dict[str, Any] = {}

    def setup(self, worker: Worker) -> None:
        self.models = {}
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        try:
            import torch

            threads = torch.get_num_threads()
        except ImportError:  # pragma: no cover - torch is a dependency of the package
            return
        if threads == 1 < cores:
            # the worker's log is Dask's (plain text): the advice goes in the message, after the event name
            log.warning("worker.threads.limited torch runs on 1 of %d cores, so the CPU stages are slow: a Dask "
                        "nanny sets OMP_NUM_THREADS=1; start the worker with --no-nanny (`fusion-node worker` "
                        "does) or change distributed.nanny.pre-spawn-environ", cores,
                        extra=logs.fields(worker=worker.address, torch_threads=threads, cores=cores))

    def teardown(self, worker: Worker) -> None:
        self.models.clear()


def _models(worker: Worker) -> dict[str, Any]:
    plugin = worker.plugins.get(PLUGIN_NAME)
    # without the plugin (a worker whose registration was lost) the job still runs; it loads the model itself
    return plugin.models if isinstance(plugin, FusionWorkerPlugin) else {}


class _Released(threading.Event):
    """Set once nobody wants the task any more (the node stopped and released it): the job stops at its next boundary.

    Reads the worker's own state of the task, so a task another node still
    waits for (the same key) goes on.
    """

    def __init__(self, worker: Worker, key: str):
        super().__init__()
        self._worker, self._key = worker, key

    def is_set(self) -> bool:
        try:
            ts = self._worker.state.tasks.get(self._key)
        except AttributeError:  # another distributed release: never stop early, the result is just discarded
            return False
        return ts is None or ts.state in ("cancelled", "released", "forgotten")


def _json_safe(value: Any) -> Any:
    """Event messages travel as msgpack: plain JSON types only (NumPy scalars in figures become floats)."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


def worker_settings(settings: NodeSettings, pipeline: str) -> dict[str, Any]:
    """What a worker needs of the configuration: the job's pipeline, ``uid_root`` and ``device``.

    Destinations (and their credentials), access lists and the storage paths
    stay with the node; the worker re-validates this, so a worker whose
    package lacks the pipeline's fusion method fails the job saying so.
    """
    p = pipeline_named(settings, pipeline).model_dump(mode="json")
    # what decides where series come from and go to is the node's business (and would not validate alone)
    p.update(destinations=[], ae_title=None, allowed_callers=[], allowed_addresses=[])
    return {"uid_root": settings.uid_root, "device": settings.device, "pipelines": [p]}


def _on_this_worker(settings: NodeSettings) -> NodeSettings:
    """The node's ``device = "auto"`` lets each worker decide: its ``FUSION_DEVICE``, else its GPU if it has one.

    A worker's hardware is its own (a CPU worker beside a GPU worker); a
    node that names "cpu" or "cuda" means it for every worker.
    """
    from fusion import environment

    wanted = (environment.device() or "").strip().lower()
    if settings.device == "auto" and wanted in ("cpu", "cuda"):
        return settings.model_copy(update={"device": wanted})
    return settings


def job_request(key: str, inputs: JobInputs, settings: NodeSettings, root: Path,
                checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The task's one argument (the node side): paths on the shared storage, the settings, the checkpoint."""
    return {
        "key": key,
        "inputs": {"job_id": inputs.job_id, "pipeline": inputs.pipeline, "version": inputs.version,
                   "uid_seed": inputs.uid_seed, "series_offset": inputs.series_offset,
                   "base_paths": [os.path.abspath(p) for p in inputs.base_paths],
                   "overlay_paths": [os.path.abspath(p) for p in inputs.overlay_paths]},
        "settings": worker_settings(settings, inputs.pipeline),
        "root": str(root),
        "checkpoint": _json_safe(checkpoint),
    }


def part10(ds: Any) -> bytes:
    """A dataset as the Part-10 file the store would write (its File Meta: ``store.completed_file_meta``)."""
    from dicom_node.index.store import completed_file_meta

    ds.file_meta = completed_file_meta(ds)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def outputs_from_reply(reply: dict[str, Any]) -> JobOutputs:
    """The task's reply as the node's :class:`JobOutputs` (datasets read back from their bytes)."""
    from pydicom import dcmread

    sc = [dcmread(io.BytesIO(b)) for b in reply["sc"]]
    reg = dcmread(io.BytesIO(reply["reg"]))
    return JobOutputs(DerivedObjects(sc, reg), dict(reply["result"]))


def _check_shared(paths: list[str], root: Path, address: str) -> None:
    missing = [p for p in paths[:1] + paths[-1:] if not os.path.exists(p)]
    if missing:
        raise JobError(f"Dask worker {address} does not see the node's storage: {missing[0]} is missing. Mount "
                       f"[storage] root ({root}) at the same path on every Dask worker (a shared file system), "
                       "then `fusion-node jobs retry` the job")


def run_job(request: dict[str, Any]) -> dict[str, Any]:
    """The Dask task: run one job's stages on this worker; returns the derived objects as Part-10 bytes.

    Stores and sends nothing (the node does, in one transaction).  Errors the
    operator should see are :class:`JobError` (pickled back to the node as
    they are); a stopping node's release raises ``JobInterrupted`` here,
    which nobody waits for any more.
    """
    worker = get_worker()
    key = str(request["key"])

    def publish(kind: str, **fields: Any) -> None:
        worker.log_event(PROGRESS_TOPIC, {"key": key, "kind": kind, **_json_safe(fields)})

    publish("started", worker=worker.address, pid=os.getpid())
    settings = _on_this_worker(NodeSettings.model_validate(request["settings"]))
    doc = request["inputs"]
    root = Path(request["root"])
    _check_shared([*doc["base_paths"], *doc["overlay_paths"]], root, worker.address)
    inputs = JobInputs(int(doc["job_id"]), str(doc["pipeline"]), [Path(p) for p in doc["base_paths"]],
                       [Path(p) for p in doc["overlay_paths"]], version=int(doc["version"]),
                       uid_seed=doc["uid_seed"], series_offset=int(doc["series_offset"]))
    save: Callable[[dict[str, Any]], None] = lambda d: publish("checkpoint", doc=d)
    checkpoints = Checkpoints.detached(request.get("checkpoint"), inputs.job_id, inputs.version, root,
                                       inputs.uid_seed or "", save)
    stage = ["load"]

    def report(name: str, done: int | None, total: int | None) -> None:
        stage[0] = name
        publish("stage", stage=name, done=done, total=total)

    try:
        outputs = run_pipeline(inputs, settings, root / "qc", _models(worker), checkpoints,
                               cancel=_Released(worker, key), report=report)
    except JobInterrupted:
        # nobody waits for this task any more (the node stopped): say so where an operator can see it
        publish("released", worker=worker.address, stage=stage[0])
        log.info("job.remote.released", extra=logs.fields(job_id=inputs.job_id, key=key, stage=stage[0]))
        raise
    return {"worker": worker.address, "sc": [part10(ds) for ds in outputs.derived.sc],
            "reg": part10(outputs.derived.reg), "result": outputs.result}
