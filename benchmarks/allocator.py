"""The VGG-feature stage: allocator settings, precision, and achieved rate against the matmul peak.

    python benchmarks/allocator.py [--slices 4] [--size 512] [--repeat 1]

Each variant runs in its own process (allocator settings are process-wide), in a worker
thread as in the node, on ``--slices`` three-exposure stacks of Harvard MRI-CT pairs tiled to
``--size``.  Reported: wall, user and system CPU seconds, minor page faults, peak RSS; the
stage's GFLOP/s (VGG16 through relu2_2, counted analytically) as a ratio of this machine's
torch matmul peak measured in the same run (fp32 and bf16), so the figure means the same on
any machine; and how far bf16 moves the fused 8-bit output from fp32 on the same slices.
Appends a section to ``docs/speed-vgg.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.report import append_section

# multiply-adds x 2 of conv1_1..conv2_2 per pixel of the input (relu2_2 is at 1/4 of the pixels)
_FLOP_PER_PIXEL = 2 * 9 * (3 * 64 + 64 * 64 + (64 * 128 + 128 * 128) / 4)


def _child(tune: bool, precision: str, slices: int, size: int, whole: bool = False) -> dict:
    import resource
    import threading

    import numpy as np

    if tune:
        from fusion.allocator import keep_freed_memory

        keep_freed_memory()
    from benchmarks.speed import load_stack
    from fusion.dmf import DMFParams, dmf_blend, dmf_weights
    from fusion.features import load_vgg16
    from fusion.gradients import exposure_gradients, resolve_precision

    a, b = load_stack(slices, size)
    a, b = a.astype(np.float32) / 255, b.astype(np.float32) / 255
    exposures = np.stack([a, b, (a + b) / 2])
    model = load_vgg16()
    out: dict = {}
    # the peak is measured in this process, just before the stage: on a shared machine both
    # see the same load, so their ratio holds where the absolute figures do not
    out["peak"] = {"fp32": matmul_peak("float32"), "bf16": matmul_peak("bfloat16")}

    def run() -> None:
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        stage = exposures
        if whole:  # the job's whole fuse stage: the trio's exposures (CBF, ...) first, as fusion.api.dmf_stack
            from fusion.api import resolve_trio
            from fusion.methods import get_method

            stage = np.stack([get_method(name)(a, b) for name in resolve_trio(None, "CT")])
        mag, phi = exposure_gradients(stage, "vgg", model=model, precision=precision)
        fused_stage = dmf_blend(stage, dmf_weights(stage, mag, phi, DMFParams())) if whole else None
        wall = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        fused = fused_stage if whole else dmf_blend(exposures, dmf_weights(exposures, mag, phi, DMFParams()))
        out.update(wall=wall, user=r1.ru_utime - r0.ru_utime, sys=r1.ru_stime - r0.ru_stime,
                   minflt=r1.ru_minflt - r0.ru_minflt, maxrss_mb=r1.ru_maxrss / 1024,
                   precision=resolve_precision(precision, "cpu"),
                   fused=np.round(np.clip(fused, 0, 1) * 255).astype(np.uint8).tobytes().hex())

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    return out


def matmul_peak(dtype_name: str, n: int = 2048, seconds: float = 2.0) -> float:
    """GFLOP/s of torch.mm on n x n matrices, best of a few timed runs."""
    import torch

    dtype = getattr(torch, dtype_name)
    x = torch.randn(n, n).to(dtype)
    y = torch.randn(n, n).to(dtype)
    torch.mm(x, y)
    best = float("inf")
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        torch.mm(x, y)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=4)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--whole", action="store_true",
                    help="time the job's whole fuse stage (DMF with the CT trio: exposures, VGG, blend), "
                         "glibc default vs kept in heap, instead of the VGG features alone")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        tune, precision = args.child.split(",")
        print(json.dumps(_child(tune == "1", precision, args.slices, args.size, args.whole)))
        return
    import numpy as np
    import torch

    from fusion.gradients import cpu_has_bf16

    variants = [("0", "fp32"), ("1", "fp32"), ("1", "bf16")]
    rows, outputs = [], {}
    flop = _FLOP_PER_PIXEL * args.size * args.size * 3 * args.slices
    for tune, precision in variants:
        res = subprocess.run([sys.executable, __file__, "--child", f"{tune},{precision}", "--slices", str(args.slices),
                              "--size", str(args.size), *(["--whole"] if args.whole else [])],
                             check=True, capture_output=True, text=True)
        r = json.loads(res.stdout.strip().splitlines()[-1])
        outputs[(tune, precision)] = np.frombuffer(bytes.fromhex(r.pop("fused")), dtype=np.uint8).astype(int)
        gflops = flop / r["wall"] / 1e9
        peaks = r.pop("peak")
        rows.append(f"| {'kept in heap' if tune == '1' else 'glibc default'} | {precision} | {r['wall']:.1f} | "
                    f"{r['user']:.1f} | {r['sys']:.1f} | {r['minflt']:,} | {r['maxrss_mb']:.0f} | {gflops:.1f} | "
                    f"{peaks[precision]:.1f} | {gflops / peaks[precision]:.2f} |")
    ref = outputs[("1", "fp32")]
    diff_alloc = np.abs(outputs[("0", "fp32")] - ref)
    diff_bf16 = np.abs(outputs[("1", "bf16")] - ref)
    body = (f"Command: `python benchmarks/allocator.py --slices {args.slices} --size {args.size}"
            f"{' --whole' if args.whole else ''}`; "
            f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, CPU has native bf16: {cpu_has_bf16()}.\n"
            "Each row's process measured torch's matmul peak (2048^2, best of 2 s) for its precision just "
            "before the stage; the last column is the stage's rate as a share of it.\n\n"
            "| allocator | precision | wall s | user s | sys s | minor faults | peak RSS MB | GFLOP/s | matmul peak | "
            "share of peak |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
            f"Fused 8-bit output, allocator change: max {diff_alloc.max()} grey levels (identical expected); "
            f"bf16 vs fp32: max {diff_bf16.max()}, mean {diff_bf16.mean():.3f} grey levels."
            + (" GFLOP/s counts only the VGG convolutions over the whole stage's time.\n" if args.whole else "\n"))
    stage = "Whole DMF fuse stage (CT trio: exposures, VGG features, weights, blend)" if args.whole \
        else "VGG-feature stage"
    heading = (f"\n## {stage}, {args.slices} x {args.size}^2 slices x 3 exposures, "
               f"{time.strftime('%Y-%m-%d')}; load average {os.getloadavg()[0]:.1f}\n\n")
    append_section(REPO / "docs" / "speed-vgg.md",
                   "# The VGG-feature stage: allocator, precision, rate against the matmul peak\n\n"
                   "Each section is one run of `benchmarks/allocator.py`.\n", heading + body)


if __name__ == "__main__":
    main()
