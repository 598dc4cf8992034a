"""The test PostgreSQL (tests/postgres_server.py) is a real server, and its row locks do what the node relies on.

Several node processes share one job queue and one outbox in PostgreSQL; what keeps two of them
from claiming the same row is the engine's ``SELECT … FOR UPDATE SKIP LOCKED``.  These tests check
that property on the real server with independent connections (and threads), not on a model of it.
"""

from __future__ import annotations

import threading
from collections import Counter

import pytest
from postgres_server import PostgresServer, PostgresUnavailable, find_bindir

sa = pytest.importorskip("sqlalchemy", reason="SQLAlchemy is not installed in this venv")
psycopg = pytest.importorskip("psycopg", reason="psycopg (PostgreSQL driver) is not installed in this venv")

_CLAIM = sa.text("SELECT id FROM jobs WHERE state = 'queued' ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED")


def _jobs_table(engine: sa.Engine, n: int) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE jobs (id serial PRIMARY KEY, state text NOT NULL, owner text)"))
        conn.execute(sa.text("INSERT INTO jobs (state) SELECT 'queued' FROM generate_series(1, :n)"), {"n": n})


def test_finds_the_installed_server_and_skips_cleanly_without_one(tmp_path):
    assert find_bindir(tmp_path) is None  # no <version>/bin here: the fixture skips, saying what to install
    fake = tmp_path / "9.6" / "bin"
    fake.mkdir(parents=True)
    for tool in ("initdb", "pg_ctl"):
        (fake / tool).touch()
    assert find_bindir(tmp_path) is None  # a version without its server binary is not a server
    (fake / "postgres").touch()
    newer = tmp_path / "16" / "bin"
    newer.mkdir(parents=True)
    for tool in ("initdb", "pg_ctl", "postgres"):
        (newer / tool).touch()
    assert find_bindir(tmp_path) == newer  # the newest version, compared as numbers (16 > 9.6)


def test_fixture_gives_a_real_server_on_loopback(postgres_server, postgres_url):
    assert postgres_url == f"postgresql+psycopg://fusion@127.0.0.1:{postgres_server.port}/{postgres_url.rsplit('/')[-1]}"
    engine = sa.create_engine(postgres_url)
    try:
        with engine.connect() as conn:
            version = conn.execute(sa.text("SHOW server_version_num")).scalar_one()
            addr = conn.execute(sa.text("SELECT host(inet_server_addr()), inet_server_port()")).one()
            user, db = conn.execute(sa.text("SELECT current_user, current_database()")).one()
        assert engine.dialect.driver == "psycopg"
        assert int(version) // 10000 == int(postgres_server.version.split(".")[0])  # the binaries we found
        assert tuple(addr) == ("127.0.0.1", postgres_server.port)
        assert user == "fusion" and db == postgres_url.rsplit("/", 1)[1] and db.startswith("test_")
        # the socket in the temporary folder answers too (libpq's host = a directory)
        with psycopg.connect(host=str(postgres_server.socket_dir), port=postgres_server.port, user="fusion",
                             dbname=db) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        engine.dispose()


def test_each_test_gets_a_fresh_empty_database(postgres_server):
    first, second = postgres_server.create_database(), postgres_server.create_database()
    assert first != second
    a, b = sa.create_engine(first), sa.create_engine(second)
    try:
        _jobs_table(a, 3)
        with b.connect() as conn:
            tables = conn.execute(sa.text("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")).scalar_one()
        assert tables == 0  # what one test creates is not in the next test's database
    finally:
        a.dispose()
        b.dispose()
        for url in (first, second):
            postgres_server.drop_database(url.rsplit("/", 1)[1])


def test_skip_locked_gives_two_connections_different_rows(postgres_url):
    engine = sa.create_engine(postgres_url)
    _jobs_table(engine, 3)
    try:
        with engine.connect() as a, engine.connect() as b:
            ta, tb = a.begin(), b.begin()
            claimed_a = a.execute(_CLAIM).scalar_one()
            claimed_b = b.execute(_CLAIM).scalar_one()  # does not wait for a: skips the row a holds
            assert (claimed_a, claimed_b) == (1, 2)
            # the lock is real: without SKIP LOCKED, b cannot take a's row (NOWAIT: fail instead of blocking)
            with pytest.raises(sa.exc.OperationalError) as err:
                b.execute(sa.text("SELECT id FROM jobs WHERE id = :id FOR UPDATE NOWAIT"), {"id": claimed_a})
            assert isinstance(err.value.orig, psycopg.errors.LockNotAvailable)
            tb.rollback()  # b's claim is given up: its row is free again
            a.execute(sa.text("UPDATE jobs SET state = 'running', owner = 'a' WHERE id = :id"), {"id": claimed_a})
            ta.commit()
            with b.begin():
                assert b.execute(_CLAIM).scalar_one() == 2  # the next queued row; 1 is running now
    finally:
        engine.dispose()


def test_concurrent_claimers_take_every_row_exactly_once(postgres_url):
    """Four connections in four threads drain a queue of 300 rows, as node processes drain the job table."""
    rows, claimers = 300, 4
    engine = sa.create_engine(postgres_url, pool_size=claimers)
    _jobs_table(engine, rows)
    taken: dict[str, list[int]] = {f"c{n}": [] for n in range(claimers)}
    errors: list[BaseException] = []
    start = threading.Barrier(claimers)

    def claimer(name: str) -> None:
        try:
            start.wait()
            while True:
                with engine.begin() as conn:
                    row = conn.execute(_CLAIM).scalar_one_or_none()
                    if row is None:
                        return
                    conn.execute(sa.text("UPDATE jobs SET state = 'running', owner = :o WHERE id = :id"),
                                 {"o": name, "id": row})
                taken[name].append(row)
        except Exception as exc:  # noqa: BLE001 - reported below: a thread's exception would otherwise vanish
            errors.append(exc)

    threads = [threading.Thread(target=claimer, args=(name,)) for name in taken]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    try:
        assert not errors, errors
        counts = Counter(row for rows_of in taken.values() for row in rows_of)
        assert sorted(counts) == list(range(1, rows + 1)) and set(counts.values()) == {1}  # each once
        with engine.connect() as conn:
            owners = dict(conn.execute(sa.text("SELECT owner, count(*) FROM jobs GROUP BY owner")).all())
            assert conn.execute(sa.text("SELECT count(*) FROM jobs WHERE state = 'queued'")).scalar_one() == 0
        assert owners == {name: len(rows_of) for name, rows_of in taken.items() if rows_of}  # the database agrees
        assert sum(1 for rows_of in taken.values() if rows_of) >= 2  # they really ran side by side
    finally:
        engine.dispose()


def test_server_stops_and_leaves_nothing_behind():
    try:
        server = PostgresServer().start()
    except PostgresUnavailable as exc:  # the fixture's rule: not installed -> skip; a failed start fails
        pytest.skip(str(exc))
    base, port = server.base, server.port
    assert base is not None and (base / "data" / "postmaster.pid").exists()
    with psycopg.connect(server.dsn(), connect_timeout=5) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    server.stop()
    assert not base.exists()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(server.dsn(), connect_timeout=5)  # nobody listens on that port any more
    server.stop()  # idempotent
    assert port > 0
