"""Settling and pairing rules, with a real store (SQLite + files) and tiny datasets."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_node.config import parse_config
from dicom_node.index.store import Store
from dicom_node.workflow.jobs import JobQueue
from dicom_node.workflow.pairing import Pairing
from dicom_node.workflow.settle import Settler

SOP = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4", "PT": "1.2.840.10008.5.1.4.1.1.128"}


def _series(store: Store, modality: str, n: int, *, study: str, patient: str, description: str = "",
            announced: int | None = None) -> str:
    series_uid = generate_uid()
    for k in range(n):
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SOP[modality]
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.PatientID = study, series_uid, patient
        ds.PatientName, ds.Modality, ds.SeriesDescription, ds.InstanceNumber = "X^Y", modality, description, k + 1
        if announced:
            ds.ImagesInAcquisition = announced
        ds.Rows = ds.Columns = 4
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.zeros((4, 4), np.uint16).tobytes()
        store.store_dataset(ds, origin="received")
    return series_uid


class _Sweep:
    """Settle then pair, as the node's sweep does (``Node.sweep``), on one store."""

    def __init__(self, settings, store, jobs):
        self.settler, self.pairing = Settler(settings, store), Pairing(settings, store, jobs)
        self.trigger, self.settle_due = self.settler.trigger, self.settler.settle_due
        self.pair_settled = self.pairing.pair_settled

    def sweep(self, now=None):
        self.settle_due(now)
        return self.pair_settled(now)


@pytest.fixture
def node(tmp_path):
    def make(match="study", timeout=3600.0, quiet=30.0, overlay_desc=""):
        settings = parse_config({
            "settle": {"quiet_seconds": quiet},
            "pipelines": [{"name": "ct-mr", "match": match, "partner_timeout_s": timeout,
                           "base": {"modality": ["CT"], "min_instances": 3},
                           "overlay": {"modality": ["MR"], "description": overlay_desc, "min_instances": 3}}],
        })
        store = Store(tmp_path / "data", tmp_path / "node.sqlite")
        store.ensure_schema()
        jobs = JobQueue(tmp_path / "node.sqlite")
        jobs.ensure_schema()
        return store, jobs, _Sweep(settings, store, jobs)

    return make


def test_quiet_period_settles_and_pairs_same_study(node):
    store, jobs, pairing = node()
    ct = _series(store, "CT", 4, study="1.1", patient="P")
    mr = _series(store, "MR", 5, study="1.1", patient="P")
    last = store.get_series(mr).last_received
    assert pairing.sweep(now=last + 10) == []  # still inside the quiet period
    assert store.get_series(ct).state == "open"
    new = pairing.sweep(now=last + 31)
    assert len(new) == 1
    job = jobs.get(new[0])
    assert (job.base_series_uid, job.overlay_series_uid) == (ct, mr)
    assert store.get_series(ct).state == store.get_series(mr).state == "paired"


def test_announced_count_settles_early(node):
    store, _, pairing = node()
    ct = _series(store, "CT", 3, study="1.1", patient="P", announced=4)
    pairing.settle_due(now=store.get_series(ct).last_received + 1)
    assert store.get_series(ct).state == "open"  # 3 of 4
    _series_more = _series(store, "CT", 4, study="1.1", patient="P", announced=4)
    pairing.settle_due(now=store.get_series(_series_more).last_received + 1)
    s = store.get_series(_series_more)
    assert s.state == "settled" and "announced" in s.state_reason


def test_different_studies_do_not_pair_by_study_but_do_by_rule(node, tmp_path):
    store, jobs, pairing = node(match="study")
    _series(store, "CT", 4, study="1.1", patient="P1")
    mr = _series(store, "MR", 4, study="2.2", patient="P2")
    t = store.get_series(mr).last_received + 60
    assert pairing.sweep(now=t) == []
    # the CIRS phantom case: two patient IDs, two studies - an explicit rule pairs them
    store2, jobs2, pairing2 = node(match="rule")
    assert len(pairing2.sweep(now=t)) == 1


def test_selector_description_and_min_instances(node):
    store, _, pairing = node(overlay_desc="^T2")
    _series(store, "CT", 4, study="1.1", patient="P")
    flair = _series(store, "MR", 4, study="1.1", patient="P", description="FLAIR AX")
    scout = _series(store, "MR", 2, study="1.1", patient="P", description="T2 scout")
    t = store.get_series(scout).last_received + 60
    assert pairing.sweep(now=t) == []
    assert store.get_series(flair).state == "unmatched" and "no pipeline" in store.get_series(flair).state_reason
    assert store.get_series(scout).state == "unmatched"


def test_partner_that_never_comes_times_out(node):
    store, jobs, pairing = node(timeout=100)
    ct = _series(store, "CT", 4, study="1.1", patient="P")
    t = store.get_series(ct).last_received + 60
    pairing.sweep(now=t)
    assert store.get_series(ct).state == "settled"
    settled_at = store.get_series(ct).state_changed
    pairing.sweep(now=settled_at + 50)
    assert store.get_series(ct).state == "settled"
    pairing.sweep(now=settled_at + 101)
    s = store.get_series(ct)
    assert s.state == "timed_out" and "no partner" in s.state_reason and jobs.list() == []


def test_settling_twice_makes_one_job_and_new_slices_make_a_new_one(node):
    store, jobs, pairing = node()
    ct = _series(store, "CT", 4, study="1.1", patient="P")
    mr = _series(store, "MR", 4, study="1.1", patient="P")
    t = store.get_series(mr).last_received + 60
    assert len(pairing.sweep(now=t)) == 1
    pairing.trigger(ct)  # settles again, same inputs
    pairing.trigger(mr)
    assert pairing.pair_settled(now=t + 1) == []
    assert len(jobs.list()) == 1
    with pytest.raises(KeyError):
        pairing.trigger("9.9.9")
