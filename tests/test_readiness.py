"""Readiness checks and job progress on their own: weights missing, disk below reserve, an old jobs table."""

from __future__ import annotations

import sqlite3


def _settings(tmp_path, **extra):
    from dicom_node.config import parse_config

    return parse_config({"storage": {"root": str(tmp_path)},
                         "pipelines": [{"name": "mr-ct", "destinations": [], "base": {"modality": ["CT"]},
                                        "overlay": {"modality": ["MR"]}, "method": "dmf"}], **extra})


def test_missing_weights_make_the_node_not_ready(tmp_path, monkeypatch):
    from dicom_node.web.readiness import Readiness

    monkeypatch.setenv("FUSION_VGG16_WEIGHTS", str(tmp_path / "nowhere.pt"))
    monkeypatch.setenv("FUSION_CACHE_DIR", str(tmp_path / "empty-cache"))
    r = Readiness(_settings(tmp_path))
    report = r.self_check()
    assert report["ready"] is False
    assert not report["checks"]["weights"]["ok"] and "fusion-node models fetch" in report["checks"]["weights"]["detail"]
    assert report["checks"]["database"]["ok"]


def test_disk_below_reserve_is_not_ready(tmp_path):
    from dicom_node.web.readiness import Readiness

    r = Readiness(_settings(tmp_path, http={"disk_reserve_mb": 2**40}))
    check = r.check_disk()
    assert not check.ok and "below the reserve" in check.detail


def test_an_old_jobs_table_gains_the_progress_columns(tmp_path):
    from dicom_node.workflow.jobs import JobQueue

    db = tmp_path / "node.sqlite"
    with sqlite3.connect(db) as c:  # the table as the previous version wrote it
        c.executescript("""CREATE TABLE jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL UNIQUE,
            pipeline TEXT NOT NULL, base_series_uid TEXT NOT NULL, overlay_series_uid TEXT NOT NULL,
            state TEXT NOT NULL DEFAULT 'queued', attempts INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL,
            started_at REAL, finished_at REAL, error TEXT, result TEXT);
            INSERT INTO jobs (key, pipeline, base_series_uid, overlay_series_uid, created_at) VALUES ('k', 'p', '1', '2', 0);""")
    q = JobQueue(db)
    q.ensure_schema()
    job = q.claim()
    assert job is not None and job.stage is None
    q.set_progress(job.id, "fuse", 8, 40)
    first = q.get(job.id)
    q.set_progress(job.id, "fuse", 16, 40)
    again = q.get(job.id)
    assert (again.stage, again.progress_done, again.progress_total) == ("fuse", 16, 40)
    assert again.stage_started_at == first.stage_started_at  # the same stage: its clock runs on
    q.set_progress(job.id, "encode")
    last = q.get(job.id)
    assert last.stage == "encode" and last.progress_done == 16 and last.stage_started_at >= again.progress_at


def test_exposed_without_token_is_refused():
    import pytest

    from dicom_node.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="token"):
        parse_config({"http": {"host": "0.0.0.0"}})
    assert parse_config({"http": {"host": "0.0.0.0", "token": "x" * 32}}).http.host == "0.0.0.0"
    assert parse_config({"http": {"host": "0.0.0.0", "enabled": False}}).http.enabled is False


def test_https_with_a_token(tmp_path):
    """[http] certificate + private_key: the node serves HTTPS (verified against its CA), and the token is asked."""
    import ssl

    import httpx
    from test_tls import issue, make_ca

    from dicom_node.config import parse_config
    from dicom_node.web.runtime import RunningNode
    from dicom_node.workflow.node import Node

    ca = make_ca(tmp_path, "hospital")
    leaf = issue(ca, tmp_path, "node", server=True, dns=("localhost",), ips=("127.0.0.1",))
    (tmp_path / "token").write_text("t0ken-" + "x" * 26 + "\n")
    settings = parse_config({"node": {"host": "127.0.0.1", "port": 0}, "storage": {"root": str(tmp_path / "data")},
                             "http": {"port": 0, "certificate": str(leaf.cert), "private_key": str(leaf.key),
                                      "token_file": str(tmp_path / "token")}})
    running = RunningNode(Node(settings)).start()
    try:
        assert running.url.startswith("https://127.0.0.1:")
        with httpx.Client(verify=ssl.create_default_context(cafile=str(ca.pem))) as c:
            assert c.get(running.url + "healthz").json()["status"] == "alive"
            assert c.get(running.url + "api/jobs").status_code == 401
            ok = c.get(running.url + "api/jobs", headers={"Authorization": "Bearer t0ken-" + "x" * 26})
            assert ok.status_code == 200 and ok.json() == []
    finally:
        running.stop()


def test_a_taken_port_is_an_error_at_start(tmp_path):
    import socket

    import pytest

    from dicom_node.config import parse_config
    from dicom_node.web.runtime import RunningNode, WebError
    from dicom_node.workflow.node import Node

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = parse_config({"node": {"host": "127.0.0.1", "port": 0}, "storage": {"root": str(tmp_path)},
                                 "http": {"port": port}})
        with pytest.raises(WebError, match=f"cannot listen for HTTP on 127.0.0.1:{port}"):
            RunningNode(Node(settings)).start()


def test_destinations_checked_against_a_real_pacs(tmp_path):
    """Orthanc as the PACS: C-ECHO to its DICOM port, QIDO-RS to its DICOMweb side (right and wrong password)."""
    from peers import OrthancServer

    from dicom_node.config import parse_config
    from dicom_node.web.readiness import Readiness

    orthanc = OrthancServer(tmp_path / "orthanc", dicomweb=True, users={"fusion": "pw"})
    try:
        web = {"kind": "dicomweb", "url": orthanc.dicomweb_url, "username": "fusion"}
        settings = parse_config({"storage": {"root": str(tmp_path / "data")}, "destinations": [
            {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port},
            {"name": "web", **web, "password": "pw"}, {"name": "web-bad", **web, "password": "wrong"}]})
        report = Readiness(settings).self_check()
    finally:
        orthanc.stop()
    d = report["destinations"]
    assert d["pacs"]["ok"] and d["pacs"]["detail"] == "C-ECHO success"
    assert d["web"]["ok"] and d["web"]["detail"] == "HTTP 200", d["web"]
    assert not d["web-bad"]["ok"] and "credentials refused" in d["web-bad"]["detail"]
