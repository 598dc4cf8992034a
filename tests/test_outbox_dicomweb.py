"""DICOMweb (STOW-RS) destinations through the same outbox, against a real Orthanc with its DICOMweb plugin.

The queue, retries, dead letters and CLI are the ones C-STORE uses
(``tests/test_outbox.py``); here: instances arrive intact, credentials work
and a wrong one is retried with a message saying what to check, a server
that is down is retried and then dead-lettered, the server's per-instance
answer decides per instance, and C-MOVE never picks a DICOMweb destination.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pydicom
import pytest
from peers import OrthancServer
from test_outbox import make_sc, uids

from dicom_node.config import NodeConfig, NodeSettings, OutboxConfig, parse_config
from dicom_node.outbox import Outbox
from dicom_node.outbox.senders import Work, outcome_for_status
from dicom_node.outbox.stow import parse_stow_response

USER, PASSWORD = "fusion", "s3cret"


@pytest.fixture
def orthanc(tmp_path):
    server = OrthancServer(tmp_path / "orthanc", dicomweb=True, users={USER: PASSWORD})
    yield server
    server.stop()


def _settings(url: str, tmp_path, *, password: str = PASSWORD, max_attempts: int = 3, **extra) -> NodeSettings:
    secret = tmp_path / "password"
    secret.write_text(password + "\n")
    return parse_config({
        "node": {"ae_title": "FUSIONTEST", "network_timeout_s": 5},
        "destinations": [{"name": "web", "kind": "dicomweb", "url": url, "username": USER,
                          "password_file": str(secret), "timeout_s": 10, **extra}],
        "outbox": {"max_attempts": max_attempts, "backoff_initial_s": 0.05, "backoff_max_s": 0.2},
    })


def test_stow_rs_delivers_every_instance_intact(tmp_path, orthanc):
    files = make_sc(tmp_path / "out", 7)
    with Outbox(tmp_path / "node.sqlite", _settings(orthanc.dicomweb_url, tmp_path, batch_size=3)) as ob:
        assert ob.enqueue("web", files) == 7
        assert ob.process_due() == {"sent": 7, "retried": 0, "dead": 0}
        assert {i.state for i in ob.list()} == {"sent"} and {i.last_status for i in ob.list()} == {0}
        assert ob.enqueue("web", files) == 0  # idempotent, as for C-STORE
    assert orthanc.sop_instance_uids() == uids(files)
    iid = orthanc.get("/instances")[0]
    stored = pydicom.dcmread(io.BytesIO(orthanc.get(f"/instances/{iid}/file")))
    original = {str(pydicom.dcmread(p).SOPInstanceUID): pydicom.dcmread(p) for p in files}[stored.SOPInstanceUID]
    assert stored.PixelData == original.PixelData and stored.SeriesInstanceUID == original.SeriesInstanceUID


def test_wrong_password_is_retried_with_a_message_then_delivered_once_fixed(tmp_path, orthanc, capsys):
    files = make_sc(tmp_path / "out", 2)
    db = tmp_path / "node.sqlite"
    with Outbox(db, _settings(orthanc.dicomweb_url, tmp_path, password="wrong")) as ob:
        ob.enqueue("web", files)
        assert ob.process_due() == {"sent": 0, "retried": 2, "dead": 0}
        item = ob.list()[0]
        assert item.state == "pending" and "401" in item.last_error and "credentials" in item.last_error
    assert orthanc.get("/instances") == []
    time.sleep(0.1)
    with Outbox(db, _settings(orthanc.dicomweb_url, tmp_path)) as ob:  # the operator fixed the password file
        assert ob.process_due() == {"sent": 2, "retried": 0, "dead": 0}
    assert orthanc.sop_instance_uids() == uids(files)
    assert PASSWORD not in capsys.readouterr().err  # credentials never reach the log


def test_server_down_is_retried_then_dead_lettered(tmp_path):
    from dicom_helpers import free_port

    files = make_sc(tmp_path / "out", 2)
    url = f"http://127.0.0.1:{free_port()}/dicom-web"  # nothing listens there
    with Outbox(tmp_path / "node.sqlite", _settings(url, tmp_path, max_attempts=2)) as ob:
        ob.enqueue("web", files)
        assert ob.process_due() == {"sent": 0, "retried": 2, "dead": 0}
        time.sleep(0.1)
        assert ob.process_due() == {"sent": 0, "retried": 0, "dead": 2}
        dead = ob.list(state="dead")
        assert len(dead) == 2 and all("STOW-RS request failed" in d.last_error for d in dead)
        assert ob.retry(destination="web") == 2  # the same operator retry as for DICOM destinations


def test_per_instance_answer_decides_per_instance():
    """PS3.18 10.5.3: Referenced SOP Sequence (stored, maybe with a warning), Failed SOP Sequence (not stored)."""
    body = json.dumps({
        "00081199": {"vr": "SQ", "Value": [
            {"00081155": {"vr": "UI", "Value": ["1.2.3.1"]}},
            {"00081155": {"vr": "UI", "Value": ["1.2.3.2"]}, "00081196": {"vr": "US", "Value": [0xB000]}}]},
        "00081198": {"vr": "SQ", "Value": [
            {"00081155": {"vr": "UI", "Value": ["1.2.3.3"]}, "00081197": {"vr": "US", "Value": [0xA700]}}]},
    }).encode()
    stored, failed = parse_stow_response(body)
    assert stored == {"1.2.3.1": 0, "1.2.3.2": 0xB000} and failed == {"1.2.3.3": 0xA700}
    assert parse_stow_response(b"") is None and parse_stow_response(b"<html>") is None

    w = Work(1, "1.2.3.3", "1.2", Path("x"), 0)
    assert outcome_for_status(w, 0xB000, what="STOW-RS").result == "sent"  # a warning is delivered
    failed_outcome = outcome_for_status(w, 0xA700, what="STOW-RS")
    assert failed_outcome.result == "failed" and "0xA700" in failed_outcome.error


def test_c_move_never_picks_a_dicomweb_destination(tmp_path):
    from dicom_node.index.store import Store
    from dicom_node.net.query_retrieve import QueryRetrieveService

    cfg = parse_config({"destinations": [
        {"name": "web", "kind": "dicomweb", "url": "http://127.0.0.1:1/dicom-web"},
        {"name": "ws", "ae_title": "WS1", "host": "127.0.0.1", "port": 11113}]})
    qr = QueryRetrieveService(cfg, Store(tmp_path, tmp_path / "db.sqlite"))
    assert [d.name for d in qr._move_destinations()] == ["ws"]


def test_dicomweb_destination_in_the_node_settings_model():
    s = NodeSettings(node=NodeConfig(), outbox=OutboxConfig(),
                     destinations=[{"name": "w", "kind": "dicomweb", "url": "https://x.example/dicom-web"}])
    assert s.destination("w").kind == "dicomweb" and s.dicom_destinations() == []
