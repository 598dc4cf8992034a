"""What the JSON API and the status page show, read from the node's database.

One function per view, returning plain JSON-able values, so the API and the
page cannot disagree.  Nothing here carries patient names or IDs: series are
shown by UID, modality, description and counts.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from dicom_node.config import NodeSettings
from dicom_node.index.store import SeriesRecord, Store
from dicom_node.outbox import Outbox
from dicom_node.workflow.jobs import Job, JobQueue

#: a running job that has reported nothing for this long is shown as stalled (its worker may be gone)
STALL_AFTER_S = 300.0
#: job stages in their order, for the progress bar of the stages without slice counts
STAGES = ("load", "register", "prepare", "fuse", "encode", "store")
#: dead letters listed at most (the metrics and counts cover the rest)
DEAD_LETTERS_SHOWN = 50


def series_view(s: SeriesRecord, settings: NodeSettings, now: float) -> dict[str, Any]:
    out: dict[str, Any] = {
        "series_uid": s.series_uid, "study_uid": s.study_uid, "modality": s.modality,
        "series_description": s.series_description, "series_number": s.series_number,
        "instances": s.instance_count, "announced": s.announced_count, "state": s.state,
        "state_reason": s.state_reason, "first_received": s.first_received, "last_received": s.last_received,
        "origin": s.origin,
    }
    if s.state == "open" and s.last_received is not None:
        out["settles_in_s"] = round(max(0.0, settings.settle.quiet_seconds - (now - s.last_received)), 1)
    if s.state == "settled" and s.state_changed is not None:
        out["waiting_for_partner_s"] = round(now - s.state_changed, 1)
    return out


def series_list(store: Store, settings: NodeSettings, state: str | None = None) -> list[dict[str, Any]]:
    now = time.time()
    return [series_view(s, settings, now) for s in store.list_series(state=state, origin="received")]


def _history(jobs: list[Job]) -> dict[str, float]:
    """Mean seconds of a finished job per pipeline: the ETA before the fuse stage has counted slices."""
    totals: dict[str, list[float]] = {}
    for j in jobs:
        if j.state == "done" and j.started_at and j.finished_at:
            totals.setdefault(j.pipeline, []).append(j.finished_at - j.started_at)
    return {p: sum(v[-10:]) / len(v[-10:]) for p, v in totals.items()}


def job_view(j: Job, now: float, history: dict[str, float]) -> dict[str, Any]:
    result = j.result or {}
    out: dict[str, Any] = {
        "id": j.id, "pipeline": j.pipeline, "state": j.state, "attempts": j.attempts,
        "base_series_uid": j.base_series_uid, "overlay_series_uid": j.overlay_series_uid,
        "created_at": j.created_at, "started_at": j.started_at, "finished_at": j.finished_at,
        "error": j.error, "stage": j.stage, "slices_done": j.progress_done, "slices_total": j.progress_total,
        "seconds": result.get("seconds"), "registration": registration_view(j),
        "sc_series_uid": result.get("sc_series_uid"), "instances": result.get("instances"),
    }
    progress = None
    eta = None
    if j.state == "done":
        progress = 1.0
    elif j.state == "running":
        stage_i = STAGES.index(j.stage) if j.stage in STAGES else 0
        progress = stage_i / len(STAGES)
        if j.stage == "fuse" and j.progress_total:
            done = j.progress_done or 0
            progress = (stage_i + done / j.progress_total) / len(STAGES)
            if done and j.stage_started_at:
                eta = (now - j.stage_started_at) / done * (j.progress_total - done)
        if eta is None and j.pipeline in history and j.started_at:
            eta = max(0.0, history[j.pipeline] - (now - j.started_at))
        silent = now - (j.progress_at or j.started_at or now)
        out["silent_s"] = round(silent, 1)
        out["stalled"] = silent > STALL_AFTER_S
        out["elapsed_s"] = round(now - j.started_at, 1) if j.started_at else None
    out["progress"] = None if progress is None else round(progress, 3)
    out["eta_s"] = None if eta is None else round(eta, 1)
    return out


def registration_view(j: Job) -> dict[str, Any] | None:
    """The registration figures of a job (done, or failed on a doubtful registration), None before."""
    r = j.result or {}
    if "translation_mm" not in r:
        return None
    quality = r.get("registration_quality") or {}
    picture = r.get("registration_picture")
    return {
        "translation_mm": r.get("translation_mm"), "rotation_deg": r.get("rotation_deg"),
        "metric": r.get("registration_metric"), "overlap": r.get("registration_overlap"),
        "verdict": ("ok" if quality.get("ok") else "doubtful") if quality else None,
        "reason": quality.get("reason"), "warning": r.get("registration_warning"),
        "check_sheet": Path(picture).name if picture else None,
    }


def jobs_list(queue: JobQueue, state: str | None = None) -> list[dict[str, Any]]:
    now = time.time()
    every = queue.list()
    history = _history(every)
    return [job_view(j, now, history) for j in every if state is None or j.state == state]


def outbox_view(outbox: Outbox) -> dict[str, Any]:
    """Per destination: counts by state, depth and age of the oldest waiting item; the latest dead letters."""
    now = time.time()
    destinations: dict[str, Any] = {}
    in_flight = [*outbox.list(state="pending"), *outbox.list(state="sending")]  # sent rows are never read here
    for name, states in outbox.summary().items():
        waiting = sorted((i for i in in_flight if i.destination == name), key=lambda i: i.id)
        destinations[name] = {
            "states": states, "depth": states["pending"] + states["sending"],
            "oldest_age_s": round(now - min(i.created_at for i in waiting), 1) if waiting else 0.0,
            "next_attempt_in_s": round(max(0.0, min(i.next_attempt_at for i in waiting) - now), 1) if waiting else None,
            "last_error": next((i.last_error for i in reversed(waiting) if i.last_error), None),
        }
    dead = outbox.list(state="dead")
    return {
        "destinations": destinations,
        "dead_letters": [{"id": i.id, "destination": i.destination, "sop_instance_uid": i.sop_instance_uid,
                          "job_id": i.job_id, "attempts": i.attempts, "last_error": i.last_error,
                          "updated_at": i.updated_at} for i in dead[-DEAD_LETTERS_SHOWN:]],
        "dead_letters_total": len(dead),
    }


def check_sheets(qc_dir: Path, queue: JobQueue, limit: int = 12) -> list[dict[str, Any]]:
    """The registration check sheets on disk, newest job first, with their job's figures."""
    out = []
    for j in reversed(queue.list()):
        reg = registration_view(j)
        if reg and reg["check_sheet"] and (qc_dir / reg["check_sheet"]).is_file():
            out.append({"job_id": j.id, "pipeline": j.pipeline, "state": j.state, **reg})
        if len(out) >= limit:
            break
    return out
