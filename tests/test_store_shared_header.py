"""The store indexes from the header the intake check read, and renames only after the caller's fsync.

``Store.store_received(header=..., synced=...)`` is how the Storage SCP
stores an instance parsed once and fsynced while it was checked
(dicom_node/net/storage_scp.py); these pin what that must not change.
"""

from __future__ import annotations

import pytest
from dicom_helpers import make_image, write
from pydicom import dcmread
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_node.dicom import validation
from dicom_node.index import store as store_mod
from dicom_node.index.store import INDEXED_KEYWORDS, Store, StoreError


@pytest.fixture
def store(tmp_path, db_location) -> Store:
    s = Store(tmp_path / "data", db_location)
    s.ensure_schema()
    return s


def _check(path, ds):
    return validation.check_instance(path, ds.SOPClassUID, ds.SOPInstanceUID, keywords=INDEXED_KEYWORDS)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian])
def test_header_of_the_check_holds_what_the_index_reads(tmp_path, syntax):
    # the check reads only some values (at the walked offsets); they must be what dcmread gives, charset included
    ds = make_image(StudyDescription="Kopf \xe4\xf6\xfc", SeriesDescription="AX", ImagesInAcquisition=7,
                    BodyPartExamined="HEAD", SeriesNumber=3, instance_number=12)
    ds.PatientName = "M\xfcller^J\xf6rg"
    ds.file_meta.TransferSyntaxUID = syntax
    path = write(ds, tmp_path / "a.dcm")
    intake = _check(path, ds)
    assert intake.problem is None and intake.header is not None
    full = dcmread(path, stop_before_pixels=True)
    assert store_mod._index_values(intake.header) == store_mod._index_values(full)
    assert store_mod._index_values(full)["patient_name"] == "M\xfcller^J\xf6rg"
    assert intake.header.file_meta.TransferSyntaxUID == syntax


@pytest.mark.data
def test_header_of_the_check_holds_what_the_index_reads_real_ct(cirs_dir):
    for path in sorted((cirs_dir / "CT").iterdir())[:3]:
        full = dcmread(path, stop_before_pixels=True)
        intake = _check(path, full)
        assert intake.problem is None and intake.header is not None
        assert store_mod._index_values(intake.header) == store_mod._index_values(full)


def test_store_from_the_checks_header_indexes_like_a_fresh_read(store):
    rows = []
    for header in (True, False):
        ds = make_image(StudyDescription="HEAD", SeriesDescription="AX", ImagesInAcquisition=7)
        tmp = write(ds, store.new_tmp_path())
        intake = _check(tmp, ds)
        result = store.store_received(tmp, "MODALITY", header=intake.header if header else None)
        assert not result.duplicate and result.path.is_file() and not tmp.exists()
        series = store.get_series(ds.SeriesInstanceUID)
        (inst,) = store.instances(ds.SeriesInstanceUID)
        rows.append((series.study_description, series.series_description, series.announced_count,
                     series.patient_id, series.patient_name, inst.rows, inst.columns, inst.transfer_syntax_uid))
    assert rows[0] == rows[1] and rows[0][0] == "HEAD"


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


def test_the_index_reads_only_the_keywords_it_declares():
    """A new index column whose keyword is missing from INDEXED_KEYWORDS would be NULL for every
    received instance (the intake check's header holds only those): every keyword the index
    reads must be declared."""
    from pydicom.dataset import Dataset

    from dicom_node.index.store import INDEXED_KEYWORDS, _index_values

    class Recording(Dataset):
        read: set[str] = set()

        def get(self, key, default=None):  # type: ignore[override]  # records, then answers as a Dataset does
            if isinstance(key, str):
                Recording.read.add(key)
            return super().get(key, default)

    _index_values(Recording())
    assert Recording.read and Recording.read <= INDEXED_KEYWORDS, Recording.read - INDEXED_KEYWORDS
