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
from typing import Any, TextIO


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


#: third-party loggers and the least severe level let through: their messages can quote
#: element values (names, IDs) at debug/info level, so only their errors reach the log
_LIBRARY_LEVELS = {"pynetdicom": "WARNING", "pydicom": "ERROR"}


class _CurrentStderr(logging.StreamHandler[TextIO]):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (test runners swap it)."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


def setup(level: str = "INFO", stream: TextIO | None = None) -> None:
    """Route our loggers (and the DICOM libraries' warnings) to one JSON stream (stderr by default).

    pydicom's ``warnings`` (e.g. "Invalid value for VR ...") quote element values,
    which can be patient names; they are silenced here for the same reason.
    """
    import warnings

    handler = logging.StreamHandler(stream) if stream is not None else _CurrentStderr()
    handler.setFormatter(JsonFormatter())
    for name, lvl in [("fusion", level), ("dicom_node", level), *_LIBRARY_LEVELS.items()]:
        log = logging.getLogger(name)
        log.handlers[:] = [handler]
        log.setLevel(lvl.upper())
        log.propagate = False
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?")


def set_level(level: str) -> None:
    """Change the level of the node's own loggers (a reloaded ``log_level``); handlers stay as set up."""
    for name in ("fusion", "dicom_node"):
        logging.getLogger(name).setLevel(level.upper())


def fields(**kw: Any) -> dict[str, dict[str, Any]]:
    """``extra=`` argument carrying structured fields: ``log.info("x.done", extra=fields(n=3))``."""
    return {"fields": kw}
