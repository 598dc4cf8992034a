"""Structured logging: one JSON object per line, a stable ``event`` name first.

A message starts with its event name (``"fuse.done"``); structured details go
in ``extra=fields(...)``, and any free text after the name lands in ``detail``.  Never put patient names or IDs in either:
log UIDs or counts instead.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import traceback
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

#: loggers whose messages are the node's own (event names, fields without patient data)
OWN_LOGGERS = ("dicom_node", "fusion", "fusion_demo")

#: a quoted literal in an exception text or a library message: 'x', "x", b'x' (values are quoted there)
_QUOTED = re.compile(r"(?<![A-Za-z0-9])b?(?:'(?:[^'\\\n]|\\.)*'" + r'|"(?:[^"\\\n]|\\.)*")')
#: a quote that opens a literal (not an apostrophe inside a word) and was left without its pair
_OPENING = re.compile(r"(?<![A-Za-z0-9])b?['\"]")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
#: free-text fields that carry a decoder's words (the node's own ``error`` texts are kept: they name
#: hosts and files an operator needs; exception text is scrubbed by :func:`_error`)
_FREE_TEXT_FIELDS = ("detail",)
#: longest free text kept (a decoder must not flood the log)
MAX_TEXT = 300


def scrub(text: str) -> str:
    """``text`` with every quoted literal replaced by ``'…'`` and cut to :data:`MAX_TEXT` characters.

    An opening quote left unpaired ends the text there: a value may follow it.
    Apostrophes inside words (``can't``) are not quotes.

    pydicom's and the decoders' messages quote the raw bytes they choked on
    (``Invalid value for VR UI: b'1.2.3\\x00Doe^John'``): with a lying length
    that is whatever follows, the patient's name and ID included.  Tags,
    lengths, offsets and type names are not quoted and are kept.
    """
    out = _QUOTED.sub("'…'", str(text))
    # an opening quote left unpaired (a value cut off, or one holding a newline): drop everything after it
    unpaired = _OPENING.search(out.replace("'…'", "   "))
    if unpaired is not None:
        out = out[:unpaired.start()] + "…"
    return out[:MAX_TEXT]


def safe_uid(value: Any) -> Any:
    """A UID as it is when it looks like one; otherwise only its length (it may be anything a sender wrote)."""
    if value is None or not isinstance(value, str) or _UID.match(value):
        return value
    return f"<not a UID, {len(value)} characters>"


def _error(exc_info: tuple[type[BaseException], BaseException, TracebackType | None]) -> dict[str, Any]:
    """An exception as type, scrubbed message and frames (file:line function), never the raw text of values."""
    _, exc, tb = exc_info
    chain: list[str] = []
    seen: BaseException | None = exc
    while seen is not None and len(chain) < 5:
        chain.append(f"{type(seen).__name__}: {scrub(str(seen))}" if str(seen) else type(seen).__name__)
        seen = seen.__cause__ or seen.__context__
    frames = [f"{f.filename.rsplit('/', 2)[-1] if f.filename else '?'}:{f.lineno} {f.name}"
              for f in traceback.extract_tb(tb)][-12:]
    return {"error": chain[0], "error_type": type(exc).__name__, "caused_by": chain[1:] or None, "trace": frames}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        if not _is_own(record.name):
            _LibraryFilter.redact(record)
        event, _, detail = record.getMessage().partition(" ")
        doc["event"] = event
        if detail:
            doc["detail"] = detail
        for key, value in (getattr(record, "fields", {}) or {}).items():
            if key in _FREE_TEXT_FIELDS and isinstance(value, str):
                value = scrub(value)
            elif key.endswith("_uid"):
                value = safe_uid(value)
            doc[key] = value
        if record.exc_info and record.exc_info[1] is not None:
            doc.update({k: v for k, v in _error(record.exc_info).items() if v is not None})
        return json.dumps(doc, default=str)


def _is_own(name: str) -> bool:
    return any(name == own or name.startswith(own + ".") for own in OWN_LOGGERS)


class _LibraryFilter(logging.Filter):
    """Rewrites a third-party record (pydicom, pynetdicom, anything else) before any handler sees it.

    Their messages are free text built with the values they handle (pydicom
    quotes element bytes, pynetdicom's handlers log datasets), so what
    reaches the log is a stable event name (``lib.pydicom.warning``), where it
    was logged, and the error type; never the message or a raw traceback.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not _is_own(record.name):
            self.redact(record)
        return True

    @staticmethod
    def redact(record: logging.LogRecord) -> None:
        if getattr(record, "_redacted", False):
            return
        top = record.name.split(".", 1)[0] or "root"
        extra: dict[str, Any] = {"origin": f"{record.name}:{record.funcName}:{record.lineno}"}
        if record.exc_info and record.exc_info[1] is not None:
            extra["error_type"] = type(record.exc_info[1]).__name__
        record.msg = f"lib.{top}.{record.levelname.lower()}"
        record.args = ()
        record.exc_info = None
        record.exc_text = None
        record.stack_info = None
        record.fields = extra
        record._redacted = True


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

    What the tests and the embedded demo call: :func:`configure` with the JSON format.
    """
    configure(level, "json", stream=stream)


def set_level(level: str) -> None:
    """Change the level of the node's own loggers (a reloaded ``log_level``); handlers stay as set up."""
    for name in ("fusion", "dicom_node"):
        logging.getLogger(name).setLevel(level.upper())


def fields(**kw: Any) -> dict[str, dict[str, Any]]:
    """``extra=`` argument carrying structured fields: ``log.info("x.done", extra=fields(n=3))``."""
    return {"fields": kw}


# -- operator-facing output: console format, log file, third-party records -------------------------
#
# Additive to the JSON formatter above: ``configure`` is what the command line calls (``setup``
# stays as it is for the tests and the embedded demo).

#: libraries whose records are routed to the node's handlers even though nothing logs through them
#: on purpose: the HTTP server's error log (its access log repeats what the node logs itself)
_ROUTED_LIBRARIES = {"uvicorn": "WARNING", "uvicorn.error": "WARNING", "uvicorn.access": "WARNING"}


class ConsoleFormatter(logging.Formatter):
    """One readable line per record for a person at a terminal: time, level, event, key=value fields.

    Same content as the JSON line (third-party text dropped alike); a traceback
    follows on its own lines.
    """

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}"
        if not _is_own(record.name):
            _LibraryFilter.redact(record)  # as the JSON formatter does; the handler's filter already has
        event, _, detail = record.getMessage().partition(" ")
        extra = dict(getattr(record, "fields", {}) or {})
        parts = [stamp, f"{record.levelname:<7s}", event]
        if detail:
            parts.append(detail)
        parts += [f"{k}={_console_value(v)}" for k, v in extra.items()]
        line = " ".join(parts)
        if record.exc_info:
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
    other library's warnings through the root logger, renamed ``lib.<package>.<level>``.
    """
    import warnings
    from logging.handlers import RotatingFileHandler

    # imported first: pydicom resets its logger's level when it is imported, and would otherwise do
    # so after this; the filter makes their records safe whatever the order anyway
    import pydicom  # noqa: F401  # imported for its side effect on the "pydicom" logger
    import pynetdicom  # noqa: F401  # likewise for "pynetdicom"

    handler: logging.Handler = logging.StreamHandler(stream) if stream is not None else _CurrentStderr()
    handler.setFormatter(ConsoleFormatter() if choose_format(fmt, stream) == "console" else JsonFormatter())
    handlers: list[logging.Handler] = [handler]
    if file is not None:
        file = Path(file)
        file.parent.mkdir(parents=True, exist_ok=True)
        rotating = RotatingFileHandler(file, maxBytes=file_max_bytes, backupCount=file_backup_count, encoding="utf-8")
        rotating.setFormatter(JsonFormatter())
        handlers.append(rotating)
    levels = [("fusion", level), ("dicom_node", level),
              *_LIBRARY_LEVELS.items(), *_ROUTED_LIBRARIES.items()]
    for name, lvl in levels:
        log = logging.getLogger(name)
        log.handlers[:] = list(handlers)
        log.setLevel(lvl.upper())
        log.propagate = False
    for h in handlers:
        h.addFilter(_LibraryFilter())  # before any formatter: the record itself loses its text
        h._fusion_node = True  # type: ignore[attr-defined]  # marks ours, so a second call replaces them
    root = logging.getLogger()
    # keep handlers others put there (pytest's capture); replace only the ones a previous call added
    root.handlers[:] = [h for h in root.handlers if not getattr(h, "_fusion_node", False)] + handlers
    root.setLevel(logging.WARNING)
    logging.captureWarnings(False)
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?")
