"""SQLite connections for the node's index, job queue and outbox (one file, WAL mode).

Each module owns its tables and creates them with ``CREATE TABLE IF NOT
EXISTS`` in its own ``ensure_schema(conn)``; this module only opens
connections with the settings durability needs.  A connection belongs to one
thread: open one per thread, they are cheap.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path


def connect(path: Path) -> sqlite3.Connection:
    """A connection in autocommit mode: WAL, synchronous=FULL, 30 s busy timeout, Row results."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")  # an acknowledged C-STORE must survive power loss
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (rollback on error): one writer at a time, no lost updates."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def now() -> float:
    """Wall-clock seconds, the time unit of every timestamp column."""
    return time.time()
