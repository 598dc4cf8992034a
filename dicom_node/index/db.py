"""The node's database: the index, job queue and outbox, on SQLite (the default) or PostgreSQL.

One SQLAlchemy engine per :class:`Database`; the schema is Alembic's
(``index/migrations``), the same on both engines, brought up to date when a
node opens the database (:meth:`Database.migrate`).

The SQL of the modules is plain text with ``?`` placeholders, run through
``Connection.exec_driver_sql``; this module only converts the placeholders
for drivers that spell them ``%s`` (psycopg).  Two rules make the engines
behave alike, and the tests run the same cases on both:

- **One writer at a time.**  SQLite's ``BEGIN IMMEDIATE`` takes the file's
  write lock; on PostgreSQL every write transaction, and every write
  statement outside one, first takes one transaction-scoped advisory lock
  (``pg_advisory_xact_lock``).  So a read-then-write transaction (claiming a
  job, claiming an outbox row, settling a series) can never interleave with
  another node process's write, on one host or many: no job or send is
  claimed twice.  Readers never wait.
- **Except where writes commute.**  Storing a received instance touches only
  its series' rows (and upserts its study row, atomic by itself), so on
  PostgreSQL it takes the write lock *shared* plus an exclusive lock of its
  own series (:meth:`Database.transaction` with ``key``): receivers of
  different series, on any number of hosts, index in parallel, while a
  settle, pair or claim still excludes them all.  ``docs/scale-out.md``
  measures both.
- **Statements outside a transaction commit at once** (autocommit), as
  ``sqlite3`` did with ``isolation_level=None``.

Connections come from the engine's pool for one statement or one
transaction, so any thread may use a :class:`Database`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy
import sqlalchemy.exc
from sqlalchemy import event
from sqlalchemy.engine import URL, make_url

log = logging.getLogger("dicom_node.index.db")

#: what a failing database raises (SQLAlchemy wraps the driver's errors)
Error = sqlalchemy.exc.SQLAlchemyError
IntegrityError = sqlalchemy.exc.IntegrityError

#: the advisory lock every PostgreSQL write takes (any constant; "fusn")
_WRITE_LOCK = 0x6675736E
#: the first half of a keyed lock's two-part key ("fusk"): never equal to the write lock's (0)
_KEY_SPACE = 0x6675736B
_READS = ("SELECT", "WITH", "EXPLAIN", "SHOW", "VALUES")


def database_url(location: Path | str) -> URL:
    """A database location as a URL: a path is a SQLite file, anything with ``://`` an SQLAlchemy URL."""
    text = str(location)
    if "://" in text:
        url = make_url(text)
        if url.get_backend_name() not in ("sqlite", "postgresql"):
            raise ValueError(f"database {url.render_as_string(hide_password=True)}: the node supports SQLite and "
                             "PostgreSQL (postgresql+psycopg://user@host/dbname)")
        return url
    return URL.create("sqlite", database=str(Path(text)))


class Row:
    """A result row, by column name or position (``dict(row)`` gives the columns)."""

    __slots__ = ("_map", "_values")

    def __init__(self, row: sqlalchemy.Row) -> None:
        self._values = tuple(row)
        self._map = row._mapping

    def __getitem__(self, key: Any) -> Any:
        return self._map[key] if isinstance(key, str) else self._values[key]

    def keys(self) -> list[str]:
        return list(self._map.keys())

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Row({dict(self._map)!r})"


class Result:
    """A statement's rows (read at once, so the connection goes back to the pool) and its row count."""

    __slots__ = ("_rows", "rowcount")

    def __init__(self, rows: list[Row], rowcount: int) -> None:
        self._rows = rows
        self.rowcount = rowcount

    def fetchone(self) -> Any:
        """The first row, or None (typed ``Any`` as a DB-API cursor's is: callers know their query)."""
        return self._rows[0] if self._rows else None

    def fetchall(self) -> list[Row]:
        return list(self._rows)

    def __iter__(self) -> Iterator[Row]:
        return iter(self._rows)


Params = Sequence[Any] | Mapping[str, Any]


@functools.lru_cache(maxsize=4096)
def _format_style(sql: str) -> str:
    """``?`` placeholders as ``%s`` (and a literal ``%`` as ``%%``), outside quoted text."""
    out: list[str] = []
    quote: str | None = None
    for ch in sql:
        if quote:
            if ch == quote:
                quote = None
        elif ch in ("'", '"'):
            quote = ch
        elif ch == "?":
            out.append("%s")
            continue
        if ch == "%":
            out.append("%%")
            continue
        out.append(ch)
    return "".join(out)


class Connection:
    """One pooled connection inside a transaction (:meth:`Database.transaction`)."""

    def __init__(self, database: Database, conn: sqlalchemy.Connection) -> None:
        self.database = database
        self._conn = conn

    @property
    def dialect(self) -> str:
        return self.database.dialect

    def execute(self, sql: str, params: Params = ()) -> Result:
        return self.database._run(self._conn, sql, params)

    def transaction(self) -> contextlib.AbstractContextManager[Connection]:
        """Already inside one: the caller's work joins it."""
        return contextlib.nullcontext(self)


class Database:
    """The node's database at ``location`` (a SQLite file path, or an SQLAlchemy URL for PostgreSQL)."""

    def __init__(self, location: Path | str | URL, *, pool_size: int = 5) -> None:
        self.url = location if isinstance(location, URL) else database_url(location)
        self.dialect = self.url.get_backend_name()
        # hide_parameters: an error's text never carries the values of a statement (patient names, IDs)
        kwargs: dict[str, Any] = {"isolation_level": "AUTOCOMMIT", "pool_pre_ping": self.dialect != "sqlite",
                                  "hide_parameters": True}
        if self.dialect == "sqlite":
            assert self.url.database
            Path(self.url.database).parent.mkdir(parents=True, exist_ok=True)
            # sqlite3's own busy wait: a writer waits up to 30 s for another process's write lock
            kwargs.update(connect_args={"timeout": 30.0}, pool_size=pool_size, max_overflow=-1)
        else:
            kwargs.update(pool_size=pool_size, max_overflow=4 * pool_size, pool_timeout=30.0)
        self.engine = sqlalchemy.create_engine(self.url, **kwargs)
        if self.dialect == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._migrated = False
        self._migrate_lock = threading.Lock()

    @classmethod
    def of(cls, location: Database | Path | str) -> Database:
        """``location`` itself when it is a :class:`Database` already, else a new one for it."""
        return location if isinstance(location, Database) else cls(location)

    @property
    def path(self) -> Path | None:
        """The SQLite file (None on PostgreSQL): where backups and the heartbeat file go beside it."""
        return Path(self.url.database) if self.dialect == "sqlite" and self.url.database else None

    def describe(self) -> str:
        """For messages and logs: the file, or the URL without its password."""
        return str(self.path) if self.path else self.url.render_as_string(hide_password=True)

    # -- statements --------------------------------------------------------------------

    def execute(self, sql: str, params: Params = ()) -> Result:
        """One statement in its own transaction (a write takes the write lock first)."""
        if self.dialect == "postgresql" and not sql.lstrip().upper().startswith(_READS):
            with self.transaction() as conn:
                return conn.execute(sql, params)
        with self.engine.connect() as conn:
            return self._run(conn, sql, params)

    @contextlib.contextmanager
    def transaction(self, key: str | None = None) -> Iterator[Connection]:
        """A write transaction: the write lock for its whole length, commit at the end, rollback on error.

        ``key`` (PostgreSQL): the transaction writes only rows of this key (one
        series) and commutes with other keys' such writes; it takes the write
        lock shared and the key's own lock exclusively.  SQLite has one writer
        whatever the key.
        """
        with self.engine.connect() as raw:
            if self.dialect == "sqlite":
                raw.exec_driver_sql("BEGIN IMMEDIATE")
            elif key is None:
                raw.exec_driver_sql("BEGIN")
                raw.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_WRITE_LOCK})")
            else:
                raw.exec_driver_sql("BEGIN")
                raw.exec_driver_sql(f"SELECT pg_advisory_xact_lock_shared({_WRITE_LOCK})")
                raw.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_KEY_SPACE}, hashtext(%s))", (key,))
            try:
                yield Connection(self, raw)
            except BaseException:
                raw.exec_driver_sql("ROLLBACK")
                raise
            raw.exec_driver_sql("COMMIT")

    @contextlib.contextmanager
    def read_only(self) -> Iterator[Connection]:
        """A connection that refuses writes (the Q/R handlers: a query must never change the index)."""
        with self.engine.connect() as raw:
            if self.dialect == "sqlite":
                raw.exec_driver_sql("PRAGMA query_only = ON")
                try:
                    yield Connection(self, raw)
                finally:
                    raw.exec_driver_sql("PRAGMA query_only = OFF")
            else:
                raw.exec_driver_sql("BEGIN READ ONLY")
                try:
                    yield Connection(self, raw)
                finally:
                    raw.exec_driver_sql("ROLLBACK")

    def probe_write(self) -> None:
        """Take the write lock and let it go: the database is writable and not stuck (readiness)."""
        with self.transaction():
            pass

    def _run(self, conn: sqlalchemy.Connection, sql: str, params: Params) -> Result:
        if self.dialect != "sqlite":
            sql = _format_style(sql)
        args: Any = dict(params) if isinstance(params, Mapping) else tuple(params)
        res = conn.exec_driver_sql(sql, args)
        rows = [Row(r) for r in res] if res.returns_rows else []
        return Result(rows, res.rowcount)

    # -- schema ------------------------------------------------------------------------

    def migrate(self) -> None:
        """Bring the schema to the newest revision (Alembic), once per object; harmless when it is."""
        with self._migrate_lock:
            if self._migrated:
                return
            from dicom_node.index import migrations

            migrations.upgrade(self)
            self._migrated = True

    def close(self) -> None:
        """Close the pooled connections (a process that forks or exits)."""
        self.engine.dispose()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")  # an acknowledged C-STORE must survive power loss
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def connect(location: Database | Path | str) -> Database:
    """The database at ``location`` with its schema up to date (what every owner of a table calls)."""
    database = Database.of(location)
    database.migrate()
    return database


def transaction(conn: Database | Connection) -> contextlib.AbstractContextManager[Connection]:
    """A write transaction on ``conn``; on a :class:`Connection` already in one, that one."""
    return conn.transaction()


def error_text(exc: BaseException) -> str:
    """An error as the operator reads it: the driver's first line, never a row's values or the parameters.

    PostgreSQL adds the failing row to a constraint error (``DETAIL: Failing
    row contains (...)``), which for ``studies`` would be a patient's name;
    logs and job errors get only the first line.
    """
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip()
    return f"{type(orig).__name__}: {text.splitlines()[0] if text else 'no message'}"


def now() -> float:
    """Wall-clock seconds, the time unit of every timestamp column."""
    return time.time()
