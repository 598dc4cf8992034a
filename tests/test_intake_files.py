"""No patient data where it does not belong: spool and temporary files inside the storage root, private, cleaned.

The real ``fusion-node serve`` process is killed with SIGKILL while DCMTK
``storescu`` is sending it a large multi-instance series; the test then
looks at every file on disk: nothing in ``$TMPDIR``, partial files only under
``<root>/tmp`` and only mode 0600 (folders 0700), removed when the node
starts again, and the canary patient name nowhere outside ``<root>/instances``
(the index database and the audit trail are the other two places allowed to hold it).
"""

from __future__ import annotations

import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from dicom_helpers import UID_PREFIX, dcmtk, make_image, write
from pydicom.uid import generate_uid

CANARY_NAME = "Canaryname^Zebulon"
CANARY_ID = "CANARY-7731-ID"
NODE_AE = "FUSIONNODE"
REPO = Path(__file__).resolve().parents[1]


def _series(folder: Path, n: int, size: int) -> list[Path]:
    study, series = generate_uid(UID_PREFIX), generate_uid(UID_PREFIX)
    files = []
    for i in range(n):
        ds = make_image(study_uid=study, series_uid=series, instance_number=i + 1, rows=size, columns=size,
                        patient_id=CANARY_ID)
        ds.PatientName = CANARY_NAME
        ds.PixelData = (np.arange(size * size, dtype=np.uint16) % 4000).tobytes()
        files.append(write(ds, folder / f"{i:03d}.dcm"))
    return files


class ServeProcess:
    """``fusion-node serve`` from a TOML file, with its own $TMPDIR and its stderr (the JSON log) in a file."""

    def __init__(self, tmp_path: Path, systmp: Path) -> None:
        self.config = tmp_path / "node.toml"
        self.config.write_text(f'[node]\nae_title = "{NODE_AE}"\nhost = "127.0.0.1"\nport = 0\n'
                               '[http]\nport = 0\n[storage]\nroot = "data"\n')
        self.log = tmp_path / f"serve-{time.monotonic_ns()}.log"
        self._stderr = open(self.log, "w")
        # env(1) adds TMPDIR to the inherited environment (tests do not read it: fusion/environment.py rule)
        self.proc = subprocess.Popen(["env", f"TMPDIR={systmp}", sys.executable, "-m", "dicom_node.cli", "serve",
                                      "--config", str(self.config)],
                                     cwd=REPO, stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        assert line.startswith(f"fusion-node listening as {NODE_AE} on port "), line + self.log.read_text()
        self.port = int(line.split(" on port ")[1].split()[0].rstrip(";,"))

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self._stderr.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._stderr.close()


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def _holding_canary(folder: Path, skip: list[Path]) -> list[Path]:
    out = []
    for p in _files(folder):
        if any(p.is_relative_to(s) for s in skip):
            continue
        data = p.read_bytes()
        if CANARY_NAME.encode() in data or CANARY_ID.encode() in data:
            out.append(p)
    return out


@pytest.mark.slow
def test_kill_9_mid_receive_leaves_no_patient_data_outside_the_store(tmp_path):
    systmp = tmp_path / "systmp"
    systmp.mkdir()
    src = tmp_path / "src"
    files = _series(src, 40, 1024)  # 2 MiB each: each C-STORE takes a while on the wire and on disk
    root = tmp_path / "data"
    node = ServeProcess(tmp_path, systmp)
    sender = subprocess.Popen([dcmtk("storescu"), "-aet", "MODALITY", "-aec", NODE_AE, "127.0.0.1", str(node.port),
                               *map(str, files)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen: dict[Path, int] = {}
    stop = threading.Event()

    def watch() -> None:  # note every partial file and its mode while the node writes it
        while not stop.is_set():
            for p in _files(root / "tmp"):
                try:
                    seen.setdefault(p, stat.S_IMODE(p.stat().st_mode))
                except FileNotFoundError:
                    pass
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        deadline = time.monotonic() + 60
        # mid-receive: some instances stored, at least one spool file being written right now
        while time.monotonic() < deadline:
            stored = _files(root / "instances")
            spooling = _files(root / "tmp" / "spool")
            if len(stored) >= 3 and spooling:
                break
            time.sleep(0.005)
        else:
            pytest.fail("never caught the node mid-receive")
        node.kill()
    finally:
        stop.set()
        watcher.join(5)
        sender.wait(60)
    left = _files(root / "tmp")
    assert left, "the kill left nothing to clean: not mid-receive"
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in left), {str(p): oct(p.stat().st_mode) for p in left}
    assert all(mode == 0o600 for mode in seen.values()), {str(p): oct(m) for p, m in seen.items()}
    for d in [root / "tmp", *(p for p in (root / "tmp").rglob("*") if p.is_dir())]:
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    assert _files(systmp) == []  # pynetdicom's spool no longer goes to $TMPDIR

    again = ServeProcess(tmp_path, systmp)  # start-up removes what the crash left
    again.stop()
    assert _files(root / "tmp") == []
    assert _files(systmp) == []
    allowed = [src, root / "instances", root / "audit", *root.glob("node.sqlite*")]
    assert _holding_canary(tmp_path, allowed) == []
    assert "store.tmp.cleared" in again.log.read_text()
