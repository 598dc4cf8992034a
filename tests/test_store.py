"""The instance store: atomic placement, idempotence, the series state rules pairing relies on."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from pathlib import Path

import pytest
import sqlalchemy
import sqlalchemy.exc
from dicom_helpers import UID_PREFIX, make_image, write
from pydicom import dcmread
from pydicom.uid import generate_uid

from dicom_node.index import store as store_mod
from dicom_node.index.store import InvalidInstanceError, Store, StoreError


@pytest.fixture
def store(tmp_path, db_location) -> Store:
    """A store on each engine (tests/conftest.py ``db_location``: the SQLite file and a real PostgreSQL)."""
    s = Store(tmp_path / "data", db_location)
    s.ensure_schema()
    return s


def put(store: Store, ds, calling_ae: str = "MODALITY", origin: str = "received"):
    tmp = write(ds, store.new_tmp_path())
    return store.store_received(tmp, calling_ae, origin=origin), tmp


def test_schema_is_idempotent_and_has_the_query_columns(store):
    store.ensure_schema()
    inspector = sqlalchemy.inspect(store.database.engine)
    cols = {t: {c["name"] for c in inspector.get_columns(t)} for t in ("studies", "series", "instances")}
    assert {"patient_id", "patient_name", "patient_birth_date", "patient_sex", "study_date", "study_time",
            "accession_number", "study_description", "study_id", "referring_physician_name",
            "specific_character_set"} <= cols["studies"]
    assert {"modality", "series_description", "series_number", "frame_of_reference_uid", "body_part",
            "announced_count", "instance_count", "first_received", "last_received", "state", "state_reason",
            "state_changed", "origin"} <= cols["series"]
    assert {"sop_class_uid", "transfer_syntax_uid", "instance_number", "path", "size_bytes", "received_at",
            "calling_ae"} <= cols["instances"]
    indexes = {i["name"] for t in ("series", "instances") for i in inspector.get_indexes(t)}
    assert {"series_state", "instances_series"} <= indexes


def test_store_received_places_and_indexes(store):
    ds = make_image(SeriesDescription="AX T1", BodyPartExamined="HEAD", ImagesInAcquisition=3, modality="MR")
    result, tmp = put(store, ds)
    assert not result.duplicate and not tmp.exists()
    expected = store.root / "instances" / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    assert result.path == expected and expected.is_file()
    assert dcmread(expected).PixelData == ds.PixelData

    series = store.get_series(ds.SeriesInstanceUID)
    assert series.instance_count == 1 and series.announced_count == 3 and series.state == "open"
    assert series.modality == "MR" and series.series_description == "AX T1" and series.body_part == "HEAD"
    assert series.origin == "received" and series.patient_id == "TEST-PATIENT" and series.study_date == "20260101"
    assert series.first_received == series.last_received is not None
    assert "TEST-PATIENT" not in repr(series) and "Test^Patient" not in repr(series)  # safe to log by accident

    (inst,) = store.instances(ds.SeriesInstanceUID)
    assert inst.path == expected and inst.size_bytes == expected.stat().st_size
    assert inst.calling_ae == "MODALITY" and inst.transfer_syntax_uid == "1.2.840.10008.1.2.1"
    assert (inst.rows, inst.columns) == (16, 16)
    # paths are stored relative to the root, so a data folder can be moved
    raw = store.database.execute("SELECT path FROM instances").fetchone()[0]
    assert not os.path.isabs(raw)
    assert list(store.tmp_dir.iterdir()) == []


def test_duplicate_is_success_and_not_stored_again(store):
    ds = make_image()
    first, _ = put(store, ds)
    before = first.path.stat()
    second, tmp = put(store, ds)
    assert second.duplicate and second.path == first.path
    assert not tmp.exists()
    assert first.path.stat().st_mtime_ns == before.st_mtime_ns
    assert store.get_series(ds.SeriesInstanceUID).instance_count == 1
    assert store.counts().instances == 1


def test_new_instance_reopens_a_settled_series_but_a_duplicate_does_not(store):
    ds = make_image(instance_number=1)
    put(store, ds)
    uid = ds.SeriesInstanceUID
    assert store.set_series_state(uid, "settled", "quiet period elapsed")
    put(store, ds)  # duplicate: nothing new arrived
    assert store.get_series(uid).state == "settled"

    more = make_image(study_uid=ds.StudyInstanceUID, series_uid=uid, instance_number=2)
    put(store, more)
    rec = store.get_series(uid)
    assert rec.state == "open" and rec.state_reason == store_mod.REOPEN_REASON and rec.instance_count == 2
    assert rec.state_changed >= rec.last_received


def test_series_state_outside_its_life_cycle_is_refused(store):
    """The schema's CHECK constraint (dicom_node.states): a typo'd state can never be written."""
    ds = make_image()
    put(store, ds)
    uid = ds.SeriesInstanceUID
    with pytest.raises(StoreError, match="(?i)check constraint"):
        store.set_series_state(uid, "failed", "not a series state")


def test_set_series_state_compare_and_set(store):
    ds = make_image()
    put(store, ds)
    uid = ds.SeriesInstanceUID
    seen = store.get_series(uid)
    assert not store.set_series_state(uid, "settled", "x", expected_state="unmatched")
    assert not store.set_series_state(uid, "settled", "x", unchanged_since=seen.last_received - 1)
    assert store.get_series(uid).state == "open"
    assert store.set_series_state(uid, "settled", "quiet", expected_state="open", unchanged_since=seen.last_received)
    rec = store.get_series(uid)
    assert rec.state == "settled" and rec.state_reason == "quiet"
    with pytest.raises(KeyError):
        store.set_series_state("1.2.3.4", "settled", "x")


def test_list_series_filters_and_store_dataset_marks_derived(store):
    a = make_image(modality="CT")
    put(store, a)
    derived = make_image(study_uid=a.StudyInstanceUID, modality="OT", sop_class="1.2.840.10008.5.1.4.1.1.7")
    del derived.file_meta  # store_dataset completes the file meta
    res = store.store_dataset(derived)
    assert not res.duplicate and res.path.is_file()
    assert dcmread(res.path).file_meta.MediaStorageSOPInstanceUID == derived.SOPInstanceUID
    assert [s.series_uid for s in store.list_series(origin="derived")] == [derived.SeriesInstanceUID]
    assert [s.series_uid for s in store.list_series(origin="received")] == [a.SeriesInstanceUID]
    assert len(store.list_series()) == 2 and len(store.list_series(state="open")) == 2
    store.set_series_state(a.SeriesInstanceUID, "unmatched", "test")
    assert [s.series_uid for s in store.list_series(state="unmatched")] == [a.SeriesInstanceUID]
    assert store.store_dataset(derived).duplicate
    assert list(store.tmp_dir.iterdir()) == []


def test_instances_sorted_by_number_then_uid(store):
    series_uid, study_uid = generate_uid(UID_PREFIX), generate_uid(UID_PREFIX)
    numbers = [3, 1, 2, None, 2]
    for n in numbers:
        ds = make_image(series_uid=series_uid, study_uid=study_uid, instance_number=n or 1)
        if n is None:
            del ds.InstanceNumber
        put(store, ds)
    got = store.instances(series_uid)
    assert [i.instance_number for i in got] == [1, 2, 2, 3, None]
    twos = [i.sop_instance_uid for i in got if i.instance_number == 2]
    assert twos == sorted(twos)


def test_counts(store):
    study = generate_uid(UID_PREFIX)
    s1, s2 = generate_uid(UID_PREFIX), generate_uid(UID_PREFIX)
    for series, n in ((s1, 3), (s2, 2)):
        for i in range(n):
            put(store, make_image(study_uid=study, series_uid=series, instance_number=i + 1))
    store.set_series_state(s2, "settled", "test")
    c = store.counts()
    assert (c.studies, c.series, c.instances) == (1, 2, 5)
    assert c.bytes == sum(p.stat().st_size for p in store.root.glob("instances/*/*/*.dcm"))
    assert c.series_by_state == {"open": 1, "settled": 1}


def test_concurrent_copies_of_one_instance_are_stored_once(store):
    ds = make_image()
    others = [make_image(study_uid=ds.StudyInstanceUID, series_uid=ds.SeriesInstanceUID, instance_number=i + 2)
              for i in range(6)]
    tmps = [write(ds, store.new_tmp_path()) for _ in range(6)] + [write(o, store.new_tmp_path()) for o in others]
    results, errors = [], []
    barrier = threading.Barrier(len(tmps))

    def worker(tmp: Path) -> None:
        barrier.wait()
        try:
            results.append(store.store_received(tmp, "SCU"))
        except Exception as exc:  # noqa: BLE001 - any failure is reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in tmps]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    same = [r for r in results if r.sop_instance_uid == ds.SOPInstanceUID]
    assert sum(not r.duplicate for r in same) == 1 and len(same) == 6
    assert store.get_series(ds.SeriesInstanceUID).instance_count == 7
    assert list(store.tmp_dir.iterdir()) == []


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI", "ignore:The value length")
@pytest.mark.parametrize("bad", ["../../etc", "1.2.3/4", "", "1.2." + "9" * 70])
def test_malformed_uids_never_reach_a_path(store, bad):
    ds = make_image()
    ds.SeriesInstanceUID = bad
    tmp = write(ds, store.new_tmp_path())
    with pytest.raises(InvalidInstanceError):
        store.store_received(tmp, "SCU")
    assert store.counts().instances == 0
    assert list((store.root / "instances").iterdir()) == []


def test_not_dicom_is_invalid(store):
    tmp = store.new_tmp_path()
    tmp.write_bytes(b"not a dicom file")
    with pytest.raises(InvalidInstanceError):
        store.store_received(tmp, "SCU")


def test_database_failure_raises_store_error(tmp_path):
    (tmp_path / "db-is-a-folder").mkdir()
    s = Store(tmp_path / "data", tmp_path / "db-is-a-folder")
    with pytest.raises(StoreError, match="check"):
        s.ensure_schema()


def test_disk_failure_raises_store_error_and_leaves_no_row(store, monkeypatch):
    ds = make_image()

    def full(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_mod.os, "replace", full)
    tmp = write(ds, store.new_tmp_path())
    with pytest.raises(StoreError, match="free space"):
        store.store_received(tmp, "SCU")
    monkeypatch.undo()
    assert store.get_instance(ds.SOPInstanceUID) is None and store.get_series(ds.SeriesInstanceUID) is None
    # the temp file is left to the caller, who can retry with it
    assert store.store_received(tmp, "SCU").duplicate is False


def test_index_failure_after_rename_removes_the_unindexed_file(store, monkeypatch):
    ds = make_image()

    def broken(self, *a, **kw):
        # what SQLAlchemy raises when the driver fails (it wraps sqlite3's and psycopg's errors)
        raise sqlalchemy.exc.OperationalError("INSERT INTO instances", None,
                                              sqlite3.OperationalError("database is locked (simulated)"))

    monkeypatch.setattr(Store, "_index", broken)
    tmp = write(ds, store.new_tmp_path())
    with pytest.raises(StoreError):
        store.store_received(tmp, "SCU")
    assert not list(store.root.glob("instances/*/*/*.dcm"))
    assert store.counts().instances == 0


@pytest.mark.data
def test_real_ct_and_mr_files(store, cirs_dir):
    import shutil

    for modality in ("CT", "MR"):
        for src in sorted((cirs_dir / modality).glob("*.dcm"))[:3]:
            tmp = store.new_tmp_path()
            shutil.copyfile(src, tmp)
            assert not store.store_received(tmp, "PACS").duplicate
    series = store.list_series()
    assert sorted(s.modality for s in series) == ["CT", "MR"]
    assert all(s.instance_count == 3 for s in series)
    assert store.counts().studies == 2  # the phantom pair comes from two different studies


def _derived_series(n: int):
    study, series = generate_uid(prefix=UID_PREFIX), generate_uid(prefix=UID_PREFIX)
    return [make_image(study_uid=study, series_uid=series, modality="OT", sop_class="1.2.840.10008.5.1.4.1.1.7")
            for _ in range(n)]


def test_staged_series_is_invisible_until_published_in_one_transaction(store):
    datasets = _derived_series(5)
    series_uid = datasets[0].SeriesInstanceUID
    staged = store.stage("job-1-v1", datasets)
    assert len(staged.files) == 5 and all(p.parent == store.staging_dir / "job-1-v1" for p in staged.files)
    assert store.get_series(series_uid) is None  # staged: not indexed, not queryable
    seen = []

    def also(conn, stored):  # runs inside the transaction: the rows are there for it, not yet for others
        seen.append(conn.execute("SELECT COUNT(*) FROM instances WHERE series_uid = ?", (series_uid,)).fetchone()[0])
        # another connection of the pool: another node process's view
        seen.append(store.database.execute("SELECT COUNT(*) FROM instances WHERE series_uid = ?",
                                           (series_uid,)).fetchone()[0])

    stored = store.publish(staged, also)
    assert seen == [5, 0]
    assert len(stored) == 5 and all(r.path.exists() for r in stored)
    assert store.get_series(series_uid).instance_count == 5
    assert not (store.staging_dir / "job-1-v1").exists()
    again = store.publish(store.stage("job-1-v1", datasets))  # a re-run with the same UIDs: kept once
    assert all(r.duplicate for r in again) and store.get_series(series_uid).instance_count == 5


def test_interrupted_publish_leaves_nothing_visible_and_start_up_cleans_it(store):
    datasets = _derived_series(4)
    series_uid = datasets[0].SeriesInstanceUID

    def boom(conn, stored):
        raise RuntimeError("killed inside the transaction")

    with pytest.raises(RuntimeError):
        store.publish(store.stage("job-2-v1", datasets), boom)
    assert store.get_series(series_uid) is None
    assert not list(store.instances_dir.rglob("*.dcm")) and not (store.staging_dir / "job-2-v1").exists()

    # a process killed after moving the files, before the commit: only the manifest tells which files were moved
    staged = store.stage("job-3-v1", datasets)
    manifest = []
    for path in staged.files:
        ds = dcmread(path, stop_before_pixels=True)
        rel = store.relative_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        (store.root / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, store.root / rel)
        manifest.append(rel.as_posix())
    (staged.folder / store_mod.MANIFEST).write_text(json.dumps(manifest))
    (store.tmp_dir / "abc.part").write_bytes(b"half a C-STORE")
    assert store.clean_staging() == 1
    assert not list(store.instances_dir.rglob("*.dcm")), "unindexed moved files removed"
    assert not list(store.staging_dir.iterdir()) and not list(store.tmp_dir.iterdir())
    assert store.get_series(series_uid) is None
