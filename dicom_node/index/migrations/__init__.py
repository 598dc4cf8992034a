"""The database schema as Alembic migrations: one revision per change, the same on SQLite and PostgreSQL.

:func:`upgrade` runs under the database's write lock, so two node processes
opening one database at once migrate it once.  A database written before the
node used Alembic (tables present, no ``alembic_version``) is taken up by the
first revision: it adds what such a file lacks and creates nothing twice.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dicom_node.index.db import Database

HERE = Path(__file__).resolve().parent
#: Alembic runs a migration through module-level proxies (``alembic.op``, ``alembic.context``), so two
#: threads of one process must not migrate at once, even two different databases: the one process-wide
#: lock of the node, for the one library that needs it
_ALEMBIC = threading.Lock()


def config():
    """The Alembic configuration of the node's migrations (no alembic.ini: everything is here)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    return cfg


def head() -> str:
    """The newest revision."""
    from alembic.script import ScriptDirectory

    rev = ScriptDirectory.from_config(config()).get_current_head()
    assert rev is not None
    return rev


def current(database: Database) -> str | None:
    """The revision the database is at (None: empty, or written before Alembic)."""
    from alembic.runtime.migration import MigrationContext

    with database.engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(database: Database, revision: str = "head") -> None:
    """Migrate ``database`` to ``revision`` under its write lock; nothing to do is cheap (one read)."""
    from alembic import command

    if revision == "head" and current(database) == head():
        return
    with _ALEMBIC, database.transaction() as conn:
        cfg = config()
        cfg.attributes["connection"] = conn._conn
        command.upgrade(cfg, revision)
