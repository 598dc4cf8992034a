"""Query/Retrieve SCP (C-FIND, C-GET, C-MOVE) against a pynetdicom SCU, with a real store and listener.

One node per module: its store holds four patients in three character sets,
source and derived series, a big-endian and an RLE-compressed instance.  A
pynetdicom Storage SCP plays the C-MOVE destination configured in the node.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from dicom_helpers import UID_PREFIX, RunningSCP, make_image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    PositronEmissionTomographyImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import AE, build_role, evt
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import (
    CTImageStorage,
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from dicom_node.config import ConfigError, DicomDestination, NodeSettings, parse_config
from dicom_node.index.store import Store
from dicom_node.net import query_retrieve as qr
from dicom_node.net import statuses

SCP_AE = "FUSIONNODE"
SCU_AE = "QRSCU"
DEST_AE = "MOVEDEST"

PATIENT_FIND, STUDY_FIND = PatientRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelFind
PATIENT_GET, STUDY_GET = PatientRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelGet
PATIENT_MOVE, STUDY_MOVE = PatientRootQueryRetrieveInformationModelMove, StudyRootQueryRetrieveInformationModelMove

MUELLER = "Müller^Jörg"
GREEK = "Ελληνικά^Δοκιμή"
YAMADA = "Yamada^Tarou=山田^太郎=やまだ^たろう"


# -- the node and its data -----------------------------------------------------------------


class Catalog:
    """What the module's store holds, by name."""

    def __init__(self) -> None:
        self.studies: dict[str, str] = {}
        self.series: dict[str, str] = {}
        self.instances: dict[str, list[str]] = {}  # series name -> SOP Instance UIDs
        self.pixels: dict[str, np.ndarray] = {}  # SOP Instance UID -> pixel values


def _put(store: Store, ds: Dataset, origin: str = "received") -> None:
    if origin == "derived":
        store.store_dataset(ds, origin="derived")
        return
    tmp = store.new_tmp_path(".dcm")
    ds.save_as(tmp, enforce_file_format=True)
    store.store_received(tmp, "MODALITY")


def _fill(store: Store) -> Catalog:
    cat = Catalog()

    def series(name: str, study: str, patient: dict, modality: str, n: int, *, sop_class=CTImageStorage,
               number: int = 1, origin: str = "received", **extra) -> None:
        uid = cat.series.setdefault(name, generate_uid(UID_PREFIX))
        cat.instances[name] = []
        for k in range(n):
            ds = make_image(study_uid=cat.studies[study], series_uid=uid, sop_class=sop_class, modality=modality,
                            instance_number=k + 1, **patient, SeriesNumber=number, **extra)
            cat.instances[name].append(ds.SOPInstanceUID)
            cat.pixels[ds.SOPInstanceUID] = ds.pixel_array.copy()
            _put(store, ds, origin)

    for name in ("A", "A2", "B", "C", "D"):
        cat.studies[name] = generate_uid(UID_PREFIX)
    mueller = dict(patient_id="PID-MUELLER", PatientName=MUELLER, SpecificCharacterSet="ISO_IR 100",
                   PatientSex="M", PatientBirthDate="19600229")
    greek = dict(patient_id="PID-GREEK", PatientName=GREEK, SpecificCharacterSet="ISO_IR 192", PatientSex="F")
    yamada = dict(patient_id="PID-YAMADA", PatientName=YAMADA, SpecificCharacterSet=["", "ISO 2022 IR 87"])
    codec = dict(patient_id="PID-CODEC", PatientName="Codec^Test")

    study_a = dict(StudyDate="20240115", StudyTime="093000", StudyDescription="Kopf CT", AccessionNumber="ACC-A")
    series("A-CT", "A", mueller, "CT", 3, number=1, SeriesDescription="Schädel nativ", **study_a)
    series("A-MR", "A", mueller, "MR", 2, sop_class=MRImageStorage, number=2, SeriesDescription="T1", **study_a)
    series("A-FUSED", "A", mueller, "OT", 2, sop_class=SecondaryCaptureImageStorage, number=901, origin="derived",
           SeriesDescription="FUSED MR on CT", **study_a)
    series("A2-CT", "A2", mueller, "CT", 1, StudyDate="20250301", StudyTime="080000", AccessionNumber="ACC-A2")
    series("B-PT", "B", greek, "PT", 2, sop_class=PositronEmissionTomographyImageStorage, StudyDate="20240615",
           StudyTime="141500", StudyDescription="Εγκέφαλος", AccessionNumber="ACC-B")
    series("C-MR", "C", yamada, "MR", 1, sop_class=MRImageStorage, StudyDate="20231231", StudyTime="235959",
           StudyDescription="頭部MRI", AccessionNumber="ACC-C")

    # study D: one big-endian and one RLE instance, for transfer syntax conversion
    cat.series["D-BE"], cat.series["D-RLE"] = generate_uid(UID_PREFIX), generate_uid(UID_PREFIX)
    be = make_image(study_uid=cat.studies["D"], series_uid=cat.series["D-BE"], **codec, StudyDate="20220101",
                    SeriesNumber=1)
    arr = be.pixel_array.copy()
    be.PixelData = arr.astype(">u2").tobytes()
    be.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    tmp = store.new_tmp_path(".dcm")
    be.save_as(tmp, enforce_file_format=True, little_endian=False, implicit_vr=False)
    assert np.array_equal(dcmread(tmp).pixel_array, arr)
    store.store_received(tmp, "MODALITY")
    cat.instances["D-BE"], cat.pixels[be.SOPInstanceUID] = [be.SOPInstanceUID], arr

    rle = make_image(study_uid=cat.studies["D"], series_uid=cat.series["D-RLE"], **codec, StudyDate="20220101",
                     SeriesNumber=2)
    arr = rle.pixel_array.copy()
    rle.compress(RLELossless, generate_instance_uid=False)
    _put(store, rle)
    cat.instances["D-RLE"], cat.pixels[rle.SOPInstanceUID] = [rle.SOPInstanceUID], arr
    return cat


class Received:
    """A pynetdicom Storage SCP: the C-MOVE destination."""

    def __init__(self) -> None:
        self.datasets: list[Dataset] = []
        self.originators: list[str] = []
        self.lock = threading.Lock()

    def on_store(self, event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self.lock:
            self.datasets.append(ds)
            self.originators.append(str(event.request.MoveOriginatorApplicationEntityTitle or "").strip())
        return 0x0000

    def uids(self) -> set[str]:
        with self.lock:
            return {str(d.SOPInstanceUID) for d in self.datasets}

    def clear(self) -> None:
        with self.lock:
            self.datasets.clear()
            self.originators.clear()


@pytest.fixture(scope="module")
def destination():
    received = Received()
    ae = AE(ae_title=DEST_AE)
    for sop in (CTImageStorage, MRImageStorage, PositronEmissionTomographyImageStorage, SecondaryCaptureImageStorage):
        ae.add_supported_context(sop, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, received.on_store)])
    received.port = server.server_address[1]
    yield received
    server.shutdown()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def node(request, tmp_path_factory, destination):
    """The Q/R SCP on each engine: its matching must answer alike on the SQLite file and PostgreSQL."""
    root = tmp_path_factory.mktemp("qr")
    url = request.getfixturevalue("postgres_server").create_database() if request.param == "postgresql" else ""
    cfg = parse_config({
        "node": {"ae_title": SCP_AE, "host": "127.0.0.1", "port": 0, "network_timeout_s": 10.0},
        "storage": {"root": str(root / "data"), "database_url": url},
        "destinations": [{"name": "workstation", "ae_title": DEST_AE, "host": "127.0.0.1", "port": destination.port}],
        "query_retrieve": {"allowed_callers": [SCU_AE], "allowed_addresses": ["127.0.0.1"]},  # Q/R is deny-by-default
    })
    store = Store(cfg.storage.root, cfg.storage.database_location)
    store.ensure_schema()
    catalog = _fill(store)
    server = RunningSCP(cfg, store, query_retrieve=True)
    server.catalog = catalog
    yield server
    server.stop()


# -- SCU helpers ---------------------------------------------------------------------------


def query(**keys) -> Dataset:
    ds = Dataset()
    for keyword, value in keys.items():
        setattr(ds, keyword, None if value == "" else value)  # empty = universal matching
    return ds


def c_find(node, ds: Dataset, model=STUDY_FIND) -> tuple[int, list[Dataset], Dataset]:
    """(final status, pending identifiers, final status dataset)."""
    ae = AE(ae_title=SCU_AE)
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=SCP_AE)
    assert assoc.is_established
    try:
        answers, final = [], None
        for status, identifier in assoc.send_c_find(ds, model):
            assert "Status" in status, "no C-FIND response"
            if status.Status in (0xFF00, 0xFF01):
                answers.append(identifier)
            else:
                final = status
        return int(final.Status), answers, final
    finally:
        assoc.release()


def raw_answers(node, ds: Dataset, model=STUDY_FIND) -> list[bytes]:
    """The identifiers of the pending C-FIND responses as they came over the wire."""
    raw: list[bytes] = []

    def on_recv(event) -> None:
        msg = event.message
        if type(msg).__name__ == "C_FIND_RSP" and msg.data_set is not None and msg.data_set.getvalue():
            raw.append(msg.data_set.getvalue())

    ae = AE(ae_title=SCU_AE)
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=SCP_AE, evt_handlers=[(evt.EVT_DIMSE_RECV, on_recv)])
    assert assoc.is_established
    try:
        statuses = [int(status.Status) for status, _ in assoc.send_c_find(ds, model)]
    finally:
        assoc.release()
    assert statuses[-1] == 0x0000 and len(raw) == len(statuses) - 1
    return raw


def find_ok(node, model=STUDY_FIND, **keys) -> list[Dataset]:
    status, answers, final = c_find(node, query(**keys), model)
    assert status == 0x0000, f"0x{status:04X} {final.get('ErrorComment')}"
    return answers


class Getter:
    """A C-GET SCU that keeps what arrives, raw bytes included."""

    def __init__(self, storage_syntaxes=(ExplicitVRLittleEndian, ImplicitVRLittleEndian), cancel_after: int = 0):
        self.datasets: list[Dataset] = []
        self.raw: dict[str, bytes] = {}
        self.syntaxes: dict[str, str] = {}
        self.cancel_after = cancel_after
        self.storage_syntaxes = list(storage_syntaxes)
        self.assoc = None

    def on_store(self, event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        uid = str(ds.SOPInstanceUID)
        self.datasets.append(ds)
        self.syntaxes[uid] = str(event.context.transfer_syntax)
        try:
            path = event.dataset_path  # pynetdicom wrote it to a file (the node switches that on globally)
            _, offset = split_dataset(Path(path))
            self.raw[uid] = Path(path).read_bytes()[offset:]
        except AttributeError:
            self.raw[uid] = event.request.DataSet.getvalue()
        if self.cancel_after and len(self.datasets) == self.cancel_after:
            self.assoc.send_c_cancel(1, query_model=self.model)
        return 0x0000

    def run(self, node, ds: Dataset, model=STUDY_GET) -> tuple[Dataset, list[Dataset]]:
        self.model = model
        ae = AE(ae_title=SCU_AE)
        ae.add_requested_context(model)
        sops = (CTImageStorage, MRImageStorage, PositronEmissionTomographyImageStorage, SecondaryCaptureImageStorage)
        for sop in sops:  # one context per transfer syntax, so that each one the node takes is usable
            for ts in self.storage_syntaxes:
                ae.add_requested_context(sop, ts)
        roles = [build_role(sop, scp_role=True) for sop in sops]
        self.assoc = ae.associate("127.0.0.1", node.port, ae_title=SCP_AE, ext_neg=roles,
                                  evt_handlers=[(evt.EVT_C_STORE, self.on_store)])
        assert self.assoc.is_established
        try:
            responses = [status for status, _ in self.assoc.send_c_get(ds, model)]
        finally:
            self.assoc.release()
        assert responses and "Status" in responses[-1]
        return responses[-1], responses


def c_move(node, ds: Dataset, dest: str = DEST_AE, model=STUDY_MOVE) -> Dataset:
    ae = AE(ae_title=SCU_AE)
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=SCP_AE)
    assert assoc.is_established
    try:
        responses = [status for status, _ in assoc.send_c_move(ds, dest, model)]
    finally:
        assoc.release()
    assert responses and "Status" in responses[-1]
    return responses[-1]


def stored_bytes(node, sop_uid: str) -> bytes:
    inst = node.store.get_instance(sop_uid)
    _, offset = split_dataset(inst.path)
    return inst.path.read_bytes()[offset:]


# -- conformance constants ---------------------------------------------------------------


def test_constants_name_both_roots_and_the_statuses():
    assert qr.FIND_SOP_CLASSES == ("1.2.840.10008.5.1.4.1.2.1.1", "1.2.840.10008.5.1.4.1.2.2.1")
    assert qr.GET_SOP_CLASSES == ("1.2.840.10008.5.1.4.1.2.1.3", "1.2.840.10008.5.1.4.1.2.2.3")
    assert qr.MOVE_SOP_CLASSES == ("1.2.840.10008.5.1.4.1.2.1.2", "1.2.840.10008.5.1.4.1.2.2.2")
    assert {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"} <= set(qr.QR_TRANSFER_SYNTAXES)
    assert (statuses.PENDING, statuses.CANCEL, statuses.MOVE_DESTINATION_UNKNOWN,
            statuses.DOES_NOT_MATCH_SOP_CLASS, statuses.SUBOPS_WARNING) == (0xFF00, 0xFE00, 0xA801, 0xA900, 0xB000)


# -- C-FIND: levels ------------------------------------------------------------------------


def test_patient_root_patient_level_with_counts(node):
    answers = find_ok(node, PATIENT_FIND, QueryRetrieveLevel="PATIENT", PatientID="", PatientName="",
                      NumberOfPatientRelatedStudies="", NumberOfPatientRelatedInstances="")
    by_id = {a.PatientID: a for a in answers}
    assert set(by_id) == {"PID-MUELLER", "PID-GREEK", "PID-YAMADA", "PID-CODEC"}
    assert by_id["PID-MUELLER"].NumberOfPatientRelatedStudies == 2
    assert by_id["PID-MUELLER"].NumberOfPatientRelatedInstances == 8  # 3 CT + 2 MR + 2 fused + 1 CT
    assert str(by_id["PID-MUELLER"].PatientName) == MUELLER
    assert all(a.QueryRetrieveLevel == "PATIENT" and a.RetrieveAETitle == SCP_AE for a in answers)


def test_patient_root_walks_down_the_hierarchy(node):
    cat = node.catalog
    studies = find_ok(node, PATIENT_FIND, QueryRetrieveLevel="STUDY", PatientID="PID-MUELLER",
                      StudyInstanceUID="", StudyDate="")
    assert {s.StudyInstanceUID for s in studies} == {cat.studies["A"], cat.studies["A2"]}
    assert [s.StudyDate for s in studies] == ["20240115", "20250301"]  # oldest first

    series = find_ok(node, PATIENT_FIND, QueryRetrieveLevel="SERIES", PatientID="PID-MUELLER",
                     StudyInstanceUID=cat.studies["A"], SeriesInstanceUID="", Modality="", SeriesNumber="",
                     NumberOfSeriesRelatedInstances="")
    assert [(s.Modality, s.SeriesNumber, s.NumberOfSeriesRelatedInstances) for s in series] == [
        ("CT", 1, 3), ("MR", 2, 2), ("OT", 901, 2)]

    images = find_ok(node, PATIENT_FIND, QueryRetrieveLevel="IMAGE", PatientID="PID-MUELLER",
                     StudyInstanceUID=cat.studies["A"], SeriesInstanceUID=cat.series["A-CT"], SOPInstanceUID="",
                     SOPClassUID="", InstanceNumber="", Rows="", Columns="", NumberOfFrames="")
    assert [i.SOPInstanceUID for i in images] == cat.instances["A-CT"]
    assert all(i.SOPClassUID == CTImageStorage and i.Rows == 16 and i.Columns == 16 for i in images)
    assert [i.InstanceNumber for i in images] == [1, 2, 3]

    # a patient ID that does not own the study finds nothing
    assert find_ok(node, PATIENT_FIND, QueryRetrieveLevel="SERIES", PatientID="PID-GREEK",
                   StudyInstanceUID=cat.studies["A"], SeriesInstanceUID="") == []


def test_study_root_levels_with_counts_and_modalities(node):
    cat = node.catalog
    studies = find_ok(node, STUDY_FIND, QueryRetrieveLevel="STUDY", StudyInstanceUID="", PatientID="",
                      ModalitiesInStudy="", NumberOfStudyRelatedSeries="", NumberOfStudyRelatedInstances="")
    by_uid = {s.StudyInstanceUID: s for s in studies}
    assert set(by_uid) == set(cat.studies.values())
    a = by_uid[cat.studies["A"]]
    assert list(a.ModalitiesInStudy) == ["CT", "MR", "OT"]
    assert (a.NumberOfStudyRelatedSeries, a.NumberOfStudyRelatedInstances) == (3, 7)

    series = find_ok(node, STUDY_FIND, QueryRetrieveLevel="SERIES", StudyInstanceUID=cat.studies["B"],
                     SeriesInstanceUID="", Modality="")
    assert [(s.SeriesInstanceUID, s.Modality) for s in series] == [(cat.series["B-PT"], "PT")]
    images = find_ok(node, STUDY_FIND, QueryRetrieveLevel="IMAGE", StudyInstanceUID=cat.studies["B"],
                     SeriesInstanceUID=cat.series["B-PT"], SOPInstanceUID="")
    assert [i.SOPInstanceUID for i in images] == cat.instances["B-PT"]


def test_answers_hold_only_requested_keys(node):
    cat = node.catalog
    (answer,) = find_ok(node, STUDY_FIND, QueryRetrieveLevel="STUDY", StudyInstanceUID=cat.studies["A2"],
                        StudyDate="", InstitutionName="")
    # ASCII-only values and no character set in the request: no Specific Character Set either
    assert {e.keyword for e in answer} == {"StudyDate", "InstitutionName", "QueryRetrieveLevel", "RetrieveAETitle",
                                           "StudyInstanceUID"}
    assert answer.StudyDate == "20250301"
    assert answer.InstitutionName in ("", None)  # not kept by the node: returned empty
    (answer,) = find_ok(node, STUDY_FIND, QueryRetrieveLevel="STUDY", StudyInstanceUID=cat.studies["A2"],
                        InstanceAvailability="")
    assert answer.InstanceAvailability == "ONLINE"
    # the unique key comes back even when the caller did not ask for it
    (answer,) = find_ok(node, STUDY_FIND, QueryRetrieveLevel="SERIES", StudyInstanceUID=cat.studies["B"],
                        Modality="PT")
    assert answer.SeriesInstanceUID == cat.series["B-PT"]
    assert "PatientName" not in answer and "SeriesDescription" not in answer


# -- C-FIND: matching ------------------------------------------------------------------------


def _study_names(answers) -> set[str]:
    return {str(a.PatientName) for a in answers}


def test_wildcards(node):
    cat = node.catalog

    def study_uids(**keys) -> set[str]:
        return {a.StudyInstanceUID for a in find_ok(node, QueryRetrieveLevel="STUDY", StudyInstanceUID="", **keys)}

    assert study_uids(AccessionNumber="ACC-?") == {cat.studies[s] for s in "ABC"}
    assert study_uids(AccessionNumber="ACC-A*") == {cat.studies["A"], cat.studies["A2"]}
    assert study_uids(StudyDescription="Kopf*") == {cat.studies["A"]}
    assert study_uids(StudyDescription="kopf*") == set()  # LO matching is case-sensitive
    assert study_uids(StudyDescription="K?pf CT") == {cat.studies["A"]}
    assert study_uids(PatientName="Codec*") == {cat.studies["D"]}
    assert study_uids(PatientName="codec^TEST") == {cat.studies["D"]}  # PN: case-insensitive
    assert study_uids(PatientID="PID-*", ModalitiesInStudy="PT") == {cat.studies["B"]}
    assert study_uids(ModalitiesInStudy="MR") == {cat.studies["A"], cat.studies["C"]}
    assert study_uids(StudyDescription="*") == set(cat.studies.values())  # "*" is universal, empty values too
    # GLOB's own bracket syntax is taken literally
    assert study_uids(AccessionNumber="ACC-[AB]") == set()
    series = find_ok(node, QueryRetrieveLevel="SERIES", StudyInstanceUID=cat.studies["A"], SeriesInstanceUID="",
                     SeriesDescription="*nativ")
    assert [s.SeriesInstanceUID for s in series] == [cat.series["A-CT"]]


@pytest.mark.filterwarnings("ignore:Invalid value for VR")  # '""' is not a date: empty value matching
def test_date_and_time_ranges(node):
    def dates(**keys) -> list[str]:
        keys = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "", "StudyDate": "", **keys}
        return sorted(a.StudyDate for a in find_ok(node, **keys))

    assert dates(StudyDate="20240101-") == ["20240115", "20240615", "20250301"]
    assert dates(StudyDate="-20231231") == ["20220101", "20231231"]
    assert dates(StudyDate="20240101-20241231") == ["20240115", "20240615"]
    assert dates(StudyDate="20240615") == ["20240615"]
    assert dates(StudyDate="20240615", StudyTime="1400-1500") == ["20240615"]
    assert dates(StudyTime="0900-0930") == ["20240115"]  # 09:30:00 is inside "up to 09:30"
    assert dates(StudyTime="2359-") == ["20231231"]
    assert dates(StudyDate='""') == []  # empty value matching: every study has a date


def test_uid_lists(node):
    cat = node.catalog
    studies = find_ok(node, QueryRetrieveLevel="STUDY", StudyInstanceUID=[cat.studies["B"], cat.studies["C"]])
    assert {s.StudyInstanceUID for s in studies} == {cat.studies["B"], cat.studies["C"]}
    wanted = [cat.instances["A-CT"][0], cat.instances["A-CT"][2]]
    images = find_ok(node, QueryRetrieveLevel="IMAGE", StudyInstanceUID=cat.studies["A"],
                     SeriesInstanceUID=cat.series["A-CT"], SOPInstanceUID=wanted)
    assert [i.SOPInstanceUID for i in images] == wanted


@pytest.mark.filterwarnings("ignore:Invalid value for VR")  # the SCU side builds the bad keys on purpose
@pytest.mark.parametrize("model, keys, why", [
    (STUDY_FIND, dict(QueryRetrieveLevel="SERIES", SeriesInstanceUID=""), "StudyInstanceUID"),
    (STUDY_FIND, dict(QueryRetrieveLevel="IMAGE", StudyInstanceUID="1.2.3", SOPInstanceUID=""), "SeriesInstanceUID"),
    (PATIENT_FIND, dict(QueryRetrieveLevel="STUDY", StudyInstanceUID=""), "PatientID"),
    (PATIENT_FIND, dict(QueryRetrieveLevel="STUDY", PatientID="PID-*", StudyInstanceUID=""), "PatientID"),
    (STUDY_FIND, dict(QueryRetrieveLevel="PATIENT", PatientID=""), "Study Root"),
    (STUDY_FIND, dict(StudyInstanceUID=""), "QueryRetrieveLevel"),
    (STUDY_FIND, dict(QueryRetrieveLevel="SERIES", StudyInstanceUID=["1.2.3", "1.2.4"], SeriesInstanceUID=""),
     "StudyInstanceUID"),
    (STUDY_FIND, dict(QueryRetrieveLevel="STUDY", StudyDate="2024-01-01"), "StudyDate"),
    (STUDY_FIND, dict(QueryRetrieveLevel="STUDY", StudyInstanceUID="1.2.*"), "StudyInstanceUID"),
])
def test_identifier_errors_answer_a900(node, model, keys, why):
    status, answers, final = c_find(node, query(**keys), model)
    assert status == statuses.DOES_NOT_MATCH_SOP_CLASS == 0xA900
    assert answers == []
    assert why in final.ErrorComment


# -- C-FIND: character sets ----------------------------------------------------------------


def test_three_character_sets_arrive_intact(node):
    answers = find_ok(node, QueryRetrieveLevel="STUDY", StudyInstanceUID="", PatientName="", StudyDescription="")
    by_name = {str(a.PatientName): a for a in answers}
    assert {MUELLER, GREEK, YAMADA} <= set(by_name)
    # the caller sent no Specific Character Set: each answer comes in its study's own set
    assert by_name[MUELLER].SpecificCharacterSet == "ISO_IR 100"
    assert by_name[GREEK].SpecificCharacterSet == "ISO_IR 192"
    assert by_name[GREEK].StudyDescription == "Εγκέφαλος"
    yamada = by_name[YAMADA]
    assert list(yamada.SpecificCharacterSet) == ["", "ISO 2022 IR 87"]
    assert yamada.StudyDescription == "頭部MRI"
    assert [str(g) for g in (yamada.PatientName.alphabetic, yamada.PatientName.ideographic,
                             yamada.PatientName.phonetic)] == ["Yamada^Tarou", "山田^太郎", "やまだ^たろう"]


def test_raw_encoding_follows_the_declared_set(node):
    cat = node.catalog
    (raw,) = raw_answers(node, query(QueryRetrieveLevel="STUDY", StudyInstanceUID=cat.studies["C"], PatientName=""))
    assert b"\x1b$B" in raw and b"\x1b(B" in raw  # JIS X 0208 escape sequences, not UTF-8
    assert "山田".encode() not in raw
    (raw,) = raw_answers(node, query(QueryRetrieveLevel="STUDY", StudyInstanceUID=cat.studies["A"], PatientName=""))
    assert MUELLER.encode("latin-1") in raw
    (raw,) = raw_answers(node, query(QueryRetrieveLevel="STUDY", StudyInstanceUID=cat.studies["C"], PatientName="",
                                     SpecificCharacterSet="ISO_IR 192"))
    assert YAMADA.encode("utf-8") in raw and b"ISO_IR 192" in raw


def test_answers_in_the_callers_character_set_when_it_fits(node):
    answers = find_ok(node, QueryRetrieveLevel="STUDY", StudyInstanceUID="", PatientName="",
                      SpecificCharacterSet="ISO_IR 192")
    by_name = {str(a.PatientName): a for a in answers}
    assert {MUELLER, GREEK, YAMADA} <= set(by_name)
    assert {by_name[n].SpecificCharacterSet for n in (MUELLER, GREEK, YAMADA)} == {"ISO_IR 192"}
    # a Latin-1 caller gets Latin-1 where it fits and the study's own set where it does not
    answers = find_ok(node, QueryRetrieveLevel="STUDY", StudyInstanceUID="", PatientName="",
                      SpecificCharacterSet="ISO_IR 100")
    by_name = {str(a.PatientName): a for a in answers}
    assert by_name[MUELLER].SpecificCharacterSet == "ISO_IR 100"
    assert by_name["Codec^Test"].SpecificCharacterSet == "ISO_IR 100"
    assert list(by_name[YAMADA].SpecificCharacterSet) == ["", "ISO 2022 IR 87"]
    assert by_name[GREEK].SpecificCharacterSet == "ISO_IR 192"


@pytest.mark.parametrize("charset, pattern, expected", [
    ("ISO_IR 192", "山田*", YAMADA),
    ("ISO_IR 192", "*やまだ*", YAMADA),
    ("ISO_IR 100", "Müller*", MUELLER),
    ("ISO_IR 100", "MÜLLER^JÖRG", MUELLER),
    ("ISO_IR 192", "ελληνικά*", GREEK),
    (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう", YAMADA),
    (["", "ISO 2022 IR 87"], "=山田*", YAMADA),
])
def test_non_ascii_names_match(node, charset, pattern, expected):
    answers = find_ok(node, QueryRetrieveLevel="PATIENT", PatientID="", PatientName=pattern,
                      SpecificCharacterSet=charset, model=PATIENT_FIND)
    assert [str(a.PatientName) for a in answers] == [expected]


# -- C-GET -----------------------------------------------------------------------------------


def test_get_series_sends_the_stored_bytes(node):
    cat = node.catalog
    getter = Getter()
    final, responses = getter.run(node, query(QueryRetrieveLevel="SERIES", StudyInstanceUID=cat.studies["A"],
                                              SeriesInstanceUID=cat.series["A-CT"]))
    assert final.Status == 0x0000
    assert final.NumberOfCompletedSuboperations == 3 and final.NumberOfFailedSuboperations == 0
    assert [int(r.Status) for r in responses[:-1]] == [0xFF00] * 3
    assert [str(d.SOPInstanceUID) for d in getter.datasets] == cat.instances["A-CT"]
    for uid in cat.instances["A-CT"]:
        assert getter.raw[uid] == stored_bytes(node, uid)  # identical to what was stored


def test_get_patient_root_study_level(node):
    cat = node.catalog
    getter = Getter()
    final, _ = getter.run(node, query(QueryRetrieveLevel="STUDY", PatientID="PID-GREEK",
                                      StudyInstanceUID=cat.studies["B"]), model=PATIENT_GET)
    assert final.Status == 0x0000 and final.NumberOfCompletedSuboperations == 2
    assert {str(d.SOPInstanceUID) for d in getter.datasets} == set(cat.instances["B-PT"])
    assert {str(d.PatientName) for d in getter.datasets} == {GREEK}


def test_get_derived_series(node):
    cat = node.catalog
    (series,) = find_ok(node, QueryRetrieveLevel="SERIES", StudyInstanceUID=cat.studies["A"], Modality="OT",
                        SeriesDescription="FUSED*", SeriesInstanceUID="")
    assert series.SeriesInstanceUID == cat.series["A-FUSED"]
    getter = Getter()
    final, _ = getter.run(node, query(QueryRetrieveLevel="SERIES", StudyInstanceUID=cat.studies["A"],
                                      SeriesInstanceUID=series.SeriesInstanceUID))
    assert final.Status == 0x0000 and final.NumberOfCompletedSuboperations == 2
    assert {str(d.SOPClassUID) for d in getter.datasets} == {SecondaryCaptureImageStorage}


def test_get_image_level_uid_list(node):
    cat = node.catalog
    wanted = cat.instances["A-MR"]
    getter = Getter()
    final, _ = getter.run(node, query(QueryRetrieveLevel="IMAGE", StudyInstanceUID=cat.studies["A"],
                                      SeriesInstanceUID=cat.series["A-MR"], SOPInstanceUID=wanted))
    assert final.Status == 0x0000 and sorted(str(d.SOPInstanceUID) for d in getter.datasets) == sorted(wanted)


def test_get_converts_big_endian_and_rle_for_an_uncompressed_peer(node):
    cat = node.catalog
    getter = Getter(storage_syntaxes=[ImplicitVRLittleEndian])
    final, _ = getter.run(node, query(QueryRetrieveLevel="STUDY", StudyInstanceUID=cat.studies["D"]))
    assert final.Status == 0x0000 and final.NumberOfCompletedSuboperations == 2
    for ds in getter.datasets:
        uid = str(ds.SOPInstanceUID)
        assert getter.syntaxes[uid] == ImplicitVRLittleEndian
        assert uid in (cat.instances["D-BE"][0], cat.instances["D-RLE"][0])  # same instance, same UID
        assert np.array_equal(ds.pixel_array, cat.pixels[uid])


def test_get_keeps_rle_when_the_peer_takes_it(node):
    cat = node.catalog
    getter = Getter(storage_syntaxes=[RLELossless, ExplicitVRLittleEndian])
    uid = cat.instances["D-RLE"][0]
    final, _ = getter.run(node, query(QueryRetrieveLevel="SERIES", StudyInstanceUID=cat.studies["D"],
                                      SeriesInstanceUID=cat.series["D-RLE"]))
    assert final.Status == 0x0000
    assert getter.syntaxes[uid] == RLELossless
    assert getter.raw[uid] == stored_bytes(node, uid)


def test_get_without_storage_contexts_fails_each_instance(node):
    cat = node.catalog
    getter = Getter(storage_syntaxes=[])
    ae = AE(ae_title=SCU_AE)
    ae.add_requested_context(STUDY_GET)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=SCP_AE)
    assert assoc.is_established
    try:
        responses = [s for s, _ in assoc.send_c_get(query(QueryRetrieveLevel="SERIES",
                                                          StudyInstanceUID=cat.studies["A"],
                                                          SeriesInstanceUID=cat.series["A-MR"]), STUDY_GET)]
    finally:
        assoc.release()
    final = responses[-1]
    assert final.Status == statuses.SUBOPS_FAILED == 0xA702
    assert final.NumberOfFailedSuboperations == 2
    assert getter.datasets == []


def test_get_honours_c_cancel(node):
    cat = node.catalog
    getter = Getter(cancel_after=1)
    final, _ = getter.run(node, query(QueryRetrieveLevel="SERIES", StudyInstanceUID=cat.studies["A"],
                                      SeriesInstanceUID=cat.series["A-CT"]))
    assert final.Status == statuses.CANCEL == 0xFE00
    assert len(getter.datasets) == 1
    assert final.NumberOfRemainingSuboperations == 2


def test_get_identifier_error(node):
    getter = Getter()
    final, _ = getter.run(node, query(QueryRetrieveLevel="SERIES", SeriesInstanceUID="1.2.3"))
    assert final.Status == 0xA900 and "StudyInstanceUID" in final.ErrorComment
    assert getter.datasets == []


def test_get_of_nothing_succeeds_empty(node):
    getter = Getter()
    final, _ = getter.run(node, query(QueryRetrieveLevel="STUDY", StudyInstanceUID="1.2.3.4.5.6.7"))
    assert final.Status == 0x0000 and final.NumberOfCompletedSuboperations == 0 and getter.datasets == []


# -- C-MOVE ------------------------------------------------------------------------------------


def test_move_study_to_configured_destination(node, destination):
    cat = node.catalog
    destination.clear()
    final = c_move(node, query(QueryRetrieveLevel="STUDY", StudyInstanceUID=cat.studies["A"]))
    assert final.Status == 0x0000
    assert final.NumberOfCompletedSuboperations == 7 and final.NumberOfFailedSuboperations == 0
    expected = set(cat.instances["A-CT"] + cat.instances["A-MR"] + cat.instances["A-FUSED"])
    assert destination.uids() == expected  # source and derived series
    assert set(destination.originators) == {SCP_AE}


def test_move_patient_root_series_and_converts_for_the_destination(node, destination):
    cat = node.catalog
    destination.clear()
    final = c_move(node, query(QueryRetrieveLevel="STUDY", PatientID="PID-CODEC", StudyInstanceUID=cat.studies["D"]),
                   model=PATIENT_MOVE)
    assert final.Status == 0x0000 and final.NumberOfCompletedSuboperations == 2
    assert destination.uids() == {cat.instances["D-BE"][0], cat.instances["D-RLE"][0]}
    for ds in destination.datasets:  # the destination takes uncompressed little endian only
        assert np.array_equal(ds.pixel_array, cat.pixels[str(ds.SOPInstanceUID)])


def test_move_to_unknown_destination_is_a801(node, destination):
    cat = node.catalog
    destination.clear()
    final = c_move(node, query(QueryRetrieveLevel="STUDY", StudyInstanceUID=cat.studies["B"]), dest="NOTCONFIGURED")
    assert final.Status == statuses.MOVE_DESTINATION_UNKNOWN == 0xA801
    assert destination.uids() == set()


def test_move_identifier_error_is_a900(node, destination):
    destination.clear()
    final = c_move(node, query(QueryRetrieveLevel="IMAGE", StudyInstanceUID="1.2.3", SOPInstanceUID="1.2.3.4"))
    assert final.Status == 0xA900 and "SeriesInstanceUID" in final.ErrorComment
    assert destination.uids() == set()


def _tls_pair(folder: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate for 127.0.0.1, its key) as PEM files; EC keys, quick to make."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)

    def cert(subject: str, key, issuer: str, issuer_key, ca: bool):
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        else:
            builder = builder.add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
                decipher_only=False), critical=True)
        return builder.sign(issuer_key, hashes.SHA256())

    folder.mkdir(parents=True, exist_ok=True)
    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    paths = folder / "ca.pem", folder / "server.pem", folder / "server-key.pem"
    paths[0].write_bytes(cert("qr test CA", ca_key, "qr test CA", ca_key, True).public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert("MOVEDEST", leaf_key, "qr test CA", ca_key, False).public_bytes(
        serialization.Encoding.PEM))
    paths[2].write_bytes(leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    return paths


def test_move_to_a_tls_destination(node, tmp_path):
    import ssl

    from dicom_node.config import DestinationTLS

    ca, cert, key = _tls_pair(tmp_path / "pki")
    _, other_ca, _ = _tls_pair(tmp_path / "other")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    received = Received()
    ae = AE(ae_title="TLSDEST")
    ae.add_supported_context(PositronEmissionTomographyImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    dest_server = ae.start_server(("127.0.0.1", 0), block=False, ssl_context=server_ctx,
                                  evt_handlers=[(evt.EVT_C_STORE, received.on_store)])
    port = dest_server.server_address[1]
    cfg = node.cfg.model_copy(update={"destinations": [
        DicomDestination(name="tls-ws", ae_title="TLSDEST", host="127.0.0.1", port=port,
                    tls=DestinationTLS(ca_certificates=ca)),
        DicomDestination(name="untrusted", ae_title="UNTRUSTED", host="127.0.0.1", port=port,
                    tls=DestinationTLS(ca_certificates=other_ca))]})
    server = RunningSCP(cfg, node.store, query_retrieve=True)
    try:
        cat = node.catalog
        study = query(QueryRetrieveLevel="STUDY", StudyInstanceUID=cat.studies["B"])
        final = c_move(server, study, dest="TLSDEST")
        assert final.Status == 0x0000 and final.NumberOfCompletedSuboperations == 2
        assert received.uids() == set(cat.instances["B-PT"])
        records: list[logging.LogRecord] = []
        handler = logging.Handler(logging.ERROR)
        handler.emit = records.append  # type: ignore[method-assign]  - a test double replaces the emit method
        qr.log.addHandler(handler)  # directly on our logger: logs.setup() may have turned propagation off
        try:
            final = c_move(server, study, dest="UNTRUSTED")
            # logged when pynetdicom drops the handler, which may be just after the response went out
            deadline = time.monotonic() + 5
            while not any(r.getMessage() == "qr.move.failed" for r in records) and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            qr.log.removeHandler(handler)
        assert final.Status == statuses.MOVE_DESTINATION_UNKNOWN
        failed = [r for r in records if r.getMessage() == "qr.move.failed"]
        assert failed and "not trusted" in failed[-1].fields["reason"]
    finally:
        server.stop()
        dest_server.shutdown()


def test_node_serves_query_retrieve(tmp_path):
    """The service wiring: Node.start brings the Q/R SCP up on the node's own port."""
    from dicom_node.workflow.node import Node

    node = Node(_node_settings(tmp_path))
    ds = make_image(patient_id="PID-NODE", PatientName=MUELLER)
    _put(node.store, ds)
    node.start()
    try:
        answers = find_ok(node, QueryRetrieveLevel="STUDY", StudyInstanceUID="", PatientName="m*")
        assert [(a.StudyInstanceUID, str(a.PatientName)) for a in answers] == [(ds.StudyInstanceUID, MUELLER)]
    finally:
        node.stop()


def _node_settings(tmp_path, **query_retrieve) -> NodeSettings:
    return parse_config({
        "node": {"ae_title": SCP_AE, "host": "127.0.0.1", "port": 0, "network_timeout_s": 10.0},
        "storage": {"root": str(tmp_path / "data")},
        "destinations": [{"name": "ws1", "ae_title": "WS1", "host": "127.0.0.1", "port": 1104},
                         {"name": "ws2", "ae_title": "WS2", "host": "127.0.0.1", "port": 1105}],
        "query_retrieve": {"allowed_callers": [SCU_AE], **query_retrieve},  # Q/R is deny-by-default
    })


def test_query_retrieve_can_be_switched_off(tmp_path):
    """query_retrieve.enabled = false: a pure router; Q/R contexts are refused, storage still works."""
    from dicom_node.workflow.node import Node

    node = Node(_node_settings(tmp_path, enabled=False)).start()
    try:
        ae = AE(ae_title=SCU_AE)
        ae.add_requested_context(STUDY_FIND)
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", node.port, ae_title=SCP_AE)
        assert assoc.is_established
        try:
            accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
            assert accepted == {str(CTImageStorage)}
        finally:
            assoc.release()
    finally:
        node.stop()


def test_move_destinations_limit_where_c_move_may_send(tmp_path):
    """A destination the outbox knows but query_retrieve.move_destinations leaves out: 0xA801, nothing sent."""
    from dicom_node.workflow.node import Node

    with pytest.raises(ConfigError, match="unknown destination 'nowhere'"):
        _node_settings(tmp_path, move_destinations=["nowhere"])
    node = Node(_node_settings(tmp_path, move_destinations=["ws1"]))
    ds = make_image(patient_id="PID-MOVE")
    _put(node.store, ds)
    node.start()
    try:
        final = c_move(node, query(QueryRetrieveLevel="STUDY", StudyInstanceUID=ds.StudyInstanceUID), dest="WS2")
        assert final.Status == 0xA801
    finally:
        node.stop()


# -- the character set rule on its own ------------------------------------------------------


def test_choose_charset_falls_back_from_caller_to_study_to_utf8():
    from dicom_node.index.matching import choose_charset

    assert choose_charset({"PatientName": "Smith^J"}, None, "ISO_IR 100") is None  # ASCII: default repertoire
    assert choose_charset({"PatientName": "Smith^J"}, "ISO_IR 100", None) == ["ISO_IR 100"]  # echo the caller's
    assert choose_charset({"PatientName": MUELLER}, None, None) == ["ISO_IR 192"]  # no set fits but UTF-8
    assert choose_charset({"PatientName": MUELLER}, ["", "ISO 2022 IR 87"], "ISO_IR 100") == ["ISO_IR 100"]
    assert choose_charset({"PatientName": YAMADA}, "ISO_IR 100", "\\ISO 2022 IR 87") == ["", "ISO 2022 IR 87"]
    assert choose_charset({"PatientName": GREEK}, "ISO_IR 100", "NOT A CHARSET") == ["ISO_IR 192"]


# -- authorization: [query_retrieve] allowed_callers / allowed_addresses --------------------------


@pytest.mark.parametrize("callers, addresses, calling, address, allowed, rule", [
    ([], [], "QRSCU", "127.0.0.1", False, "qr_not_configured"),  # the default: nobody
    (["QRSCU"], [], "QRSCU", "127.0.0.1", True, "accepted"),
    (["QRSCU"], [], "OTHER", "127.0.0.1", False, "qr_calling_ae"),
    ([], ["10.0.0.0/8"], "ANY", "10.1.2.3", True, "accepted"),
    ([], ["10.0.0.0/8"], "ANY", "::ffff:10.1.2.3", True, "accepted"),
    (["QRSCU"], ["10.0.0.0/8"], "QRSCU", "127.0.0.1", False, "qr_address"),  # every list that is set
])
def test_query_retrieve_access_decision(callers, addresses, calling, address, allowed, rule):
    from dicom_node.net.access import QueryRetrieveAccess

    cfg = parse_config({"query_retrieve": {"allowed_callers": callers, "allowed_addresses": addresses}})
    decision = QueryRetrieveAccess(cfg.query_retrieve).decide(calling, address)
    assert (decision.allowed, decision.rule) == (allowed, rule)


def _qr_contexts_accepted(port: int, calling: str) -> set[str]:
    ae = AE(ae_title=calling)
    for model in (STUDY_FIND, PatientRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelMove):
        ae.add_requested_context(model)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title=SCP_AE)
    assert assoc.is_established
    try:
        return {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
    finally:
        assoc.release()


def test_query_retrieve_is_refused_unless_the_caller_is_listed(tmp_path):
    """Default config: storage works, Q/R contexts are rejected; listed AE titles get them; DCMTK findscu sees why."""
    import subprocess

    from dicom_helpers import dcmtk, json_logs

    qr_models = {str(STUDY_FIND), str(PatientRootQueryRetrieveInformationModelGet),
                 str(StudyRootQueryRetrieveInformationModelMove)}
    root = tmp_path / "data"
    base = {"node": {"ae_title": SCP_AE, "host": "127.0.0.1", "port": 0}, "storage": {"root": str(root)}}
    with json_logs("dicom_node.net.query_retrieve") as log:
        default = RunningSCP(parse_config(base), Store(root, root / "node.sqlite"), query_retrieve=True)
        try:
            assert _qr_contexts_accepted(default.port, SCU_AE) == {str(CTImageStorage)}
            find = subprocess.run([dcmtk("findscu"), "-S", "-aet", SCU_AE, "-aec", SCP_AE, "-k",
                                   "QueryRetrieveLevel=STUDY", "127.0.0.1", str(default.port)],
                                  capture_output=True, text=True, timeout=30)
            assert find.returncode != 0 and "No Acceptable Presentation Contexts" in find.stdout + find.stderr
        finally:
            default.stop()
        listed = RunningSCP(parse_config({**base, "query_retrieve": {"allowed_callers": ["WS01"]}}),
                            Store(root, root / "node.sqlite"), query_retrieve=True)
        try:
            assert _qr_contexts_accepted(listed.port, "WS01") == qr_models | {str(CTImageStorage)}
            assert _qr_contexts_accepted(listed.port, "INTRUDER") == {str(CTImageStorage)}
        finally:
            listed.stop()
        refused = log.events("qr.refused")
    assert [r["rule"] for r in refused] == ["qr_not_configured", "qr_not_configured", "qr_calling_ae"]
    assert refused[-1]["calling_ae"] == "INTRUDER" and refused[-1]["address"] == "127.0.0.1"
