"""A Dask scheduler and workers as real processes on loopback, for the executor tests and the scale-out benchmark."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from dicom_helpers import free_port, wait_listening

from fusion import environment

REPO = Path(__file__).resolve().parents[1]


class DaskCluster:
    """``dask scheduler`` and ``dask worker --nthreads 1 --no-nanny`` processes on loopback (killed at teardown).

    With ``root`` (the node's storage root), the second worker is started by
    ``fusion-node worker`` (which checks that it sees the root, then becomes
    the same ``dask worker``).

    ``--no-nanny``: a SIGKILLed worker stays dead (a nanny would restart it),
    so the job must move to the other worker.  The workers preload
    ``dicom_node.workflow.remote``, as docs/scale-out.md advises, so the first job
    does not pay for the imports.
    """

    def __init__(self, folder: Path, workers: int = 2, root: Path | None = None, allowed_failures: int | None = None,
                 resources: dict[str, str] | None = None):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.env = environment.child_environment(pythonpath=REPO)
        if allowed_failures is not None:  # Dask's own setting, read by the scheduler from its environment
            self.env["DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES"] = str(allowed_failures)
        self.procs: dict[str, subprocess.Popen] = {}
        self._logs: list = []
        self._start("scheduler", [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                                  "--port", str(self.port), "--no-dashboard"])
        wait_listening(self.port, self.procs["scheduler"], folder / "scheduler.log")
        for i in range(workers):
            if i == 1 and root is not None:  # the second one through the node's own wrapper, as an operator would
                config = folder / "worker.toml"
                config.write_text(f'[storage]\nroot = "{root}"\n[executor]\nkind = "dask"\n'
                                  f'scheduler = "{self.address}"\n')
                (root / "instances").mkdir(parents=True, exist_ok=True)  # as the node's first start makes it
                self._start(f"w{i}", [sys.executable, "-m", "dicom_node.cli", "worker", "--config", str(config),
                                      "--name", f"w{i}"])
                continue
            extra = ["--resources", resources[f"w{i}"]] if resources and f"w{i}" in resources else []
            self._start(f"w{i}", [sys.executable, "-m", "distributed.cli.dask_worker", self.address,
                                  "--nthreads", "1", "--no-nanny", "--no-dashboard", "--name", f"w{i}",
                                  "--host", "127.0.0.1", "--preload", "dicom_node.workflow.remote", *extra])
        from distributed import Client

        self.client = Client(self.address, timeout=30, set_as_default=False)
        try:
            self.client.wait_for_workers(workers, timeout=120)
        except Exception:
            self.close()
            raise

    def _start(self, name: str, cmd: list[str]) -> None:
        log = open(self.folder / f"{name}.log", "wb")
        self._logs.append(log)
        self.procs[name] = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def worker_names(self) -> dict[str, str]:
        """address -> the worker's --name."""
        return {a: str(w["name"]) for a, w in self.client.scheduler_info()["workers"].items()}

    def running(self, key: str) -> str | None:
        """The address of the worker the scheduler has ``key`` on, if any."""
        for address, keys in self.client.processing().items():
            if key in keys:
                return address
        return None

    def executing(self) -> dict[str, int]:
        """Tasks executing right now per worker (asked of the workers themselves)."""
        return self.client.run(lambda dask_worker: len(dask_worker.state.executing))

    def kill(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait(10)

    def close(self) -> None:
        try:
            self.client.close(timeout=5)
        except Exception:  # noqa: BLE001 - teardown goes on to kill the processes whatever the client says
            pass
        for proc in reversed(list(self.procs.values())):
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
        for log in self._logs:
            log.close()
