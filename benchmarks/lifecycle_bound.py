"""How long a real ``fusion-node serve`` takes from SIGTERM to exit: idle, during a receive, during a job.

    python benchmarks/lifecycle_bound.py [--runs 3] [--timeout 10]

Each run starts the real command from a TOML file (``node.shutdown_timeout_s``
= ``--timeout``), brings it into the state, sends SIGTERM and measures the time
to the process's exit (and the node's own ``node.stopped`` figure).  During a
receive a pynetdicom sender streams small CT images without pause; during a
job the generated CT+MR pair is fused (DMF, image gradients) and SIGTERM comes
``--job-delays`` seconds after ``job.started``.  Prints a Markdown table;
figures under load are meaningful as ratios to the idle stop of the same run.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from dicom_helpers import dcmtk, make_image
from serve_process import PIPELINE, ServeProcess, node_toml


def _stop(node: ServeProcess, timeout: float) -> tuple[float, float, dict]:
    t0 = node.signal(signal.SIGTERM)
    rc = node.wait_exit(timeout + 30)
    took = time.monotonic() - t0
    assert rc == 0, node.log_path.read_text()[-2000:]
    stopped = node.events("node.stopped")[0]
    return took, stopped["seconds"], stopped


def idle(folder: Path, timeout: float) -> dict:
    node = ServeProcess(folder, node_toml(shutdown_timeout_s=timeout))
    try:
        time.sleep(1.0)
        took, inner, _ = _stop(node, timeout)
    finally:
        node.stop()
    return {"exit_s": took, "stopped_s": inner, "note": ""}


def receive(folder: Path, timeout: float) -> dict:
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    node = ServeProcess(folder, node_toml(shutdown_timeout_s=timeout))
    acked: list[str] = []
    started = threading.Event()

    def sender() -> None:
        ae = AE(ae_title="SCANNER")
        ae.dimse_timeout = ae.acse_timeout = ae.network_timeout = 5
        ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", node.port, ae_title="FUSIONNODE")
        for i in range(5000):
            if not assoc.is_established:
                break
            ds = make_image(instance_number=i + 1, rows=64, columns=64)
            try:
                status = assoc.send_c_store(ds)
            except RuntimeError:  # aborted by the stopping node between two checks
                break
            if getattr(status, "Status", None) == 0:
                acked.append(str(ds.SOPInstanceUID))
                if len(acked) == 40:
                    started.set()
        started.set()

    t = threading.Thread(target=sender, daemon=True)
    try:
        t.start()
        started.wait(60)
        took, inner, _ = _stop(node, timeout)
        t.join(30)
        with node.db() as db:
            stored = {r[0] for r in db.execute("SELECT sop_instance_uid FROM instances")}
    finally:
        node.stop()
    lost = len(set(acked) - stored)
    return {"exit_s": took, "stopped_s": inner, "note": f"{len(acked)} acknowledged, {lost} lost"}


def job(folder: Path, timeout: float, delay: float, pair: tuple[Path, Path]) -> dict:
    node = ServeProcess(folder, node_toml(shutdown_timeout_s=timeout, pipelines=PIPELINE))
    try:
        subprocess.run([dcmtk("storescu"), "-aet", "SCANNER", "-aec", "FUSIONNODE", "+sd", "127.0.0.1",
                        str(node.port), *map(str, pair)], check=True, capture_output=True, timeout=300)
        node.wait_event("job.started", 120)
        time.sleep(delay)
        took, inner, stopped = _stop(node, timeout)
        with node.db() as db:
            state, error = db.execute("SELECT state, error FROM jobs").fetchone()
        how = "released at the deadline" if stopped["jobs_released"] else (
            "stopped at a stage boundary" if node.events("job.interrupted") else "finished first")
        if error:
            how += f" (error: {error[:200]}; log {node.log_path})"
    finally:
        node.stop()
    return {"exit_s": took, "stopped_s": inner, "note": f"job {state}, {how}"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=10.0, help="node.shutdown_timeout_s (default 10)")
    ap.add_argument("--job-delays", type=float, nargs="*", default=[0.0, 4.0])
    ap.add_argument("--workdir", type=Path, default=None, help="keep configs, logs and databases here (default: a "
                                                               "temporary folder, removed)")
    args = ap.parse_args(argv)
    from fusion_demo.samples import write_synthetic_pair

    rows: list[tuple[str, dict]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or Path(tmp)
        pair = write_synthetic_pair(root / "pair")
        n = 0
        for _ in range(args.runs):
            cases = [("idle", lambda f: idle(f, args.timeout)), ("during a receive", lambda f: receive(f, args.timeout))]
            cases += [(f"during a job (+{d:g} s)", lambda f, d=d: job(f, args.timeout, d, pair))
                      for d in args.job_delays]
            for name, run in cases:
                n += 1
                rows.append((name, run(root / f"run{n}")))
    idle_mean = statistics.mean(r["exit_s"] for name, r in rows if name == "idle")
    print(f"shutdown_timeout_s = {args.timeout:g}; bound = timeout + 2 s = {args.timeout + 2:g} s\n")
    print("| state at SIGTERM | SIGTERM to exit (s) | node.stopped (s) | / idle exit | note |")
    print("|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['exit_s']:.2f} | {r['stopped_s']:.2f} | {r['exit_s'] / idle_mean:.2f} | {r['note']} |")
    worst = max(r["exit_s"] for _, r in rows)
    print(f"\nworst {worst:.2f} s of the {args.timeout + 2:g} s bound; idle exit {idle_mean:.2f} s (mean)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
