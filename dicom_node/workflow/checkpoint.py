"""A job's finished stages, kept so that a restarted job resumes after the last one.

Two checkpoints, the two expensive stages:

* the registration (matrix, figures, quality verdict; JSON) in the job row's
  ``checkpoint`` column - a restart skips the optimiser;
* the fused stack (uint8 pixels and what made them) as one ``.npz`` under
  ``<root>/checkpoints/job-<id>-v<version>.npz`` - a crash while the derived
  objects were being written or published re-derives them without fusing again
  (the UIDs follow from the job, so they come out the same).

Both belong to one job version and one set of parameters: each carries the
job's output seed (``jobs.output_seed``) and is ignored when it no longer
matches (the pipeline's method or registration settings changed), and
``jobs retry --new-version`` clears them.
The fused file is removed once the job is done; :func:`clean` removes those of
jobs that are no longer queued or running (start-up).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dicom_node import logs
from dicom_node.workflow.jobs import Job, JobQueue
from dicom_node.workflow.stages import FusedStack, Registration

log = logging.getLogger("dicom_node.workflow.checkpoint")


def folder(root: Path) -> Path:
    return Path(root) / "checkpoints"


class Checkpoints:
    """The checkpoints of one job run; every save happens only while this run holds the job's lease."""

    def __init__(self, queue: JobQueue, job: Job, root: Path, seed: str):
        self._bind(job.checkpoint, job.id, job.version, root, seed, lambda doc: queue.save_checkpoint(job.id, doc))

    @classmethod
    def detached(cls, doc: dict[str, Any] | None, job_id: int, version: int, root: Path, seed: str,
                 save_doc: Callable[[dict[str, Any]], None]) -> Checkpoints:
        """The checkpoints of a run away from the job table (a Dask worker, ``workflow/remote.py``).

        The registration comes in ``doc`` (the job row's ``checkpoint``, as the
        node read it) and a newly saved one goes to ``save_doc`` (the node
        writes it, under its lease); the fused file lives under ``root`` as
        always, which the worker sees at the node's path.
        """
        self = cls.__new__(cls)
        self._bind(doc, job_id, version, root, seed, save_doc)
        return self

    def _bind(self, doc: dict[str, Any] | None, job_id: int, version: int, root: Path, seed: str,
              save_doc: Callable[[dict[str, Any]], None]) -> None:
        self._job_id, self._version, self._seed, self._save_doc = job_id, version, seed, save_doc
        self._doc: dict[str, Any] = dict(doc or {})
        self._fused_path = folder(root) / f"job-{job_id}-v{version}.npz"

    @property
    def document(self) -> dict[str, Any]:
        """What the job row's ``checkpoint`` column holds for this run (JSON-able)."""
        return dict(self._doc)

    def store_document(self, doc: dict[str, Any]) -> None:
        """Keep ``doc`` (a detached run's saved checkpoint) as this run's, in the job row."""
        self._doc = dict(doc)
        self._save_doc(self._doc)

    def registration(self) -> tuple[Registration, float] | None:
        """The saved registration and the seconds it took, or None."""
        doc = self._doc.get("registration")
        if not doc or self._doc.get("version") != self._version or self._doc.get("seed") != self._seed:
            return None
        return Registration.from_json(doc), float(self._doc.get("register_s") or 0.0)

    def save_registration(self, registration: Registration, seconds: float) -> None:
        self._doc.update(version=self._version, seed=self._seed, registration=registration.to_json(), register_s=round(seconds, 3))
        self._save_doc(self._doc)
        log.info("job.checkpoint.saved", extra=logs.fields(job_id=self._job_id, stage="register"))

    def fused(self) -> FusedStack | None:
        if not self._fused_path.exists():
            return None
        try:
            with np.load(self._fused_path, allow_pickle=False) as z:
                if str(z["seed"]) != self._seed:
                    return None
                return FusedStack(np.asarray(z["pixels"]), str(z["method"]), tuple(str(t) for t in z["trio"]),
                                  str(z["feature_source"]), str(z["device"]))
        except (OSError, ValueError, KeyError) as exc:  # a torn file: fuse again
            log.warning("job.checkpoint.unreadable", extra=logs.fields(job_id=self._job_id, reason=str(exc)))
            return None

    def save_fused(self, fused: FusedStack) -> None:
        path = self._fused_path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        with open(tmp, "wb") as f:
            np.savez(f, seed=self._seed, pixels=fused.pixels, method=fused.method, trio=np.array(fused.trio, dtype=str),
                     feature_source=fused.feature_source, device=fused.device)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        log.info("job.checkpoint.saved", extra=logs.fields(job_id=self._job_id, stage="fuse"))

    def discard_files(self) -> None:
        self._fused_path.unlink(missing_ok=True)


def clean(queue: JobQueue, root: Path) -> int:
    """Remove fused checkpoints of jobs that will not resume (done, failed, deleted, older versions)."""
    d = folder(root)
    if not d.exists():
        return 0
    live = {f"job-{j.id}-v{j.version}.npz" for j in queue.list() if j.state in ("queued", "running")}
    n = 0
    for p in d.iterdir():
        if p.name not in live:
            p.unlink(missing_ok=True)
            n += 1
    return n
