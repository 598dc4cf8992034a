"""Verification + Storage SCP against real peers (DCMTK binaries and a pynetdicom SCU).

Every test runs its own server on a free loopback port with a store in tmp_path.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from dicom_helpers import UID_PREFIX, RunningSCP, dcmtk, make_image, run_tool, write
from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, SpatialRegistrationStorage

from dicom_node.config import NodeSettings, StorageConfig
from dicom_node.index.store import Store, StoreError
from dicom_node.net import storage_scp as scp_mod
from dicom_node.net.statuses import CANNOT_UNDERSTAND as STATUS_CANNOT_UNDERSTAND
from dicom_node.net.statuses import DOES_NOT_MATCH_SOP_CLASS as STATUS_DATASET_MISMATCH
from dicom_node.net.statuses import OUT_OF_RESOURCES as STATUS_OUT_OF_RESOURCES
from dicom_node.net.storage_scp import STORAGE_SOP_CLASSES, STORAGE_TRANSFER_SYNTAXES

SCP_AE = "FUSIONNODE"
SCU_AE = "TESTSCU"


def _settings(tmp_path: Path, **node) -> NodeSettings:
    cfg = NodeSettings(storage=StorageConfig(root=tmp_path / "data"))
    # port 0 = let the OS choose (bypasses the ge=1 validation on purpose; tests only)
    node_cfg = cfg.node.model_copy(update={"ae_title": SCP_AE, "host": "127.0.0.1", "port": 0,
                                           "network_timeout_s": 10.0, **node})
    return cfg.model_copy(update={"node": node_cfg})


@pytest.fixture
def make_server(tmp_path):
    started: list[RunningSCP] = []

    def make(**node) -> RunningSCP:
        cfg = _settings(tmp_path, **node)
        store = Store(cfg.storage.root, cfg.storage.database_path)
        server = RunningSCP(cfg, store)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def server(make_server) -> RunningSCP:
    return make_server()


def echo(server: RunningSCP, aet: str = SCU_AE) -> subprocess.CompletedProcess:
    return run_tool("echoscu", "-aet", aet, "-aec", SCP_AE, "127.0.0.1", str(server.port), timeout=30)


def storescu(server: RunningSCP, *files: Path, aet: str = SCU_AE) -> subprocess.CompletedProcess:
    return run_tool("storescu", "-aet", aet, "-aec", SCP_AE, "127.0.0.1", str(server.port), *files, timeout=60)


def storescu_exact(server: RunningSCP, path: Path, sop_class: str, tsyntax: str,
                   workdir: Path) -> subprocess.CompletedProcess:
    """storescu proposing only the file's own transfer syntax (its defaults propose uncompressed only)."""
    cfg = workdir / "storescu.cfg"
    cfg.write_text(
        f"[[TransferSyntaxes]]\n[Sent]\nTransferSyntax1 = {tsyntax}\n"
        f"[[PresentationContexts]]\n[Contexts]\nPresentationContext1 = {sop_class}\\Sent\n"
        "[[Profiles]]\n[Send]\nPresentationContexts = Contexts\n"
    )
    return run_tool("storescu", "-xf", cfg, "Send", "-aet", SCU_AE, "-aec", SCP_AE, "127.0.0.1", str(server.port),
                    path, timeout=60)


def assert_stored_ok(proc: subprocess.CompletedProcess) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "E:" not in out and "Failed" not in out and "Error" not in out, out


def scu_send(server: RunningSCP, what, sop_class: str, transfer_syntax: str = ExplicitVRLittleEndian) -> int:
    """Send one dataset or file with pynetdicom and return the exact DIMSE status."""
    ae = AE(ae_title=SCU_AE)
    ae.add_requested_context(sop_class, transfer_syntax)
    assoc = ae.associate("127.0.0.1", server.port, ae_title=SCP_AE)
    assert assoc.is_established, "association with the SCP failed"
    try:
        status = assoc.send_c_store(what)
        assert status, "no C-STORE response (association aborted?)"
        return int(status.Status)
    finally:
        assoc.release()


def write_with_meta(ds, path: Path, **meta) -> Path:
    """A Part-10 file whose File Meta says something the dataset does not (pynetdicom's chunked
    send takes the C-STORE command's UIDs from the file meta, so this is how a peer lies)."""
    fm = FileMetaDataset(ds.file_meta)
    for key, value in meta.items():
        setattr(fm, key, value)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    with open(path, "wb") as fp:
        fp.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(fp, fm, enforce_standard=True)
        fp.write(body.getvalue())
    return path


def copy_ct(cirs_dir: Path, dest: Path, n: int) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    src = sorted((cirs_dir / "CT").glob("*.dcm"))[:n]
    return [Path(shutil.copy(p, dest / p.name)) for p in src]


# -- conformance constants ----------------------------------------------------------------


def test_presentation_contexts_cover_the_documented_syntaxes():
    for uid in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99",
                "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
                "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81",
                "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.5"):
        assert uid in STORAGE_TRANSFER_SYNTAXES
    for uid in ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.128",
                "1.2.840.10008.5.1.4.1.1.20", "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.66.1"):
        assert uid in STORAGE_SOP_CLASSES
    assert len(set(STORAGE_SOP_CLASSES)) == len(STORAGE_SOP_CLASSES)


# -- verification and association policy --------------------------------------------------


def test_echoscu(server):
    proc = echo(server)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_server_binds_port_zero_to_a_real_port(server):
    assert 0 < server.port < 65536


def test_disallowed_calling_ae_is_rejected(make_server):
    server = make_server(allowed_callers=["GOODSCU"])
    bad = echo(server, aet="BADSCU")
    assert bad.returncode != 0
    assert "reject" in (bad.stdout + bad.stderr).lower()
    good = echo(server, aet="GOODSCU")
    assert good.returncode == 0, good.stdout + good.stderr


# -- storage with real files --------------------------------------------------------------


@pytest.mark.data
def test_storescu_ct_series_indexed_once(server, cirs_dir, tmp_path):
    files = copy_ct(cirs_dir, tmp_path / "send", 10)
    headers = [dcmread(f, stop_before_pixels=True) for f in files]
    assert_stored_ok(storescu(server, *files))

    # checked right after the SCU returned: the durability contract
    store = Store(server.store.root, server.store.db_path)
    series_uid = headers[0].SeriesInstanceUID
    rec = store.get_series(series_uid)
    assert rec is not None and rec.instance_count == 10 and rec.modality == "CT" and rec.state == "open"
    got = store.instances(series_uid)
    assert {i.sop_instance_uid for i in got} == {h.SOPInstanceUID for h in headers}
    for inst, h in zip(sorted(got, key=lambda i: i.sop_instance_uid),
                       sorted(headers, key=lambda h: h.SOPInstanceUID)):
        expected = store.root / "instances" / h.StudyInstanceUID / h.SeriesInstanceUID / f"{h.SOPInstanceUID}.dcm"
        assert inst.path == expected and expected.is_file()
        stored = dcmread(expected, stop_before_pixels=True)
        assert stored.SOPInstanceUID == h.SOPInstanceUID
        assert stored.file_meta.SourceApplicationEntityTitle == SCU_AE
        assert inst.calling_ae == SCU_AE
    # our copies consumed, pynetdicom's spool folder of the association removed at release
    assert list(store.root.joinpath("tmp").rglob("*")) in ([], [store.root / "tmp" / "spool"])

    # the same files again: success, still stored once
    assert_stored_ok(storescu(server, *files))
    assert store.get_series(series_uid).instance_count == 10
    assert store.counts().instances == 10
    assert len(list(store.root.glob("instances/*/*/*.dcm"))) == 10


def _compressed(kind: str, cirs_dir: Path, out: Path) -> Path:
    ct = sorted((cirs_dir / "CT").glob("*.dcm"))[70]
    mr = sorted((cirs_dir / "MR").glob("*.dcm"))[88]
    if kind == "jpeg-baseline":  # 8-bit only: DCMTK rescales the MR to 8 bits
        run = run_tool("dcmcjpeg", "+eb", mr, out)
    elif kind == "jpeg-extended":
        run = run_tool("dcmcjpeg", "+ee", ct, out)
    elif kind == "jpeg-lossless-p14":
        run = run_tool("dcmcjpeg", "+el", ct, out)
    elif kind == "jpeg-lossless-sv1":
        run = run_tool("dcmcjpeg", "+e1", ct, out)
    elif kind == "jpeg-ls-lossless":
        run = run_tool("dcmcjpls", "+el", ct, out)
    elif kind == "jpeg-ls-near":  # near-lossless needs unsigned data
        run = run_tool("dcmcjpls", "+en", mr, out)
    elif kind == "rle":
        run = run_tool("dcmcrle", ct, out)
    elif kind == "deflated":
        run = run_tool("dcmconv", "+td", ct, out)
    elif kind == "big-endian":
        run = run_tool("dcmconv", "+tb", ct, out)
    elif kind in ("j2k-lossless", "j2k-lossy"):
        ds = dcmread(ct)
        if kind == "j2k-lossless":
            ds.compress(JPEG2000Lossless)
        else:
            ds.compress(JPEG2000, j2k_cr=[10])
        ds.save_as(out)
        return out
    else:
        raise AssertionError(kind)
    assert run.returncode == 0, run.stdout + run.stderr
    return out


@pytest.mark.data
@pytest.mark.parametrize(
    "kind, tsyntax",
    [
        ("jpeg-baseline", JPEGBaseline8Bit),
        ("jpeg-extended", JPEGExtended12Bit),
        ("jpeg-lossless-p14", JPEGLossless),
        ("jpeg-lossless-sv1", JPEGLosslessSV1),
        ("jpeg-ls-lossless", JPEGLSLossless),
        ("jpeg-ls-near", JPEGLSNearLossless),
        ("j2k-lossless", JPEG2000Lossless),
        ("j2k-lossy", JPEG2000),
        ("rle", RLELossless),
        ("deflated", DeflatedExplicitVRLittleEndian),
        ("big-endian", ExplicitVRBigEndian),
    ],
)
def test_transfer_syntaxes_stored_as_sent_and_decodable(server, cirs_dir, tmp_path, kind, tsyntax):
    src = _compressed(kind, cirs_dir, tmp_path / f"{kind}.dcm")
    header = dcmread(src, stop_before_pixels=True)
    assert header.file_meta.TransferSyntaxUID == tsyntax
    proc = storescu_exact(server, src, header.SOPClassUID, tsyntax, tmp_path)
    assert_stored_ok(proc)
    inst = server.store.get_instance(header.SOPInstanceUID)
    assert inst is not None, proc.stdout + proc.stderr
    assert inst.transfer_syntax_uid == tsyntax  # stored as received, not transcoded by the peer
    arr = dcmread(inst.path).pixel_array  # pixel_array(path) cannot read deflated files
    assert arr.shape == (header.Rows, header.Columns)


# -- rejections ---------------------------------------------------------------------------


def test_truncated_pixel_data_is_refused_and_server_keeps_serving(server, tmp_path):
    ds = make_image(rows=64, columns=64)
    ds.PixelData = ds.PixelData[:1000]
    assert scu_send(server, ds, CTImageStorage) == STATUS_CANNOT_UNDERSTAND
    assert server.store.get_instance(ds.SOPInstanceUID) is None
    assert [p for p in server.store.tmp_dir.rglob("*") if p.is_file()] == []
    _still_serving(server, tmp_path)


def test_undecodable_compressed_pixel_data_is_refused(server, tmp_path, monkeypatch):
    ds = make_image(rows=32, columns=32)
    ds.compress(RLELossless)
    ds.PixelData = ds.PixelData[:40] + b"\xff" * 24  # keeps the encapsulation, breaks the RLE segments
    path = write(ds, tmp_path / "bad-rle.dcm")
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send the bytes as they are
    assert scu_send(server, path, CTImageStorage, RLELossless) == STATUS_CANNOT_UNDERSTAND
    assert server.store.get_instance(ds.SOPInstanceUID) is None
    _still_serving(server, tmp_path)


def test_missing_sop_instance_uid_is_refused(server, tmp_path, monkeypatch):
    ds = make_image()
    uid = ds.SOPInstanceUID
    del ds.SOPInstanceUID  # the file meta (and so the C-STORE command) still names the instance
    path = write_with_meta(ds, tmp_path / "nouid.dcm", MediaStorageSOPInstanceUID=uid)
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    assert scu_send(server, path, CTImageStorage) == STATUS_DATASET_MISMATCH
    assert server.store.get_instance(uid) is None
    _still_serving(server, tmp_path)


def test_sop_instance_uid_differing_from_command_is_refused(server, tmp_path, monkeypatch):
    path = write_with_meta(make_image(), tmp_path / "mismatch.dcm", MediaStorageSOPInstanceUID=generate_uid(UID_PREFIX))
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    assert scu_send(server, path, CTImageStorage) == STATUS_DATASET_MISMATCH
    assert server.store.counts().instances == 0


def test_sop_class_differing_from_command_is_refused(server, tmp_path, monkeypatch):
    path = write_with_meta(make_image(sop_class=SecondaryCaptureImageStorage), tmp_path / "class.dcm",
                           MediaStorageSOPClassUID=MRImageStorage)
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    assert scu_send(server, path, MRImageStorage) == STATUS_DATASET_MISMATCH


def test_unparseable_dataset_is_refused(server, tmp_path, monkeypatch):
    good = write(make_image(), tmp_path / "good.dcm")
    raw = good.read_bytes()
    from pynetdicom.dsutils import split_dataset

    _, offset = split_dataset(good)
    bad = tmp_path / "garbage.dcm"
    # a sequence of undefined length whose first item is not an item tag
    body = struct.pack("<HH", 0x0008, 0x1140) + b"SQ\x00\x00" + b"\xff\xff\xff\xff"
    body += struct.pack("<HHI", 0x1234, 0x5678, 8) + b"\x01" * 8
    bad.write_bytes(raw[:offset] + body)
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    assert scu_send(server, bad, CTImageStorage) == STATUS_CANNOT_UNDERSTAND
    assert server.store.counts().instances == 0
    _still_serving(server, tmp_path)


def test_store_failure_answers_out_of_resources(server, tmp_path, monkeypatch):
    def broken(*a, **kw):
        raise StoreError("disk full (simulated)")

    monkeypatch.setattr(server.store, "store_received", broken)
    ds = make_image()
    assert scu_send(server, ds, CTImageStorage) == STATUS_OUT_OF_RESOURCES
    assert [p for p in server.store.tmp_dir.rglob("*") if p.is_file()] == []  # the partial file is cleaned up
    monkeypatch.undo()
    assert scu_send(server, ds, CTImageStorage) == 0x0000  # the sender's retry succeeds


def test_unexpected_handler_error_answers_cannot_understand(server, tmp_path, monkeypatch):
    def boom(*a, **kw):
        raise RuntimeError("bug (simulated)")

    monkeypatch.setattr(scp_mod.validation, "check_instance", boom)
    assert scu_send(server, make_image(), CTImageStorage) == STATUS_CANNOT_UNDERSTAND
    monkeypatch.undo()
    _still_serving(server, tmp_path)


def test_success_means_row_and_file_exist(server):
    ds = make_image(rows=128, columns=128)
    assert scu_send(server, ds, CTImageStorage) == 0x0000
    fresh = Store(server.store.root, server.store.db_path)  # another connection sees the committed row
    inst = fresh.get_instance(ds.SOPInstanceUID)
    assert inst is not None and inst.path.is_file() and inst.path.stat().st_size == inst.size_bytes
    assert dcmread(inst.path).PixelData == ds.PixelData
    # a duplicate is success too, and changes nothing
    assert scu_send(server, ds, CTImageStorage) == 0x0000
    assert fresh.counts().instances == 1


def test_registration_object_without_pixel_data_is_stored(server):
    ds = make_image(sop_class=SpatialRegistrationStorage, modality="REG")
    for kw in ("Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated", "BitsStored",
               "HighBit", "PixelRepresentation", "PixelData"):
        delattr(ds, kw)
    assert scu_send(server, ds, SpatialRegistrationStorage) == 0x0000
    assert server.store.get_series(ds.SeriesInstanceUID).modality == "REG"


def _still_serving(server: RunningSCP, tmp_path: Path) -> None:
    proc = echo(server)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    good = write(make_image(), tmp_path / f"good-{generate_uid(UID_PREFIX)}.dcm")
    assert_stored_ok(storescu(server, good))
    assert server.store.get_instance(dcmread(good, stop_before_pixels=True).SOPInstanceUID) is not None


def test_dcmtk_present():
    assert Path(dcmtk("storescu")).is_absolute()


def test_success_only_after_fsync_rename_dir_fsync_and_commit(server, monkeypatch):
    """The order behind Success, with the file's fsync overlapped with its intake check (storage_scp._store).

    Every fsync, rename and commit the store makes is recorded; the C-STORE
    answers Success only after the file was fsynced before its rename, its
    folder after it, and the row committed last.
    """
    from dicom_node.index import db as db_mod
    from dicom_node.index import store as store_mod

    steps: list[tuple[str, str]] = []
    real_fsync, real_replace, real_tx = store_mod.os.fsync, store_mod.os.replace, db_mod.Database.transaction

    def fsync(fd):
        real_fsync(fd)
        steps.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))

    def replace(src, dst):
        steps.append(("rename", str(src)))
        real_replace(src, dst)

    @contextlib.contextmanager
    def transaction(self, *a, **kw):
        with real_tx(self, *a, **kw) as tx:
            yield tx
        steps.append(("commit", ""))

    monkeypatch.setattr(store_mod.os, "fsync", fsync)
    monkeypatch.setattr(store_mod.os, "replace", replace)
    monkeypatch.setattr(db_mod.Database, "transaction", transaction)
    ds = make_image(rows=64, columns=64)
    assert scu_send(server, ds, CTImageStorage) == 0x0000
    final = server.store.get_instance(ds.SOPInstanceUID).path
    (rename,) = [i for i, (what, _) in enumerate(steps) if what == "rename"]
    tmp = steps[rename][1]
    assert ("fsync", tmp) in steps[:rename], steps  # the file's bytes were durable before the rename
    assert ("fsync", str(final.parent)) in steps[rename:], steps  # then its directory entry
    dir_sync = steps.index(("fsync", str(final.parent)), rename)
    assert ("commit", "") in steps[dir_sync:], steps  # then the index row; Success came after all of them
