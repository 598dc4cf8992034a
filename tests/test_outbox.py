"""dicom_node.outbox against real peers on loopback: DCMTK storescp and an in-process pynetdicom SCP."""

from __future__ import annotations

import logging
import socket
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_helpers import json_logs
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import AE, StoragePresentationContexts, evt

from dicom_node.config import DicomDestination, NodeConfig, NodeSettings, OutboxConfig
from dicom_node.outbox import Outbox, OutboxItem

PATIENT_NAME = "Secret^Patient"
PATIENT_ID = "PID-SECRET-42"
STORESCP = Path("/usr/bin/storescp")


# -- helpers ----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


def make_sc(folder: Path, n: int = 1, *, transfer_syntax=ExplicitVRLittleEndian) -> list[Path]:
    """``n`` valid 16x16 MONOCHROME2 Secondary Capture files of one series."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    paths = []
    for i in range(n):
        uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        meta.MediaStorageSOPInstanceUID = uid
        meta.TransferSyntaxUID = transfer_syntax
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = SecondaryCaptureImageStorage
        ds.SOPInstanceUID = uid
        ds.PatientName = PATIENT_NAME
        ds.PatientID = PATIENT_ID
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.Modality = "OT"
        ds.ConversionType = "WSD"
        ds.SeriesNumber = 1
        ds.InstanceNumber = i + 1
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = 16
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.PixelData = (np.arange(256, dtype=np.uint16).reshape(16, 16) * (i + 1) % 4096).tobytes()
        path = folder / f"sc{i:03d}_{uid[-6:]}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def uids(paths) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


def settings_for(port: int, *, max_attempts: int = 3, initial: float = 0.05, maximum: float = 0.2,
                 called: str = "DEST") -> NodeSettings:
    return NodeSettings(
        node=NodeConfig(ae_title="FUSIONTEST", network_timeout_s=5),
        destinations=[
            DicomDestination(name="pacs", ae_title=called, host="127.0.0.1", port=port),
            DicomDestination(name="other", ae_title="OTHER", host="127.0.0.1", port=port),
        ],
        outbox=OutboxConfig(max_attempts=max_attempts, backoff_initial_s=initial, backoff_max_s=maximum),
    )


class PynetdicomPeer:
    """Storage SCP in this process on a free loopback port; ``status`` is what every C-STORE answers."""

    def __init__(self, ae_title: str = "DEST", require_called_aet: bool = False):
        self.status = 0x0000
        self.received: list[str] = []
        self.connections = 0
        self._lock = threading.Lock()
        ae = AE(ae_title=ae_title)
        ae.supported_contexts = StoragePresentationContexts
        ae.require_called_aet = require_called_aet
        self.server = ae.start_server(
            ("127.0.0.1", 0), block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store), (evt.EVT_CONN_OPEN, self._on_open)],
        )
        self.port = self.server.server_address[1]

    def _on_open(self, event):
        with self._lock:
            self.connections += 1

    def _on_store(self, event):
        status = self.status
        if status in (0x0000, 0xB000, 0xB006, 0xB007):
            with self._lock:
                self.received.append(str(event.request.AffectedSOPInstanceUID))
        return status

    def close(self):
        self.server.shutdown()


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """On PostgreSQL the audit trail goes under the (relative) storage root: keep it in the test's folder."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def peer():
    p = PynetdicomPeer()
    yield p
    p.close()


class Storescp:
    """DCMTK's storescp as a subprocess writing into ``folder``."""

    def __init__(self, folder: Path, port: int, ae_title: str = "DEST"):
        if not STORESCP.exists():
            pytest.skip("DCMTK storescp not installed at /usr/bin/storescp")
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.log = open(folder.parent / f"storescp-{port}.log", "wb")
        self.proc = subprocess.Popen(
            [str(STORESCP), "-od", str(folder), "-aet", ae_title, str(port)],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        try:
            _wait_listening(port)
        except TimeoutError:
            self.stop()
            raise

    def received(self) -> set[str]:
        return uids(p for p in self.folder.iterdir() if p.is_file())

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture
def capture():
    """JSON log lines of dicom_node.outbox (independent of propagation settings)."""
    with json_logs("dicom_node.outbox", level=logging.DEBUG) as log:
        yield log


def states(ob: Outbox) -> dict[str, str]:
    return {i.sop_instance_uid: i.state for i in ob.list()}


# -- tests ------------------------------------------------------------------


def test_sends_to_dcmtk_storescp_in_one_association(db_location, tmp_path, capture):
    port = _free_port()
    scp = Storescp(tmp_path / "received", port)
    try:
        files = make_sc(tmp_path / "out", 3)
        ob = Outbox(db_location, settings_for(port))
        assert ob.enqueue("pacs", files, job_id=7) == 3
        assert ob.summary()["pacs"]["pending"] == 3
        assert ob.process_due() == {"sent": 3, "retried": 0, "dead": 0}
        items = ob.list()
        assert all(isinstance(i, OutboxItem) and i.state == "sent" and i.last_status == 0 for i in items)
        assert {i.job_id for i in items} == {7}
        assert scp.received() == uids(files)
        assert ob.summary()["pacs"] == {"pending": 0, "sending": 0, "sent": 3, "dead": 0}
        assert ob.wait_idle(0.1)
        ob.close()
    finally:
        scp.stop()
    text = capture.text()
    assert '"event": "outbox.enqueued"' in text and '"event": "outbox.sent"' in text
    assert PATIENT_NAME not in text and "Secret" not in text and PATIENT_ID not in text


def test_destination_down_then_up(db_location, tmp_path):
    port = _free_port()  # nothing listens here yet
    files = make_sc(tmp_path / "out", 2)
    ob = Outbox(db_location, settings_for(port, max_attempts=5, initial=0.05))
    ob.enqueue("pacs", files)
    t0 = time.time()
    assert ob.process_due(now=t0) == {"sent": 0, "retried": 2, "dead": 0}
    for item in ob.list():
        assert item.state == "pending" and item.attempts == 1
        assert item.next_attempt_at == pytest.approx(t0 + 0.05)
        assert item.last_status is None and "connection failed" in item.last_error
    # not due yet: nothing happens, not even a connection attempt
    assert ob.process_due(now=t0 + 0.01) == {"sent": 0, "retried": 0, "dead": 0}

    scp = Storescp(tmp_path / "received", port)
    try:
        time.sleep(0.06)
        assert ob.process_due() == {"sent": 2, "retried": 0, "dead": 0}
        assert scp.received() == uids(files)
        assert {i.attempts for i in ob.list()} == {2}
    finally:
        scp.stop()
    ob.close()


def test_backoff_doubles_caps_and_dead_letters(db_location, tmp_path, capture):
    port = _free_port()
    files = make_sc(tmp_path / "out", 1)
    ob = Outbox(db_location, settings_for(port, max_attempts=6, initial=1.0, maximum=5.0))
    ob.enqueue("pacs", files)
    now = time.time() + 10.0
    for attempt, delay in enumerate([1.0, 2.0, 4.0, 5.0, 5.0], start=1):
        assert ob.process_due(now=now) == {"sent": 0, "retried": 1, "dead": 0}
        (item,) = ob.list()
        assert (item.state, item.attempts) == ("pending", attempt)
        assert item.next_attempt_at == pytest.approx(now + delay)
        assert ob.process_due(now=now + delay - 0.01) == {"sent": 0, "retried": 0, "dead": 0}
        now += delay
    assert ob.process_due(now=now) == {"sent": 0, "retried": 0, "dead": 1}
    (item,) = ob.list(state="dead")
    assert item.attempts == 6 and "connection failed" in item.last_error
    assert ob.process_due(now=now + 1e6) == {"sent": 0, "retried": 0, "dead": 0}  # dead stays dead
    assert ob.wait_idle(0)  # no pending/sending left -> idle
    text = capture.text()
    assert '"event": "outbox.dead"' in text and item.sop_instance_uid in text
    assert '"event": "outbox.association.failed"' in text and '"event": "outbox.retry"' in text
    ob.close()


def test_failure_status_retries_dies_and_is_revived(db_location, tmp_path, peer, capture):
    files = make_sc(tmp_path / "out", 2)
    ob = Outbox(db_location, settings_for(peer.port, max_attempts=3, initial=0.01))
    ob.enqueue("pacs", files)
    peer.status = 0xA700  # out of resources
    now = time.time()
    assert ob.process_due(now=now) == {"sent": 0, "retried": 2, "dead": 0}
    assert ob.process_due(now=now + 1) == {"sent": 0, "retried": 2, "dead": 0}
    assert ob.process_due(now=now + 2) == {"sent": 0, "retried": 0, "dead": 2}
    dead = ob.list(state="dead")
    assert len(dead) == 2
    assert all(i.attempts == 3 and i.last_status == 0xA700 and "0xA700" in i.last_error for i in dead)
    assert peer.connections == 3  # one association per round, both files on it
    assert ob.wait_idle(0)

    # re-enqueueing does not revive a dead letter; retry() does
    assert ob.enqueue("pacs", files) == 0
    assert ob.list(state="dead") == dead
    assert ob.retry(ids=[dead[0].id]) == 1
    assert ob.retry(destination="other") == 0
    assert ob.retry() == 2  # the other dead one, and the already-pending one reset again
    assert {(i.state, i.attempts) for i in ob.list()} == {("pending", 0)}
    peer.status = 0x0000
    assert ob.process_due() == {"sent": 2, "retried": 0, "dead": 0}
    assert set(peer.received) == uids(files)
    assert ob.retry() == 0  # sent items are never touched
    assert '"status": "0xA700"' in capture.text()
    ob.close()


def test_warning_status_counts_as_sent(db_location, tmp_path, peer, capture):
    files = make_sc(tmp_path / "out", 1)
    ob = Outbox(db_location, settings_for(peer.port))
    ob.enqueue("pacs", files)
    peer.status = 0xB000
    assert ob.process_due() == {"sent": 1, "retried": 0, "dead": 0}
    (item,) = ob.list()
    assert item.state == "sent" and item.last_status == 0xB000
    lines = [ln for ln in capture.text().splitlines() if '"outbox.sent"' in ln]
    assert lines and '"level": "warning"' in lines[0] and "0xB000" in lines[0]
    ob.close()


def test_association_rejected_is_retried(db_location, tmp_path):
    peer = PynetdicomPeer(ae_title="DEST", require_called_aet=True)
    try:
        files = make_sc(tmp_path / "out", 1)
        ob = Outbox(db_location, settings_for(peer.port, called="WRONGAE"))
        ob.enqueue("pacs", files)
        assert ob.process_due() == {"sent": 0, "retried": 1, "dead": 0}
        (item,) = ob.list()
        assert item.state == "pending" and "rejected" in item.last_error
        assert peer.received == []
        ob.close()
    finally:
        peer.close()


def test_mixed_transfer_syntaxes_and_missing_file(db_location, tmp_path, peer):
    explicit = make_sc(tmp_path / "a", 2)
    implicit = make_sc(tmp_path / "b", 2, transfer_syntax=ImplicitVRLittleEndian)
    ob = Outbox(db_location, settings_for(peer.port))
    assert ob.enqueue("pacs", explicit + implicit) == 4
    gone = implicit[1]
    gone_uid = uids([gone]).pop()
    gone.unlink()  # vanished after queueing: dead at once, retrying cannot help
    assert ob.process_due() == {"sent": 3, "retried": 0, "dead": 1}
    assert set(peer.received) == uids(explicit + implicit[:1])
    assert peer.connections == 1
    (dead,) = ob.list(state="dead")
    assert dead.sop_instance_uid == gone_uid and "cannot read" in dead.last_error
    ob.close()


def test_restart_resets_interrupted_sends(tmp_path, peer):
    files = make_sc(tmp_path / "out", 2)
    db_path = tmp_path / "node.sqlite"
    ob = Outbox(db_path, settings_for(peer.port))
    ob.enqueue("pacs", files)
    ob.close()
    del ob
    # a crash in the middle of a send leaves a row 'sending'
    conn = sqlite3.connect(db_path)
    with conn:
        conn.execute("UPDATE outbox SET state='sending' WHERE id=(SELECT MIN(id) FROM outbox)")
    conn.close()

    ob = Outbox(db_path, settings_for(peer.port))
    assert {i.state for i in ob.list()} == {"pending"}
    assert ob.process_due() == {"sent": 2, "retried": 0, "dead": 0}
    assert set(peer.received) == uids(files)
    ob.close()


def test_enqueue_is_idempotent(db_location, tmp_path, peer):
    files = make_sc(tmp_path / "out", 3)
    ob = Outbox(db_location, settings_for(peer.port))
    assert ob.enqueue("pacs", files) == 3
    assert ob.enqueue("pacs", files[:2]) == 0
    assert ob.enqueue("other", files[:1]) == 1  # another destination is another row
    assert len(ob.list(destination="pacs")) == 3 and len(ob.list()) == 4
    assert ob.process_due() == {"sent": 4, "retried": 0, "dead": 0}
    assert len(peer.received) == 4
    assert ob.enqueue("pacs", files) == 0
    assert ob.process_due() == {"sent": 0, "retried": 0, "dead": 0}
    assert len(peer.received) == 4 and len(ob.list()) == 4
    ob.close()


def test_unknown_destination_and_bad_files(db_location, tmp_path, peer):
    ob = Outbox(db_location, settings_for(peer.port))
    with pytest.raises(ValueError, match=r"'nowhere'.*'pacs', 'other'"):
        ob.enqueue("nowhere", make_sc(tmp_path / "out", 1))
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    with pytest.raises(ValueError, match="not a DICOM file"):
        ob.enqueue("pacs", [junk])
    with pytest.raises(ValueError, match="unknown state"):
        ob.list(state="lost")
    assert ob.list() == []
    ob.close()


def test_background_worker_sends_and_stops_promptly(db_location, tmp_path, peer):
    files = make_sc(tmp_path / "out", 3)
    ob = Outbox(db_location, settings_for(peer.port))
    ob.start(poll_interval_s=0.05)
    try:
        ob.enqueue("pacs", files)
        assert ob.wait_idle(10.0)
        assert set(peer.received) == uids(files)
    finally:
        t0 = time.monotonic()
        assert ob.stop(timeout=5.0)
        assert time.monotonic() - t0 < 2.0
    # a stopped worker does not prevent manual processing
    more = make_sc(tmp_path / "more", 1)
    ob.enqueue("pacs", more)
    assert ob.process_due() == {"sent": 1, "retried": 0, "dead": 0}
    ob.close()


def test_unexpected_error_never_strands_rows_sending(db_location, tmp_path, peer, monkeypatch):
    files = make_sc(tmp_path / "out", 2)
    ob = Outbox(db_location, settings_for(peer.port))
    ob.enqueue("pacs", files)

    class Broken:  # a sender with a bug: it fails after its first item
        def send(self, batch, cancel):
            raise RuntimeError("simulated bug")
            yield  # a generator, like every sender

    from dicom_node.outbox import queue as queue_module

    monkeypatch.setattr(queue_module, "sender_for", lambda *args: Broken())
    assert ob.process_due() == {"sent": 0, "retried": 2, "dead": 0}
    assert {(i.state, i.attempts) for i in ob.list()} == {("pending", 1)}
    assert "simulated bug" in ob.list()[0].last_error
    monkeypatch.undo()
    time.sleep(0.06)
    assert ob.process_due() == {"sent": 2, "retried": 0, "dead": 0}
    ob.close()
