"""Structured logging: one JSON object per line, a stable ``event`` name first.

A message starts with its event name (``"fuse.done"``); structured details go
in ``extra=fields(...)``, and any free text after the name lands in ``detail``.  Never put patient names or IDs in either:
log UIDs or counts instead.
"""

from __future__ import annotations

import json
import logging
import sys
import time


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        event, _, detail = record.getMessage().partition(" ")
        doc["event"] = event
        if detail:
            doc["detail"] = detail
        doc.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            doc["error"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def setup(level: str = "INFO", stream=None) -> None:
    """Route the ``fusion`` and ``dicom_node`` loggers to one JSON stream (stderr by default)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    for name in ("fusion", "dicom_node"):
        log = logging.getLogger(name)
        log.handlers[:] = [handler]
        log.setLevel(level.upper())
        log.propagate = False


def fields(**kw) -> dict:
    """``extra=`` argument carrying structured fields: ``log.info("x.done", extra=fields(n=3))``."""
    return {"fields": kw}
