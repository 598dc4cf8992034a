"""Who holds a claim on a row (a running job's lease, an outbox row being sent), and whether that holder died.

Several node processes may share one database (``docs/scale-out.md``).  A row
one of them works on carries its *owner* (the machine and storage root, the
same after a restart), its *run* (this process: pid and a random part) and
when the claim expires unless renewed.  Another process takes the row over
only when the claim expired, or at once when the owner is itself and the
run's process is gone (a restart after kill -9 or a power cut).
"""

from __future__ import annotations

import hashlib
import os
import socket
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dicom_node.index.db import Connection, Database


def node_identity(root: Path) -> str:
    """Who owns a claim: this machine and this storage root, the same after a restart of the node."""
    digest = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:12]
    return f"{socket.gethostname()}:{digest}"


def new_run_id() -> str:
    """This process's run: its pid first (so a restarted node on the same machine can tell it died)."""
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


def pid_alive(pid: str) -> bool:
    """Whether a process of this machine still runs (a run id starts with its pid)."""
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def claim_dead(owner: str | None, run: str | None, expires: float | None, *, me: str, now: float) -> bool:
    """A claim nobody holds any more: none, expired, or this owner's own run whose process is gone."""
    if owner is None or run is None or (expires or 0) < now:
        return True
    return owner == me and not pid_alive(str(run).split("-")[0])


def take_over(conn: Database | Connection, query: str, params: Sequence[Any], *, prefix: str, me: str, run: str,
              now: float, take: Callable[[Connection, Any], int]) -> list[Any]:
    """Apply ``take`` to the rows of ``query`` whose claim (``<prefix>_owner/_run/_expires``) is dead.

    Looked at first without the write lock (almost always nothing is dead,
    and a sweep must not serialise the other nodes for nothing), then again
    under it, so two processes never take one row over twice.  Rows held by
    ``run`` (this process) are never dead.  Returns the rows ``take`` counted
    (its return value: how many rows its update changed).
    """
    from dicom_node.index import db

    def dead(c: Database | Connection) -> list[Any]:
        return [r for r in c.execute(query, params).fetchall() if r[f"{prefix}_run"] != run
                and claim_dead(r[f"{prefix}_owner"], r[f"{prefix}_run"], r[f"{prefix}_expires"], me=me, now=now)]

    if not dead(conn):
        return []
    with db.transaction(conn) as c:
        return [r for r in dead(c) if take(c, r)]
