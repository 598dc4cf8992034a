"""The store indexes from the header the intake check read, and renames only after the caller's fsync.

``Store.store_received(header=..., synced=...)`` is how the Storage SCP
stores an instance parsed once and fsynced while it was checked
(dicom_node/net/storage_scp.py); these pin what that must not change.
"""

from __future__ import annotations

import pytest
from dicom_helpers import make_image, write
from pydicom.uid import ImplicitVRLittleEndian

from dicom_node.dicom import validation
from dicom_node.index.store import Store, StoreError


@pytest.fixture
def store(tmp_path, db_location) -> Store:
    s = Store(tmp_path / "data", db_location)
    s.ensure_schema()
    return s


def test_header_of_the_check_indexes_what_a_fresh_read_does(store):
    # a value the check's header defers (over 64 KiB: implicit VR allows that length) is read from the
    # file before it moves
    long_description = "X" * (70 * 1024)
    ds = make_image(StudyDescription=long_description, SeriesDescription="AX", ImagesInAcquisition=7)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    tmp = write(ds, store.new_tmp_path())
    intake = validation.check_instance(tmp, ds.SOPClassUID, ds.SOPInstanceUID)
    assert intake.problem is None and intake.header is not None
    assert intake.header.get_item("StudyDescription", keep_deferred=True).value is None  # deferred: not read yet
    result = store.store_received(tmp, "MODALITY", header=intake.header)
    assert not result.duplicate and result.path.is_file() and not tmp.exists()
    series = store.get_series(ds.SeriesInstanceUID)
    assert series.study_description == long_description
    assert (series.series_description, series.announced_count, series.patient_id) == ("AX", 7, "TEST-PATIENT")
    (inst,) = store.instances(ds.SeriesInstanceUID)
    assert (inst.rows, inst.columns, inst.size_bytes) == (16, 16, result.path.stat().st_size)


def test_refused_or_deflated_files_hand_no_header_to_the_store(tmp_path):
    ds = make_image()
    path = write(ds, tmp_path / "a.dcm")
    refused = validation.check_instance(path, ds.SOPClassUID, "1.2.3.4")  # not the command's instance UID
    assert refused.problem is not None and refused.header is None


def test_rename_waits_for_the_callers_fsync(store):
    ds = make_image()
    tmp = write(ds, store.new_tmp_path())
    final = store.root / store.relative_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    seen = []

    def synced() -> int:
        seen.append((tmp.exists(), final.exists()))
        return store.sync_file(tmp)

    result = store.store_received(tmp, "MODALITY", synced=synced)
    assert seen == [(True, False)]  # asked for before anything was moved
    assert result.path == final and final.is_file()


def test_a_failed_fsync_stores_nothing(store):
    ds = make_image()
    tmp = write(ds, store.new_tmp_path())

    def synced() -> int:
        raise OSError(5, "Input/output error (simulated)")

    with pytest.raises(StoreError, match="free space"):
        store.store_received(tmp, "MODALITY", synced=synced)
    assert store.get_instance(ds.SOPInstanceUID) is None and not list(store.root.glob("instances/*/*/*.dcm"))
