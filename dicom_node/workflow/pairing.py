"""Which two complete series make a fusion job: the pipelines' rules, applied to settled series.

Series states (``dicom_node.states.SeriesState``, column ``series.state``):
a ``settled`` series (see ``settle.py``) becomes ``paired`` (a job was made
with it), ``unmatched`` (no pipeline selects it) or ``timed_out`` (a pipeline
selects it but no partner settled in time).  A new instance re-opens a series
(the store does that), so a late slice leads to a new job on the new inputs -
while the same inputs settling twice map to the same job key and are
processed once.

Routing by Called AE Title: a pipeline with its own ``ae_title`` pairs only
series that arrived through that AE title (an instance's ``called_ae`` in
the store); a pipeline without one takes series sent to any other called AE
title (the node's own), never those sent to another pipeline's.

Every decision is logged once with its reason (events ``pairing.*``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

from dicom_node import logs
from dicom_node.config import NodeSettings, Pipeline, SeriesSelector
from dicom_node.index import db
from dicom_node.states import SeriesState
from dicom_node.workflow.jobs import JobQueue, input_key

log = logging.getLogger("dicom_node.workflow.pairing")

#: states whose series can still be a partner
WAITING = (SeriesState.SETTLED, SeriesState.PAIRED)


def selects(selector: SeriesSelector, series: Any) -> bool:
    """Whether a series (a store record) fits a pipeline's base or overlay selector."""
    if (series.modality or "").upper() not in selector.modality:
        return False
    if selector.description and not re.search(selector.description, series.series_description or "", re.IGNORECASE):
        return False
    return series.instance_count >= selector.min_instances


def arrived_through(pipeline: Pipeline, called_aes: frozenset[str], pipeline_aes: frozenset[str]) -> bool:
    """Whether a series sent to ``called_aes`` may be paired by ``pipeline``.

    A pipeline with its own AE title takes only series sent to it; one without
    takes the rest, but not series sent to another pipeline's AE title (the
    sender chose that pipeline: fusing it twice would send two fused series).
    """
    if pipeline.ae_title is None:
        return not (called_aes & pipeline_aes)
    return pipeline.ae_title in called_aes


def same_scope(pipeline: Pipeline, a: Any, b: Any) -> bool:
    if a.series_uid == b.series_uid:
        return False
    if pipeline.match == "study":
        return a.study_uid == b.study_uid
    if pipeline.match == "patient":
        return bool(a.patient_id) and a.patient_id == b.patient_id
    return True  # "rule": the selectors alone decide


class Pairing:
    def __init__(self, settings: NodeSettings, store: Any, jobs: JobQueue):
        self._settings, self._store, self._jobs = settings, store, jobs
        #: the pipelines' own Called AE Titles (routing, see module notes); empty = no lookups needed
        self._pipeline_aes = frozenset(p.ae_title for p in settings.pipelines if p.ae_title)

    # -- pairing ----------------------------------------------------------------
    def pair_settled(self, now: float | None = None) -> list[int]:
        """Turn settled series into jobs; give up on those whose partner never came."""
        now = db.now() if now is None else now
        new_jobs = []
        candidates = [s for st in WAITING for s in self._store.list_series(state=st, origin="received")]
        called: dict[str, frozenset[str]] = {}  # this pass's cache: series UID -> called AE titles
        #: (pipeline, base, overlay) decided in this pass: two series settling together are one decision
        decided: set[tuple[str, str, str]] = set()
        for s in [c for c in candidates if c.state == SeriesState.SETTLED]:
            selecting = [(p, role) for p in self._settings.pipelines for role in ("base", "overlay")
                         if selects(getattr(p, role), s)]
            fitting = [(p, role) for p, role in selecting if self._routed(p, s, called)]
            if not fitting:
                reason = "no pipeline selects this series"
                if selecting:
                    names = ", ".join(sorted({p.name for p, _ in selecting}))
                    sent_to = ", ".join(sorted(self._called_aes(s, called))) or "no recorded AE title"
                    reason = (f"pipeline(s) {names} take only series sent to their own AE title; "
                              f"this one was sent to {sent_to}")
                self._store.set_series_state(s.series_uid, SeriesState.UNMATCHED, reason)
                log.info("pairing.series.unmatched", extra=logs.fields(
                    series_uid=s.series_uid, modality=s.modality, instances=s.instance_count, reason=reason))
                continue
            made = False
            for pipeline, role in fitting:
                partner = self._partner(pipeline, role, s, candidates, called)
                if partner is None:
                    continue
                base, overlay = (s, partner) if role == "base" else (partner, s)
                made = True
                if (pipeline.name, base.series_uid, overlay.series_uid) in decided:
                    continue
                decided.add((pipeline.name, base.series_uid, overlay.series_uid))
                job_id = self._make_job(pipeline, base, overlay)
                if job_id is not None:
                    new_jobs.append(job_id)
            if made:
                continue
            waited = now - (s.state_changed or now)
            timeout = min(p.partner_timeout_s for p, _ in fitting)
            if waited >= timeout:
                reason = (f"no partner series settled within {timeout:g} s for pipeline(s) "
                          f"{', '.join(sorted({p.name for p, _ in fitting}))}")
                self._store.set_series_state(s.series_uid, SeriesState.TIMED_OUT, reason)
                log.warning("pairing.partner.timeout", extra=logs.fields(series_uid=s.series_uid, reason=reason))
        return new_jobs

    def _partner(self, pipeline: Pipeline, role: str, s: Any, candidates: Iterable[Any],
                 called: dict[str, frozenset[str]]) -> Any | None:
        other_role = "overlay" if role == "base" else "base"
        options = [c for c in candidates if same_scope(pipeline, s, c) and selects(getattr(pipeline, other_role), c)
                   and self._routed(pipeline, c, called)]
        if not options:
            return None
        # the partner acquired closest in time: the natural pair when a patient has several
        return min(options, key=lambda c: abs(c.last_received - s.last_received))

    def _called_aes(self, s: Any, cache: dict[str, frozenset[str]]) -> frozenset[str]:
        if s.series_uid not in cache:
            cache[s.series_uid] = frozenset(self._store.called_aes(s.series_uid))
        return cache[s.series_uid]

    def _routed(self, pipeline: Pipeline, s: Any, cache: dict[str, frozenset[str]]) -> bool:
        if not self._pipeline_aes:  # no pipeline has its own AE title: nothing to look up
            return True
        return arrived_through(pipeline, self._called_aes(s, cache), self._pipeline_aes)

    def _make_job(self, pipeline: Pipeline, base: Any, overlay: Any) -> int | None:
        key = input_key(pipeline.name,
                        [i.sop_instance_uid for i in self._store.instances(base.series_uid)],
                        [i.sop_instance_uid for i in self._store.instances(overlay.series_uid)])
        job_id, created = self._jobs.enqueue(key, pipeline.name, base.series_uid, overlay.series_uid)
        for s in (base, overlay):
            if s.state != SeriesState.PAIRED:
                self._store.set_series_state(s.series_uid, SeriesState.PAIRED, f"job {job_id} ({pipeline.name})")
        # a job that already exists is no new decision: it was logged once, as pairing.job.created
        (log.info if created else log.debug)("pairing.job.created" if created else "pairing.job.exists", extra=logs.fields(
            job_id=job_id, pipeline=pipeline.name, base_series_uid=base.series_uid,
            overlay_series_uid=overlay.series_uid, base_instances=base.instance_count,
            overlay_instances=overlay.instance_count))
        return job_id if created else None

