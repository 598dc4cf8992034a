"""The node's network behaviour as DCMTK's tools see it: Verification and Storage SCP.

One running node listener (real sockets, a store in a temporary folder) is
exercised with DCMTK's ``echoscu`` and ``storescu``:

* C-ECHO, also with the most a requestor may propose (128 contexts x 38 syntaxes);
* C-STORE once per transfer syntax the node claims (``scp.STORAGE_TRANSFER_SYNTAXES``):
  the test encodes an image in that syntax (DCMTK's dcmconv/dcmcjpeg/dcmcjpls/dcmcrle,
  pydicom's JPEG 2000 encoder), makes storescu propose that syntax alone, and checks
  that the node accepted it, stored the file in it and kept the pixel data as sent
  (byte for byte; decoded values equal the original for the lossless syntaxes);
* C-STORE of one instance of every claimed storage SOP class in one association;
* what the node does not claim is refused at negotiation: an unlisted SOP class and an
  unlisted transfer syntax get no presentation context and nothing is stored.

C-FIND/C-GET/C-MOVE with findscu/getscu/movescu are in test_qr_dcmtk.py.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from dicom_helpers import UID_PREFIX, RunningSCP, make_image, run_tool, write
from pydicom import dcmread
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
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

from dicom_node.config import NodeSettings, StorageConfig
from dicom_node.index.store import Store
from dicom_node.net.listener import VERIFICATION_TRANSFER_SYNTAXES
from dicom_node.net.storage_scp import STORAGE_SOP_CLASSES, STORAGE_TRANSFER_SYNTAXES

SCP_AE = "FUSIONNODE"
SCU_AE = "DCMTKSCU"
CT = "1.2.840.10008.5.1.4.1.1.2"
ULTRASOUND = "1.2.840.10008.5.1.4.1.1.6.1"  # not claimed by the node
HTJ2K_LOSSLESS = "1.2.840.10008.1.2.4.201"  # not claimed by the node
#: DCMTK's names of the uncompressed syntaxes in its -d output
DCMTK_NAMES = {"LittleEndianImplicit": ImplicitVRLittleEndian, "LittleEndianExplicit": ExplicitVRLittleEndian,
               "BigEndianExplicit": ExplicitVRBigEndian}

#: syntaxes whose decoded pixels must equal the original exactly
LOSSLESS = {ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian,
            JPEGLossless, JPEGLosslessSV1, JPEGLSLossless, JPEG2000Lossless, RLELossless}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("node")
    cfg = NodeSettings(storage=StorageConfig(root=root / "data"))
    cfg = cfg.model_copy(update={"node": cfg.node.model_copy(update={
        "ae_title": SCP_AE, "host": "127.0.0.1", "port": 0, "network_timeout_s": 20.0})})
    server = RunningSCP(cfg, Store(cfg.storage.root, cfg.storage.database_path))
    yield server
    server.stop()


def _image(bits: int, stored: int, sop_class: str = CT) -> tuple:
    """A 64x64 image with structure (a disc on a ramp), values within ``stored`` bits."""
    y, x = np.mgrid[0:64, 0:64]
    top = (1 << stored) - 1
    arr = (x * top // 80 + np.where((x - 32) ** 2 + (y - 30) ** 2 < 300, top // 5, 0)).clip(0, top)
    arr = arr.astype(np.uint8 if bits == 8 else np.uint16)
    ds = make_image(rows=64, columns=64, bits=bits, sop_class=sop_class,
                    modality="OT" if sop_class == SecondaryCaptureImageStorage else "CT")
    ds.BitsStored, ds.HighBit = stored, stored - 1
    ds.PixelData = arr.tobytes()
    return ds, arr


def _dcmtk(tool: str, *args: str) -> Callable[[Path, Path], None]:
    def convert(src: Path, out: Path) -> None:
        proc = run_tool(tool, *args, src, out)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return convert


def _pydicom(ts: str, **kwargs) -> Callable[[Path, Path], None]:
    def convert(src: Path, out: Path) -> None:
        ds = dcmread(src)
        ds.compress(ts, **kwargs)
        ds.save_as(out, enforce_file_format=True)
    return convert


def _as_is(src: Path, out: Path) -> None:
    out.write_bytes(src.read_bytes())


#: how to make a file in each syntax: (bits allocated, bits stored, SOP class, converter)
ENCODERS: dict[str, tuple[int, int, str, Callable[[Path, Path], None]]] = {
    ImplicitVRLittleEndian: (16, 16, CT, _dcmtk("dcmconv", "+ti")),
    ExplicitVRLittleEndian: (16, 16, CT, _as_is),
    ExplicitVRBigEndian: (16, 16, CT, _dcmtk("dcmconv", "+tb")),
    DeflatedExplicitVRLittleEndian: (16, 16, CT, _dcmtk("dcmconv", "+td")),
    JPEGBaseline8Bit: (8, 8, SecondaryCaptureImageStorage, _dcmtk("dcmcjpeg", "+eb")),
    JPEGExtended12Bit: (16, 12, CT, _dcmtk("dcmcjpeg", "+ee")),
    JPEGLossless: (16, 16, CT, _dcmtk("dcmcjpeg", "+el")),
    JPEGLosslessSV1: (16, 16, CT, _dcmtk("dcmcjpeg", "+e1")),
    JPEGLSLossless: (16, 16, CT, _dcmtk("dcmcjpls", "+el")),
    JPEGLSNearLossless: (16, 12, CT, _dcmtk("dcmcjpls", "+en")),
    JPEG2000Lossless: (16, 16, CT, _pydicom(JPEG2000Lossless)),
    JPEG2000: (16, 12, CT, _pydicom(JPEG2000, j2k_cr=[10])),
    RLELossless: (16, 16, CT, _dcmtk("dcmcrle")),
}


def storescu_proposing(server: RunningSCP, files: list[Path], pairs: list[tuple[str, str]],
                       workdir: Path) -> subprocess.CompletedProcess:
    """storescu proposing exactly ``pairs`` of (SOP class, transfer syntax), one context each."""
    syntaxes = sorted({ts for _, ts in pairs})
    lines = ["[[TransferSyntaxes]]"]
    for i, ts in enumerate(syntaxes):
        lines += [f"[TS{i}]", f"TransferSyntax1 = {ts}"]
    lines += ["[[PresentationContexts]]", "[Contexts]"]
    for n, (sop, ts) in enumerate(pairs, 1):
        lines.append(f"PresentationContext{n} = {sop}\\TS{syntaxes.index(ts)}")
    lines += ["[[Profiles]]", "[Send]", "PresentationContexts = Contexts"]
    cfg = workdir / "storescu.cfg"
    cfg.write_text("\n".join(lines) + "\n")
    return run_tool("storescu", "-v", "-xf", cfg, "Send", "-aet", SCU_AE, "-aec", SCP_AE, "127.0.0.1",
                    str(server.port), *files, timeout=60)


def _ok(proc: subprocess.CompletedProcess) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "E:" not in out and "F:" not in out, out
    return out


# -- Verification --------------------------------------------------------------------------------


def test_echoscu(server):
    _ok(run_tool("echoscu", "-v", "-aet", SCU_AE, "-aec", SCP_AE, "127.0.0.1", str(server.port), timeout=30))


def test_echoscu_with_the_most_a_requestor_may_propose(server):
    """128 presentation contexts of 38 transfer syntaxes each: accepted, one of the node's syntaxes chosen."""
    out = _ok(run_tool("echoscu", "-d", "-pts", "38", "-ppc", "128", "-aet", SCU_AE, "-aec", SCP_AE,
                       "127.0.0.1", str(server.port), timeout=30))
    assert "Association Accepted" in out
    accepted = re.findall(r"Accepted Transfer Syntax: =(\w+)", out)
    assert len(accepted) == 128, out
    assert {DCMTK_NAMES[name] for name in accepted} <= set(VERIFICATION_TRANSFER_SYNTAXES)


# -- Storage, one transfer syntax at a time ----------------------------------------------------------


def test_every_claimed_syntax_has_an_encoder():
    assert set(ENCODERS) == set(STORAGE_TRANSFER_SYNTAXES), (
        "a storage transfer syntax was added or removed: teach ENCODERS how to make a file in it")


@pytest.mark.parametrize("ts", STORAGE_TRANSFER_SYNTAXES, ids=lambda ts: UID(ts).keyword or ts)
def test_storescu_each_transfer_syntax(server, tmp_path, ts):
    bits, stored, sop_class, convert = ENCODERS[ts]
    ds, original = _image(bits, stored, sop_class)
    src = write(ds, tmp_path / "native.dcm")
    sent = tmp_path / "sent.dcm"
    convert(src, sent)
    sent_ds = dcmread(sent)
    assert sent_ds.file_meta.TransferSyntaxUID == ts, "the encoder did not produce the syntax under test"

    out = _ok(storescu_proposing(server, [sent], [(sop_class, ts)], tmp_path))
    assert "Received Store Response (Success)" in out, out

    inst = server.store.get_instance(sent_ds.SOPInstanceUID)
    assert inst is not None, out
    assert inst.transfer_syntax_uid == ts
    stored_ds = dcmread(inst.path)
    assert stored_ds.file_meta.TransferSyntaxUID == ts  # stored as received, not transcoded
    assert stored_ds.file_meta.SourceApplicationEntityTitle == SCU_AE
    assert stored_ds.PixelData == sent_ds.PixelData  # the pixel data bytes as the sender encoded them
    decoded = stored_ds.pixel_array
    assert decoded.shape == original.shape
    if ts in LOSSLESS:
        assert np.array_equal(decoded, original)
    else:  # lossy: the same picture, within the codec's error
        assert np.abs(decoded.astype(np.int64) - original).mean() < 0.02 * ((1 << stored) - 1)


# -- Storage, every SOP class -------------------------------------------------------------------------


def test_storescu_every_claimed_sop_class(server, tmp_path):
    files, uids = [], []
    for i, sop_class in enumerate(STORAGE_SOP_CLASSES):
        ds = make_image(sop_class=sop_class, instance_number=i + 1)
        files.append(write(ds, tmp_path / f"{i:02d}.dcm"))
        uids.append(ds.SOPInstanceUID)
    # storescu's own negotiation: -R proposes a context for each file's SOP class, Explicit VR LE first
    out = _ok(run_tool("storescu", "-v", "-R", "-xe", "-aet", SCU_AE, "-aec", SCP_AE, "127.0.0.1",
                       str(server.port), *files, timeout=60))
    assert out.count("Received Store Response (Success)") == len(STORAGE_SOP_CLASSES), out
    for uid, sop_class in zip(uids, STORAGE_SOP_CLASSES):
        inst = server.store.get_instance(uid)
        assert inst is not None and inst.sop_class_uid == sop_class


# -- what the node does not claim ---------------------------------------------------------------------


@pytest.mark.parametrize("sop_class, ts", [(ULTRASOUND, ExplicitVRLittleEndian), (CT, HTJ2K_LOSSLESS)],
                         ids=["unclaimed SOP class", "unclaimed transfer syntax"])
def test_unclaimed_context_is_refused(server, tmp_path, sop_class, ts):
    assert sop_class not in STORAGE_SOP_CLASSES or ts not in STORAGE_TRANSFER_SYNTAXES
    ds = make_image(sop_class=sop_class, sop_uid=generate_uid(UID_PREFIX))
    path = write(ds, tmp_path / "x.dcm")
    proc = storescu_proposing(server, [path], [(sop_class, ts)], tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "No Acceptable Presentation Contexts" in out or "no presentation context" in out.lower(), out
    assert server.store.get_instance(ds.SOPInstanceUID) is None
