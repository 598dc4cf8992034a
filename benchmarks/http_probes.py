"""Response times of the HTTP side on a running node, each as a ratio to /healthz measured in the same run.

    python benchmarks/http_probes.py [--requests 50]

/readyz and /metrics read the database on every request but never open an
association (the C-ECHO results are cached), so they should stay of the
order of /healthz; the status page renders every section.  Prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from dicom_node.config import parse_config
from dicom_node.web.runtime import RunningNode
from dicom_node.workflow.node import Node


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=50)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        s = parse_config({"node": {"ae_title": "BENCH", "host": "127.0.0.1", "port": 0}, "storage": {"root": tmp},
                          "http": {"port": 0}})
        running = RunningNode(Node(s)).start()
        try:
            client = httpx.Client()
            while client.get(running.url + "readyz").json()["checks"]["weights"]["detail"] == "not checked yet":
                time.sleep(0.2)  # the start-up self-check is done: nothing else runs beside the requests
            for _ in range(10):
                client.get(running.url + "healthz")  # warm-up
            medians = {}
            for path in ("healthz", "readyz", "metrics", "api/jobs", ""):
                times = []
                for _ in range(args.requests):
                    t0 = time.perf_counter()
                    client.get(running.url + path)
                    times.append(time.perf_counter() - t0)
                medians["/" + path] = statistics.median(times) * 1000
        finally:
            running.stop()
    base = medians["/healthz"]
    print("| request | median ms | x /healthz |\n|---|---|---|")
    for path, ms in medians.items():
        print(f"| GET {path} | {ms:.2f} | {ms / base:.1f} |")


if __name__ == "__main__":
    main()
