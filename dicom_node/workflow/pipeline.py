"""One fusion job as a chain of stages (``stages.py``): load -> register -> prepare -> fuse -> derive.

:func:`run_pipeline` returns what the job produced (:class:`JobOutputs`: the
derived datasets and the job's result record, timings included); it stores
nothing and sends nothing - the node does both (``node.py``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicom_node import logs
from dicom_node.config import NodeSettings, Pipeline
from dicom_node.workflow import stages
from dicom_node.workflow.stages import DerivedObjects, JobError

log = logging.getLogger("dicom_node.workflow.pipeline")

__all__ = ["JobError", "JobInputs", "JobOutputs", "StageClock", "pipeline_named", "run_pipeline"]


@dataclass
class StageClock:
    """Seconds per stage, summed when a stage runs more than once."""

    seconds: dict[str, float]

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - t0, 3)


@dataclass(frozen=True)
class JobInputs:
    """What a job works on: the files of both series, in the store's order."""

    job_id: int
    pipeline: str
    base_paths: Sequence[Path]
    overlay_paths: Sequence[Path]


@dataclass(frozen=True)
class JobOutputs:
    derived: DerivedObjects
    #: the job's result record: figures, timings, what was made (JSON-able)
    result: dict[str, Any]


def pipeline_named(settings: NodeSettings, name: str) -> Pipeline:
    for p in settings.pipelines:
        if p.name == name:
            return p
    raise JobError(f"pipeline {name!r} is no longer in the configuration; re-add it or delete the job")


def run_pipeline(job: JobInputs, settings: NodeSettings, qc_dir: Path,
                 models: dict[str, Any] | None = None) -> JobOutputs:
    """Run one job's stages; returns the derived objects and the result record."""
    from fusion.backend import resolve_device

    pipeline = pipeline_named(settings, job.pipeline)
    clock = StageClock({})
    result: dict[str, Any] = {"pipeline": pipeline.name}

    with clock.stage("load"):
        pair = stages.load(job.base_paths, job.overlay_paths)
    notes = [*pair.base.notes, *pair.overlay.notes]
    if notes:
        result["notes"] = notes
    log.info("pipeline.loaded", extra=logs.fields(
        job_id=job.job_id, base=f"{pair.base.modality} {pair.base.image.GetSize()}",
        overlay=f"{pair.overlay.modality} {pair.overlay.image.GetSize()}", notes=notes))

    with clock.stage("register"):
        registration = stages.register(pair, pipeline, qc_dir, job.job_id)
    result.update(registration.as_result())
    log.info("pipeline.registered", extra=logs.fields(job_id=job.job_id, **registration.figures))

    with clock.stage("prepare"):
        prepared = stages.prepare(pair, registration, pipeline)
    if prepared.warnings:
        result.setdefault("warnings", []).extend(prepared.warnings)
        for text in prepared.warnings:
            log.warning("pipeline.display.warning", extra=logs.fields(job_id=job.job_id, warning=text))

    device = resolve_device(settings.device)

    def progress(done: int, total: int) -> None:
        log.info("pipeline.fuse.progress", extra=logs.fields(job_id=job.job_id, slices_done=done, slices_total=total))

    with clock.stage("fuse"):
        fused = stages.fuse(prepared, pipeline, device, models, progress)

    with clock.stage("encode"):
        derived = stages.derive(pair, registration, fused, pipeline, settings.uid_root)

    result.update(seconds=clock.seconds, method=fused.method, trio=list(fused.trio),
                  sc_series_uid=str(derived.sc[0].SeriesInstanceUID),
                  reg_sop_instance_uid=str(derived.reg.SOPInstanceUID), instances=len(derived.sc), device=device)
    return JobOutputs(derived, result)
