"""The log never carries a patient's name or ID, whatever a sender puts on the wire and whatever the import order.

pydicom's warnings quote raw element bytes (a lying UID length makes the
"UID" the bytes of the patient's name); pynetdicom logs exceptions with their
text; a traceback quotes what the decoder choked on.  A corpus of malformed
objects carrying canary patient names and IDs goes byte for byte to the real
``fusion-node serve`` process; none of its log lines may hold a canary.
"""

from __future__ import annotations

import io
import json
import logging
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from dicom_helpers import make_image, write
from pydicom.uid import CTImageStorage, ImplicitVRLittleEndian
from pynetdicom import AE

from dicom_node import logs

CANARY_NAME = "Canaryname^Zebulon"
CANARY_ID = "CANARY-7731-ID"
NODE_AE = "FUSIONNODE"
REPO = Path(__file__).resolve().parents[1]


def _canary(**kw):
    ds = make_image(patient_id=CANARY_ID, **kw)
    ds.PatientName = CANARY_NAME
    ds.OtherPatientIDs = CANARY_ID
    return ds


def _raw(path: Path) -> bytearray:
    return bytearray(path.read_bytes())


def _set_length(data: bytearray, tag: tuple[int, int], length: int, *, explicit: bool = True) -> bytearray:
    """Rewrite the length of the first ``tag`` element (Explicit VR 16-bit length, or Implicit VR 32-bit)."""
    start = data.index(struct.pack("<HH", *tag), 132 + 60)  # after the preamble and File Meta
    if explicit:
        data[start + 6:start + 8] = struct.pack("<H", length)
    else:
        data[start + 4:start + 8] = struct.pack("<I", length)
    return data


def corpus(folder: Path) -> dict[str, Path]:
    """Malformed objects, each with the canary name and ID inside; name -> Part-10 file sent byte for byte."""
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}

    def save(name: str, data: bytes | bytearray) -> None:
        path = folder / f"{name}.dcm"
        path.write_bytes(bytes(data))
        out[name] = path

    good = write(_canary(), folder / "good.dcm")
    data = _raw(good)
    # SOP Instance UID's length swallows what follows: the patient's name and ID become the "UID"
    save("lying_sop_uid_length", _set_length(_raw(good), (0x0008, 0x0018), 180))
    save("lying_study_uid_length", _set_length(_raw(good), (0x0020, 0x000D), 250))
    # PatientName longer than the file: the dataset ends inside it
    save("patient_name_past_the_end", _set_length(_raw(good), (0x0010, 0x0010), 0xFFF0))
    # a VR that does not exist on the patient's name
    bad_vr = _raw(good)
    at = bad_vr.index(struct.pack("<HH", 0x0010, 0x0010), 192)
    bad_vr[at + 4:at + 6] = b"ZZ"
    save("unknown_vr_on_patient_name", bad_vr)
    # cut just after the patient module and inside Pixel Data
    save("cut_after_patient", data[:data.index(struct.pack("<HH", 0x0010, 0x0030), 192) + 4])
    save("cut_in_pixel_data", data[:len(data) - 300])
    # the name in a character set that does not exist, and in bytes that are not that set
    ds = _canary()
    ds.SpecificCharacterSet = "ISO_IR 999"
    save("unknown_charset", write(ds, folder / "tmp-charset.dcm").read_bytes())
    ds = _canary()
    ds.SpecificCharacterSet = "ISO_IR 192"
    save("invalid_utf8_name", write(ds, folder / "tmp-utf8.dcm").read_bytes().replace(
        CANARY_NAME.encode(), CANARY_NAME.encode()[:-2] + b"\xff\xfe"))
    # UIDs that are not UIDs, with the canary in them
    ds = _canary()
    ds.StudyInstanceUID = f"1.2.3.{CANARY_ID}"
    save("canary_in_study_uid", write(ds, folder / "tmp-uid.dcm").read_bytes())
    ds = _canary()
    ds.SeriesInstanceUID = "1.2." + "9" * 70
    save("overlong_series_uid", write(ds, folder / "tmp-long.dcm").read_bytes())
    # Implicit VR with a lying Patient ID length
    ds = _canary()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    imp = _raw(write(ds, folder / "tmp-implicit.dcm"))
    save("implicit_lying_patient_id", _set_length(imp, (0x0010, 0x0020), 0x7FFF0, explicit=False))
    # Rows that lie and swallow Pixel Data (a US of 200 bytes)
    save("lying_rows_length", _set_length(_raw(good), (0x0028, 0x0010), 200))
    return out


def _send(port: int, files: dict[str, Path]) -> dict[str, int | None]:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, [ImplicitVRLittleEndian, "1.2.840.10008.1.2.1"])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    statuses: dict[str, int | None] = {}
    for name, path in files.items():
        assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
        assert assoc.is_established, name
        try:
            rsp = assoc.send_c_store(path)
            statuses[name] = int(rsp.Status) if "Status" in rsp else None
        except Exception:  # noqa: BLE001  # the sending side may refuse to encode a broken file: not our concern
            statuses[name] = None
        finally:
            if assoc.is_established:
                assoc.release()
    return statuses


def _canaries_in(text: str) -> list[str]:
    needles = [CANARY_NAME, CANARY_ID, "Canaryname", "Zebulon", "7731"]
    return [line for line in text.splitlines() if any(n in line for n in needles)]


@pytest.mark.slow
def test_no_canary_in_the_real_node_log(tmp_path):
    files = corpus(tmp_path / "corpus")
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[node]\nae_title = "{NODE_AE}"\nhost = "127.0.0.1"\nport = 0\n[http]\nport = 0\n[storage]\nroot = "data"\n')
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as err:
        # every Python warning shown (env(1) adds the switch; tests do not read the environment)
        proc = subprocess.Popen(["env", "PYTHONWARNINGS=always", sys.executable, "-m", "dicom_node.cli",
                                 "--log-level", "DEBUG", "serve", "--config", str(cfg)],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            line = proc.stdout.readline() if proc.stdout else ""
            assert "listening" in line, line + log_path.read_text()
            port = int(line.split(" on port ")[1].split()[0].rstrip(";,"))
            statuses = _send(port, files)
            good = _send(port, {"good": tmp_path / "corpus" / "good.dcm"})
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    text = log_path.read_text()
    assert good == {"good": 0}, text[-3000:]
    assert sum(1 for s in statuses.values() if s not in (0, None)) >= 5, statuses  # the rejection paths ran
    assert "scp.store.rejected" in text
    assert _canaries_in(text) == []
    for line in text.splitlines():  # and every line is JSON: nothing bypassed the formatter
        json.loads(line)


def test_pydicom_imported_after_setup_cannot_log_values():
    """In a fresh interpreter: logs.setup first, pydicom's logger reset by a re-import, then its warnings."""
    script = f"""
import io, logging, sys, importlib
from dicom_node import logs
buf = io.StringIO()
logs.setup("DEBUG", stream=buf)
import pydicom, pydicom.config
importlib.reload(pydicom.config)          # what a late first import does: level back to WARNING
logging.getLogger("pydicom").warning("Invalid value for VR UI: b'1.2\\\\x00{CANARY_NAME}'")
logging.getLogger("pydicom.dataelem").error("bad %s", "{CANARY_ID}")
logging.getLogger("pynetdicom.assoc").exception("oops", exc_info=ValueError("{CANARY_NAME}"))
logging.getLogger("somelib").warning("{CANARY_ID}")
sys.stdout.write(buf.getvalue())
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(x) for x in out.stdout.splitlines()]
    assert [x["event"] for x in lines] == ["lib.pydicom.warning", "lib.pydicom.error", "lib.pynetdicom.error",
                                           "lib.somelib.warning"]
    assert lines[2]["error_type"] == "ValueError"
    assert _canaries_in(out.stdout + out.stderr) == []


def test_tracebacks_and_free_text_are_scrubbed():
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(logs.JsonFormatter())
    log = logging.getLogger("dicom_node.test_intake_logs")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        try:
            try:
                raise KeyError(CANARY_ID)
            except KeyError as inner:
                raise ValueError(f"Invalid value for VR UI: b'1.2.3\\x00{CANARY_NAME}'") from inner
        except ValueError:
            log.exception("scp.store.error", extra=logs.fields(sop_instance_uid=f"1.2.{CANARY_ID}",
                                                                detail=f"bad value '{CANARY_NAME}'"))
    finally:
        log.removeHandler(handler)
    doc = json.loads(buf.getvalue())
    assert doc["event"] == "scp.store.error" and doc["error_type"] == "ValueError"
    assert doc["caused_by"] == ["KeyError: '…'"] and doc["trace"]
    assert doc["sop_instance_uid"].startswith("<not a UID")
    assert _canaries_in(buf.getvalue()) == []
