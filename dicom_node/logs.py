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
from pathlib import Path
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


def fields(**kw: Any) -> dict[str, dict[str, Any]]:
    """``extra=`` argument carrying structured fields: ``log.info("x.done", extra=fields(n=3))``."""
    return {"fields": kw}


# -- operator-facing output: console format, log file, third-party records -------------------------
#
# Additive to the JSON formatter above: ``configure`` is what the command line calls (``setup``
# stays as it is for the tests and the embedded demo).

#: our own packages: their messages start with an event name; anything else is a library's record
_OWN_PACKAGES = ("fusion", "dicom_node", "fusion_demo")
#: libraries whose records are routed to the node's handlers even though nothing logs through them
#: on purpose: the HTTP server's error log (its access log repeats what the node logs itself)
_ROUTED_LIBRARIES = {"uvicorn": "WARNING", "uvicorn.error": "WARNING", "uvicorn.access": "WARNING"}


def is_library_record(record: logging.LogRecord) -> bool:
    """A record from a logger outside our packages (pynetdicom, pydicom, uvicorn, httpx ...)."""
    return record.name.split(".")[0] not in _OWN_PACKAGES


def library_event(record: logging.LogRecord) -> str:
    """The stable event name of a third-party record: ``lib.<top-level package>``.

    A library's message is free text that may quote element values (names,
    IDs); its first word is no event name ("Unknown", "TCP", "Association").
    So the event is named for the library and the message itself is dropped.
    """
    return "lib." + (record.name.split(".")[0] or "root")


def library_fields(record: logging.LogRecord) -> dict[str, Any]:
    """What may be kept of a third-party record: where it came from, never its text or arguments."""
    doc: dict[str, Any] = {"source": f"{record.module}:{record.funcName}:{record.lineno}"}
    if record.exc_info and record.exc_info[0] is not None:
        doc["error_type"] = record.exc_info[0].__name__
    return doc


class OperatorJsonFormatter(JsonFormatter):
    """The JSON formatter with third-party records named ``lib.<package>`` and stripped of their text."""

    def format(self, record: logging.LogRecord) -> str:
        if not is_library_record(record):
            return super().format(record)
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": library_event(record),
            **library_fields(record),
        }
        return json.dumps(doc, default=str)


class ConsoleFormatter(logging.Formatter):
    """One readable line per record for a person at a terminal: time, level, event, key=value fields.

    Same content as the JSON line (third-party text dropped alike); a traceback
    follows on its own lines.
    """

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}"
        if is_library_record(record):
            event, detail, extra = library_event(record), "", library_fields(record)
        else:
            event, _, detail = record.getMessage().partition(" ")
            extra = dict(getattr(record, "fields", {}) or {})
        parts = [stamp, f"{record.levelname:<7s}", event]
        if detail:
            parts.append(detail)
        parts += [f"{k}={_console_value(v)}" for k, v in extra.items()]
        line = " ".join(parts)
        if record.exc_info and not is_library_record(record):
            line += "\n" + self.formatException(record.exc_info)
        return line


def _console_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return json.dumps(text) if (not text or any(c.isspace() for c in text)) else text


def choose_format(fmt: str, stream: TextIO | None = None) -> str:
    """``auto`` resolved: console when the stream is a terminal, else JSON (journald, docker, pipes)."""
    if fmt != "auto":
        return fmt
    target = stream if stream is not None else sys.stderr
    isatty = getattr(target, "isatty", None)
    return "console" if callable(isatty) and isatty() else "json"


def configure(level: str = "INFO", fmt: str = "auto", *, file: Path | None = None,
              file_max_bytes: int = 50_000_000, file_backup_count: int = 10,
              stream: TextIO | None = None) -> None:
    """Route every record to stderr (console or JSON) and, when ``file`` is given, to a rotated JSON file.

    Our loggers at ``level``; the DICOM libraries at their own floor
    (``_LIBRARY_LEVELS``: their debug text can quote patient data); any
    other library's warnings through the root logger, renamed ``lib.<package>``.
    """
    import warnings
    from logging.handlers import RotatingFileHandler

    handler: logging.Handler = logging.StreamHandler(stream) if stream is not None else _CurrentStderr()
    handler.setFormatter(ConsoleFormatter() if choose_format(fmt, stream) == "console" else OperatorJsonFormatter())
    handlers: list[logging.Handler] = [handler]
    if file is not None:
        file = Path(file)
        file.parent.mkdir(parents=True, exist_ok=True)
        rotating = RotatingFileHandler(file, maxBytes=file_max_bytes, backupCount=file_backup_count, encoding="utf-8")
        rotating.setFormatter(OperatorJsonFormatter())
        handlers.append(rotating)
    levels = [("fusion", level), ("dicom_node", level),
              *_LIBRARY_LEVELS.items(), *_ROUTED_LIBRARIES.items()]
    for name, lvl in levels:
        log = logging.getLogger(name)
        log.handlers[:] = list(handlers)
        log.setLevel(lvl.upper())
        log.propagate = False
    for h in handlers:
        h._fusion_node = True  # type: ignore[attr-defined]  # marks ours, so a second call replaces them
    root = logging.getLogger()
    # keep handlers others put there (pytest's capture); replace only the ones a previous call added
    root.handlers[:] = [h for h in root.handlers if not getattr(h, "_fusion_node", False)] + handlers
    root.setLevel(logging.WARNING)
    logging.captureWarnings(False)
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?")
