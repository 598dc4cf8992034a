"""A real PostgreSQL for the tests: a temporary cluster from the Debian ``postgresql`` package.

The node's scale-out path keeps its index, job queue and outbox in PostgreSQL and relies on the
engine's row locks (``SELECT … FOR UPDATE SKIP LOCKED``) so that several node processes never claim
the same job or send twice.  Those are properties of the real server, so the tests run one: the
server binaries of the installed version (``/usr/lib/postgresql/<version>/bin``, the newest if
several) ``initdb`` a cluster in a temporary folder and ``pg_ctl`` starts it on a free loopback TCP
port (and a Unix socket in that folder), with ``trust`` authentication for loopback and the socket
only.  At teardown the server is stopped and the folder removed.

``initdb`` refuses to run as root, so when the tests run as root (containers, CI) the server
binaries run as the ``postgres`` system user the package creates (``runuser``, else ``setpriv``),
and the temporary folder belongs to that user; otherwise they run as the current user.

``durable=False`` (the default) turns ``fsync``, ``synchronous_commit`` and ``full_page_writes``
off: a test cluster needs no crash safety and the tests run faster.  A benchmark that measures the
database's write rate passes ``durable=True`` so the figure is what a production server would see.

Use the session fixture ``postgres_server`` (tests/conftest.py) and the per-test ``postgres_url``
(a fresh, empty database ``test_<n>``), or :class:`PostgresServer` directly as a context manager.
"""

from __future__ import annotations

import atexit
import itertools
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

#: where the Debian packages put each server version's binaries
PG_LIB = Path("/usr/lib/postgresql")
#: the database superuser the cluster is created with (the compose file's user too)
USER = "fusion"
#: the system user the server runs as when the tests run as root (created by the Debian package)
SYSTEM_USER = "postgres"


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server is installed here (a reason to skip); the message says what to install."""


class PostgresFailed(RuntimeError):
    """The server is installed but initdb or pg_ctl failed (a failure, not a skip); with its log's tail."""


def find_bindir(root: Path = PG_LIB) -> Path | None:
    """The ``bin`` folder of the newest installed server version (one with initdb, pg_ctl, postgres)."""
    candidates = []
    for bindir in root.glob("*/bin"):
        if not all((bindir / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            continue
        m = re.fullmatch(r"(\d+)(?:\.(\d+))?", bindir.parent.name)
        if m:
            candidates.append(((int(m.group(1)), int(m.group(2) or 0)), bindir))
    return max(candidates)[1] if candidates else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_as_prefix(user: str) -> list[str]:
    """The command prefix that runs a program as ``user`` (root only): runuser, else setpriv."""
    if runuser := shutil.which("runuser"):
        return [runuser, "-u", user, "--"]
    if setpriv := shutil.which("setpriv"):
        return [setpriv, f"--reuid={user}", f"--regid={user}", "--init-groups", "--"]
    raise PostgresUnavailable("running as root, and neither runuser nor setpriv (util-linux) is installed to "
                              f"start the server as {user!r}; install util-linux or run the tests as another user")


class PostgresServer:
    """One temporary PostgreSQL cluster on 127.0.0.1; :meth:`start` it, :meth:`stop` it (or use ``with``).

    :attr:`port` is its TCP port, :attr:`socket_dir` the folder of its Unix socket; :meth:`url` gives
    the SQLAlchemy URL of a database, :meth:`create_database` makes a fresh empty one.
    """

    def __init__(self, *, durable: bool = False, bindir: Path | None = None) -> None:
        found = bindir or find_bindir()
        if found is None:
            raise PostgresUnavailable(f"no PostgreSQL server binaries under {PG_LIB}/<version>/bin "
                                      "(apt-get install postgresql; `make test` installs it)")
        self.bindir: Path = found
        self.durable = durable
        self.version = self.bindir.parent.name
        self.prefix: list[str] = []
        self.owner: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            try:
                self.owner = pwd.getpwnam(SYSTEM_USER)
            except KeyError:
                raise PostgresUnavailable(f"running as root and there is no {SYSTEM_USER!r} system user to run the "
                                          "server as (the Debian postgresql package creates it)") from None
            self.prefix = _run_as_prefix(SYSTEM_USER)
        self.base: Path | None = None
        self.port = 0
        self.startup_s = 0.0
        self._names = itertools.count(1)

    # -- paths ---------------------------------------------------------------------------------------
    @property
    def datadir(self) -> Path:
        assert self.base is not None, "the server was not started"
        return self.base / "data"

    @property
    def socket_dir(self) -> Path:
        assert self.base is not None, "the server was not started"
        return self.base / "run"

    @property
    def logfile(self) -> Path:
        assert self.base is not None, "the server was not started"
        return self.base / "server.log"

    def url(self, database: str = "postgres", *, driver: str = "psycopg") -> str:
        """``postgresql+psycopg://fusion@127.0.0.1:<port>/<database>`` (trust: no password)."""
        return f"postgresql+{driver}://{USER}@127.0.0.1:{self.port}/{database}"

    def dsn(self, database: str = "postgres") -> str:
        """The libpq connection string (for psycopg directly, or psql)."""
        return f"host=127.0.0.1 port={self.port} user={USER} dbname={database}"

    # -- life cycle ----------------------------------------------------------------------------------
    def _tool(self, name: str, *args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = [*self.prefix, str(self.bindir / name), *map(str, args)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.base)
        if done.returncode != 0:
            log = self.logfile.read_text()[-3000:] if self.logfile.exists() else ""
            raise PostgresFailed(f"{name} failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}\n{log}")
        return done

    def _chown(self, path: Path) -> None:
        if self.owner is not None:
            os.chown(path, self.owner.pw_uid, self.owner.pw_gid)

    def start(self) -> PostgresServer:
        """initdb a fresh cluster in a new temporary folder and start the server (waits until it accepts)."""
        t0 = time.perf_counter()
        # tempfile's folder, not pytest's tmp_path: that one is private to the test user (0700),
        # which the postgres user could not enter when the tests run as root
        self.base = Path(tempfile.mkdtemp(prefix="fusion-pg-"))
        self._chown(self.base)
        self.socket_dir.mkdir()
        self._chown(self.socket_dir)
        atexit.register(self.stop)  # a test run that dies still stops its server
        try:
            self._tool("initdb", "-D", self.datadir, "-U", USER, "-E", "UTF8", "--locale=C",
                       "--auth-local=trust", "--auth-host=trust", *([] if self.durable else ["--no-sync"]))
            # loopback and the socket only, trust for both: nothing else can reach this server
            (self.datadir / "pg_hba.conf").write_text(
                "local all all trust\nhost all all 127.0.0.1/32 trust\n")
            self._chown(self.datadir / "pg_hba.conf")
            options = ["-c listen_addresses=127.0.0.1", f"-c unix_socket_directories={self.socket_dir}",
                       "-c max_connections=100", "-c shared_buffers=32MB"]
            if not self.durable:
                options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
            for attempt in range(5):  # the free port may be taken between the probe and the bind
                self.port = _free_port()
                try:
                    self._tool("pg_ctl", "start", "-D", self.datadir, "-l", self.logfile, "-w", "-t", "60",
                               "-o", " ".join([f"-p {self.port}", *options]))
                    break
                except PostgresFailed:
                    if attempt == 4 or "could not bind" not in self.logfile.read_text():
                        raise
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.perf_counter() - t0
        return self

    def stop(self) -> None:
        """Stop the server (fast shutdown, immediate if that hangs) and remove its folder; idempotent."""
        base, self.base = self.base, None
        if base is None:
            return
        atexit.unregister(self.stop)
        pid_file = base / "data" / "postmaster.pid"
        if pid_file.exists():
            cmd = [*self.prefix, str(self.bindir / "pg_ctl"), "stop", "-D", str(base / "data"), "-w", "-t", "30"]
            try:
                stopped = subprocess.run([*cmd, "-m", "fast"], capture_output=True, timeout=40, cwd=base)
                if stopped.returncode != 0:
                    subprocess.run([*cmd, "-m", "immediate"], capture_output=True, timeout=40, cwd=base)
            except subprocess.TimeoutExpired:
                subprocess.run([*cmd, "-m", "immediate"], capture_output=True, timeout=40, cwd=base)
        shutil.rmtree(base, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- databases -----------------------------------------------------------------------------------
    def execute_autocommit(self, sql: str, database: str = "postgres") -> None:
        """Run one statement outside a transaction (CREATE/DROP DATABASE cannot run inside one)."""
        import psycopg

        with psycopg.connect(self.dsn(database), autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql)  # a name checked by create_database, no user input

    def create_database(self, name: str | None = None) -> str:
        """A fresh, empty database (``test_<n>`` unless named); returns its SQLAlchemy URL."""
        name = name or f"test_{next(self._names)}"
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
            raise ValueError(f"database name {name!r}: use lower-case letters, digits and _")
        self.execute_autocommit(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, closing whatever connections a test left open on it."""
        self.execute_autocommit(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
