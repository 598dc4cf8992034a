"""The Query/Retrieve SCP through DCMTK's own SCUs: findscu, getscu, and movescu into a DCMTK storescp.

The store is filled the way a modality would: ``storescu`` over the network
(plus one derived series written by the node itself).  Answers are read back
from what the tools write (``findscu -X`` response files, ``getscu``/``storescp``
received files) and from their exit codes and log lines.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from dicom_helpers import UID_PREFIX, RunningSCP, dcmtk, free_port, make_image, run_tool, write
from pydicom import dcmread
from pydicom.uid import MRImageStorage, SecondaryCaptureImageStorage, generate_uid
from pynetdicom.dsutils import split_dataset

from dicom_node.config import parse_config
from dicom_node.index.store import Store

SCP_AE = "FUSIONNODE"
DEST_AE = "DCMTKDEST"

MUELLER = "Müller^Jörg"
GREEK = "Ελληνικά^Δοκιμή"
YAMADA = "Yamada^Tarou=山田^太郎=やまだ^たろう"


@pytest.fixture(scope="module")
def storescp(tmp_path_factory):
    """A DCMTK Storage SCP, the C-MOVE destination (files written bit-preserving into ``.folder``)."""
    folder = tmp_path_factory.mktemp("storescp")
    port = free_port()
    log = open(folder.parent / f"{folder.name}.log", "w")  # a file, not a pipe nobody drains
    proc = subprocess.Popen([dcmtk("storescp"), "-aet", DEST_AE, "-od", str(folder), "+B", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while run_tool("echoscu", "-aec", DEST_AE, "127.0.0.1", str(port), timeout=10).returncode != 0:
        assert proc.poll() is None and time.monotonic() < deadline, "storescp did not start"
        time.sleep(0.1)
    proc.port, proc.folder = port, folder
    yield proc
    proc.terminate()
    proc.wait(10)
    log.close()


@pytest.fixture(scope="module")
def node(tmp_path_factory, storescp):
    root = tmp_path_factory.mktemp("qr-dcmtk")
    cfg = parse_config({
        "node": {"ae_title": SCP_AE, "host": "127.0.0.1", "port": 0, "network_timeout_s": 10.0},
        "storage": {"root": str(root / "data")},
        "destinations": [{"name": "dcmtk", "ae_title": DEST_AE, "host": "127.0.0.1", "port": storescp.port}],
        # Q/R is deny-by-default: the DCMTK tools' calling AE titles are the configured workstations
        "query_retrieve": {"allowed_callers": ["FINDSCU", "GETSCU", "MOVESCU"]},
    })
    store = Store(cfg.storage.root, cfg.storage.database_path)
    server = RunningSCP(cfg, store, query_retrieve=True)

    studies = {k: generate_uid(UID_PREFIX) for k in "ABC"}
    series = {k: generate_uid(UID_PREFIX) for k in ("A-CT", "A-MR", "A-FUSED", "B-CT", "C-MR")}
    files: list[Path] = []
    src = root / "send"

    def add(name: str, study: str, n: int, **kw) -> None:
        for k in range(n):
            ds = make_image(study_uid=studies[study], series_uid=series[name], instance_number=k + 1, **kw)
            files.append(write(ds, src / f"{name}-{k}.dcm"))

    mueller = dict(patient_id="PID-MUELLER", PatientName=MUELLER, SpecificCharacterSet="ISO_IR 100",
                   StudyDate="20240115", StudyDescription="Kopf")
    add("A-CT", "A", 3, **mueller, SeriesNumber=1)
    add("A-MR", "A", 2, **mueller, modality="MR", sop_class=MRImageStorage, SeriesNumber=2)
    add("B-CT", "B", 2, patient_id="PID-GREEK", PatientName=GREEK, SpecificCharacterSet="ISO_IR 192",
        StudyDate="20240615", SeriesNumber=1)
    add("C-MR", "C", 1, patient_id="PID-YAMADA", PatientName=YAMADA, SpecificCharacterSet=["", "ISO 2022 IR 87"],
        modality="MR", sop_class=MRImageStorage, StudyDate="20231231", StudyDescription="頭部MRI", SeriesNumber=1)
    # storescu proposes every uncompressed syntax; the node picks Explicit VR LE (first in its list)
    proc = run_tool("storescu", "-aet", "MODALITY", "-aec", SCP_AE, "127.0.0.1", str(server.port), *files,
                    timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for k in range(2):  # the node's own output: a derived series in study A
        store.store_dataset(make_image(study_uid=studies["A"], series_uid=series["A-FUSED"], modality="OT",
                                       sop_class=SecondaryCaptureImageStorage, instance_number=k + 1, **mueller,
                                       SeriesNumber=901, SeriesDescription="FUSED"), origin="derived")
    server.studies, server.series, server.work = studies, series, root
    yield server
    server.stop()


def _out(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


def findscu(node, model: str, *keys: str, folder: Path) -> tuple[subprocess.CompletedProcess, list]:
    """Run findscu with ``-k`` keys; the answers as pydicom datasets read from its ``-X`` files, in order."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("rsp*.dcm"):
        old.unlink()
    args = [model, "-aet", "FINDSCU", "-aec", SCP_AE, "-X", "-od", folder, "-v"]
    for key in keys:
        args += ["-k", key]
    proc = run_tool("findscu", *args, "127.0.0.1", str(node.port), timeout=60)
    return proc, [dcmread(p) for p in sorted(folder.glob("rsp*.dcm"))]


def stored_dataset_bytes(store: Store, sop_uid: str) -> bytes:
    path = store.get_instance(sop_uid).path
    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


# -- findscu -------------------------------------------------------------------------------


def test_findscu_patient_root_every_level(node, tmp_path):
    proc, answers = findscu(node, "-P", "QueryRetrieveLevel=PATIENT", "PatientID", "PatientName",
                            "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedInstances", folder=tmp_path)
    assert proc.returncode == 0, _out(proc)
    by_id = {a.PatientID: a for a in answers}
    assert set(by_id) == {"PID-MUELLER", "PID-GREEK", "PID-YAMADA"}
    assert (by_id["PID-MUELLER"].NumberOfPatientRelatedStudies,
            by_id["PID-MUELLER"].NumberOfPatientRelatedInstances) == (1, 7)

    proc, answers = findscu(node, "-P", "QueryRetrieveLevel=STUDY", "PatientID=PID-MUELLER", "StudyInstanceUID",
                            "ModalitiesInStudy", folder=tmp_path)
    assert proc.returncode == 0, _out(proc)
    assert [(a.StudyInstanceUID, list(a.ModalitiesInStudy)) for a in answers] == [
        (node.studies["A"], ["CT", "MR", "OT"])]

    proc, answers = findscu(node, "-P", "QueryRetrieveLevel=SERIES", "PatientID=PID-MUELLER",
                            f"StudyInstanceUID={node.studies['A']}", "SeriesInstanceUID", "Modality",
                            "NumberOfSeriesRelatedInstances", folder=tmp_path)
    assert proc.returncode == 0, _out(proc)
    assert [(a.SeriesInstanceUID, a.Modality, a.NumberOfSeriesRelatedInstances) for a in answers] == [
        (node.series["A-CT"], "CT", 3), (node.series["A-MR"], "MR", 2), (node.series["A-FUSED"], "OT", 2)]

    proc, answers = findscu(node, "-P", "QueryRetrieveLevel=IMAGE", "PatientID=PID-MUELLER",
                            f"StudyInstanceUID={node.studies['A']}", f"SeriesInstanceUID={node.series['A-FUSED']}",
                            "SOPInstanceUID", "SOPClassUID", "InstanceNumber", folder=tmp_path)
    assert proc.returncode == 0, _out(proc)
    assert [(a.SOPClassUID, a.InstanceNumber) for a in answers] == [(SecondaryCaptureImageStorage, 1),
                                                                      (SecondaryCaptureImageStorage, 2)]


def test_findscu_study_root_ranges_wildcards_and_uid_lists(node, tmp_path):
    def study_uids(*keys: str) -> set[str]:
        proc, answers = findscu(node, "-S", "QueryRetrieveLevel=STUDY", "StudyInstanceUID", *keys, folder=tmp_path)
        assert proc.returncode == 0, _out(proc)
        return {a.StudyInstanceUID for a in answers}

    s = node.studies
    assert study_uids() == set(s.values())
    assert study_uids("StudyDate=20240101-") == {s["A"], s["B"]}
    assert study_uids("StudyDate=-20231231") == {s["C"]}
    assert study_uids("StudyDate=20240101-20240131") == {s["A"]}
    assert study_uids("PatientID=PID-?REEK") == {s["B"]}
    assert study_uids("StudyDescription=K*") == {s["A"]}
    assert study_uids("ModalitiesInStudy=MR") == {s["A"], s["C"]}
    proc, answers = findscu(node, "-S", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={s['A']}\\{s['C']}",
                            folder=tmp_path)
    assert {a.StudyInstanceUID for a in answers} == {s["A"], s["C"]}

    proc, answers = findscu(node, "-S", "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={s['B']}",
                            "SeriesInstanceUID", folder=tmp_path)
    assert [a.SeriesInstanceUID for a in answers] == [node.series["B-CT"]]


def test_findscu_character_sets_intact(node, tmp_path):
    proc, answers = findscu(node, "-S", "QueryRetrieveLevel=STUDY", "StudyInstanceUID", "PatientName",
                            "StudyDescription", folder=tmp_path)
    assert proc.returncode == 0, _out(proc)
    by_name = {str(a.PatientName): a for a in answers}
    assert set(by_name) == {MUELLER, GREEK, YAMADA}
    assert by_name[MUELLER].SpecificCharacterSet == "ISO_IR 100"
    assert by_name[GREEK].SpecificCharacterSet == "ISO_IR 192"
    assert list(by_name[YAMADA].SpecificCharacterSet) == ["", "ISO 2022 IR 87"]
    assert by_name[YAMADA].StudyDescription == "頭部MRI"
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("rsp*.dcm"))
    assert b"\x1b$B" in raw and MUELLER.encode("latin-1") in raw and GREEK.encode("utf-8") in raw


@pytest.mark.parametrize("charset, pattern, expected", [
    ("ISO_IR 192", "山田*", YAMADA),
    ("ISO_IR 192", "müller*", MUELLER),
    ("ISO_IR 192", "Ελλην*", GREEK),
])
def test_findscu_non_ascii_query(node, tmp_path, charset, pattern, expected):
    proc, answers = findscu(node, "-P", "QueryRetrieveLevel=PATIENT", f"SpecificCharacterSet={charset}",
                            f"PatientName={pattern}", "PatientID", folder=tmp_path)
    assert proc.returncode == 0, _out(proc)
    assert [str(a.PatientName) for a in answers] == [expected]
    assert answers[0].SpecificCharacterSet == charset  # the caller's own set carries every name


def test_findscu_hierarchy_error(node, tmp_path):
    proc, answers = findscu(node, "-S", "QueryRetrieveLevel=SERIES", "SeriesInstanceUID", folder=tmp_path)
    assert answers == []
    out = _out(proc)
    assert "Received Final Find Response (Error: DataSetDoesNotMatchSOPClass)" in out, out  # 0xA900


# -- getscu --------------------------------------------------------------------------------


def test_getscu_series_files_identical_to_the_store(node, tmp_path):
    out_dir = tmp_path / "get"
    out_dir.mkdir()
    proc = run_tool("getscu", "-S", "-aet", "GETSCU", "-aec", SCP_AE, "-od", out_dir, "+B",
                    "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={node.studies['A']}",
                    "-k", f"SeriesInstanceUID={node.series['A-CT']}", "127.0.0.1", str(node.port), timeout=60)
    assert proc.returncode == 0, _out(proc)
    got = {dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in out_dir.iterdir()}
    expected = {i.sop_instance_uid for i in node.store.instances(node.series["A-CT"])}
    assert set(got) == expected and len(expected) == 3
    for uid, path in got.items():
        _, offset = split_dataset(path)
        received = path.read_bytes()[offset:]
        stored = stored_dataset_bytes(node.store, uid)
        # stored as Explicit VR Little Endian, and the node picks Explicit VR LE from getscu's proposal
        # too, so each instance goes out as stored: byte for byte
        assert dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == \
            dcmread(node.store.get_instance(uid).path, stop_before_pixels=True).file_meta.TransferSyntaxUID
        assert received == stored
        assert str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.1"
        assert np.array_equal(dcmread(path).pixel_array, dcmread(node.store.get_instance(uid).path).pixel_array)


def test_getscu_patient_root_derived_series(node, tmp_path):
    out_dir = tmp_path / "get"
    out_dir.mkdir()
    proc = run_tool("getscu", "-P", "-aet", "GETSCU", "-aec", SCP_AE, "-od", out_dir,
                    "-k", "QueryRetrieveLevel=SERIES", "-k", "PatientID=PID-MUELLER",
                    "-k", f"StudyInstanceUID={node.studies['A']}", "-k", f"SeriesInstanceUID={node.series['A-FUSED']}",
                    "127.0.0.1", str(node.port), timeout=60)
    assert proc.returncode == 0, _out(proc)
    got = [dcmread(p) for p in out_dir.iterdir()]
    assert len(got) == 2 and {str(d.SOPClassUID) for d in got} == {SecondaryCaptureImageStorage}
    assert {str(d.PatientName) for d in got} == {MUELLER}


# -- movescu -> storescp -------------------------------------------------------------------


def _received(storescp, uids: set[str], timeout: float = 10) -> dict[str, Path]:
    """storescp's files by SOP Instance UID, waiting until all of ``uids`` are there (it writes after answering)."""
    deadline = time.monotonic() + timeout
    while True:
        files = {}
        for p in storescp.folder.iterdir():
            try:
                files[dcmread(p, stop_before_pixels=True).SOPInstanceUID] = p
            except Exception:  # noqa: BLE001 - a file still being written
                continue
        if uids <= set(files) or time.monotonic() > deadline:
            return files
        time.sleep(0.1)


def test_movescu_study_into_storescp(node, storescp):
    proc = run_tool("movescu", "-S", "-v", "-aet", "MOVESCU", "-aec", SCP_AE, "-aem", DEST_AE,
                    "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={node.studies['A']}",
                    "127.0.0.1", str(node.port), timeout=60)
    out = _out(proc)
    assert proc.returncode == 0, out
    expected = {i.sop_instance_uid for name in ("A-CT", "A-MR", "A-FUSED")
                for i in node.store.instances(node.series[name])}
    assert len(expected) == 7
    files = _received(storescp, expected)
    assert expected <= set(files), out  # source and derived series
    for uid in expected:
        sent, stored = dcmread(files[uid]), dcmread(node.store.get_instance(uid).path)
        assert np.array_equal(sent.pixel_array, stored.pixel_array)
        assert str(sent.PatientName) == MUELLER and sent.SeriesInstanceUID == stored.SeriesInstanceUID
    assert len(re.findall(r"Received Move Response \d+ \(Pending\)", out)) == 7, out
    assert "Received Final Move Response (Success)" in out, out


def test_movescu_patient_root_image_level(node, storescp):
    uid = node.store.instances(node.series["C-MR"])[0].sop_instance_uid
    proc = run_tool("movescu", "-P", "-v", "-aet", "MOVESCU", "-aec", SCP_AE, "-aem", DEST_AE,
                    "-k", "QueryRetrieveLevel=IMAGE", "-k", "PatientID=PID-YAMADA",
                    "-k", f"StudyInstanceUID={node.studies['C']}", "-k", f"SeriesInstanceUID={node.series['C-MR']}",
                    "-k", f"SOPInstanceUID={uid}", "127.0.0.1", str(node.port), timeout=60)
    assert proc.returncode == 0, _out(proc)
    files = _received(storescp, {uid})
    assert uid in files
    assert str(dcmread(files[uid]).PatientName) == YAMADA


def test_movescu_unknown_destination(node):
    proc = run_tool("movescu", "-S", "-v", "-aet", "MOVESCU", "-aec", SCP_AE, "-aem", "NOSUCHAE",
                    "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={node.studies['B']}",
                    "127.0.0.1", str(node.port), timeout=60)
    out = _out(proc)
    assert "Received Final Move Response (Refused: MoveDestinationUnknown)" in out, out  # 0xA801
