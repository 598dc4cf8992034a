"""The audit trail: who stored, queried, retrieved and was sent which study (PS3.15 A.5 / RFC 3881 records).

Everything goes over real associations: DCMTK ``storescu`` stores two
studies in one association, pynetdicom queries, C-GETs and C-MOVEs them, and
the outbox delivers one to a pynetdicom Storage SCP.  Each step must leave
its record in ``<root>/audit/audit.jsonl`` (0600 in a 0700 folder) with the
participants' AE titles and addresses and the studies' Patient ID and Study
Instance UID; the JSON log must not name those patients.
"""

from __future__ import annotations

import stat
import subprocess

from dicom_helpers import UID_PREFIX, RunningSCP, dcmtk, json_logs, make_image, write
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage
from test_qr import SCP_AE, SCU_AE, Getter, Received, c_find, c_move, query

from dicom_node import audit
from dicom_node.config import parse_config
from dicom_node.index.store import Store
from dicom_node.outbox import Outbox

DEST_AE = "AUDITDEST"
PATIENTS = {"A": "AUDIT-PID-A", "B": "AUDIT-PID-B"}


def _records(root, event_code: str, action: str) -> list[dict]:
    return [r for r in audit.trail_for(root, SCP_AE).read()
            if r["EventIdentification"]["EventID"]["code"] == event_code
            and r["EventIdentification"]["EventActionCode"] == action]


def _objects(record: dict) -> dict[str, list[dict]]:
    kinds = {"2": "patient", "110180": "study", "110181": "sop_class"}
    out: dict[str, list[dict]] = {"patient": [], "study": [], "sop_class": []}
    for o in record["ParticipantObjectIdentification"]:
        out[kinds[o["ParticipantObjectIDTypeCode"]["code"]]].append(o)
    return out


def test_store_query_retrieve_and_delivery_are_audited(tmp_path):
    received = Received()
    dest_ae = AE(ae_title=DEST_AE)
    dest_ae.add_supported_context(CTImageStorage)
    dest = dest_ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, received.on_store)])
    root = tmp_path / "data"
    cfg = parse_config({
        "node": {"ae_title": SCP_AE, "host": "127.0.0.1", "port": 0, "network_timeout_s": 10},
        "storage": {"root": str(root)},
        "destinations": [{"name": "ws", "ae_title": DEST_AE, "host": "127.0.0.1", "port": dest.server_address[1]}],
        "query_retrieve": {"allowed_callers": [SCU_AE]},
    })
    studies = {k: generate_uid(UID_PREFIX) for k in PATIENTS}
    files = [write(make_image(study_uid=studies[k], patient_id=pid, instance_number=i + 1),
                   tmp_path / "src" / f"{k}{i}.dcm")
             for k, pid in PATIENTS.items() for i in range(2 if k == "A" else 1)]
    store = Store(root, root / "node.sqlite")
    with json_logs("dicom_node") as log:
        server = RunningSCP(cfg, store, query_retrieve=True)
        try:
            sent = subprocess.run([dcmtk("storescu"), "-aet", "MODALITY", "-aec", SCP_AE, "127.0.0.1", str(server.port),
                                   *map(str, files)], capture_output=True, text=True, timeout=60)
            assert sent.returncode == 0, sent.stdout + sent.stderr
            status, answers, _ = c_find(server, query(QueryRetrieveLevel="STUDY", StudyInstanceUID="", PatientID=""))
            assert status == 0 and len(answers) == 2
            final, _ = Getter().run(server, query(QueryRetrieveLevel="STUDY", StudyInstanceUID=studies["A"]))
            assert final.Status == 0
            final = c_move(server, query(QueryRetrieveLevel="STUDY", StudyInstanceUID=studies["B"]), dest=DEST_AE)
            assert final.Status == 0 and len(received.uids()) == 1
        finally:
            server.stop()
        outbox = Outbox(cfg.storage.database_path, cfg, audit_trail=audit.trail_for(root, SCP_AE))
        try:
            outbox.enqueue("ws", sorted((root / "instances" / studies["A"]).rglob("*.dcm")))
            assert outbox.process_due()["sent"] == 2
        finally:
            outbox.close()
    dest.shutdown()

    trail = audit.trail_for(root, SCP_AE)
    assert stat.S_IMODE(trail.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(trail.folder.stat().st_mode) == 0o700

    # stored: one record per study of the association, the modality as requestor and source
    stored = _records(root, "110104", "C")
    assert len(stored) == 2
    by_study = {_objects(r)["study"][0]["ParticipantObjectID"]: r for r in stored}
    assert set(by_study) == set(studies.values())
    a = by_study[studies["A"]]
    assert a["EventIdentification"]["EventOutcomeIndicator"] == 0 and a["EventIdentification"]["EventDateTime"]
    source, destination = a["ActiveParticipant"]
    assert (source["UserID"], source["NetworkAccessPointID"], source["UserIsRequestor"]) == ("MODALITY", "127.0.0.1", True)
    assert source["RoleIDCode"]["code"] == "110153" and destination["UserID"] == SCP_AE
    assert [p["ParticipantObjectID"] for p in _objects(a)["patient"]] == [PATIENTS["A"]]
    assert _objects(a)["study"][0]["ParticipantObjectDescription"]["SOPClass"] == [
        {"UID": str(CTImageStorage), "NumberOfInstances": 2}]

    # queried: who asked, which studies and patients it was shown
    (find,) = _records(root, "110112", "E")
    assert find["ActiveParticipant"][0]["UserID"] == SCU_AE and find["ActiveParticipant"][0]["UserIsRequestor"]
    assert {o["ParticipantObjectID"] for o in _objects(find)["study"]} == set(studies.values())
    assert {o["ParticipantObjectID"] for o in _objects(find)["patient"]} == set(PATIENTS.values())

    # retrieved (C-GET, C-MOVE) and delivered by the outbox: action R, node as source
    get, move, delivery = _records(root, "110104", "R")
    assert [p["UserID"] for p in get["ActiveParticipant"]] == [SCP_AE, SCU_AE]
    assert get["ActiveParticipant"][1]["RoleIDCode"]["code"] == "110152"
    assert _objects(get)["study"][0]["ParticipantObjectID"] == studies["A"]
    assert [p["UserID"] for p in move["ActiveParticipant"]] == [SCU_AE, SCP_AE, DEST_AE]
    assert [o["ParticipantObjectID"] for o in _objects(move)["patient"]] == [PATIENTS["B"]]
    assert [p["UserID"] for p in delivery["ActiveParticipant"]] == [SCP_AE, DEST_AE]
    assert _objects(delivery)["study"][0]["ParticipantObjectDescription"]["SOPClass"][0]["NumberOfInstances"] == 2
    assert [o["ParticipantObjectID"] for o in _objects(delivery)["patient"]] == [PATIENTS["A"]]

    # patient identifiers in the audit file only, never in the log
    assert not any(pid in log.text() for pid in PATIENTS.values())
