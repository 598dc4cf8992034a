"""Wall time of the node on a real pair, stage by stage, from the first image received to the fused series stored.

    python benchmarks/node_latency.py [--sample cirs|synthetic] [--method faithful|dmf|dmf_paper|...]
                                      [--feature-source vgg|image] [--quiet 5]

Starts a node and a local destination (an in-process Storage SCP standing in
for the PACS), sends the pair with DCMTK ``storescu`` (pynetdicom when DCMTK
is absent), and reads the timings back from the database and the job result:

- receive: first to last instance stored (network + fsync + index)
- settle: last instance to the job being queued (the quiet period dominates)
- wait: queued to started
- load, register, resample, normalise, fuse, encode (+ store): the job's own stages
- send: job finished to the last instance acknowledged by the destination

Also the process's peak RSS (the node and its job; ``ru_maxrss``).  Appends a table to
``docs/node-latency.md``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.report import append_section
from dicom_node.config import parse_config
from dicom_node.workflow.node import Node
from fusion_demo.demo import LocalDestination, send_series
from fusion_demo.samples import shared_dir, write_synthetic_pair


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sample", choices=("cirs", "synthetic"), default="cirs")
    ap.add_argument("--method", default=None, help="the pipeline's fusion method (default: the node's default)")
    ap.add_argument("--feature-source", choices=("vgg", "image"), default="vgg")
    ap.add_argument("--quiet", type=float, default=5.0, help="settle quiet period, s")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "node-latency.md")
    args = ap.parse_args(argv)

    import resource

    from fusion.allocator import keep_freed_memory

    keep_freed_memory()  # as `fusion-node serve` does
    work = Path(tempfile.mkdtemp(prefix="fusion-latency-"))
    if args.sample == "cirs":
        folders, match = [shared_dir() / "data" / "cirs057a" / "CT", shared_dir() / "data" / "cirs057a" / "MR"], "rule"
    else:
        folders, match = list(write_synthetic_pair(work / "input")), "study"
    dest = LocalDestination(work / "received")
    settings = parse_config({
        "device": args.device,
        "node": {"ae_title": "FUSIONNODE", "host": "127.0.0.1", "port": 0},
        "storage": {"root": str(work / "node")},
        "settle": {"quiet_seconds": args.quiet, "sweep_interval_s": 0.5},
        "destinations": [{"name": "pacs", "ae_title": dest.ae_title, "host": "127.0.0.1", "port": dest.port}],
        "pipelines": [{"name": "ct-mr", "match": match, "destinations": ["pacs"],
                       "feature_source": args.feature_source, **({"method": args.method} if args.method else {}),
                       "base": {"modality": ["CT"]}, "overlay": {"modality": ["MR"]}}],
    })
    node = Node(settings).start()
    try:
        storescu = "/usr/bin/storescu" if Path("/usr/bin/storescu").exists() else None
        if storescu:
            subprocess.run([storescu, "-aet", "SCANNER", "-aec", "FUSIONNODE", "+sd", "127.0.0.1", str(node.port),
                            *map(str, folders)], check=True, capture_output=True)
        else:
            send_series(folders, node.port, "FUSIONNODE")
        while not (jobs := node.jobs.list()) or jobs[0].state not in ("done", "failed"):
            time.sleep(0.2)
        job = jobs[0]
        if job.state == "failed":
            print(f"job failed: {job.error}")
            return 1
        node.outbox.wait_idle(600)
        conn = node.store._conn()
        first, last = conn.execute("SELECT MIN(received_at), MAX(received_at) FROM instances i JOIN series s "
                                   "USING (series_uid) WHERE s.origin = 'received'").fetchone()
        job_row = conn.execute("SELECT created_at, started_at, finished_at FROM jobs WHERE id = ?", (job.id,)).fetchone()
        sent_at = conn.execute("SELECT MAX(updated_at) FROM outbox WHERE state = 'sent'").fetchone()[0]
    finally:
        node.stop()
        dest.stop()
    r = job.result
    stages = [("receive (first to last image)", last - first), ("settle", job_row["created_at"] - last),
              ("wait for a worker", job_row["started_at"] - job_row["created_at"])]
    stages += [(name, secs) for name, secs in r["seconds"].items()]
    stages += [("send to destination", sent_at - job_row["finished_at"])]
    total = sent_at - last
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    method = r.get("method", "?")
    how = f"{args.feature_source} gradients, " if r.get("trio") else ""
    cmd = f"--method {args.method} " if args.method else ""
    lines = [f"\n## {args.sample} pair, method {method}, {how}device {r['device']}, quiet period {args.quiet:g} s "
             f"({time.strftime('%Y-%m-%d')})\n",
             f"Command: `python benchmarks/node_latency.py --sample {args.sample} {cmd}"
             + (f"--feature-source {args.feature_source} " if r.get("trio") else "") + f"--quiet {args.quiet:g}`; {r['instances']} fused images; registration moved the "
             f"overlay {r.get('translation_mm')} mm, {r.get('rotation_deg')} deg; peak RSS of the node process "
             f"{peak_mb:.0f} MB" + (f"; VGG precision {r['vgg_precision']}" if r.get("vgg_precision") else "") + ".\n",
             "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {secs:.2f} |" for name, secs in stages]
    lines.append(f"| **last image received -> fused series stored at the destination** | **{total:.1f}** |")
    if r.get("vgg_precision"):
        import pydicom

        first_file = next(p for p in sorted(Path(folders[0]).iterdir()) if p.is_file())
        lines.append("\n" + vgg_rate(r["vgg_precision"], int(pydicom.dcmread(first_file, stop_before_pixels=True).Rows)))
    text = "\n".join(lines) + "\n"
    append_section(args.out, "# Node latency, stage by stage\n\nEach section is one run of `benchmarks/node_latency.py` "
                             "on this repository's CI-sized machine (2 cores, no GPU) unless it says otherwise.\n", text)
    shutil.rmtree(work, ignore_errors=True)
    return 0


def vgg_rate(precision: Literal["fp32", "bf16"], size: int, slices: int = 2) -> str:
    """The VGG-feature stage's GFLOP/s as a share of this machine's matmul peak, both measured now.

    Measured after the job, in this process and at the job's slice size (three exposures of
    ``slices`` slices, as the job runs them), so a figure means the same on any machine.
    """
    import numpy as np

    from benchmarks.allocator import _FLOP_PER_PIXEL, matmul_peak
    from benchmarks.speed import load_stack
    from fusion.features import load_vgg16
    from fusion.gradients import exposure_gradients

    a, b = load_stack(slices, size)
    a, b = a.astype(np.float32) / 255, b.astype(np.float32) / 255
    exposures = np.stack([a, b, (a + b) / 2])
    model = load_vgg16()
    exposure_gradients(exposures[:, :1], "vgg", model=model, precision=precision)  # warm-up
    t0 = time.perf_counter()
    exposure_gradients(exposures, "vgg", model=model, precision=precision)
    wall = time.perf_counter() - t0
    gflops = _FLOP_PER_PIXEL * size * size * 3 * slices / wall / 1e9
    peaks = {"fp32": matmul_peak("float32"), "bf16": matmul_peak("bfloat16")}
    return (f"VGG-feature stage measured after the job ({slices} x {size}² slices x 3 exposures, {precision}): "
            f"{wall / slices:.2f} s a slice, {gflops:.1f} GFLOP/s (VGG16 to relu2_2, counted analytically) = "
            f"**{gflops / peaks[precision]:.2f} of this machine's {precision} matmul peak** "
            f"({peaks['fp32']:.0f} GFLOP/s fp32, {peaks['bf16']:.0f} bf16, 2048² torch matmul measured in the "
            "same run); the rest of a slice's time is the derivatives and structure tensors of the feature maps.")


if __name__ == "__main__":
    sys.exit(main())
