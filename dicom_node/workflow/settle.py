"""When is a received series complete?  The settle rules, and the operator's manual trigger.

A series is ``open`` while instances arrive.  It becomes ``settled`` when no
new instance came for ``settle.quiet_seconds``, when every instance it
announced (ImagesInAcquisition) arrived, or when an operator triggers it
(``fusion-node trigger``).  Settling is a compare-and-set on the series row,
so an instance that arrives while the sweep decides keeps the series open.
What happens to a settled series is decided in ``pairing.py``.
"""

from __future__ import annotations

import logging
from typing import Any

from dicom_node import logs
from dicom_node.config import NodeSettings
from dicom_node.index import db
from dicom_node.states import SeriesState

log = logging.getLogger("dicom_node.workflow.settle")


class Settler:
    def __init__(self, settings: NodeSettings, store: Any) -> None:
        self._settings, self._store = settings, store

    def settle_due(self, now: float | None = None) -> list[str]:
        """Settle every open received series whose quiet period is over or whose announced count arrived."""
        now = db.now() if now is None else now
        cfg = self._settings.settle
        settled = []
        for s in self._store.list_series(state=SeriesState.OPEN, origin="received"):
            reason = None
            if cfg.use_announced_count and s.announced_count and s.instance_count >= s.announced_count:
                reason = f"all {s.announced_count} announced instances received"
            elif now - s.last_received >= cfg.quiet_seconds:
                reason = f"no new instance for {now - s.last_received:.0f} s (quiet period {cfg.quiet_seconds:g} s)"
            if reason:
                self._settle(s, reason)
                settled.append(s.series_uid)
        return settled

    def trigger(self, series_uid: str) -> None:
        """Operator's manual trigger: settle now, whatever the quiet period says."""
        s = self._store.get_series(series_uid)
        if s is None:
            raise KeyError(f"no series {series_uid} in the store")
        self._settle(s, "manual trigger", only_if_unchanged=False)

    def _settle(self, s: Any, reason: str, *, only_if_unchanged: bool = True) -> None:
        # compare-and-set: an instance that arrived since we read the series keeps it open
        if not self._store.set_series_state(s.series_uid, SeriesState.SETTLED, reason,
                                            expected_state=s.state if only_if_unchanged else None,
                                            unchanged_since=s.last_received if only_if_unchanged else None):
            log.info("pairing.series.settle_skipped", extra=logs.fields(
                series_uid=s.series_uid, reason="changed while deciding (new instance)"))
            return
        log.info("pairing.series.settled", extra=logs.fields(
            series_uid=s.series_uid, modality=s.modality, instances=s.instance_count, reason=reason))

