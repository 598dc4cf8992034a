"""Access control: who may associate, the exact A-ASSOCIATE-RJ the others get, and routing by called AE title.

The decision itself (``dicom_node.net.access``) is checked as a pure function;
every rule is then observed from the caller's side over real sockets, with
DCMTK ``echoscu``/``storescu`` (what a modality sees) and with pynetdicom (the
rejection primitive's result/source/reason).
"""

from __future__ import annotations

import socket
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from dicom_helpers import UID_PREFIX, RunningSCP, dcmtk, json_logs, make_image, write
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicom_node.config import ConfigError, NodeSettings, parse_config
from dicom_node.index.store import Store
from dicom_node.net.access import (
    REJECT_ADDRESS,
    REJECT_CALLED_AE,
    REJECT_CALLING_AE,
    REJECT_LIMIT,
    REJECTIONS,
    AccessPolicy,
    peer_ip,
)
from dicom_node.workflow.jobs import JobQueue
from dicom_node.workflow.pairing import Pairing
from dicom_node.workflow.settle import Settler

NODE_AE = "FUSIONNODE"
PIPE_AE = "FUSE_MRCT"


def settings(tmp_path: Path | None = None, node: dict | None = None, pipelines: list[dict] | None = None) -> NodeSettings:
    raw = {"node": {"ae_title": NODE_AE, "host": "127.0.0.1", "port": 0, "network_timeout_s": 10, **(node or {})},
           "pipelines": pipelines or []}
    if tmp_path is not None:
        raw["storage"] = {"root": str(tmp_path / "data")}
    return parse_config(raw)


def pipeline(name: str = "mr-ct", **kw) -> dict:
    return {"name": name, "match": "rule", "base": {"modality": ["CT"], "min_instances": 2},
            "overlay": {"modality": ["MR"], "min_instances": 2}, **kw}


# -- the decision, as a pure function -------------------------------------------------------------


def test_constants_are_the_ps38_codes():
    # (result, source, reason) per PS3.8 Table 9-21; the conformance statement cites these names
    assert REJECT_CALLING_AE == (1, 1, 3)
    assert REJECT_CALLED_AE == (1, 1, 7)
    assert REJECT_ADDRESS == (1, 1, 1)
    assert REJECT_LIMIT == (2, 3, 2)
    assert set(REJECTIONS.values()) >= {REJECT_CALLING_AE, REJECT_CALLED_AE, REJECT_ADDRESS, REJECT_LIMIT}


@pytest.mark.parametrize("calling, called, address, open_, expected", [
    ("CT01", NODE_AE, "10.1.2.3", 0, None),
    ("  CT01 ", f"{NODE_AE}  ", "10.1.2.3", 0, None),  # padding is not significant
    ("ct01", NODE_AE, "10.1.2.3", 0, REJECT_CALLING_AE),  # AE titles are case-sensitive
    ("EVIL", NODE_AE, "10.1.2.3", 0, REJECT_CALLING_AE),
    ("CT01", "SOMEONE", "10.1.2.3", 0, REJECT_CALLED_AE),
    ("EVIL", "SOMEONE", "192.0.2.1", 9, REJECT_CALLED_AE),  # called AE is checked first
    ("CT01", NODE_AE, "192.0.2.1", 0, REJECT_ADDRESS),
    ("EVIL", NODE_AE, "192.0.2.1", 0, REJECT_ADDRESS),  # address before calling AE: a stranger learns nothing
    ("CT01", NODE_AE, "::ffff:10.9.9.9", 0, None),  # IPv4 seen through a dual-stack socket
    ("CT01", NODE_AE, "fd00::1", 0, None),
    ("CT01", NODE_AE, "fe80::1%eth0", 0, REJECT_ADDRESS),
    ("CT01", NODE_AE, "not-an-ip", 0, REJECT_ADDRESS),
    ("CT01", NODE_AE, "10.1.2.3", 1, None),
    ("CT01", NODE_AE, "10.1.2.3", 2, REJECT_LIMIT),
    ("EVIL", NODE_AE, "10.1.2.3", 2, REJECT_CALLING_AE),  # permanent reasons win over the transient limit
    # the pipeline's AE title: its own lists apply on top of the node's
    ("MR01", PIPE_AE, "10.1.2.3", 0, None),
    ("CT01", PIPE_AE, "10.1.2.3", 0, REJECT_CALLING_AE),
    ("MR01", PIPE_AE, "10.200.0.1", 0, REJECT_ADDRESS),
    ("MR01", PIPE_AE, "fd00::1", 0, REJECT_ADDRESS),
])
def test_decide(calling, called, address, open_, expected):
    cfg = settings(node={"allowed_callers": ["CT01", "MR01"], "allowed_addresses": ["10.0.0.0/8", "fd00::/8"],
                         "max_associations": 2},
                   pipelines=[pipeline(ae_title=PIPE_AE, allowed_callers=["MR01"], allowed_addresses=["10.1.0.0/16"])])
    decision = AccessPolicy.from_settings(cfg).decide(calling, called, address, open_)
    assert decision.rejection == expected, decision.why
    assert decision.accepted == (expected is None)
    if called.strip() == PIPE_AE and expected != REJECT_CALLED_AE:
        assert decision.pipeline == "mr-ct"
    if expected is not None:
        assert decision.rule in REJECTIONS and REJECTIONS[decision.rule] == expected and decision.why


def test_open_policy_and_called_ae_check_switched_off():
    policy = AccessPolicy.from_settings(settings(node={"require_called_ae": False}))
    assert policy.decide("ANYONE", "ANYTHING", "203.0.113.5", 0).accepted
    assert policy.decide("ANYONE", NODE_AE, "2001:db8::1", 9).accepted  # default limit: 10 open
    assert policy.decide("ANYONE", NODE_AE, "2001:db8::1", 10).rejection == REJECT_LIMIT
    assert policy.called_ae_titles == (NODE_AE,)
    assert peer_ip("::ffff:127.0.0.1").version == 4 and peer_ip("host.example") is None


@pytest.mark.parametrize("raw, fragment", [
    ({"node": {"allowed_addresses": ["10.0.0.300"]}}, "node.allowed_addresses: .*'10.0.0.300' is not an IP address"),
    ({"node": {"allowed_addresses": ["10.1.2.3/8"]}}, "has host bits set"),
    ({"node": {"allowed_callers": ["WAY_TOO_LONG_AE_TITLE"]}}, "node.allowed_callers"),
    ({"pipelines": [pipeline(ae_title=NODE_AE)]}, "already used by node.ae_title"),
    ({"pipelines": [pipeline(ae_title="X"), pipeline("other", ae_title="X")]}, "already used by pipeline 'mr-ct'"),
    ({"pipelines": [pipeline(allowed_callers=["CT01"])]}, "set ae_title"),
    ({"pipelines": [pipeline(ae_title="BAD\\AE")]}, "pipelines.0.ae_title"),
])
def test_access_config_mistakes_are_named(raw, fragment):
    raw = {"node": {"ae_title": NODE_AE, **raw.get("node", {})}, "pipelines": raw.get("pipelines", [])}
    with pytest.raises(ConfigError, match=fragment):
        parse_config(raw)


def test_networks_are_normalised():
    cfg = settings(node={"allowed_addresses": [" 192.168.1.7 ", "FD00::/8"]})
    assert cfg.node.allowed_addresses == ["192.168.1.7/32", "fd00::/8"]


# -- over the network -----------------------------------------------------------------------------


@pytest.fixture
def capture():
    """The SCP's JSON log lines, as dicts."""
    with json_logs("dicom_node.net.listener") as log:
        yield log.events


@pytest.fixture
def make_server(tmp_path):
    started: list[RunningSCP] = []

    def make(node: dict | None = None, pipelines: list[dict] | None = None) -> RunningSCP:
        cfg = settings(tmp_path, node, pipelines)
        server = RunningSCP(cfg, Store(cfg.storage.root, cfg.storage.database_path))
        started.append(server)
        return server

    yield make
    for s in started:
        s.stop()


def echoscu(port: int, calling: str = "ECHOSCU", called: str = NODE_AE) -> subprocess.CompletedProcess:
    return subprocess.run([dcmtk("echoscu"), "-v", "-aet", calling, "-aec", called, "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=30)


#: how DCMTK's echoscu prints each rejection (what the modality's operator reads)
DCMTK_TEXT = {
    REJECT_CALLING_AE: ("Result: Rejected Permanent, Source: Service User", "Reason: Calling AE Title Not Recognized"),
    REJECT_CALLED_AE: ("Result: Rejected Permanent, Source: Service User", "Reason: Called AE Title Not Recognized"),
    REJECT_ADDRESS: ("Result: Rejected Permanent, Source: Service User", "Reason: No Reason\n"),
    REJECT_LIMIT: ("Result: Rejected Transient, Source: Service Provider (Presentation Related)",
                   "Reason: Local Limit Exceeded"),
}


def assert_dcmtk_rejected(proc: subprocess.CompletedProcess, rejection: tuple[int, int, int]) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Association Rejected" in out, out
    for line in DCMTK_TEXT[rejection]:
        assert line in out, out


def associate(port: int, calling: str = "PYSCU", called: str = NODE_AE):
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 10
    return ae.associate("127.0.0.1", port, ae_title=called)


def rejection_of(assoc) -> tuple[int, int, int]:
    """The A-ASSOCIATE-RJ as pynetdicom received it: (result, source, reason)."""
    assert assoc.is_rejected and not assoc.is_established
    rj = assoc.acceptor.primitive
    return rj.result, rj.result_source, rj.diagnostic


def test_calling_ae_allow_list(make_server, capture):
    server = make_server({"allowed_callers": ["GOODSCU", "PYSCU"]})
    assert_dcmtk_rejected(echoscu(server.port, calling="BADSCU"), REJECT_CALLING_AE)
    assert echoscu(server.port, calling="GOODSCU").returncode == 0
    assert rejection_of(associate(server.port, calling="INTRUDER")) == REJECT_CALLING_AE
    ok = associate(server.port)
    assert ok.is_established and ok.send_c_echo().Status == 0
    ok.release()

    (dcmtk_rj, py_rj) = capture("scp.association.rejected")
    assert dcmtk_rj["calling_ae"] == "BADSCU" and dcmtk_rj["address"] == "127.0.0.1" and dcmtk_rj["rule"] == "calling_ae"
    assert (dcmtk_rj["result"], dcmtk_rj["source"], dcmtk_rj["diagnostic"]) == REJECT_CALLING_AE
    assert "node.allowed_callers" in dcmtk_rj["reason"] and py_rj["calling_ae"] == "INTRUDER"


def test_called_ae_check(make_server, capture):
    server = make_server()
    assert_dcmtk_rejected(echoscu(server.port, called="NOTTHENODE"), REJECT_CALLED_AE)
    assert rejection_of(associate(server.port, called="ANY-SCP")) == REJECT_CALLED_AE
    assert echoscu(server.port).returncode == 0
    assert [r["called_ae"] for r in capture("scp.association.rejected")] == ["NOTTHENODE", "ANY-SCP"]

    lax = make_server({"require_called_ae": False})
    assert echoscu(lax.port, called="NOTTHENODE").returncode == 0


@pytest.mark.parametrize("allowed, accepted", [
    (["10.0.0.0/8"], False),
    (["10.0.0.0/8", "127.0.0.0/8"], True),
    (["127.0.0.1"], True),
    (["::1"], False),  # an IPv6 rule does not admit an IPv4 peer
])
def test_ip_allow_list(make_server, capture, allowed, accepted):
    server = make_server({"allowed_addresses": allowed})
    proc = echoscu(server.port)
    if accepted:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assoc = associate(server.port)
        assert assoc.is_established
        assoc.release()
        return
    # dropped at accept: no thread, no association, no A-ASSOCIATE-RJ (a stranger learns nothing)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Association Rejected" not in out, out
    assoc = associate(server.port)
    assert not assoc.is_established and not assoc.is_rejected
    drops = capture("scp.connection.dropped")
    assert len(drops) == 2 and not capture("scp.association.rejected")
    assert all(d["rule"] == "address" and d["address"] == "127.0.0.1" and "node.allowed_addresses" in d["reason"]
               for d in drops)


def test_association_limit(make_server, capture):
    server = make_server({"max_associations": 2})
    held = [associate(server.port) for _ in range(2)]
    try:
        assert all(a.is_established for a in held)
        assert rejection_of(associate(server.port)) == REJECT_LIMIT
        assert_dcmtk_rejected(echoscu(server.port), REJECT_LIMIT)
        held.pop().release()
        deadline = time.monotonic() + 5  # the released association's thread winds down
        while True:
            again = associate(server.port)
            if again.is_established or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert again.is_established
        held.append(again)
    finally:
        for a in held:
            a.release()
    limits = capture("scp.association.rejected")
    assert len(limits) >= 2 and all(r["rule"] == "limit" and r["result"] == 2 for r in limits)


def test_idle_and_closed_connections_lock_nobody_out(make_server, capture):
    """50 connections that never send an A-ASSOCIATE-RQ hold no slot; an allowed echoscu is answered at once.

    Before issue 11 each held one of max_associations for network_timeout_s (60 s); the ARTIM timer
    (artim_timeout_s) now closes the silent ones.
    """
    server = make_server({"max_associations": 2, "network_timeout_s": 60, "artim_timeout_s": 2,
                          "allowed_addresses": ["127.0.0.0/8"]})
    start = time.monotonic()
    assert echoscu(server.port).returncode == 0
    alone = time.monotonic() - start
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(25)]
    for _ in range(25):
        socket.create_connection(("127.0.0.1", server.port)).close()
    try:
        time.sleep(0.2)
        start = time.monotonic()
        proc = echoscu(server.port)
        waited = time.monotonic() - start
        assert proc.returncode == 0, proc.stdout + proc.stderr
        print(f"echoscu behind 25 idle + 25 closed connections: {waited:.2f} s (alone: {alone:.2f} s)")
        assert waited < max(1.0, 3 * alone), (waited, alone)
        for sock in idle:  # the ARTIM timer closes them: the peer reads end-of-file
            sock.settimeout(10)
            assert sock.recv(1) == b""
    finally:
        for sock in idle:
            sock.close()
    assert len(capture("scp.connection.idle")) == 25
    assert not capture("scp.association.rejected")


def test_strangers_are_dropped_at_accept(make_server, capture):
    """A peer outside node.allowed_addresses is closed by the accepting thread before it can send anything."""
    server = make_server({"allowed_addresses": ["10.0.0.0/8"], "artim_timeout_s": 30})
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.settimeout(10)
        assert sock.recv(1) == b""
    assert time.monotonic() - start < 5  # not the 30 s a silent allowed peer would get
    (drop,) = capture("scp.connection.dropped")
    assert drop["address"] == "127.0.0.1" and drop["rule"] == "address"


def test_pipeline_ae_title_has_its_own_callers(make_server, capture):
    server = make_server({"allowed_callers": ["CT01", "MR01"]},
                         [pipeline(ae_title=PIPE_AE, allowed_callers=["MR01"])])
    assert echoscu(server.port, calling="MR01", called=PIPE_AE).returncode == 0
    assert echoscu(server.port, calling="CT01", called=NODE_AE).returncode == 0
    assert_dcmtk_rejected(echoscu(server.port, calling="CT01", called=PIPE_AE), REJECT_CALLING_AE)
    assert_dcmtk_rejected(echoscu(server.port, calling="OTHER", called=NODE_AE), REJECT_CALLING_AE)
    rejected = capture("scp.association.rejected")
    assert "allowed_callers of pipeline 'mr-ct'" in rejected[0]["reason"]
    assert [a["called_ae"] for a in capture("scp.association.accepted")] == [PIPE_AE, NODE_AE]


def test_pipeline_address_list(make_server):
    server = make_server(pipelines=[pipeline(ae_title=PIPE_AE, allowed_addresses=["10.0.0.0/8"])])
    assert_dcmtk_rejected(echoscu(server.port, called=PIPE_AE), REJECT_ADDRESS)
    assert echoscu(server.port, called=NODE_AE).returncode == 0  # the node's own title has no such list


# -- routing by called AE title ---------------------------------------------------------------------


def series_files(folder: Path, modality: str, n: int, study: str) -> list[Path]:
    series = generate_uid(UID_PREFIX)
    sop_class = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}[modality]
    return [write(make_image(study_uid=study, series_uid=series, modality=modality, sop_class=sop_class,
                             instance_number=i + 1), folder / f"{modality}{i}.dcm") for i in range(n)]


def storescu(port: int, called: str, files: list[Path]) -> None:
    proc = subprocess.run([dcmtk("storescu"), "-aet", "MODALITY", "-aec", called, "127.0.0.1", str(port),
                           *map(str, files)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_instances_record_the_called_ae_and_pairing_follows_it(make_server, tmp_path):
    routed = pipeline("routed", ae_title=PIPE_AE)
    anywhere = pipeline("anywhere", base={"modality": ["CT"], "min_instances": 2},
                        overlay={"modality": ["MR"], "description": "^T1", "min_instances": 2})
    server = make_server(pipelines=[routed, anywhere])
    study = generate_uid(UID_PREFIX)
    ct_node = series_files(tmp_path / "a", "CT", 2, study)
    mr_node = series_files(tmp_path / "b", "MR", 2, study)
    ct_pipe = series_files(tmp_path / "c", "CT", 2, study)
    mr_pipe = series_files(tmp_path / "d", "MR", 2, study)
    storescu(server.port, NODE_AE, ct_node + mr_node)
    storescu(server.port, PIPE_AE, ct_pipe + mr_pipe)

    store = server.store

    def uid(files: list[Path]) -> str:
        return series_uid(files[0])

    assert store.called_aes(uid(ct_node)) == {NODE_AE} and store.called_aes(uid(mr_pipe)) == {PIPE_AE}
    assert all(i.called_ae == PIPE_AE and i.calling_ae == "MODALITY" for i in store.instances(uid(ct_pipe)))

    jobs = JobQueue(store.db_path)
    jobs.ensure_schema()
    pairing = Pairing(server.cfg, store, jobs)
    for s in store.list_series():
        Settler(server.cfg, store).trigger(s.series_uid)
    made = {(j.pipeline, j.base_series_uid, j.overlay_series_uid) for j in (jobs.get(i) for i in pairing.pair_settled())}
    # "routed" pairs only what came through its AE title; the node-AE series find no pipeline:
    # "anywhere" would take them, but its overlay selector wants a T1 description
    assert made == {("routed", uid(ct_pipe), uid(mr_pipe))}
    unmatched = store.get_series(uid(mr_node))
    assert unmatched.state == "unmatched" and "own AE title" in unmatched.state_reason and NODE_AE in unmatched.state_reason


def test_pipeline_without_ae_title_leaves_series_sent_to_another_pipelines_ae(make_server, tmp_path):
    """A series sent to a pipeline's own AE title belongs to that pipeline: never fused twice."""
    server = make_server(pipelines=[pipeline("anywhere"), pipeline("other", ae_title=PIPE_AE,
                                                                  base={"modality": ["PT"], "min_instances": 2})])
    study = generate_uid(UID_PREFIX)
    ct = series_files(tmp_path / "a", "CT", 2, study)
    mr_routed = series_files(tmp_path / "b", "MR", 2, study)
    storescu(server.port, NODE_AE, ct)
    storescu(server.port, PIPE_AE, mr_routed)  # meant for "other" (which waits for its PT)
    jobs = JobQueue(server.store.db_path)
    jobs.ensure_schema()
    pairing = Pairing(server.cfg, server.store, jobs)
    for s in server.store.list_series():
        Settler(server.cfg, server.store).trigger(s.series_uid)
    assert pairing.pair_settled() == []

    mr = series_files(tmp_path / "c", "MR", 2, study)
    storescu(server.port, NODE_AE, mr)  # sent to the node's own AE title: "anywhere" takes it
    Settler(server.cfg, server.store).trigger(series_uid(mr[0]))
    (job_id,) = pairing.pair_settled()
    job = jobs.get(job_id)
    assert (job.pipeline, job.base_series_uid, job.overlay_series_uid) == ("anywhere", series_uid(ct[0]), series_uid(mr[0]))


def series_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


def test_older_database_gains_the_called_ae_column(tmp_path):
    db = tmp_path / "node.sqlite"
    old = Store(tmp_path / "data", db)
    old.ensure_schema()
    ds = make_image()
    old.store_dataset(ds, origin="received", calling_ae="OLDSCU")
    old.close()
    with sqlite3.connect(db) as conn:  # what a database written before the column (and Alembic) existed looks like
        conn.execute("ALTER TABLE instances DROP COLUMN called_ae")
        conn.execute("DROP TABLE alembic_version")
        for column in ("claim_owner", "claim_run", "claim_expires"):  # revision 0002's
            conn.execute(f"ALTER TABLE outbox DROP COLUMN {column}")
        assert "called_ae" not in {r[1] for r in conn.execute("PRAGMA table_info(instances)")}

    store = Store(tmp_path / "data", db)
    store.ensure_schema()
    store.ensure_schema()  # idempotent
    rec = store.get_instance(ds.SOPInstanceUID)
    assert rec.calling_ae == "OLDSCU" and rec.called_ae is None
    assert store.called_aes(ds.SeriesInstanceUID) == frozenset()
    tmp = store.new_tmp_path(".dcm")
    new = make_image(series_uid=ds.SeriesInstanceUID, study_uid=ds.StudyInstanceUID, instance_number=2)
    write(new, tmp)
    store.store_received(tmp, "NEWSCU", called_ae=PIPE_AE)
    assert store.get_instance(new.SOPInstanceUID).called_ae == PIPE_AE
    assert store.called_aes(ds.SeriesInstanceUID) == {PIPE_AE}
