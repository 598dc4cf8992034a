"""Retention: every rule with an eligible and an ineligible case, on a real store, job queue and outbox in one database.

Series are stored through the store's own path, jobs move through the real
queue, outbox rows are really sent to an in-process Storage SCP (sent) or
fail against a closed port (pending, dead); only the clock (``now``) and, for
the watermark, the disk measurement are chosen by the test.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from dicom_helpers import make_image
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
from test_outbox import PynetdicomPeer, _free_port

from dicom_node.config import (
    DicomDestination,
    NodeConfig,
    NodeSettings,
    OutboxConfig,
    RetentionConfig,
    StorageConfig,
)
from dicom_node.index.disk import DiskSpace
from dicom_node.index.store import Store
from dicom_node.outbox import Outbox
from dicom_node.workflow.jobs import JobQueue, input_key
from dicom_node.workflow.retention import DAY_S, Retention

STUDY = "1.2.826.0.1.3680043.8.498.4242"


class World:
    """A node's database parts, a reachable peer ("pacs") and an unreachable one ("down")."""

    def __init__(self, tmp_path: Path, peer: PynetdicomPeer, **retention) -> None:
        self.settings = NodeSettings(
            node=NodeConfig(ae_title="FUSIONTEST", network_timeout_s=5),
            storage=StorageConfig(root=tmp_path / "data"),
            destinations=[DicomDestination(name="pacs", ae_title="DEST", host="127.0.0.1", port=peer.port),
                          DicomDestination(name="down", ae_title="DOWN", host="127.0.0.1", port=_free_port())],
            outbox=OutboxConfig(backoff_initial_s=1000, max_attempts=2),
            retention=RetentionConfig(**retention))
        db = self.settings.storage.database_path
        self.store = Store(self.settings.storage.root, db)
        self.store.ensure_schema()
        self.jobs = JobQueue(db)
        self.jobs.ensure_schema()
        self.outbox = Outbox(db, self.settings)

    def series(self, n: int = 3, *, state: str = "paired", origin: str = "received", modality: str = "CT",
               size: int = 16) -> tuple[str, list]:
        uid = make_image().SeriesInstanceUID
        results = []
        for i in range(n):
            ds = make_image(series_uid=uid, study_uid=STUDY, instance_number=i + 1, modality=modality,
                            rows=size, columns=size)
            results.append(self.store.store_dataset(ds, origin=origin))
        if origin == "received" and state != "open":
            assert self.store.set_series_state(uid, state, "test")
        return str(uid), results

    def job(self, base: str, overlay: str, state: str) -> int:
        job_id, _ = self.jobs.enqueue(input_key("p", [base], [overlay]), "p", base, overlay)
        if state == "queued":
            return job_id
        job = self.jobs.claim()
        assert job is not None and job.id == job_id
        if state == "done":
            self.jobs.finish(job_id, {"ok": True})
        elif state == "failed":
            self.jobs.fail(job_id, "boom")
        return job_id

    def fused(self, base: str, overlay: str, *, delivered: bool | str = True) -> tuple[int, str]:
        """A done job with its derived series queued; ``delivered``: True = sent, "pending", "dead"."""
        job_id = self.job(base, overlay, "done")
        uid, results = self.series(2, origin="derived", modality="OT")
        self.outbox.enqueue("pacs" if delivered is True else "down", results, job_id=job_id)
        self.outbox.process_due()
        if delivered == "dead":
            self.outbox.process_due(now=time.time() + 5000)
        return job_id, uid

    def verdicts(self, days: float, **kw) -> dict[str, object]:
        return {v.series_uid: v for v in Retention(self.settings, self.store, **kw).verdicts(
            time.time() + days * DAY_S)}


@pytest.fixture
def peer():
    p = PynetdicomPeer()
    yield p
    p.close()


def test_fused_and_delivered_goes_after_its_age_limit(tmp_path, peer):
    w = World(tmp_path, peer)
    ct, _ = w.series()
    mr, _ = w.series(modality="MR")
    _, derived = w.fused(ct, mr)
    young, old = w.verdicts(6), w.verdicts(8)
    for uid in (ct, mr, derived):
        assert young[uid].eligible_by_state and not young[uid].purge and "kept until 7 days" in young[uid].reason
        assert old[uid].purge, old[uid].reason
    assert "fused (job(s)" in old[ct].reason and old[derived].reason.startswith("derived and delivered")


@pytest.mark.parametrize("how", ["pending", "dead"])
def test_fusion_not_delivered_keeps_inputs_and_outputs(tmp_path, peer, how):
    w = World(tmp_path, peer)
    ct, _ = w.series()
    mr, _ = w.series(modality="MR")
    _, derived = w.fused(ct, mr, delivered=how)
    assert {i.state for i in w.outbox.list()} == {how}
    v = w.verdicts(365)
    assert not v[ct].purge and "not yet delivered" in v[ct].reason
    assert not v[derived].purge and "outbox item(s) not yet delivered" in v[derived].reason


@pytest.mark.parametrize("state", ["queued", "running"])
def test_a_pending_job_keeps_its_series(tmp_path, peer, state):
    w = World(tmp_path, peer)
    ct, _ = w.series()
    mr, _ = w.series(modality="MR")
    job_id = w.job(ct, mr, state)
    v = w.verdicts(365)
    for uid in (ct, mr):
        assert not v[uid].eligible_by_state and f"job(s) [{job_id}] queued or running" in v[uid].reason
    # even a disk below the watermark does not make them eligible
    full = Retention(w.settings, w.store, space=lambda: DiskSpace(100, 1)).purge(time.time() + 365 * DAY_S)
    assert not full.purged and full.below_watermark


@pytest.mark.parametrize("state", ["unmatched", "timed_out"])
def test_never_fused_goes_after_its_own_limit(tmp_path, peer, state):
    w = World(tmp_path, peer)
    uid, _ = w.series(state=state)
    assert not w.verdicts(8)[uid].purge, "7 days is the fused limit, not this one"
    assert w.verdicts(15)[uid].purge and f"never fused ({state})" in w.verdicts(15)[uid].reason


def test_failed_job_inputs_count_as_never_fused(tmp_path, peer):
    w = World(tmp_path, peer)
    ct, _ = w.series()
    mr, _ = w.series(modality="MR")
    w.job(ct, mr, "failed")
    assert not w.verdicts(8)[ct].purge
    assert w.verdicts(15)[ct].purge and "failed" in w.verdicts(15)[ct].reason


@pytest.mark.parametrize("state", ["open", "settled"])
def test_open_and_settled_series_are_never_purged(tmp_path, peer, state):
    w = World(tmp_path, peer)
    uid, _ = w.series(state=state)
    v = w.verdicts(1000)[uid]
    assert not v.eligible_by_state and state in v.reason


def test_a_received_instance_still_queued_for_sending_keeps_its_series(tmp_path, peer):
    w = World(tmp_path, peer)
    uid, results = w.series(state="unmatched")
    w.outbox.enqueue("down", results[:1])
    assert not w.verdicts(1000)[uid].purge
    w.outbox.retry()  # still pending: kept
    assert "1 outbox item(s) not yet delivered" in w.verdicts(1000)[uid].reason


def test_purge_deletes_rows_and_files_dry_run_deletes_nothing(tmp_path, peer):
    w = World(tmp_path, peer)
    ct, ct_files = w.series()
    mr, _ = w.series(modality="MR")
    _, derived = w.fused(ct, mr)
    keep, _ = w.series(state="settled")
    paths = [w.store.root / r.path for r in ct_files] if not Path(ct_files[0].path).is_absolute() else \
        [Path(r.path) for r in ct_files]
    assert all(p.is_file() for p in paths)
    r = Retention(w.settings, w.store)
    later = time.time() + 8 * DAY_S
    dry = r.purge(later, dry_run=True)
    assert {v.series_uid for v in dry.purged} == {ct, mr, derived} and keep in {v.series_uid for v in dry.kept}
    assert all(p.is_file() for p in paths) and w.store.get_series(ct) is not None
    done = r.purge(later)
    assert {v.series_uid for v in done.purged} == {ct, mr, derived} and done.bytes_purged > 0
    assert not any(p.exists() for p in paths) and not paths[0].parent.exists()
    for uid in (ct, mr, derived):
        assert w.store.get_series(uid) is None and not w.store.instances(uid)
    assert w.store.get_series(keep) is not None, "the study stays while a series of it remains"
    assert not [i for i in w.outbox.list() if i.series_uid == derived], "sent rows of purged instances go too"
    assert w.jobs.list()[0].state == "done", "the job record is history and stays"


def test_watermark_purges_oldest_eligible_until_enough_is_free(tmp_path, peer):
    w = World(tmp_path, peer, min_free_percent=50.0, reserve_free_percent=1.0)
    first, _ = w.series(state="unmatched", size=64)
    time.sleep(0.02)
    second, _ = w.series(state="timed_out", size=64)
    time.sleep(0.02)
    busy, _ = w.series(state="settled", size=64)
    one = w.store.instances(first)[0].size_bytes * 3
    # 100 000-byte disk, free just below the 50 % watermark by less than one series
    space = DiskSpace(100_000, 50_000 - one // 2)
    report = Retention(w.settings, w.store, space=lambda: space).purge()
    assert report.below_watermark
    assert [v.series_uid for v in report.purged] == [first], "oldest first, and only as much as needed"
    assert "disk below retention.min_free_percent" in report.purged[0].reason
    kept = {v.series_uid: v for v in report.kept}
    assert "enough space freed" in kept[second].reason and not kept[busy].eligible_by_state
    # far below: every eligible series goes, never the settled one
    report = Retention(w.settings, w.store, space=lambda: DiskSpace(100_000, 10)).purge()
    assert [v.series_uid for v in report.purged] == [second]
    assert w.store.get_series(busy) is not None


def test_below_the_reserve_c_store_is_refused_with_out_of_resources(tmp_path):
    from dicom_helpers import RunningSCP

    from dicom_node.index.disk import DiskGuard, disk_space
    from dicom_node.net.listener import Listener
    from dicom_node.net.storage_scp import StorageService

    free = disk_space(tmp_path).free_percent
    for reserve, expect in ((100.0, 0xA700), (max(0.0, free - 5), 0x0000)):
        cfg = NodeSettings(node=NodeConfig(ae_title="FUSIONTEST", host="127.0.0.1", port=0),
                           storage=StorageConfig(root=tmp_path / f"data{reserve:g}"),
                           retention=RetentionConfig(min_free_percent=100.0, reserve_free_percent=reserve))
        store = Store(cfg.storage.root, cfg.storage.database_path)
        scp = RunningSCP.__new__(RunningSCP)
        scp.cfg, scp.store = cfg, store
        scp.listener = Listener(cfg, [StorageService(store, cfg.limits, DiskGuard(cfg.storage.root, cfg.retention))]).start()
        try:
            ae = AE(ae_title="SCANNER")
            ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
            assoc = ae.associate("127.0.0.1", scp.port, ae_title="FUSIONTEST")
            ds = make_image()
            status = assoc.send_c_store(ds).Status
            assoc.release()
        finally:
            scp.stop()
        assert status == expect, (reserve, hex(status))
        assert (store.get_instance(str(ds.SOPInstanceUID)) is None) == (expect == 0xA700)


def test_cli_purge_dry_run_and_purge(tmp_path, capsys):
    from dicom_node.cli import main
    from dicom_node.config import load_config

    (tmp_path / "node.toml").write_text('[storage]\nroot = "data"\n[retention]\nunfused_max_age_days = 0\n')
    settings = load_config(tmp_path / "node.toml")
    store = Store(settings.storage.root, settings.storage.database_path)
    store.ensure_schema()
    gone = store.store_dataset(make_image(), origin="received")
    kept = store.store_dataset(make_image(), origin="received")
    store.set_series_state(gone.series_uid, "unmatched", "test")
    cfg = ["--config", str(tmp_path / "node.toml")]
    assert main(["purge", "--dry-run", "--explain", *cfg]) == 0
    out = capsys.readouterr().out
    assert f"would purge: received unmatched {gone.series_uid} 1 instance(s)" in out and "never fused" in out
    assert f"keep: received open      {kept.series_uid}" in out and "would purge 1 series" in out
    assert store.get_series(gone.series_uid) is not None
    assert main(["purge", *cfg]) == 0
    assert "purged 1 series" in capsys.readouterr().out
    assert store.get_series(gone.series_uid) is None and store.get_series(kept.series_uid) is not None
