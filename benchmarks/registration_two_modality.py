"""Registration accuracy on two genuinely different modalities (the Harvard MRI/CT, MRI/PET, MRI/SPECT stacks).

    python benchmarks/registration_two_modality.py [SEEDS]     (default: 1 seed per stack)

Each case: one patient's MRI stack as the base, the same patient's CT / PET /
SPECT stack (co-registered by the atlas) moved by a known rigid transform on its
own grid (``tests/registration_cases.make_two_modality_case``), registered with
the node's defaults (one thread).  TRE at the base's 8 corners and centre.
Prints one JSON line per case and a summary; writes docs/registration-two-modality.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import registration_cases as rc

from fusion.registration.rigid import RegistrationParams, register_rigid


def main() -> None:
    seeds = range(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    harvard = ROOT.parent / "shared" / "data" / "harvard"
    rows = []
    for subset, stacks in rc.HARVARD_STACKS.items():
        for stack in range(len(stacks)):
            for seed in seeds:
                c = rc.make_two_modality_case(harvard, subset, stack, seed)
                t0 = time.perf_counter()
                r = register_rigid(c.base, c.overlay, RegistrationParams(threads=1))
                tre = rc.tre_mm(r.matrix, c.truth, c.base)
                row = {"kind": c.kind, "case": c.layout, "seed": seed, "angle_deg": round(c.angle_deg, 1),
                       "shift_mm": round(c.shift_mm, 1), "tre_median": round(float(np.median(tre)), 2),
                       "tre_max": round(float(tre.max()), 2), "seconds": round(time.perf_counter() - t0, 1)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    summary = {}
    for kind in sorted({r["kind"] for r in rows}):
        sel = [r for r in rows if r["kind"] == kind]
        summary[kind] = {"cases": len(sel), "median_of_medians": float(np.median([r["tre_median"] for r in sel])),
                         "worst_max": max(r["tre_max"] for r in sel)}
    print(json.dumps(summary))
    (ROOT / "docs" / "registration-two-modality.json").write_text(json.dumps({"rows": rows, "summary": summary},
                                                                             indent=1))


if __name__ == "__main__":
    main()
