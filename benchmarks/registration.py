"""Registration accuracy, self-consistency, quality check and speed: the measurements behind docs/registration.md.

    python benchmarks/registration.py [--cases 20] [--tradeoff-cases 5] [--skip-tradeoff] [--skip-baseline]
                                      [--picture-only]

Needs ../shared/data/cirs057a (set FUSION_SHARED_DIR otherwise).  Parts:

1. accuracy: ``--cases`` known-transform cases per pairing (CT-like, PET-like
   overlays; ``tests/registration_cases.py``), default parameters, one thread
   (bit-reproducible), TRE at the base volume's 8 corners and centre; the same
   cases with the quality check (false alarms) and, mirrored left-right, as
   flipped series (detections); plain SimpleITK (the earlier defaults) on the
   same cases as the anchor;
2. the real CIRS pair: MR onto CT with the defaults, time, quality figures,
   consistency under known moves of the CT (exact: header only), the MR
   mirrored left-right;
3. trade-off: sampling x pyramid x threads on the CIRS pair (time, deviation
   from the reference result) and on ``--tradeoff-cases`` synthetic cases per
   pairing (TRE), plus ablations of each accuracy measure.

Writes the measured part of docs/registration.md (between the MEASURED
markers), all raw numbers to docs/registration.json, and the CIRS check sheet
to docs/registration-cirs.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import registration_cases as rc

from fusion import environment
from fusion.registration.quality import assess_registration, check_sheet
from fusion.registration.rigid import RegistrationParams, register_rigid

SHARED = environment.shared_dir()
CIRS = SHARED / "data" / "cirs057a"
DOC = REPO / "docs" / "registration.md"
RAW = REPO / "docs" / "registration.json"
PICTURE = REPO / "docs" / "registration-cirs.png"
BEGIN, END = "<!-- BEGIN MEASURED (benchmarks/registration.py) -->", "<!-- END MEASURED -->"

#: the defaults before issue 4 ("plain SimpleITK Mattes MI", the measured starting point of docs/method.md)
BASELINE = dict(smoothing_sigmas=(2.0, 1.0, 0.0), min_samples=0, clip_percentiles=None, working_spacing_mm=None,
                isotropic_moving=False)


def log(msg: str) -> None:
    print(msg, flush=True)


def stats(values) -> dict:
    a = np.asarray(values, dtype=float).ravel()
    return {"median": float(np.median(a)), "p90": float(np.percentile(a, 90)), "max": float(a.max()), "n": int(a.size)}


def load_avg() -> str:
    try:
        return ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


# ---------------------------------------------------------------------------
# 1. accuracy on known transforms
# ---------------------------------------------------------------------------


def accuracy(source, base, n: int, baseline: bool) -> dict:
    out: dict = {}
    for kind in ("ct", "pet"):
        rows = []
        for seed in range(n):
            case = rc.make_case(source, base, kind, seed)
            res = register_rigid(case.base, case.overlay, RegistrationParams(threads=1))
            tre = rc.tre_mm(res.matrix, case.truth, case.base)
            q = assess_registration(case.base, case.overlay, res)
            flipped = rc.flipped_lr(case.overlay)
            fres = register_rigid(case.base, flipped, RegistrationParams(threads=1))
            fq = assess_registration(case.base, flipped, fres)
            row = {
                "seed": seed, "angle_deg": case.angle_deg, "shift_mm": case.shift_mm, "layout": case.layout,
                "overlay_spacing": list(case.overlay.GetSpacing()), "overlay_size": list(case.overlay.GetSize()),
                "tre": tre.tolist(), "seconds": res.seconds, "iterations": list(res.iterations_per_level),
                "quality": q.as_dict(), "flipped_quality": fq.as_dict(),
                "flipped_tre_max": float(rc.tre_mm(fres.matrix, case.truth, case.base).max()),
            }
            if baseline:
                bres = register_rigid(case.base, case.overlay, RegistrationParams(threads=1, **BASELINE))
                row["baseline_tre"] = rc.tre_mm(bres.matrix, case.truth, case.base).tolist()
                row["baseline_seconds"] = bres.seconds
            rows.append(row)
            log(f"{kind} {seed:2d}: {case.angle_deg:4.1f} deg {case.shift_mm:4.1f} mm {case.layout:16s} TRE median "
                f"{np.median(tre):.3f} max {tre.max():.3f} ({res.seconds:.1f} s) quality ok={q.ok} "
                f"ECC {q.similarity:.3f} sharp {q.sharpness:.2f} flip {q.flip_similarity:.3f}; flipped -> ok={fq.ok} "
                f"{fq.tags}" + (f"; baseline max {max(row['baseline_tre']):.2f}" if baseline else ""))
        out[kind] = rows
    return out


# ---------------------------------------------------------------------------
# 2. the real pair
# ---------------------------------------------------------------------------


def write_picture(ct, mr, result) -> None:
    """The CIRS check sheet (what the node saves per job under <root>/qc) for docs/registration.md."""
    title = (f"CIRS 057A: MR onto CT, moved {result.translation_norm_mm:.1f} mm, turned "
             f"{result.rotation_angle_deg:.1f} deg")
    check_sheet(ct, mr, result.transform, ("CT", "MR"), title).save(PICTURE)
    log(f"wrote {PICTURE}")


def cirs_pair(ct, mr) -> dict:
    out: dict = {}
    p = RegistrationParams(threads=1)
    a = register_rigid(ct, mr, p)
    q = assess_registration(ct, mr, a)
    out["result"] = {"translation_mm": list(a.translation_mm), "translation_norm_mm": a.translation_norm_mm,
                     "rotation_deg": list(a.rotation_deg), "rotation_angle_deg": a.rotation_angle_deg,
                     "seconds": a.seconds, "iterations": list(a.iterations_per_level), "quality": q.as_dict()}
    log(f"CIRS MR->CT: |t| {a.translation_norm_mm:.2f} mm, rotation {a.rotation_angle_deg:.2f} deg, {a.seconds:.1f} s; "
        f"quality {q.as_dict()}")
    write_picture(ct, mr, a)
    rng = np.random.default_rng(5)
    cons = []
    for _k in range(3):
        axis, direction = rng.normal(size=3), rng.normal(size=3)
        angle, shift = float(rng.uniform(5, 15)), float(rng.uniform(10, 40))
        pm = rc.rigid(angle, axis, shift * direction / np.linalg.norm(direction), rc.centre(ct))
        b = register_rigid(rc.moved_header(ct, pm), mr, p)
        d = rc.tre_mm(b.matrix @ pm, a.matrix, ct)
        cons.append({"angle_deg": angle, "shift_mm": shift, "disagreement": d.tolist(), "seconds": b.seconds})
        log(f"  CT moved {angle:.1f} deg / {shift:.1f} mm: composed results differ median {np.median(d):.2f} max "
            f"{d.max():.2f} mm")
    out["consistency"] = cons
    seeds = []
    for seed in (1, 2, 3):
        s = register_rigid(ct, mr, dataclasses.replace(p, seed=seed))
        seeds.append(rc.tre_mm(s.matrix, a.matrix, ct).tolist())
    out["seed_spread"] = seeds
    log(f"  other seeds differ by max {max(max(s) for s in seeds):.2f} mm")
    fl = rc.flipped_lr(mr)
    fr = register_rigid(ct, fl, p)
    fq = assess_registration(ct, fl, fr)
    out["flipped_mr"] = {"quality": fq.as_dict(), "rotation_angle_deg": fr.rotation_angle_deg}
    log(f"  MR mirrored left-right: {fq.as_dict()}")
    return out


# ---------------------------------------------------------------------------
# 3. trade-off
# ---------------------------------------------------------------------------

PYRAMIDS = {
    "8-4-2 mm (4/2/1)": dict(shrink_factors=(4, 2, 1), smoothing_sigmas=(4.0, 2.0, 1.5)),
    "8-4 mm (4/2)": dict(shrink_factors=(4, 2), smoothing_sigmas=(4.0, 2.0)),
    "16-8-4 mm (8/4/2)": dict(shrink_factors=(8, 4, 2), smoothing_sigmas=(8.0, 4.0, 2.0)),
}
SAMPLINGS = (0.02, 0.05, 0.10)
ABLATIONS = {
    "no min_samples": dict(min_samples=0),
    "no clipping": dict(clip_percentiles=None),
    "moving not isotropic": dict(isotropic_moving=False),
    "final sigma 1 mm": dict(smoothing_sigmas=(4.0, 2.0, 1.0)),
    "final sigma 2 mm": dict(smoothing_sigmas=(4.0, 2.0, 2.0)),
    "native grids (no 2 mm working grid)": dict(working_spacing_mm=None),
    "earlier sigmas 2/1/0 mm": dict(smoothing_sigmas=(2.0, 1.0, 0.0)),
    "plain SimpleITK (earlier defaults)": BASELINE,
}


def tradeoff(ct, mr, source, base, n: int, reference: np.ndarray) -> list[dict]:
    cases = [rc.make_case(source, base, kind, seed) for kind in ("ct", "pet") for seed in range(n)]
    rows = []

    def run(label: str, knobs: dict, threads_list=(1, 2)) -> None:
        row = {"label": label, "knobs": {k: v for k, v in knobs.items()}}
        for threads in threads_list:
            r = register_rigid(ct, mr, RegistrationParams(threads=threads, **knobs))
            row[f"cirs_seconds_t{threads}"] = r.seconds
            row["cirs_deviation_max"] = float(rc.tre_mm(r.matrix, reference, ct).max())
        tres, secs = {"ct": [], "pet": []}, []
        for c in cases:
            r = register_rigid(c.base, c.overlay, RegistrationParams(threads=2, **knobs))
            tres[c.kind].append(rc.tre_mm(r.matrix, c.truth, c.base).tolist())
            secs.append(r.seconds)
        row["synthetic"] = {k: stats(v) for k, v in tres.items()}
        row["synthetic_seconds"] = float(np.mean(secs))
        rows.append(row)
        times = ", ".join(f"t{t} {row[f'cirs_seconds_t{t}']:.1f} s" for t in threads_list)
        log(f"{label:40s} CIRS {times}, dev {row['cirs_deviation_max']:.2f} mm; synthetic ct max "
            f"{row['synthetic']['ct']['max']:.2f} pet max {row['synthetic']['pet']['max']:.2f} ({row['synthetic_seconds']:.1f} s)")

    for pname, pyr in PYRAMIDS.items():
        for s in SAMPLINGS:
            run(f"{pname}, {s:.0%}", {**pyr, "sampling": s})
    for name, knobs in ABLATIONS.items():
        run(f"ablation: {name}", knobs, threads_list=(2,))
    return rows


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------


def _f(v: float) -> str:
    return f"{v:.2f}"


def render(data: dict) -> str:
    lines = [BEGIN, "",
             f"Measured {data['date']} on {data['machine']} (SimpleITK {data['simpleitk']}; load average over "
             f"1, 5, 15 min at the start: {data['load_start'].replace(' / ', ', ')}, at the end: "
             f"{data['load_end'].replace(' / ', ', ')}; with load above 2 another job shared the 2 cores, so the "
             f"seconds are upper bounds). Benchmark run time {data.get('seconds', 0) / 60:.0f} min.", ""]
    acc = data.get("accuracy")
    if acc:
        lines += ["### Accuracy on known transforms", "",
                  f"{len(acc['ct'])} cases per pairing, seeds 0-{len(acc['ct']) - 1}, default parameters, one thread "
                  "(bit-reproducible). TRE in mm at the 8 corners and the centre of the **base** volume "
                  "(CIRS CT, 2 x 2 x 2.5 mm, 336 x 336 x 177 mm field of view: corners up to 250 mm from the centre).",
                  "",
                  "| pairing | cases | TRE median | p90 | max | worst case's median | bar (median <= 0.5, max <= 1.0) "
                  "| seconds per case (mean) | quality check: false alarms | flipped copies detected |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for kind, name in (("ct", "CT-like overlay (1-2 mm, 2-3 mm slices)"), ("pet", "PET-like overlay (3-4 mm, 6-8 mm PSF)")):
            rows = acc[kind]
            t = stats([r["tre"] for r in rows])
            worst = max(float(np.median(r["tre"])) for r in rows)
            ok = t["median"] <= rc.TRE_MEDIAN_BAR_MM and t["max"] <= rc.TRE_MAX_BAR_MM
            alarms = sum(not r["quality"]["ok"] for r in rows)
            caught = sum(not r["flipped_quality"]["ok"] for r in rows)
            lines.append(f"| {name} | {len(rows)} | {_f(t['median'])} | {_f(t['p90'])} | {_f(t['max'])} | {_f(worst)} | "
                         f"{'met' if ok else 'MISSED'} | {np.mean([r['seconds'] for r in rows]):.1f} | "
                         f"{alarms} of {len(rows)} | {caught} of {len(rows)} |")
        if all("baseline_tre" in r for kind in ("ct", "pet") for r in acc[kind]):
            lines += ["", "Anchor: the same cases with plain SimpleITK Mattes-MI rigid registration (the earlier "
                      "defaults: shrink 4/2/1, sigmas 2/1/0 mm, 5 % random sampling, no clipping, native grids):", "",
                      "| pairing | TRE median | p90 | max | cases with max > 2 mm | seconds per case |", "|---|---|---|---|---|---|"]
            for kind in ("ct", "pet"):
                rows = acc[kind]
                t = stats([r["baseline_tre"] for r in rows])
                fails = sum(max(r["baseline_tre"]) > 2 for r in rows)
                lines.append(f"| {kind} | {_f(t['median'])} | {_f(t['p90'])} | {_f(t['max'])} | {fails} of {len(rows)} | "
                             f"{np.mean([r['baseline_seconds'] for r in rows]):.1f} |")
        lines += ["", "Per case (max TRE, mm; angle, shift; overlay layout):", ""]
        for kind in ("ct", "pet"):
            lines.append(f"- {kind}: " + "; ".join(
                f"{max(r['tre']):.2f} ({r['angle_deg']:.0f} deg, {r['shift_mm']:.0f} mm, {r['layout']})" for r in acc[kind]))
        lines += ["", "Quality figures of the correct registrations (min-max) and of their flipped copies:", "",
                  "| pairing | ECC | sharpness | support overlap | flip ECC - ECC | flipped: flip ECC - ECC |",
                  "|---|---|---|---|---|---|"]
        for kind in ("ct", "pet"):
            rows = acc[kind]

            def rng_(key, src="quality"):
                v = [r[src][key] for r in rows]
                return f"{min(v):.2f}-{max(v):.2f}"
            d = [r["quality"]["flip_similarity"] - r["quality"]["similarity"] for r in rows]
            fd = [r["flipped_quality"]["flip_similarity"] - r["flipped_quality"]["similarity"] for r in rows]
            lines.append(f"| {kind} | {rng_('similarity')} | {rng_('sharpness')} | {rng_('support_overlap')} | "
                         f"{min(d):+.3f} to {max(d):+.3f} | {min(fd):+.3f} to {max(fd):+.3f} |")
    cirs = data.get("cirs")
    if cirs:
        r, q = cirs["result"], cirs["result"]["quality"]
        cons = [max(c["disagreement"]) for c in cirs["consistency"]]
        lines += ["", "### The real CIRS pair (MR onto CT)", "",
                  f"- result: translation of the CT centre {np.round(r['translation_mm'], 2).tolist()} mm "
                  f"(|t| = {r['translation_norm_mm']:.2f} mm), rotation {r['rotation_angle_deg']:.2f} deg, "
                  f"{r['seconds']:.1f} s (one thread), iterations per level {r['iterations']};",
                  f"- quality: ECC {q['similarity']:.3f}, sharpness {q['sharpness']:.3f}, support overlap "
                  f"{q['support_overlap']:.3f}, mirrored ECC {q['flip_similarity']:.3f}, check {q['seconds']:.1f} s, "
                  f"{'accepted' if q['ok'] else 'REFUSED: ' + '; '.join(q['problems'])};",
                  "- consistency (CT moved by a known rigid transform through its header, registered again, composed): "
                  + ", ".join(f"{c['angle_deg']:.1f} deg / {c['shift_mm']:.1f} mm -> max {max(c['disagreement']):.2f} mm"
                              for c in cirs["consistency"])
                  + f" at the CT's corners and centre (bar 1 mm: {'met' if max(cons) <= 1 else 'MISSED'});",
                  f"- other sampling seeds: max {max(max(s) for s in cirs['seed_spread']):.2f} mm from the seed-0 result;",
                  f"- MR mirrored left-right: ECC {cirs['flipped_mr']['quality']['similarity']:.3f}, mirrored-back ECC "
                  f"{cirs['flipped_mr']['quality']['flip_similarity']:.3f}, "
                  f"{'accepted' if cirs['flipped_mr']['quality']['ok'] else 'refused'} (see the flip check's limits below)."]
    trade = data.get("tradeoff")
    if trade:
        meta = data.get("tradeoff_meta")
        when = (f" Measured in a separate run (load average at its start {meta['load_start']}, at its end "
                f"{meta['load_end']})." if meta else "")
        lines += ["", "### Accuracy / time trade-off", "",
                  f"CIRS pair: seconds with 1 and 2 threads, and the largest deviation from the reference (default) "
                  f"result at the CT's corners and centre. Synthetic: {data['tradeoff_cases']} cases per pairing (the "
                  "first of the accuracy series), 2 threads, TRE median and max over all their points." + when, "",
                  "| setting | CIRS s (1 thread) | CIRS s (2 threads) | CIRS deviation mm | CT-like TRE median / max | "
                  "PET-like TRE median / max | synthetic s per case |", "|---|---|---|---|---|---|---|"]
        for row in trade:
            t1 = row.get("cirs_seconds_t1")
            lines.append(f"| {row['label']} | {'' if t1 is None else f'{t1:.1f}'} | {row['cirs_seconds_t2']:.1f} | "
                         f"{row['cirs_deviation_max']:.2f} | {_f(row['synthetic']['ct']['median'])} / "
                         f"{_f(row['synthetic']['ct']['max'])} | {_f(row['synthetic']['pet']['median'])} / "
                         f"{_f(row['synthetic']['pet']['max'])} | {row['synthetic_seconds']:.1f} |")
    lines += ["", END]
    return "\n".join(lines)


def write_doc(text: str) -> None:
    if DOC.exists() and BEGIN in DOC.read_text():
        old = DOC.read_text()
        head, rest = old.split(BEGIN, 1)
        tail = rest.split(END, 1)[1] if END in rest else ""
        DOC.write_text(head + text + tail)
    else:
        DOC.write_text("# Registration\n\n" + text + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=20)
    ap.add_argument("--tradeoff-cases", type=int, default=5)
    ap.add_argument("--skip-tradeoff", action="store_true")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--render-only", action="store_true", help="rewrite the doc from docs/registration.json")
    ap.add_argument("--picture-only", action="store_true", help="register the CIRS pair and write only the picture")
    args = ap.parse_args()
    if args.picture_only:
        ct, mr = rc.load_cirs(str(CIRS))
        write_picture(ct, mr, register_rigid(ct, mr, RegistrationParams(threads=1)))
        return
    if args.render_only:
        write_doc(render(json.loads(RAW.read_text())))
        return
    if not CIRS.exists():
        sys.exit(f"CIRS data not found at {CIRS} (set FUSION_SHARED_DIR)")
    data: dict = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                  "simpleitk": sitk.Version.VersionString(), "load_start": load_avg()}
    if RAW.exists():  # keep parts not re-run
        old = json.loads(RAW.read_text())
        data.update({k: v for k, v in old.items() if k in ("accuracy", "cirs", "tradeoff", "tradeoff_cases", "tradeoff_meta")})
    t0 = time.perf_counter()
    ct, mr = rc.load_cirs(str(CIRS))
    source, base = rc.cirs_base(str(CIRS))
    if not args.skip_accuracy:
        previous = data.get("accuracy") or {}
        data["accuracy"] = accuracy(source, base, args.cases, baseline=not args.skip_baseline)
        if args.skip_baseline:  # keep the anchor measured by an earlier run on the same cases
            for kind, rows in data["accuracy"].items():
                old_rows = {r["seed"]: r for r in previous.get(kind, []) if "baseline_tre" in r}
                for r in rows:
                    if r["seed"] in old_rows:
                        r["baseline_tre"] = old_rows[r["seed"]]["baseline_tre"]
                        r["baseline_seconds"] = old_rows[r["seed"]]["baseline_seconds"]
        data["cirs"] = cirs_pair(ct, mr)
    if not args.skip_tradeoff:
        reference = register_rigid(ct, mr, RegistrationParams(threads=1)).matrix
        load0 = load_avg()
        data["tradeoff"] = tradeoff(ct, mr, source, base, args.tradeoff_cases, reference)
        data["tradeoff_cases"] = args.tradeoff_cases
        data["tradeoff_meta"] = {"load_start": load0, "load_end": load_avg()}
    data["load_end"] = load_avg()
    data["seconds"] = time.perf_counter() - t0
    RAW.write_text(json.dumps(data, indent=1))
    write_doc(render(data))
    log(f"wrote {DOC} and {RAW} in {data['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
