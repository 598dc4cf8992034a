"""The stages of one fusion job, each a function from typed values to a typed value.

    load -> register -> prepare (resample + normalise) -> fuse -> derive

No stage touches the store, the outbox or the database: the inputs are file
paths and settings, the outputs are values (volumes, a registration, arrays,
datasets).  :mod:`dicom_node.workflow.pipeline` chains them; the node stores
and queues what comes out.  Each output is something a later step can keep:
:class:`Registration` is plain JSON (matrix, figures, verdict), the prepared
and fused stacks are arrays, the derived objects are datasets.  That is what a
resumable job checkpoints.

Science stays in ``fusion``; DICOM stays in ``dicom_node.dicom``.  Stages
raise :class:`JobError` with a message for the operator; errors of the image
science (``fusion.errors.FusionError``) are turned into one here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dicom_node import events, logs
from dicom_node.config import Pipeline
from dicom_node.dicom.volume import GeometryError, Volume, load_series
from dicom_node.errors import NodeError

log = logging.getLogger("dicom_node.workflow.stages")

#: the anatomical modality: fused as DMF's first source, its contrast kept
ANATOMICAL = ("MR",)
#: modalities shown in colour on the fused series
COLOUR_MODALITIES = ("PT", "NM")
#: slices fused per batch: bounds memory on 512x512 stacks and gives progress reports
FUSE_BATCH = 16

Progress = Callable[[int, int], None]


class JobError(NodeError):
    """A job that cannot be done as configured; the message says what to do."""


# -- values passed between stages -----------------------------------------------------------


@dataclass(frozen=True)
class LoadedPair:
    base: Volume
    overlay: Volume


@dataclass(frozen=True)
class Registration:
    """Where the overlay lies on the base, and how far to trust it: plain values, JSON as it is."""

    #: 4x4 base -> overlay point map in LPS mm (SimpleITK's fixed -> moving); identity when registration is off
    matrix: tuple[tuple[float, ...], ...]
    #: translation_mm, rotation_deg, registration_metric, registration_overlap (empty when off)
    figures: dict[str, Any] = field(default_factory=dict)
    #: fusion.registration.quality figures and verdict (None when registration is off)
    quality: dict[str, Any] | None = None
    #: "CHECK REG: ..." text when the policy is "warn" and the registration is doubtful
    warning: str | None = None
    #: the check sheet PNG, when it could be drawn
    picture: str | None = None

    @property
    def matrix_array(self) -> np.ndarray:
        return np.asarray(self.matrix, dtype=np.float64)

    def to_json(self) -> dict[str, Any]:
        return {"matrix": [list(r) for r in self.matrix], "figures": self.figures, "quality": self.quality,
                "warning": self.warning, "picture": self.picture}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Registration:
        return cls(tuple(tuple(float(v) for v in r) for r in doc["matrix"]), dict(doc.get("figures") or {}),
                   doc.get("quality"), doc.get("warning"), doc.get("picture"))

    def as_result(self) -> dict[str, Any]:
        """The job-result fields (what ``jobs show`` prints and the status page shows)."""
        out: dict[str, Any] = dict(self.figures)
        if self.quality is not None:
            out["registration_quality"] = self.quality
        if self.picture:
            out["registration_picture"] = self.picture
        if self.warning:
            out["registration_warning"] = self.warning
        return out


@dataclass(frozen=True)
class PreparedStacks:
    """Both series on the base grid, each on 0..1: the anatomical one and the other (RGB for PET/NM)."""

    anatomical: np.ndarray
    other: np.ndarray
    other_modality: str
    #: what a reader should know about the display (a CT window saturating most of the body); job result "warnings"
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class FusedStack:
    #: (S, H, W) or (S, H, W, 3) uint8, slice i on base slice i
    pixels: np.ndarray
    method: str
    #: DMF's exposures; empty for a single method
    trio: tuple[str, ...]
    feature_source: str
    device: str


@dataclass(frozen=True)
class DerivedObjects:
    sc: list[Any]
    reg: Any

    @property
    def datasets(self) -> list[Any]:
        return [*self.sc, self.reg]


# -- the stages -----------------------------------------------------------------------------


def load(base_paths: Sequence[Path], overlay_paths: Sequence[Path]) -> LoadedPair:
    """Both series as volumes (geometry checked, LPS, float32)."""
    try:
        return LoadedPair(load_series(base_paths), load_series(overlay_paths))
    except GeometryError as exc:
        raise JobError(f"cannot build a volume: {exc}") from exc


def register(pair: LoadedPair, pipeline: Pipeline, qc_dir: Path, job_id: int) -> Registration:
    """Rigid MI registration of the overlay onto the base, its check sheet, and the quality verdict.

    A doubtful registration raises :class:`JobError` under ``on_poor_quality =
    "fail"`` (the figures go with it, ``JobError.result``); under ``"warn"`` it
    comes back with ``warning`` set.
    """
    from dicom_node.dicom.orientation import header_doubts
    from fusion.errors import FusionError
    from fusion.registration.quality import QualityThresholds, assess_registration
    from fusion.registration.rigid import RegistrationParams, register_rigid

    # what the headers say about left and right: a doubt is a problem like a figure outside its limit
    doubts = header_doubts(pair.base.headers, pair.overlay.headers)
    if not pipeline.registration.enabled:
        off = Registration(tuple(tuple(float(v) for v in r) for r in np.eye(4)))
        if not doubts:
            return off
        return _doubtful(off, {"ok": False, "problems": doubts, "header_doubts": doubts}, ["ORIENTATION?"],
                         pipeline, job_id, None)
    params = RegistrationParams.from_mapping(pipeline.registration.model_dump())
    try:
        reg = register_rigid(pair.base.image, pair.overlay.image, params)
    except FusionError as exc:
        raise JobError(f"registration failed, nothing was sent: {exc}") from exc
    figures = {"translation_mm": [round(float(v), 2) for v in reg.translation_mm],
               "rotation_deg": [round(float(v), 3) for v in reg.rotation_deg],
               "registration_metric": round(float(reg.final_metric), 5),
               "registration_overlap": round(float(reg.overlap), 4)}
    picture = _check_sheet(pair, reg, pipeline, qc_dir, job_id)
    cfg = pipeline.registration
    quality = assess_registration(pair.base.image, pair.overlay.image, reg,
                                  QualityThresholds.from_mapping(cfg.quality.model_dump()))
    qdict = quality.as_dict()
    tags = list(quality.tags)
    if doubts:
        qdict.update(ok=False, problems=[*qdict["problems"], *doubts], header_doubts=doubts)
        tags.insert(1 if quality.flipped else 0, "ORIENTATION?")
    out = Registration(tuple(tuple(float(v) for v in r) for r in reg.matrix), figures, qdict, None, picture)
    if qdict["ok"]:
        return out
    return _doubtful(out, qdict, tags, pipeline, job_id, picture)


def _doubtful(out: Registration, quality: dict[str, Any], tags: list[str], pipeline: Pipeline, job_id: int,
              picture: str | None) -> Registration:
    """Apply ``on_poor_quality`` to a doubtful registration: raise (``"fail"``) or mark it (``"warn"``)."""
    cfg = pipeline.registration
    reason = "; ".join(quality["problems"])
    log.warning("pipeline.registration_doubtful", extra=logs.fields(
        job_id=job_id, policy=cfg.on_poor_quality, problems=reason))
    events.emit("registration.doubtful", job_id=job_id, pipeline=pipeline.name, policy=cfg.on_poor_quality,
                problems=reason, picture=picture)
    if cfg.on_poor_quality == "fail":
        raise JobError(
            f"registration rejected, nothing was sent: {reason}. Check that the two series show the same "
            "body part of the same patient and that their orientation headers are right; to send such results "
            f"with a visible warning instead, set on_poor_quality = \"warn\" in pipeline {pipeline.name!r}"
            + (f"; the check sheet is {picture}" if picture else ""),
            result={"pipeline": pipeline.name, **out.as_result()},
        )
    return Registration(out.matrix, out.figures, quality, " ".join(tags[:2]) or None, out.picture)


def _check_sheet(pair: LoadedPair, reg: Any, pipeline: Pipeline, qc_dir: Path, job_id: int) -> str | None:
    """Save the registration check sheet (orthogonal slices, checkerboards before/after) as a PNG.

    The picture an operator or radiologist opens when a registration is doubted:
    a misalignment shows as edges jumping at the checkerboard's tile borders.
    A failure here costs the picture, never the job.
    """
    from fusion.registration.quality import check_sheet

    try:
        title = (f"{pipeline.name}: {pair.overlay.modality} onto {pair.base.modality}, moved "
                 f"{reg.translation_norm_mm:.1f} mm, turned {reg.rotation_angle_deg:.1f} deg (job {job_id})")
        sheet = check_sheet(pair.base.image, pair.overlay.image, reg.transform,
                            (pair.base.modality, pair.overlay.modality), title)
        path = Path(qc_dir) / f"job-{job_id}-registration.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        sheet.save(path)
        return str(path)
    except Exception as exc:  # noqa: BLE001 - a picture must never cost a fusion
        log.warning("pipeline.registration_picture.failed", extra=logs.fields(job_id=job_id, reason=str(exc)))
        return None


def _colourise(grey: np.ndarray, palette: str = "hot_iron") -> np.ndarray:
    """PET/SPECT on 0..1 to RGB through the pipeline's DICOM standard palette (Hot Iron or PET)."""
    from dicom_node.dicom.palette import colourise

    return colourise(grey, palette).astype(np.float32)


def _shows_colour(*modalities: str) -> bool:
    return any(m in COLOUR_MODALITIES for m in modalities)


def ct_window_warnings(vol: Volume, hu: np.ndarray, window: Any, pipeline: Pipeline) -> list[str]:
    """A sentence when the CT window shows more than ``ct_saturation_warning`` of the body white or black."""
    from fusion.display import window_saturation
    from fusion.intensity import CT_BRAIN_WINDOW

    if vol.modality != "CT":
        return []
    c, w = (float(v) for v in (window or CT_BRAIN_WINDOW))
    sat = window_saturation(hu, c, w)
    side, share = sat.worst()
    if share <= pipeline.ct_saturation_warning:
        return []
    return [f"the CT window {c:g}/{w:g} HU shows {share:.0%} of the body {side} (more than "
            f"{pipeline.ct_saturation_warning:.0%}): the fused image shows little of the CT there; set ct_window "
            f"= [centre, width] in pipeline {pipeline.name!r} (e.g. [40, 400] soft tissue, [400, 1800] bone)"]


def prepare(pair: LoadedPair, registration: Registration, pipeline: Pipeline) -> PreparedStacks:
    """The overlay resampled onto the base grid, both normalised for their modality (0..1)."""
    import SimpleITK as sitk

    from fusion.intensity import normalise_for_modality
    from fusion.registration.rigid import resample_onto

    base, overlay = pair.base, pair.overlay
    transform = sitk.AffineTransform(3)
    m = registration.matrix_array
    transform.SetMatrix([float(v) for v in m[:3, :3].ravel()])
    transform.SetTranslation([float(v) for v in m[:3, 3]])
    # outside the overlay's field of view: its own minimum (air), not 0 (water in HU)
    outside = float(sitk.GetArrayViewFromImage(overlay.image).min())
    moved = resample_onto(overlay.image, base.image, transform, default_value=outside)
    base_arr = sitk.GetArrayFromImage(base.image)
    over_arr = sitk.GetArrayFromImage(moved)

    def ct_window(vol: Volume) -> Any:  # config, else the CT's own header window, else the brain preset
        return pipeline.ct_window or (vol.header_window() if vol.modality == "CT" else None)

    base_n = normalise_for_modality(base_arr, base.modality, ct_window=ct_window(base), units=base.units)
    over_n = normalise_for_modality(over_arr, overlay.modality, ct_window=ct_window(overlay), units=overlay.units)
    # the saturation is judged on the CT as acquired (the overlay's own voxels, not its resampled copy)
    warnings = [*ct_window_warnings(base, base_arr, ct_window(base), pipeline),
                *ct_window_warnings(overlay, sitk.GetArrayViewFromImage(overlay.image), ct_window(overlay), pipeline)]
    if base.modality in ANATOMICAL or overlay.modality not in ANATOMICAL:
        a, b, other_modality = base_n, over_n, overlay.modality
    else:
        a, b, other_modality = over_n, base_n, base.modality
    if other_modality in COLOUR_MODALITIES:
        b = _colourise(b, pipeline.palette)
    return PreparedStacks(a.astype(np.float32), b.astype(np.float32), other_modality, tuple(warnings))


def fuse(prepared: PreparedStacks, pipeline: Pipeline, device: str, models: dict[str, Any] | None = None,
         progress: Progress | None = None) -> FusedStack:
    """The pipeline's fusion method over the whole stack, in batches of :data:`FUSE_BATCH` slices.

    ``models`` caches the VGG16 model per device between jobs (loading it costs
    a second or two); ``progress(done, total)`` is called after each batch.
    """
    from fusion.api import fuse_grey, merge_colour, resolve_trio, split_colour, uses_vgg
    from fusion.backend import to_device, to_numpy
    from fusion.errors import FusionError
    from fusion.intensity import to_uint8

    method = pipeline.method
    trio = resolve_trio(pipeline.trio or None, prepared.other_modality, method=method)
    model = None
    if uses_vgg(method, pipeline.feature_source):
        from fusion.features import load_vgg16

        try:
            model = (models or {}).get(device) or load_vgg16(device=device)
        except FusionError as exc:
            raise JobError(f"fusion needs the VGG16 weights: {exc}") from exc
        if models is not None:
            models[device] = model
    a_d, b_d, chroma = split_colour(to_device(prepared.anatomical, device), to_device(prepared.other, device))
    n = a_d.shape[0]
    parts = []
    for start in range(0, n, FUSE_BATCH):
        sl = slice(start, start + FUSE_BATCH)
        fused = fuse_grey(a_d[sl], b_d[sl], method=method, trio=trio, feature_source=pipeline.feature_source,
                          model=model)
        parts.append(to_numpy(merge_colour(fused, None if chroma is None else chroma[sl])))
        if progress is not None:
            progress(min(start + FUSE_BATCH, n), n)
    return FusedStack(to_uint8(np.concatenate(parts)), method, tuple(trio), pipeline.feature_source, device)


#: how a derivation description names a method that is not DMF (DMF names its trio and gradients)
DERIVATION_NAMES = {
    "faithful": "FAITHFUL (gradient-domain, max-anchored; fusion.methods.faithful)",
}


def fusion_derivation(fused: FusedStack, overlay_modality: str, base_modality: str) -> str:
    """The Derivation Description's first part: which method fused what onto what (DMF: its trio too)."""
    onto = f"fusion of {overlay_modality} onto {base_modality}"
    if fused.method in DERIVATION_NAMES:
        return f"{DERIVATION_NAMES[fused.method]} {onto}"
    if fused.trio:
        name = "DMF (paper trios)" if fused.method == "dmf_paper" else "DMF"
        gradients = "VGG16 feature" if fused.feature_source == "vgg" else "image"
        return f"{name} {onto}: {'+'.join(m.upper() for m in fused.trio)} exposures, {gradients} gradients"
    return f"{fused.method.upper()} {onto}"


def derive(pair: LoadedPair, registration: Registration, fused: FusedStack, pipeline: Pipeline,
           uid_root: str, *, uid_seed: str | None = None, version: int = 1, series_offset: int = 0) -> DerivedObjects:
    """The fused Secondary Capture series and the Spatial Registration object, in the base's study.

    ``uid_seed`` makes every UID follow from the job (a re-run makes the same
    objects); ``version`` > 1 (an operator's explicit new version) is written
    into both descriptions, so the PACS shows which series is the newer one;
    ``series_offset`` (the pipeline's place in the configuration) keeps the
    Series Numbers of two pipelines fusing the same base apart.
    """
    from dicom_node.dicom.derived import default_series_number
    from dicom_node.dicom.reg import build_registration
    from dicom_node.dicom.sc import build_sc_series, sc_series_description

    base, overlay = pair.base, pair.overlay
    name = pipeline.name if version <= 1 else f"{pipeline.name} v{version}"
    description = sc_series_description(name, base.modality, overlay.modality, registration.warning)
    reg_description = reg_series_description(name, base.modality, overlay.modality)
    how = fusion_derivation(fused, overlay.modality, base.modality)
    derivation = how + (", rigid Mattes-MI registration" if pipeline.registration.enabled else ", not registered")
    if _shows_colour(base.modality, overlay.modality):
        from dicom_node.dicom.palette import PALETTE_NAMES

        derivation += f", colour: DICOM {PALETTE_NAMES[pipeline.palette]} palette"
    if version > 1:
        derivation += f" (version {version})"
    base0 = base.headers[0]
    sc = build_sc_series(base.headers, overlay.headers, fused.pixels, uid_root=uid_root,
                         series_description=description, derivation_description=derivation[:1024],
                         base_to_overlay=registration.matrix_array, uid_seed=uid_seed,
                         series_number=default_series_number(base0, 1000 + series_offset))
    reg = build_registration(base.headers, overlay.headers, registration.matrix_array, uid_root=uid_root,
                             content_label="RIGID_MI", uid_seed=uid_seed, series_description=reg_description,
                             series_number=default_series_number(base0, 2000 + series_offset))
    return DerivedObjects(sc, reg)


def reg_series_description(pipeline_name: str, base_modality: str, overlay_modality: str) -> str:
    """The REG series' description: names the pipeline, so two fusions of one base are told apart.

    >>> reg_series_description("mr-pt", "MR", "PT")
    'REG PT>MR MR-PT'
    """
    text = f"REG {overlay_modality.strip().upper()}>{base_modality.strip().upper()} {pipeline_name.strip().upper()}"
    return text.replace("\\", "/").encode("ascii", "replace").decode("ascii")[:64].rstrip()
