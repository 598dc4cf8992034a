"""One fusion job as a chain of stages (``stages.py``): load -> register -> prepare -> fuse -> derive.

:func:`run_pipeline` returns what the job produced (:class:`JobOutputs`: the
derived datasets and the job's result record, timings included); it stores
nothing and sends nothing - the node does both (``node.py``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicom_node import logs
from dicom_node.config import NodeSettings, Pipeline
from dicom_node.workflow import stages
from dicom_node.workflow.checkpoint import Checkpoints
from dicom_node.workflow.jobs import JobInterrupted
from dicom_node.workflow.stages import DerivedObjects, JobError

log = logging.getLogger("dicom_node.workflow.pipeline")

__all__ = ["JobError", "JobInputs", "JobOutputs", "StageClock", "StageProgress", "pipeline_named", "run_pipeline"]


#: ``(stage, slices done, slices total)``; done/total are None outside the slice-by-slice stages
StageProgress = Callable[[str, "int | None", "int | None"], None]


@dataclass
class StageClock:
    """Seconds per stage, summed when a stage runs more than once."""

    seconds: dict[str, float]
    #: told ``(stage, done, total)`` as the job goes: the job table's progress columns
    report: StageProgress | None = None

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.report is not None:
            self.report(name, None, None)
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
    #: the job's version (1, +1 per ``jobs retry --new-version``): written into the descriptions
    version: int = 1
    #: what the derived UIDs follow from (``jobs.output_seed``); None = random UIDs
    uid_seed: str | None = None
    #: the pipeline's place in the configuration: keeps two pipelines' Series Numbers on one base apart
    series_offset: int = 0


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


def _check(cancel: threading.Event | None, job_id: int, before: str) -> None:
    """The stage boundary: a stopping node ends the job here (it goes back to the queue)."""
    if cancel is not None and cancel.is_set():
        raise JobInterrupted(f"job {job_id}: the node is stopping; stopped before {before}, queued again")


def run_pipeline(job: JobInputs, settings: NodeSettings, qc_dir: Path,
                 models: dict[str, Any] | None = None, checkpoints: Checkpoints | None = None,
                 cancel: threading.Event | None = None, report: StageProgress | None = None) -> JobOutputs:
    """Run one job's stages; returns the derived objects and the result record.

    With ``checkpoints``, a registration or fused stack an earlier run of the
    job finished is used instead of being computed again (``result["resumed"]``
    names the stages skipped), and each is saved as soon as it is done.
    ``cancel`` is checked between stages and between fused slices; when set,
    :class:`JobInterrupted` is raised, so a SIGTERM costs at most one stage
    (what was checkpointed is kept for the restart).
    ``report`` hears each stage as it starts and the fuse stage's slices as they
    are done: the minutes of a large fusion are the ones an operator asks about.
    """
    from fusion.backend import resolve_device
    from fusion.environment import crash_point

    pipeline = pipeline_named(settings, job.pipeline)
    clock = StageClock({}, report)
    result: dict[str, Any] = {"pipeline": pipeline.name}

    with clock.stage("load"):
        pair = stages.load(job.base_paths, job.overlay_paths)
    notes = [*pair.base.notes, *pair.overlay.notes]
    if notes:
        result["notes"] = notes
    log.info("pipeline.loaded", extra=logs.fields(
        job_id=job.job_id, base=f"{pair.base.modality} {pair.base.image.GetSize()}",
        overlay=f"{pair.overlay.modality} {pair.overlay.image.GetSize()}", notes=notes))

    resumed: list[str] = []
    saved = checkpoints.registration() if checkpoints else None
    if saved is not None:
        registration, clock.seconds["register"] = saved
        resumed.append("register")
    else:
        _check(cancel, job.job_id, "register")
        crash_point("register")
        with clock.stage("register"):
            registration = stages.register(pair, pipeline, qc_dir, job.job_id)
        if checkpoints:
            checkpoints.save_registration(registration, clock.seconds["register"])
    result.update(registration.as_result())
    log.info("pipeline.registered", extra=logs.fields(job_id=job.job_id, resumed="register" in resumed,
                                                       **registration.figures))

    device = resolve_device(settings.device)
    fused = checkpoints.fused() if checkpoints else None
    if fused is not None:
        resumed.append("fuse")
    else:
        _check(cancel, job.job_id, "prepare")
        with clock.stage("prepare"):
            prepared = stages.prepare(pair, registration, pipeline)
        if prepared.warnings:
            result.setdefault("warnings", []).extend(prepared.warnings)
            for text in prepared.warnings:
                log.warning("pipeline.display.warning", extra=logs.fields(job_id=job.job_id, warning=text))

        def progress(done: int, total: int) -> None:
            _check(cancel, job.job_id, f"fusing slice {done + 1} of {total}")
            log.info("pipeline.fuse.progress", extra=logs.fields(job_id=job.job_id, slices_done=done,
                                                                 slices_total=total))
            crash_point("fuse")
            if report is not None:
                report("fuse", done, total)

        _check(cancel, job.job_id, "fuse")
        with clock.stage("fuse"):
            fused = stages.fuse(prepared, pipeline, device, models, progress)
        if checkpoints:
            checkpoints.save_fused(fused)
    if resumed:
        result["resumed"] = resumed
        log.info("pipeline.resumed", extra=logs.fields(job_id=job.job_id, skipped=resumed))

    with clock.stage("encode"):
        derived = stages.derive(pair, registration, fused, pipeline, settings.uid_root, uid_seed=job.uid_seed,
                                version=job.version, series_offset=job.series_offset)

    result.update(seconds=clock.seconds, method=fused.method, trio=list(fused.trio),
                  sc_series_uid=str(derived.sc[0].SeriesInstanceUID),
                  reg_sop_instance_uid=str(derived.reg.SOPInstanceUID), instances=len(derived.sc),
                  device=fused.device, version=job.version)
    if fused.feature_source == "vgg" and fused.trio:
        from fusion.gradients import resolve_precision

        # the best path this machine has: bf16 convolutions where the CPU multiplies bf16 natively
        result["vgg_precision"] = resolve_precision("auto", device)
    _check(cancel, job.job_id, "storing the derived objects")
    return JobOutputs(derived, result)
