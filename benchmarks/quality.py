"""Fusion quality on the Harvard pairs with the papers' evaluator, beside the published results.

    python benchmarks/quality.py [--subset MRI_CT] [--limit N] [--device cpu]

For each subset (fused as one stack, the way the node works): every single
method of ``fusion.methods``, the average and pixelwise-max baselines, DMF with
the paper's trios (VGG and image gradients), DMF with sharpened weights, and
the best trios found by an exhaustive search over all trios of the method set.
Scored with ``fusion.metrics.papers`` (CDDFuse's evaluator) under the papers'
protocol: luminance, each fused image min-max stretched to [0, 255] and
rounded.  Writes ``docs/quality.md``, ``docs/quality.json``,
``docs/quality-chart.png`` and ``docs/quality-montage.png``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fusion.api import merge_colour, split_colour
from fusion.backend import resolve_device, to_device, to_numpy
from fusion.dmf import DMFParams, dmf_blend, dmf_weights
from fusion.gradients import exposure_gradients
from fusion.intensity import to_unit
from fusion.methods import available, get_method
from fusion.metrics import papers
from fusion.preview import montage
from fusion_demo.samples import harvard_pairs, load_image

COLUMNS = ["EN", "SD", "SF", "MI", "SCD", "VIF", "Qabf", "SSIM"]
#: best published value per column (papers' evaluator, same pairs), from the issue
PUBLISHED_BEST = {
    "MRI_CT": dict(EN=5.30, SD=88.59, SF=38.14, MI=2.61, SCD=1.74, VIF=0.61, Qabf=0.68, SSIM=1.34),
    "MRI_PET": dict(EN=4.77, SD=81.72, SF=31.97, MI=2.03, SCD=1.82, VIF=0.71, Qabf=0.71, SSIM=1.49),
    "MRI_SPECT": dict(EN=4.39, SD=71.82, SF=23.77, MI=2.49, SCD=1.92, VIF=0.97, Qabf=0.78, SSIM=1.49),
}
CDDFUSE_MRI_CT = dict(MI=2.61, SCD=1.41, VIF=0.61, Qabf=0.68, SSIM=1.34)
PAPER_TRIOS = {
    "MRI_CT": [("adf", "cbf", "fpde")],
    "MRI_PET": [("tif", "wls", "mdlatlrr"), ("tif", "wls", "cbf"), ("tif", "wls", "gfce")],
    "MRI_SPECT": [("tif", "wls", "mdlatlrr"), ("tif", "wls", "cbf"), ("tif", "wls", "gfce")],
}
SHARP = 8.0


def stretch(f: np.ndarray) -> np.ndarray:
    """The papers' protocol: min-max stretch of each fused image to [0, 255], rounded."""
    lo, hi = f.min(axis=(-2, -1), keepdims=True), f.max(axis=(-2, -1), keepdims=True)
    return np.round((f - lo) / np.maximum(hi - lo, 1e-12) * 255.0)


def score_stack(fused01: np.ndarray, a255: np.ndarray, b255: np.ndarray, only=None) -> dict[str, float]:
    f255 = stretch(fused01.astype(np.float64)).astype(np.float32)
    rows = [papers(f255[i], a255[i], b255[i]) if only is None else {m: getattr(papers, m)(f255[i], a255[i], b255[i])
                                                                    for m in only} for i in range(len(f255))]
    return {k: float(np.nanmean([r[k] for r in rows])) for k in rows[0]}


def run_subset(subset: str, limit, device: str, model, log) -> dict:
    pairs = harvard_pairs(subset=subset)[:limit]
    mri = np.stack([load_image(p.mri) for p in pairs])
    other = np.stack([load_image(p.other) for p in pairs])
    a, b, chroma = split_colour(to_unit(to_device(mri, device)), to_unit(to_device(other, device)))
    a255 = np.round(to_numpy(a) * 255).astype(np.float32)  # cv2 BGR2GRAY + round == BT.601 Y rounded
    b255 = np.round(to_numpy(b) * 255).astype(np.float32)
    n = len(pairs)
    outputs, timing = {}, {}
    for m in available():
        t0 = time.perf_counter()
        outputs[m] = get_method(m)(a, b)
        timing[m] = (time.perf_counter() - t0) / n
        log(f"  {m}: {1000 * timing[m]:.0f} ms/pair")
    grads = {}
    for source in ("vgg", "image"):
        for m, out in outputs.items():
            mag, phi = exposure_gradients(out[None], source, model=model if source == "vgg" else None)
            grads[source, m] = (mag[0], phi[0])

    def dmf(trio, source="vgg", sharpness=1.0):
        ex = np.stack([to_numpy(outputs[m]) for m in trio])
        mag = np.stack([to_numpy(grads[source, m][0]) for m in trio])
        phi = np.stack([to_numpy(grads[source, m][1]) for m in trio])
        params = DMFParams(sharpness=sharpness)
        return dmf_blend(ex, dmf_weights(ex, mag, phi, params), params)

    cands: dict[str, np.ndarray] = {m.upper(): to_numpy(o) for m, o in outputs.items()}
    cands["average"] = (to_numpy(a) + to_numpy(b)) / 2
    cands["max"] = np.maximum(to_numpy(a), to_numpy(b))
    for trio in PAPER_TRIOS[subset]:
        name = "+".join(t.upper() for t in trio)
        cands[f"DMF {name} (VGG)"] = dmf(trio)
        cands[f"DMF {name} (image)"] = dmf(trio, "image")
        cands[f"DMF {name} (VGG, sharp {SHARP:g})"] = dmf(trio, sharpness=SHARP)
    # exhaustive trio search on Qabf + MI (quick), VGG gradients, paper and sharpened weights
    quick = {}
    for trio in itertools.combinations(sorted(outputs), 3):
        for sharp in (1.0, SHARP):
            q = score_stack(dmf(trio, sharpness=sharp), a255, b255, only=("Qabf", "MI"))
            quick[trio, sharp] = q
    search = {}
    for sharp in (1.0, SHARP):
        for key in ("Qabf", "MI"):
            trio = max((t for (t, s) in quick if s == sharp), key=lambda t: quick[t, sharp][key])
            label = f"DMF {'+'.join(x.upper() for x in trio)} (VGG{f', sharp {sharp:g}' if sharp != 1 else ''}) [best {key}]"
            search[label] = (trio, sharp)
    for label, (trio, sharp) in search.items():
        if label not in cands:
            cands[label] = dmf(trio, sharpness=sharp)
    log(f"  scoring {len(cands)} candidates on {n} pairs ...")
    scores = {name: score_stack(f, a255, b255) for name, f in cands.items()}
    first = {name: to_numpy(merge_colour(to_device(f[0], "cpu"), None if chroma is None else to_numpy(chroma[0])))
             for name, f in cands.items()}
    return {"n": n, "scores": scores, "ms_per_pair": {m: 1000 * t for m, t in timing.items()},
            "trio_search": {"+".join(t) + f" sharp={s:g}": v for (t, s), v in quick.items()},
            "_first": (mri[0], other[0], first, pairs[0].name)}


def bar_chart(results: dict, path: Path) -> None:
    """Qabf and MI per candidate and subset as horizontal bars (PIL only, no plotting library)."""
    from PIL import Image, ImageDraw

    rows = []
    for subset, r in results.items():
        for name, s in sorted(r["scores"].items(), key=lambda kv: -kv[1]["Qabf"])[:10]:
            rows.append((subset, name, s["Qabf"], s["MI"]))
    width, row_h, left = 1100, 18, 430
    img = Image.new("RGB", (width, 40 + row_h * (len(rows) + 2 * len(results))), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 8), "Top 10 per subset by Qabf (blue, 0..1) and MI (orange, 0..4 nats); papers' evaluator, stretched", fill="black")
    y, last = 30, None
    for subset, name, q, mi in rows:
        if subset != last:
            y += row_h
            d.text((10, y), subset, fill="black")
            y += row_h
            last = subset
        d.text((20, y), name[:62], fill="black")
        d.rectangle([left, y + 2, left + int(q * 300), y + 8], fill=(40, 90, 200))
        d.rectangle([left, y + 9, left + int(mi / 4 * 300), y + 15], fill=(230, 120, 30))
        d.text((left + 310, y), f"Qabf {q:.3f}  MI {mi:.3f}", fill="black")
        y += row_h
    img.save(path)


def write_markdown(path: Path, results: dict, device: str, argv_text: str) -> None:
    L = ["# Fusion quality on the Harvard pairs, papers' evaluator, beside published results", "",
         f"Generated by `python benchmarks/quality.py{argv_text}` (device {device}); raw numbers in `quality.json`.", "",
         "**Protocol (every column of ours):** CDDFuse `utils/Evaluator.py` semantics (`fusion.metrics.papers`), "
         "scored on luminance (BT.601 Y = cv2 BGR2GRAY, rounded); each fused image min-max **stretched to [0, 255]** and "
         "rounded before scoring, as CDDFuse's `test_MIF.py` saves it; sources unstretched; per-image values averaged over "
         "the subset. The published rows use the same evaluator, protocol and pairs (values from the issue; they are the "
         "best value per column over the compared methods, not one method). MI in nats, EN in bits, SSIM summed over both "
         "sources with skimage-0.19 defaults (data_range = 2).", "",
         "DMF rows: `(VGG)` = gradients of VGG16 relu1_2+relu2_2 features, `(image)` = plain image gradients, "
         f"`sharp {SHARP:g}` = the weights VA*CA raised to {SHARP:g} before eq. 8's normalisation (`DMFParams.sharpness`); "
         "`[best X]` = the trio that maximises X in an exhaustive search over all trios of the method set.", ""]
    for subset, r in results.items():
        L += [f"## {subset} ({r['n']} pairs)", "", "| method | " + " | ".join(COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
        pub = PUBLISHED_BEST[subset]
        L.append("| *published best per column* | " + " | ".join(f"*{pub[c]:.2f}*" for c in COLUMNS) + " |")
        if subset == "MRI_CT":
            L.append("| *CDDFuse (published)* | " + " | ".join(f"*{CDDFUSE_MRI_CT[c]:.2f}*" if c in CDDFUSE_MRI_CT else "" for c in COLUMNS) + " |")
        best = {c: max(s[c] for s in r["scores"].values()) for c in COLUMNS}
        for name, s in sorted(r["scores"].items(), key=lambda kv: -kv[1]["Qabf"]):
            cells = [(f"**{s[c]:.3f}**" if s[c] == best[c] else f"{s[c]:.3f}") + ("+" if s[c] > pub[c] else "") for c in COLUMNS]
            L.append(f"| {name} | " + " | ".join(cells) + " |")
        L += ["", "Bold: best of ours; `+`: beats the best published value of that column.", ""]
    L += ["![Qabf and MI per candidate](quality-chart.png)", "", "![first pair of each subset](quality-montage.png)", ""]
    path.write_text("\n".join(L))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subset", action="append")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=REPO / "docs")
    args = ap.parse_args(argv)
    if not harvard_pairs():
        print("Harvard pairs not found (../shared/data/harvard); nothing to benchmark.", file=sys.stderr)
        return 2
    from fusion.features import load_vgg16

    device = resolve_device(args.device)
    model = load_vgg16(device=device)
    results = {}
    for subset in args.subset or ["MRI_CT", "MRI_PET", "MRI_SPECT"]:
        print(f"{subset}:", flush=True)
        t0 = time.perf_counter()
        results[subset] = run_subset(subset, args.limit, device, model, lambda m: print(m, flush=True))
        print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    rows, labels = [], []
    for subset, r in results.items():
        mri, other, first, pname = r.pop("_first")
        keep = [k for k in first if k.startswith("DMF") and "[best Qabf]" in k][:1] + ["CBF", "max",
                next(k for k in first if k.startswith("DMF") and "(VGG)" in k)]
        rows.append([mri, other, *[first[k] for k in keep]])
        labels.append([f"{subset} {pname}: MRI", subset.split("_")[1], *[k[:40] for k in keep]])
    montage(rows, labels).save(args.out / "quality-montage.png")
    bar_chart(results, args.out / "quality-chart.png")
    (args.out / "quality.json").write_text(json.dumps(results, indent=1))
    argv_text = "".join(f" {x}" for x in (argv if argv is not None else sys.argv[1:]))
    write_markdown(args.out / "quality.md", results, device, argv_text)
    print(f"wrote {args.out / 'quality.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
