"""Calibrate the left-right mirror test: its advantage figure on correct cases of several kinds (and, by its
antisymmetry, on their mirrored copies); writes docs/mirror-calibration.json.

    python benchmarks/mirror_calibration.py [--check-flipped] [--only=head|body]

Cases: head PET, head CT and head SPECT from the Harvard stacks (two real modalities, tests/registration_cases.py),
the generated head phantom (CT + MR, with a lesion and a calcification off the midline), and body: the CIRS 057A
CT-derived CT-like / PET-like cases and the real CIRS MR onto CT.  ``--check-flipped`` also runs the test on each
mirrored copy (twice the time) to show the antisymmetry holds.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import registration_cases as rc

from fusion.registration.mirror import mirror_test
from fusion.registration.quality import SimilarityProbe


def cases(data: Path, only: str = ""):
    if only == "body":
        yield from body_cases(data)
        return
    for subset, stacks in rc.HARVARD_STACKS.items():
        for i in range(len(stacks)):
            c = rc.make_two_modality_case(data / "harvard", subset, i, 0)
            yield c.kind, c.layout, c.base, c.overlay
    from dicom_node.dicom.volume import load_series
    from fusion_demo.samples import write_synthetic_pair

    with tempfile.TemporaryDirectory() as tmp:
        ct_dir, mr_dir = write_synthetic_pair(Path(tmp))
        ct = load_series(sorted(ct_dir.iterdir())).image
        mr = load_series(sorted(mr_dir.iterdir())).image
    yield "head-phantom", "generated CT + MR", ct, mr
    if only != "head":
        yield from body_cases(data)


def body_cases(data: Path):
    source, base = rc.cirs_base(str(data / "cirs057a"))
    for kind in ("ct", "pet"):
        for seed in (0, 1):
            c = rc.make_case(source, base, kind, seed)
            yield f"body-{kind}-like", f"CIRS seed {seed}", c.base, c.overlay
    ct, mr = rc.load_cirs(str(data / "cirs057a"))
    yield "body-mr", "CIRS MR onto CT", ct, mr


def main() -> None:
    check_flipped = "--check-flipped" in sys.argv
    only = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--only=")), "")
    data = ROOT.parent / "shared" / "data"
    rows = []
    t0 = time.perf_counter()
    for kind, what, base, overlay in cases(data, only):
        probe = SimilarityProbe(base, overlay)
        m = mirror_test(probe, seed=1, threads=1)
        row = {"kind": kind, "case": what, **m.as_dict()}
        if check_flipped:
            row["flipped_advantage"] = round(mirror_test(probe.mirrored(), seed=1, threads=1).advantage, 4)
        rows.append(row)
        print(json.dumps(row), flush=True)
    adv = np.array([r["advantage"] for r in rows])
    summary = {"cases": len(rows), "correct_max": float(adv.max()), "correct_min": float(adv.min()),
               "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(summary))
    (ROOT / "docs" / f"mirror-calibration{'-' + only if only else ''}.json").write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
