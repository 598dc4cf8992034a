"""The running node's sign of life: a small JSON file beside its database, rewritten every few seconds.

``fusion-node status`` reads the database, which a dead node leaves looking
exactly like a live one.  The heartbeat tells them apart: the node rewrites
``<database>.heartbeat.json`` (pid, host, start time, ports) every
:data:`INTERVAL_S` seconds and marks it stopped on a clean stop; a file not
rewritten for :data:`STALE_AFTER_S`, or naming a pid that is gone on this host,
is a node that died.  A file, not a table: writing it never contends with the
job and outbox transactions, and it is read without opening the database.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicom_node import __version__, logs

log = logging.getLogger("dicom_node.workflow.heartbeat")

#: seconds between two rewrites of the file
INTERVAL_S = 2.0
#: a heartbeat older than this belongs to a node that is gone (several missed beats, not one slow disk)
STALE_AFTER_S = 15.0


def heartbeat_path(database_path: Path, instance: str = "") -> Path:
    """``node.sqlite`` -> ``node.heartbeat.json`` in the same folder (it moves with the database).

    Node processes sharing one storage root (``storage.instance``) each keep
    their own: ``node.<instance>.heartbeat.json``.
    """
    database_path = Path(database_path)
    return database_path.with_name(database_path.stem + (f".{instance}" if instance else "") + ".heartbeat.json")


class Heartbeat:
    """A daemon thread rewriting the heartbeat file (atomically: write, then rename) until stopped."""

    def __init__(self, path: Path, info: dict[str, Any], interval_s: float = INTERVAL_S) -> None:
        self.path = Path(path)
        self.interval_s = interval_s
        self._doc: dict[str, Any] = {"pid": os.getpid(), "host": socket.gethostname(), "version": __version__,
                                     "started_at": time.time(), **info}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self, state: str) -> None:
        doc = {**self._doc, "state": state, "updated_at": time.time()}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(doc))
            os.replace(tmp, self.path)
        except OSError as exc:  # a missed beat is not worth stopping the node for; status will say "stale"
            log.warning("node.heartbeat.write_failed", extra=logs.fields(path=str(self.path), error=str(exc)))

    def start(self) -> Heartbeat:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write("running")
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._write("running")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._write("stopped")


@dataclass(frozen=True)
class Liveness:
    """What the heartbeat file says about the node using a database."""

    running: bool
    #: one line for a person: "running (pid 123, last seen 2 s ago)", "not running (stopped ...)"
    summary: str
    pid: int | None = None
    host: str | None = None
    #: seconds since the last beat; None when no node ever ran on this database
    last_seen_s: float | None = None
    started_at: float | None = None
    version: str | None = None
    ports: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user (the service user)
        return True
    return True


def age_text(seconds: float) -> str:
    """``12 s``, ``5 min``, ``3.2 h``, ``4 d``: an age as a person reads it in a status line or a table."""
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} d"


def _ago(seconds: float) -> str:
    return age_text(seconds) + " ago"


def read_liveness(path: Path, now: float | None = None) -> Liveness:
    """Whether a node is alive on this database, judged from its heartbeat file."""
    now = time.time() if now is None else now
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return Liveness(False, "not running (no node has run on this database since heartbeats were recorded)")
    except (OSError, ValueError) as exc:
        return Liveness(False, f"unknown (heartbeat file {path} unreadable: {exc})")
    pid, host = doc.get("pid"), doc.get("host")
    age = max(0.0, now - float(doc.get("updated_at", 0.0)))
    common = {"pid": pid, "host": host, "last_seen_s": round(age, 1), "started_at": doc.get("started_at"),
              "version": doc.get("version"), "ports": doc.get("ports")}
    where = f"pid {pid}" + ("" if host == socket.gethostname() else f" on {host}")
    if doc.get("state") == "stopped":
        return Liveness(False, f"not running (stopped cleanly {_ago(age)}, was {where})", **common)
    if host == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid):
        return Liveness(False, f"not running ({where} is gone, last seen {_ago(age)}; it did not stop cleanly)",
                        **common)
    if age > STALE_AFTER_S:
        return Liveness(False, f"not running (no heartbeat from {where} since {_ago(age)})", **common)
    return Liveness(True, f"running ({where}, last seen {_ago(age)})", **common)
