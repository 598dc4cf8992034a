"""A real ``fusion-node serve`` process for the lifecycle tests: config from TOML, JSON log in a file, signals."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class ServeProcess:
    """``fusion-node serve --config <folder>/node.toml``; the log (JSON lines) goes to ``<folder>/serve-N.log``."""

    runs = 0

    def __init__(self, folder: Path, toml: str | None = None):
        self.folder = folder
        self.config = folder / "node.toml"
        if toml is not None:
            folder.mkdir(parents=True, exist_ok=True)
            self.config.write_text(toml)
        ServeProcess.runs += 1
        self.log_path = folder / f"serve-{ServeProcess.runs}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(self.config)],
                                     cwd=REPO, stdout=subprocess.PIPE, stderr=self._log, text=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.startswith("fusion-node listening"):
            self.proc.kill()
            raise AssertionError(f"serve did not start: {line!r}\n{self.log_path.read_text()[-3000:]}")
        self.port = int(line.split(" on port ")[1].split()[0].rstrip(";"))

    def events(self, name: str | None = None) -> list[dict]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if name is None or rec.get("event") == name:
                out.append(rec)
        return out

    def wait_event(self, name: str, timeout: float, **match) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for rec in self.events(name):
                if all(rec.get(k) == v for k, v in match.items()):
                    return rec
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"no {name} {match or ''} within {timeout} s; log tail:\n"
                             + self.log_path.read_text()[-3000:])

    def signal(self, sig: int = signal.SIGTERM) -> float:
        """Send ``sig``; returns the monotonic time it was sent."""
        t = time.monotonic()
        self.proc.send_signal(sig)
        return t

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()

    def db(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.folder / "data" / "node.sqlite")
        conn.row_factory = sqlite3.Row
        return conn


def node_toml(*, port: int = 0, extra: str = "", shutdown_timeout_s: float = 5.0,
              destinations: str = "", pipelines: str = "", top: str = "") -> str:
    """A node config; ``extra`` goes under [node], ``top`` before it (top-level keys)."""
    return f'''
{top}
[node]
ae_title = "FUSIONNODE"
host = "127.0.0.1"
port = {port}
shutdown_timeout_s = {shutdown_timeout_s}
{extra}
[http]
port = 0
[storage]
root = "data"
[settle]
quiet_seconds = 1
sweep_interval_s = 0.3
{destinations}
{pipelines}
'''


#: a CT+MR pipeline of at least 10 instances each, fused with DMF on image gradients: a job long
#: enough to be stopped in (tests/test_lifecycle.py, benchmarks/lifecycle_bound.py)
PIPELINE = '''
[[pipelines]]
name = "ct-mr"
match = "study"
feature_source = "image"
method = "dmf"
destinations = []
[pipelines.base]
modality = ["CT"]
min_instances = 10
[pipelines.overlay]
modality = ["MR"]
min_instances = 10
'''


def pacs_pipeline_toml(*, port: int, root: Path, pacs_port: int, pacs_ae: str = "ORTHANC", top: str = "",
                       storage: str = "", sections: str = "", quiet_seconds: float = 2,
                       outbox: str = "backoff_initial_s = 0.5\nbackoff_max_s = 1", feature_source: str = "image") -> str:
    """A node on CPU that fuses CT+MR studies (10+ instances each) and sends them to one PACS.

    For the tests and benchmarks that run whole nodes against a real peer
    (fault injection, shared queue, scale-out): ``top`` holds top-level keys,
    ``storage`` more [storage] keys, ``sections`` whole sections (e.g. [executor]).
    """
    return f'''
device = "cpu"
{top}
[node]
ae_title = "FUSIONNODE"
host = "127.0.0.1"
port = {port}
[http]
port = 0
[storage]
root = "{root}"
{storage}
[settle]
quiet_seconds = {quiet_seconds}
sweep_interval_s = 0.3
[outbox]
{outbox}
{sections}
[[destinations]]
name = "pacs"
ae_title = "{pacs_ae}"
host = "127.0.0.1"
port = {pacs_port}
[[pipelines]]
name = "ct-mr"
match = "study"
destinations = ["pacs"]
feature_source = "{feature_source}"
base = {{ modality = ["CT"], min_instances = 10 }}
overlay = {{ modality = ["MR"], min_instances = 10 }}
'''


def start_serve(config: Path, port: int, log: Path, env: dict[str, str] | None = None,
                timeout: float = 120.0) -> subprocess.Popen:
    """``fusion-node serve --config config`` as its own process, once it listens on ``port``."""
    from dicom_helpers import wait_listening

    from fusion.environment import child_environment

    proc = subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(config)],
                            env=env if env is not None else child_environment(REPO), cwd=REPO,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        wait_listening(port, proc, log, timeout)
    except (RuntimeError, TimeoutError):
        proc.kill()
        raise
    return proc


def stop_process(proc: subprocess.Popen, timeout: float = 30.0) -> int | None:
    """SIGTERM, then SIGKILL after ``timeout`` s: a node (or peer) process stopped as an operator would."""
    if proc.poll() is None:
        proc.terminate()
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(10)
