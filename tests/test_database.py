"""The database layer on both engines: one schema, the same rules, no job or send claimed twice.

Every case runs on the embedded SQLite file and on a real PostgreSQL (a
temporary cluster the tests start: tests/postgres_server.py).  The claims are
checked with several *processes* racing, the way several node processes on
one database race, not with threads of one process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from dicom_helpers import make_image, write

from dicom_node.config import NodeSettings
from dicom_node.index import db, migrations
from dicom_node.index.store import Store
from dicom_node.outbox import Outbox
from dicom_node.outbox import queue as outbox_queue
from dicom_node.states import JobState, OutboxState, SeriesState
from dicom_node.workflow.jobs import JobQueue
from fusion.environment import child_environment

REPO = Path(__file__).resolve().parents[1]


def _columns(location) -> dict[str, set[str]]:
    engine = sa.create_engine(db.database_url(location))
    try:
        inspector = sa.inspect(engine)
        return {t: {c["name"] for c in inspector.get_columns(t)} for t in inspector.get_table_names()
                if t != "sqlite_sequence"}
    finally:
        engine.dispose()


def test_one_schema_on_both_engines(tmp_path, postgres_url):
    """Alembic gives SQLite and PostgreSQL the same tables and columns, at the newest revision."""
    lite = db.connect(tmp_path / "node.sqlite")
    pg = db.connect(postgres_url)
    assert migrations.current(lite) == migrations.current(pg) == migrations.head()
    lite_cols, pg_cols = _columns(tmp_path / "node.sqlite"), _columns(postgres_url)
    assert lite_cols == pg_cols
    assert {"studies", "series", "instances", "jobs", "outbox", "outbox_destinations", "alembic_version"} <= set(lite_cols)
    assert {"claim_owner", "claim_run", "claim_expires"} <= lite_cols["outbox"]
    db.connect(postgres_url)  # opening again migrates nothing and fails nothing


def test_the_schema_refuses_a_state_the_code_does_not_know(db_location):
    """The CHECK constraints hold exactly the states of states.py (a new state needs a migration)."""
    database = db.connect(db_location)
    now = time.time()
    database.execute("INSERT INTO studies (study_uid) VALUES ('1.2')")
    for state in SeriesState:
        database.execute("INSERT INTO series (series_uid, study_uid, state) VALUES (?, '1.2', ?)",
                         (f"1.2.{len(state.value)}.{state.value.__hash__() & 0xffff}", state.value))
    for i, state in enumerate(JobState):
        database.execute("INSERT INTO jobs (key, pipeline, base_series_uid, overlay_series_uid, state, created_at)"
                         " VALUES (?, 'p', 'b', 'o', ?, ?)", (f"k{i}", state.value, now))
    for i, state in enumerate(OutboxState):
        database.execute("INSERT INTO outbox (destination, sop_instance_uid, sop_class_uid, path, state,"
                         " next_attempt_at, created_at, updated_at) VALUES ('d', ?, 'c', 'p', ?, 0, 0, 0)",
                         (f"1.{i}", state.value))
    for sql, args in (("INSERT INTO series (series_uid, study_uid, state) VALUES ('9.9', '1.2', ?)", ("settling",)),
                      ("INSERT INTO jobs (key, pipeline, base_series_uid, overlay_series_uid, state, created_at)"
                       " VALUES ('x', 'p', 'b', 'o', ?, 0)", ("paused",)),
                      ("INSERT INTO outbox (destination, sop_instance_uid, sop_class_uid, path, state,"
                       " next_attempt_at, created_at, updated_at) VALUES ('d', '9', 'c', 'p', ?, 0, 0, 0)", ("lost",))):
        with pytest.raises(db.IntegrityError):
            database.execute(sql, args)


def test_store_index_and_find_on_both_engines(tmp_path, db_location):
    """The same instance stored twice is one row; C-FIND wildcards and names match alike on both engines."""
    from pydicom.dataset import Dataset

    from dicom_node.index.matching import find

    store = Store(tmp_path / "data", db_location)
    store.ensure_schema()
    ds = make_image(PatientName="Müller^Jörg", patient_id="PID_1%", SpecificCharacterSet="ISO_IR 192")
    first = store.store_received(write(ds, store.new_tmp_path()), "SCU")
    again = store.store_received(write(ds, store.new_tmp_path()), "SCU")
    assert not first.duplicate and again.duplicate
    assert store.counts().instances == 1

    def study_query(**keys) -> list[str]:
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.StudyInstanceUID = ""
        for k, v in keys.items():
            setattr(q, k, v)
        return [str(r.StudyInstanceUID) for r in find(store.database, q, "STUDY")]

    uid = str(ds.StudyInstanceUID)
    assert study_query(PatientName="müller*") == [uid]          # names: case-folded, wildcard
    assert study_query(PatientName="MULLER*") == []
    assert study_query(PatientID="PID?1%") == [uid]             # '?' one character; '%' is a literal
    assert study_query(PatientID="PID_*") == [uid]
    assert study_query(PatientID="pid*") == []                  # other text: case-sensitive
    assert study_query(PatientID="PIDX1%") == []                # '_' in the value is a literal, not LIKE's


_CLAIMER = """
import json, os, sys, time
from dicom_node.workflow.jobs import JobQueue
q = JobQueue(sys.argv[1], owner=sys.argv[2])
q.counts()  # connected and ready: then all start together
print("ready", flush=True)
while not os.path.exists(sys.argv[3]):
    time.sleep(0.005)
got = []
while (job := q.claim()) is not None:
    got.append(job.id)
    q.finish(job.id, {"by": sys.argv[2]})
print(json.dumps(got))
"""


def test_no_job_is_claimed_twice_by_racing_node_processes(db_location, tmp_path):
    """Three processes claim from one queue at once: every job is claimed exactly once."""
    queue = JobQueue(db_location, owner="seed")
    queue.ensure_schema()
    ids = {queue.enqueue(f"key-{i}", "p", f"b{i}", f"o{i}")[0] for i in range(60)}
    env = child_environment(REPO)
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _CLAIMER, str(db_location), f"node-{n}", str(go)], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in range(3)]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    go.touch()
    claimed = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        claimed.append(json.loads(out.strip().splitlines()[-1]))
    every = [i for got in claimed for i in got]
    assert sorted(every) == sorted(ids), "each job claimed exactly once"
    assert all(j.state == "done" for j in queue.list())
    assert sum(1 for got in claimed if got) >= 2, f"the processes did race: {[len(g) for g in claimed]}"


def _settings(tmp_path) -> NodeSettings:
    return NodeSettings.model_validate({
        "storage": {"root": str(tmp_path / "data")},
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 1}],
    })


def test_outbox_rows_of_a_live_sender_are_never_taken_over(tmp_path, db_location, monkeypatch):
    """A node starting beside another leaves that one's rows in flight alone; a dead sender's go back."""
    settings = _settings(tmp_path)
    a = Outbox(db_location, settings, owner="host-a:root")
    files = []
    for i in range(3):
        ds = make_image(instance_number=i + 1)
        files.append(write(ds, tmp_path / f"i{i}.dcm"))
    a.enqueue("pacs", files)
    claimed = a._claim("pacs", None)
    assert len(claimed) == 3
    # another node process (another host) opens the same database: the rows stay A's
    b = Outbox(db_location, settings, owner="host-b:root")
    assert b._recover() == 0
    assert {i.state for i in b.list()} == {"sending"}
    assert b._claim("pacs", None) == []
    # A renews while it sends; once A stops renewing (died), the claims run out and B takes the rows back
    a._renew_claims(force=True)
    assert b._recover() == 0
    monkeypatch.setattr(outbox_queue.db, "now", lambda: time.time() + outbox_queue.CLAIM_S + 1)
    assert b._recover() == 3
    assert {i.state for i in b.list()} == {"pending"}
    assert len(b._claim("pacs", None)) == 3


def test_a_restarted_node_takes_back_its_own_dead_sends_at_once(tmp_path, db_location):
    """Same owner, a run whose process is gone (kill -9, power cut): its rows go back without waiting."""
    settings = _settings(tmp_path)
    first = Outbox(db_location, settings, owner="host-a:root")
    first.enqueue("pacs", [write(make_image(), tmp_path / "i.dcm")])
    first._claim("pacs", None)
    first.database.execute("UPDATE outbox SET claim_run = '999999999-dead'")  # no such process
    again = Outbox(db_location, settings, owner="host-a:root")  # the restart recovers on construction
    assert {i.state for i in again.list()} == {"pending"}


def test_concurrent_receivers_index_every_instance_once(tmp_path, db_location):
    """Six writers storing three series at once (two per series, duplicates included): counts exact.

    On PostgreSQL instances of different series index in parallel (the write
    lock shared, each series' own lock exclusive); within a series they wait.
    """
    import threading

    store = Store(tmp_path / "data", db_location)
    store.ensure_schema()
    study = make_image().StudyInstanceUID
    series = [make_image(study_uid=study).SeriesInstanceUID for _ in range(3)]
    images = {s: [make_image(study_uid=study, series_uid=s, instance_number=i + 1) for i in range(12)] for s in series}
    errors: list[BaseException] = []

    def send(s: str, order: int) -> None:
        try:
            for ds in images[s][::order]:  # one sender forwards, the other backwards: both store every instance
                store.store_received(write(ds, store.new_tmp_path()), "SCU")
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(s, o)) for s in series for o in (1, -1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for s in series:
        record = store.get_series(s)
        assert record is not None and record.instance_count == 12
        assert len(store.instances(s)) == 12
    assert store.counts().studies == 1 and store.counts().instances == 36


def test_threads_migrating_different_databases_at_once(tmp_path, postgres_server):
    """Alembic's proxies are process-wide: two nodes in one process (tests, tools) migrate one after the other."""
    import threading

    locations = [tmp_path / f"n{i}.sqlite" for i in range(3)] + [postgres_server.create_database() for _ in range(3)]
    errors: list[BaseException] = []

    def migrate(location) -> None:
        try:
            db.Database(location).migrate()
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=migrate, args=(loc,)) for loc in locations]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert all(migrations.current(db.Database(loc)) == migrations.head() for loc in locations)
