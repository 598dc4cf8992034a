"""DMF throughput in slices/s, stage by stage, on whole stacks.

    python benchmarks/speed.py [--slices 16] [--size 256] [--device cpu|cuda] [--repeat 3]

Stages: each conventional method of the trio, the gradients (VGG features or
image), the weights (eqs. 3-8) and the pyramid blend.  Input is a stack of the
Harvard MRI-CT pairs (tiled/cropped to ``--size``), or the generated phantom
when the data is absent.  Each stage is timed on the whole stack, best of
``--repeat`` after one warm-up run, with the GPU synchronised around it.
Appends a table to ``docs/speed-core.md``.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.report import append_section
from fusion.api import DEFAULT_TRIO
from fusion.backend import array_module, resolve_device, to_device
from fusion.dmf import DMFParams, dmf_blend, dmf_weights
from fusion.gradients import exposure_gradients
from fusion.intensity import to_unit
from fusion.methods import get_method
from fusion_demo.samples import harvard_pairs, load_image, synthetic_pair


def load_stack(n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    pairs = harvard_pairs(subset="MRI_CT")
    if pairs:
        mri = [load_image(p.mri) for p in pairs]
        ct = [load_image(p.other) for p in pairs]
    else:
        m, c = synthetic_pair(256)
        mri, ct = [m], [c]
    reps = -(-size // 256)

    def tile(img):
        return np.tile(img, (reps, reps))[:size, :size]

    a = np.stack([tile(mri[i % len(mri)]) for i in range(n)])
    b = np.stack([tile(ct[i % len(ct)]) for i in range(n)])
    return a, b


def _sync(xp) -> None:
    if xp is not np:
        xp.cuda.get_current_stream().synchronize()


def timed(fn, xp, repeat: int):
    fn()  # warm-up: kernel compilation, cuDNN autotune, caches
    _sync(xp)
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        _sync(xp)
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=16)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "speed-core.md")
    args = ap.parse_args(argv)

    device = resolve_device(args.device)
    a_np, b_np = load_stack(args.slices, args.size)
    a = to_unit(to_device(a_np, device)).astype(args.dtype)
    b = to_unit(to_device(b_np, device)).astype(args.dtype)
    xp = array_module(a)
    from fusion.features import load_vgg16

    model = load_vgg16(device=device)
    params = DMFParams()
    rows = []
    exposures = []
    for name in DEFAULT_TRIO:
        t, e = timed(lambda name=name: get_method(name)(a, b), xp, args.repeat)
        rows.append((f"method {name.upper()}", t))
        exposures.append(e)
    ex = xp.stack(exposures)
    for source in ("vgg", "image"):
        t, (mag, phi) = timed(lambda source=source: exposure_gradients(ex, source, model=model), xp, args.repeat)
        rows.append((f"gradients ({'VGG features' if source == 'vgg' else 'image'})", t))
        if source == "vgg":
            t_w, w = timed(lambda: dmf_weights(ex, mag, phi, params), xp, args.repeat)
    rows.append(("weights (eqs. 3-8)", t_w))
    t_b, _ = timed(lambda: dmf_blend(ex, w, params), xp, args.repeat)
    rows.append(("pyramid blend", t_b))

    n = args.slices
    total_vgg = sum(t for name, t in rows if "image" not in name)
    lines = []
    hw = platform.processor() or platform.machine()
    if device == "cuda":
        import cupy

        hw = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    else:
        import os

        hw = f"{hw}, {os.cpu_count()} cores"
    header = (f"\n## {args.size}x{args.size}, {n} slices, {args.dtype}, device {device} ({hw}), "
              f"torch threads {__import__('torch').get_num_threads()}\n")
    lines.append(header)
    lines.append(f"Command: `python benchmarks/speed.py --slices {n} --size {args.size} --device {device} "
                 f"--dtype {args.dtype} --repeat {args.repeat}` ({time.strftime('%Y-%m-%d')})\n")
    lines.append("| stage | seconds (whole stack) | ms/slice | slices/s |")
    lines.append("|---|---|---|---|")
    for name, t in rows:
        lines.append(f"| {name} | {t:.3f} | {1000 * t / n:.1f} | {n / t:.1f} |")
    lines.append(f"| **DMF total (VGG gradients)** | {total_vgg:.3f} | {1000 * total_vgg / n:.1f} | {n / total_vgg:.2f} |")
    text = "\n".join(lines) + "\n"
    append_section(args.out, "# DMF speed, stage by stage\n\nEach section is one run of `benchmarks/speed.py`; "
                             "best of N after a warm-up, whole stack per stage.\n", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
