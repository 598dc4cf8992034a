"""Seconds per method: one 256x256 pair, and a 512x512 stack, on whole stacks.

    python benchmarks/speed_methods.py [--device cpu|cuda] [--stack 8] [--repeat 3]

Inputs are Harvard MRI-CT pairs (tiled to 512x512 for the stack), or the
generated phantom.  Best of ``--repeat`` after a warm-up, GPU synchronised.
Appends a table to ``docs/speed.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.report import append_section
from benchmarks.speed import load_stack, timed
from fusion.api import DEFAULT_TRIO, dmf_stack
from fusion.backend import array_module, resolve_device, to_device
from fusion.intensity import to_unit
from fusion.methods import available, get_method


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--stack", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "speed.md")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    from fusion.features import load_vgg16

    model = load_vgg16(device=device)
    cases = {}
    for label, n, size in (("256x256 pair", 1, 256), (f"512x512 stack of {args.stack}", args.stack, 512)):
        a_np, b_np = load_stack(n, size)
        a, b = to_unit(to_device(a_np, device)), to_unit(to_device(b_np, device))
        xp = array_module(a)
        row = {}
        for m in available():
            row[m] = timed(lambda m=m: get_method(m)(a, b), xp, args.repeat)[0]
        for src in ("vgg", "image"):
            row[f"DMF {'+'.join(DEFAULT_TRIO)} ({src})"] = timed(
                lambda src=src: dmf_stack(a, b, feature_source=src, model=model), xp, args.repeat)[0]
        cases[label] = (n, row)
    hw = f"{platform.machine()}, {os.cpu_count()} cores" if device == "cpu" else "GPU"
    lines = [f"\n## device {device} ({hw}), float32, {time.strftime('%Y-%m-%d')}\n",
             f"Command: `python benchmarks/speed_methods.py --device {device} --stack {args.stack} --repeat {args.repeat}`\n",
             "| method | " + " | ".join(f"{k}: s (ms/slice)" for k in cases) + " |", "|---|" + "---|" * len(cases)]
    for m in next(iter(cases.values()))[1]:
        lines.append(f"| {m} | " + " | ".join(f"{row[m]:.3f} ({1000 * row[m] / n:.0f})" for n, row in cases.values()) + " |")
    text = "\n".join(lines) + "\n"
    append_section(args.out, "# Speed per fusion method\n\nEach section is one run of `benchmarks/speed_methods.py`; "
                             "stage-by-stage DMF figures are in `speed-core.md`.\n", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
