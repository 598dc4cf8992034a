"""Fusion quality on the Harvard pairs: DMF (VGG and image gradients) against its three inputs.

    python benchmarks/quality.py [--subset MRI_CT] [--limit N] [--device cpu]

Each subset is fused as one stack (the way the node works), scored on
luminance at 0..255 after rounding to 8 bits (what a saved PNG holds), and
averaged per subset.  Writes ``docs/quality-core.md`` and
``docs/quality-core-montage.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dicom_node.samples import harvard_pairs, load_image  # noqa: E402
from fusion.api import DEFAULT_TRIO, merge_colour, split_colour  # noqa: E402
from fusion.backend import resolve_device, to_device, to_numpy  # noqa: E402
from fusion.dmf import DMFParams, dmf_blend, dmf_weights  # noqa: E402
from fusion.gradients import exposure_gradients  # noqa: E402
from fusion.intensity import to_unit  # noqa: E402
from fusion.methods import get_method  # noqa: E402
from fusion.metrics import METRICS, score  # noqa: E402
from fusion.preview import montage  # noqa: E402

COLUMNS = ["Qabf", "MI", "SSIM", "SD", "EN", "AG"]


def fuse_subset(mri: np.ndarray, other: np.ndarray, device: str, model) -> dict[str, np.ndarray]:
    """All candidate fusions of one subset's stack, luminance on 0..1 (S, H, W) plus colour variants."""
    a, b, chroma = split_colour(to_unit(to_device(mri, device)), to_unit(to_device(other, device)))
    xp_exposures = [get_method(m)(a, b) for m in DEFAULT_TRIO]
    import numpy  # noqa: F401  (xp-agnostic below)

    from fusion.backend import array_module

    xp = array_module(a)
    exposures = xp.stack(xp_exposures)
    params = DMFParams()
    out = {m.upper(): e for m, e in zip(DEFAULT_TRIO, xp_exposures)}
    for source in ("vgg", "image"):
        mag, phi = exposure_gradients(exposures, source, model=model if source == "vgg" else None)
        out[f"DMF ({source})"] = dmf_blend(exposures, dmf_weights(exposures, mag, phi, params), params)
    lum = {k: to_numpy(v) for k, v in out.items()}
    colour = {k: to_numpy(merge_colour(v, chroma)) for k, v in out.items()}
    return {"lum": lum, "colour": colour, "a": to_numpy(a), "b": to_numpy(b)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subset", action="append", help="MRI_CT, MRI_PET, MRI_SPECT (default all)")
    ap.add_argument("--limit", type=int, default=None, help="first N pairs per subset")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=REPO / "docs")
    args = ap.parse_args(argv)

    if not harvard_pairs():
        print("Harvard pairs not found (../shared/data/harvard); nothing to benchmark.", file=sys.stderr)
        return 2
    from fusion.features import load_vgg16

    device = resolve_device(args.device)
    model = load_vgg16(device=device)
    subsets = args.subset or ["MRI_CT", "MRI_PET", "MRI_SPECT"]
    results: dict[str, dict[str, dict[str, float]]] = {}
    rows_for_montage, labels_for_montage = [], []
    for subset in subsets:
        pairs = harvard_pairs(subset=subset)[: args.limit]
        mri = np.stack([load_image(p.mri) for p in pairs])
        other = np.stack([load_image(p.other) for p in pairs])
        t0 = time.perf_counter()
        fused = fuse_subset(mri, other, device, model)
        seconds = time.perf_counter() - t0
        a255, b255 = fused["a"] * 255, fused["b"] * 255
        per_method = {}
        for name, stack in fused["lum"].items():
            f255 = np.clip(np.round(stack * 255), 0, 255)
            scores = [score(a255[i], b255[i], f255[i]) for i in range(len(pairs))]
            per_method[name] = {m: float(np.mean([s[m] for s in scores])) for m in METRICS}
        results[subset] = per_method
        print(f"{subset}: {len(pairs)} pairs fused in {seconds:.1f} s", flush=True)
        for name, vals in per_method.items():
            print(f"  {name:12s} " + "  ".join(f"{c} {vals[c]:.4f}" for c in COLUMNS), flush=True)
        i = 0  # first pair of each subset in the montage
        names = list(fused["colour"])
        rows_for_montage.append([mri[i], other[i], *[fused["colour"][n][i] for n in names]])
        labels_for_montage.append([f"{subset} {pairs[i].name}: MRI", subset.split("_")[1], *names])
        results[subset]["_pairs"] = {"n": len(pairs), "seconds": seconds}  # type: ignore[assignment]

    args.out.mkdir(parents=True, exist_ok=True)
    montage(rows_for_montage, labels_for_montage).save(args.out / "quality-core-montage.png")
    (args.out / "quality-core.json").write_text(json.dumps(results, indent=2))
    write_markdown(args.out / "quality-core.md", results, device, args)
    print(f"wrote {args.out / 'quality-core.md'}")
    return 0


def write_markdown(path: Path, results, device: str, args) -> None:
    lines = [
        "# Fusion quality of the core methods on the Harvard pairs",
        "",
        "Generated by `python benchmarks/quality.py"
        + (f" --limit {args.limit}" if args.limit else "")
        + "` (device: " + device + ").",
        "",
        "Protocol: every subset fused as one stack; scored on luminance (BT.601 Y) at 0..255 after rounding",
        "to 8 bits; no output stretching. Metrics (see `fusion/metrics.py`): Q^AB/F Hong variant, MI in nats",
        "(integer grey levels, `MI(F,A)+MI(F,B)`), SSIM Wang 2004 summed over both sources (max 2), SD, EN",
        "(bits), AG as in the papers' evaluator. These are simple implementations; the validated suite comes",
        "with the full method set. DMF uses the trio " + "+".join(m.upper() for m in DEFAULT_TRIO) + ".",
        "",
    ]
    for subset, per_method in results.items():
        meta = per_method.get("_pairs", {})
        lines += [f"## {subset} ({meta.get('n', '?')} pairs)", "",
                  "| method | " + " | ".join(COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
        methods = [m for m in per_method if m != "_pairs"]
        best = {c: max(per_method[m][c] for m in methods) for c in COLUMNS}
        for m in methods:
            cells = []
            for c in COLUMNS:
                v = per_method[m][c]
                cells.append(f"**{v:.4f}**" if v == best[c] else f"{v:.4f}")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        inputs = [m.upper() for m in DEFAULT_TRIO]
        for src in ("vgg", "image"):
            d = per_method[f"DMF ({src})"]
            verdict = ", ".join(
                f"{c}: {'beats' if d[c] > max(per_method[i][c] for i in inputs) else 'does not beat'} the best input "
                f"({d[c]:.4f} vs {max(per_method[i][c] for i in inputs):.4f})"
                for c in ("Qabf", "MI")
            )
            lines.append("")
            lines.append(f"DMF ({src}) — {verdict}.")
        lines.append("")
    lines += ["![montage: first pair of each subset](quality-core-montage.png)", ""]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
