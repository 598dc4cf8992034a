"""One fusion job: load -> register -> resample -> normalise -> fuse -> derive -> store -> queue for sending.

The science lives in ``fusion``; this module moves data between DICOM and
arrays and records how long each stage took (returned as the job's result,
so ``fusion-node status`` and the logs can show it).
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from dicom_node import logs
from dicom_node.config import NodeSettings, Pipeline

log = logging.getLogger("dicom_node.pipeline")

ANATOMICAL = ("MR",)
COLOUR_MODALITIES = ("PT", "NM")
#: slices fused per batch: bounds memory on 512x512 stacks and gives progress reports
FUSE_BATCH = 16


class JobError(RuntimeError):
    """A job that cannot be done as configured; ``operator_message`` says what to do."""

    def __init__(self, message: str, result: dict | None = None):
        super().__init__(message)
        self.operator_message = message
        #: what was measured before the job stopped (e.g. the registration quality figures), kept on the job
        self.result = result


@dataclass
class StageClock:
    seconds: dict[str, float]

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - t0, 3)


def _pipeline(settings: NodeSettings, name: str) -> Pipeline:
    for p in settings.pipelines:
        if p.name == name:
            return p
    raise JobError(f"pipeline {name!r} is no longer in the configuration; re-add it or delete the job")


def _colourise(grey: np.ndarray) -> np.ndarray:
    """PET/SPECT on 0..1 to RGB with a hot-iron style ramp (black-red-yellow-white)."""
    r = np.clip(grey * 2.0, 0, 1)
    g = np.clip(grey * 2.0 - 0.5, 0, 1)
    b = np.clip(grey * 4.0 - 3.0, 0, 1)
    return np.stack([r, g, b], axis=-1).astype(np.float32)


def _check_registration(job: Any, pipeline: Pipeline, fixed: Any, moving: Any, reg: Any, result: dict) -> str | None:
    """Quality figures of the registration into ``result``; raise JobError or return the warning per the policy.

    Returns the short warning for the Series Description ("CHECK REG: ...") when
    the registration is outside the limits and the policy is "warn", else None.
    """
    from fusion.registration_quality import QualityThresholds, assess_registration

    cfg = pipeline.registration
    quality = assess_registration(fixed, moving, reg, QualityThresholds.from_mapping(cfg.quality.model_dump()))
    result["registration_quality"] = quality.as_dict()
    if quality.ok:
        return None
    log.warning("pipeline.registration_doubtful", extra=logs.fields(
        job_id=job.id, policy=cfg.on_poor_quality, problems=quality.reason))
    if cfg.on_poor_quality == "fail":
        raise JobError(
            f"registration rejected, nothing was sent: {quality.reason}. Check that the two series show the same "
            "body part of the same patient and that their orientation headers are right; to send such results "
            f"with a visible warning instead, set on_poor_quality = \"warn\" in pipeline {pipeline.name!r}"
            + (f"; the check sheet is {result['registration_picture']}" if result.get("registration_picture") else ""),
            result=result,
        )
    result["registration_warning"] = quality.warning
    return quality.warning


def _registration_picture(job: Any, pipeline: Pipeline, store: Any, base: Any, overlay: Any, reg: Any) -> str | None:
    """Save the registration check sheet (orthogonal slices, checkerboards before/after) under ``<root>/qc``.

    The picture an operator or radiologist opens when a registration is doubted:
    a misalignment shows as edges jumping at the checkerboard's tile borders.
    A failure here costs the picture, never the job.
    """
    from fusion.registration_quality import check_sheet

    try:
        title = (f"{pipeline.name}: {overlay.modality} onto {base.modality}, moved {reg.translation_norm_mm:.1f} mm, "
                 f"turned {reg.rotation_angle_deg:.1f} deg (job {job.id})")
        sheet = check_sheet(base.image, overlay.image, reg.transform, (base.modality, overlay.modality), title)
        path = Path(store.root) / "qc" / f"job-{job.id}-registration.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        sheet.save(path)
        return str(path)
    except Exception as exc:  # noqa: BLE001 - a picture must never cost a fusion
        log.warning("pipeline.registration_picture.failed", extra=logs.fields(job_id=job.id, reason=str(exc)))
        return None


def run_job(job: Any, settings: NodeSettings, store: Any, outbox: Any, model_cache: dict | None = None) -> dict:
    """Run one fusion job end to end; returns timings and what was produced."""
    import SimpleITK as sitk

    from dicom_node.derived import build_registration, build_sc_series, sc_series_description
    from dicom_node.volume import GeometryError, load_series
    from fusion.api import default_trio, dmf_stack, merge_colour, split_colour
    from fusion.backend import resolve_device, to_device, to_numpy
    from fusion.intensity import normalise_for_modality, to_uint8
    from fusion.registration import RegistrationError, RegistrationParams, register_rigid, resample_onto

    pipeline = _pipeline(settings, job.pipeline)
    clock = StageClock({})
    result: dict[str, Any] = {"pipeline": pipeline.name}

    with clock.stage("load"):
        try:
            base = load_series([i.path for i in store.instances(job.base_series_uid)])
            overlay = load_series([i.path for i in store.instances(job.overlay_series_uid)])
        except GeometryError as exc:
            raise JobError(f"cannot build a volume: {exc}") from exc
    log.info("pipeline.loaded", extra=logs.fields(job_id=job.id, base=f"{base.modality} {base.image.GetSize()}",
                                                  overlay=f"{overlay.modality} {overlay.image.GetSize()}"))

    with clock.stage("register"):
        reg_warning = None
        if pipeline.registration.enabled:
            params = RegistrationParams.from_mapping(pipeline.registration.model_dump())
            try:
                reg = register_rigid(base.image, overlay.image, params)
            except RegistrationError as exc:
                raise JobError(f"registration failed, nothing was sent: {exc}") from exc
            transform, matrix = reg.transform, reg.matrix
            result.update(translation_mm=[round(float(v), 2) for v in reg.translation_mm],
                          rotation_deg=[round(float(v), 3) for v in reg.rotation_deg],
                          registration_metric=round(float(reg.final_metric), 5),
                          registration_overlap=round(float(reg.overlap), 4))
            picture = _registration_picture(job, pipeline, store, base, overlay, reg)
            if picture:
                result["registration_picture"] = picture
            reg_warning = _check_registration(job, pipeline, base.image, overlay.image, reg, result)
        else:
            transform, matrix = sitk.Euler3DTransform(), np.eye(4)
    log.info("pipeline.registered", extra=logs.fields(job_id=job.id, **{k: v for k, v in result.items() if k != "pipeline"}))

    with clock.stage("resample"):
        # outside the overlay's field of view: its own minimum (air), not 0 (water in HU)
        outside = float(sitk.GetArrayViewFromImage(overlay.image).min())
        moved = resample_onto(overlay.image, base.image, transform, default_value=outside)
        base_arr = sitk.GetArrayFromImage(base.image)
        over_arr = sitk.GetArrayFromImage(moved)

    with clock.stage("normalise"):
        def ct_window(vol):  # config, else the CT's own header window, else the brain preset
            return pipeline.ct_window or (vol.header_window() if vol.modality == "CT" else None)

        base_n = normalise_for_modality(base_arr, base.modality, ct_window=ct_window(base), units=base.units)
        over_n = normalise_for_modality(over_arr, overlay.modality, ct_window=ct_window(overlay), units=overlay.units)
        if base.modality in ANATOMICAL or overlay.modality not in ANATOMICAL:
            a, b, other_modality = base_n, over_n, overlay.modality
        else:
            a, b, other_modality = over_n, base_n, base.modality
        if other_modality in COLOUR_MODALITIES:
            b = _colourise(b)
        trio = tuple(pipeline.trio) or default_trio(other_modality)

    device = resolve_device(settings.device)
    model = None
    if pipeline.feature_source == "vgg":
        from fusion.features import load_vgg16

        model = (model_cache or {}).get(device) or load_vgg16(device=device)
        if model_cache is not None:
            model_cache[device] = model

    with clock.stage("fuse"):
        a_d, b_d, chroma = split_colour(to_device(a.astype(np.float32), device), to_device(b.astype(np.float32), device))
        n = a_d.shape[0]
        fused = []
        for start in range(0, n, FUSE_BATCH):
            sl = slice(start, start + FUSE_BATCH)
            res = dmf_stack(a_d[sl], b_d[sl], trio=trio, feature_source=pipeline.feature_source, model=model)
            part = merge_colour(res.fused, None if chroma is None else chroma[sl])
            fused.append(to_numpy(part))
            log.info("pipeline.fuse.progress", extra=logs.fields(job_id=job.id, slices_done=min(start + FUSE_BATCH, n),
                                                                 slices_total=n))
        fused8 = to_uint8(np.concatenate(fused))

    with clock.stage("encode"):
        trio_text = "+".join(m.upper() for m in trio)
        description = sc_series_description(pipeline.name, base.modality, overlay.modality, reg_warning)
        derivation = (f"DMF fusion of {overlay.modality} onto {base.modality}: {trio_text} exposures, "
                      f"{'VGG16 feature' if pipeline.feature_source == 'vgg' else 'image'} gradients, "
                      f"rigid Mattes-MI registration")
        sc = build_sc_series(base.headers, overlay.headers, fused8, uid_root=settings.uid_root,
                             series_description=description, derivation_description=derivation[:1024],
                             base_to_overlay=matrix)
        reg = build_registration(base.headers, overlay.headers, matrix, uid_root=settings.uid_root,
                                 content_label="RIGID_MI")
        stored = [store.store_dataset(ds, origin="derived") for ds in [*sc, reg]]

    with clock.stage("queue"):
        paths = [r.path for r in stored]
        for dest in pipeline.destinations:
            outbox.enqueue(dest, paths, job_id=job.id)

    result.update(seconds=clock.seconds, trio=list(trio), sc_series_uid=sc[0].SeriesInstanceUID,
                  reg_sop_instance_uid=reg.SOPInstanceUID, instances=len(sc), device=device)
    return result
