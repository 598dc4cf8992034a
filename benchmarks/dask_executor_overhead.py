"""What running a job on a Dask worker costs over running it in the node: one pair, the same stages.

    python benchmarks/dask_executor_overhead.py [--runs 3] [--method tif]

Starts a Dask scheduler and one worker (``--nthreads 1 --no-nanny``, the fusion
module preloaded) on loopback, then runs the generated CT+MR pair ``--runs``
times through ``runners.LocalRunner`` and as often through
``runners.DaskRunner`` (each run a new job version: a new Dask key, no
checkpoint to resume from).  Per run: the runner's wall time (for Dask:
submit -> the node holds the decoded datasets), the sum of the stages' own
seconds, and the Part-10 bytes the worker sent back.  The difference of the
wall times less the difference of the stage sums is the executor's overhead
(submission, events, result transfer, decoding); the stage sums themselves
differ only by the machine's load.  Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from test_dask_executor import DaskCluster

from dicom_node.config import parse_config
from dicom_node.workflow.checkpoint import Checkpoints
from dicom_node.workflow.jobs import JobQueue, output_seed
from dicom_node.workflow.pipeline import JobInputs, pipeline_named
from dicom_node.workflow.runners import DaskRunner, LocalRunner
from fusion_demo.samples import write_synthetic_pair


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--method", default="tif", help="fusion method of the pipeline (image features)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        ct, mr = write_synthetic_pair(tmp / "pair")
        files = [sorted(ct.iterdir()), sorted(mr.iterdir())]
        cluster = DaskCluster(tmp / "dask", workers=1)
        try:
            settings = parse_config({"device": "cpu", "executor": {"kind": "dask", "scheduler": cluster.address},
                                     "pipelines": [{"name": "p", "method": args.method, "feature_source": "image",
                                                    "base": {"modality": ["CT"]}, "overlay": {"modality": ["MR"]}}]})
            q = JobQueue(tmp / "node.sqlite", owner="bench")
            q.ensure_schema()
            q.enqueue("bench", "p", "b", "o")
            claimed = q.claim()
            assert claimed is not None
            runners = {"local": LocalRunner(tmp), "dask": DaskRunner(settings.executor, tmp)}
            rows: dict[str, list[tuple[float, float, int]]] = {k: [] for k in runners}
            version = 0
            for _ in range(args.runs):
                for kind, runner in runners.items():
                    version += 1
                    job = dataclasses.replace(claimed, version=version, checkpoint=None)
                    seed = output_seed(job, pipeline_named(settings, "p"))
                    inputs = JobInputs(job.id, "p", files[0], files[1], version=version, uid_seed=seed)
                    t0 = time.perf_counter()
                    out = runner.run(job, inputs, settings, Checkpoints(q, job, tmp, seed), threading.Event(),
                                     lambda *a: None)
                    wall = time.perf_counter() - t0
                    size = sum(len(ds.PixelData) for ds in out.derived.sc) if kind == "dask" else 0
                    rows[kind].append((wall, sum(out.result["seconds"].values()), size))
            runners["dask"].close()
        finally:
            cluster.close()
    print("| runner | runs | wall s (median) | stages s (median) | wall - stages s | pixel bytes back |")
    print("|---|---|---|---|---|---|")
    med = {}
    for kind, r in rows.items():
        wall, stages = statistics.median(x[0] for x in r), statistics.median(x[1] for x in r)
        med[kind] = wall - stages
        print(f"| {kind} | {len(r)} | {wall:.2f} | {stages:.2f} | {wall - stages:.2f} | {r[0][2] or '-'} |")
    print(f"\nDask executor overhead (wall - stages, dask minus local): {med['dask'] - med['local']:.2f} s per job")


if __name__ == "__main__":
    main()
