"""Real peers the tests start themselves: Orthanc as a PACS (DICOM, and DICOMweb through its plugin)."""

from __future__ import annotations

import base64
import json
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from dicom_helpers import free_port

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


class OrthancServer:
    """Orthanc on loopback ports of its own; ``dicomweb=True`` loads the DICOMweb plugin at /dicom-web/.

    ``users`` ({name: password}) turns HTTP Basic authentication on (REST and DICOMweb alike).
    ``ports`` (DICOM, HTTP) reuses the ports of a stopped server on the same ``workdir``: the PACS back
    after an outage, with what it had stored.
    """

    def __init__(self, workdir: Path, *, dicomweb: bool = False, users: dict[str, str] | None = None,
                 ports: tuple[int, int] | None = None):
        if not Path(ORTHANC).exists():
            pytest.skip("Orthanc is not installed (apt-get install orthanc; `make test` does it)")
        if dicomweb and not Path(DICOMWEB_PLUGIN).exists():
            pytest.skip("Orthanc's DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)")
        self.dicom_port, self.http_port = ports or (free_port(), free_port())
        self.users = dict(users or {})
        workdir.mkdir(parents=True, exist_ok=True)
        cfg = {
            "Name": "test-pacs", "StorageDirectory": str(workdir / "db"), "IndexDirectory": str(workdir / "db"),
            "DicomAet": "ORTHANC", "DicomPort": self.dicom_port, "HttpPort": self.http_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users, "DicomCheckCalledAet": False,
            "HttpServerEnabled": True, "DicomServerEnabled": True, "StableAge": 1,
            "Plugins": [DICOMWEB_PLUGIN] if dicomweb else [],
            "DicomWeb": {"Enable": dicomweb, "Root": "/dicom-web/"},
        }
        (workdir / "orthanc.json").write_text(json.dumps(cfg))
        self.workdir = workdir
        self.log = open(workdir / "orthanc.log", "a")
        self._launch()

    def _launch(self) -> None:
        workdir = self.workdir
        self.proc = subprocess.Popen([ORTHANC, str(workdir / "orthanc.json")], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                self.get("/system")
                return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Orthanc did not start; see {workdir / 'orthanc.log'}")

    @property
    def dicomweb_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/dicom-web"

    def get(self, path: str):
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}")
        if self.users:
            user, password = next(iter(self.users.items()))
            req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
        with urllib.request.urlopen(req, timeout=10) as r:
            body = r.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body

    def sop_instance_uids(self) -> set[str]:
        return {self.get(f"/instances/{i}/simplified-tags")["SOPInstanceUID"] for i in self.get("/instances")}

    def down(self) -> None:
        """Stop the PACS, keeping its ports, database and log for :meth:`up` (a maintenance window)."""
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def up(self) -> None:
        """Start the PACS again on the same ports with the same database."""
        self._launch()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.down()
        self.log.close()
