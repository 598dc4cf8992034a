"""Exploring FAITHFUL's variants on the tuning pairs: which change passes every bar of issue 14?

    python benchmarks/faithful_tuning.py [--subset MRI_PET] [--pairs tune|held|all] [--vif-every 2]
                                         [--config NAME ...]

Each candidate is a :class:`Variant` of ``fusion.methods.faithful`` (gradient weights,
intensity anchor, lambda, MRI gradient gain); the table gives, per subset, Q^AB/F, its
MRI share, VIF, SSIM and bone/uptake kept under the protocol of ``benchmarks/fidelity.py``
(luminance, min-max stretched; kept on the unstretched image), next to CBF and the max
rule of the same pairs, and the margin of every bar (docs/fidelity.md).  Tuning uses
only the pairs with index % 4 == 0 (``--pairs tune``, the default); ``--pairs held``
reports a chosen variant on the others.  VIF (~0.7 s a slice) is computed on every
``--vif-every``-th of the selected pairs only.  Numbers and the conclusion drawn from
them: docs/faithful-tuning.md.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fusion.api import split_colour
from fusion.fidelity import bone_kept, qabf_shares, stretch255, uptake_kept
from fusion.filters import window_mean
from fusion.intensity import to_unit
from fusion.methods import get_method
from fusion.methods.faithful import forward_gradient, screened_poisson
from fusion.metrics import papers
from fusion.metrics.cddfuse import _vifp_mscale  # the evaluator's VIFp, per source
from fusion_demo.samples import harvard_pairs, load_image

SUBSETS = ("MRI_CT", "MRI_PET", "MRI_SPECT")
VIF_MARGIN, SSIM_MARGIN, KEPT = 0.05, 0.03, 0.9


@dataclass(frozen=True)
class Variant:
    """One candidate; the defaults are the current FAITHFUL."""

    lam: float = 0.1
    #: "wta" (winner-take-all by 3x3 energy), "soft" (w = E_a^p / (E_a^p + E_b^p)),
    #: "maxabs" (per component, the larger |d|)
    weight: str = "wta"
    p: float = 2.0
    #: "max", or "hot": max where the overlay is hot (above its own ``hot_q`` quantile of
    #: the foreground), the MRI elsewhere, with a smooth ramp of width ``ramp``
    anchor: str = "max"
    hot_q: float = 0.5
    ramp: float = 0.1
    #: MRI gradients multiplied by this where the overlay is flat (E_b < flat)
    gain: float = 1.0
    flat: float = 0.01
    radius: int = 1
    #: winner-take-all with a bias: the MRI's gradient where E_a >= bias * E_b
    bias: float = 1.0
    #: "ramp" anchor: s = 0 below the overlay foreground's q_lo quantile, 1 above its q_hi one,
    #: linear between; M = A + s * max(B - A, 0)
    q_lo: float = 0.5
    q_hi: float = 0.95
    #: gate the selected field by s too: G = (1 - s) grad A + s G_selected (only with "ramp")
    gate: bool = False
    #: the MRI outside the overlay's hot part: output (1 - s) A + s F with the ramp s of q_lo/q_hi
    #: (any anchor); "mri only" (F = A, the overlay ignored) shows what the bars alone reward
    outside: bool = False
    mri_only: bool = False
    #: the target field is grad(anchor) + alpha * (selected field - grad(anchor)): 0 = the max rule
    alpha: float = 1.0


def ramp(b: np.ndarray, q_lo: float, q_hi: float) -> np.ndarray:
    """0 below the q_lo quantile of each slice's overlay foreground, 1 above its q_hi one, linear between."""
    fg = b > 2 / 255
    qs = np.array([np.quantile(b[i][fg[i]], [q_lo, q_hi]) if fg[i].any() else [1.0, 1.0]
                   for i in range(len(b))], dtype=b.dtype)
    lo, hi = qs[:, 0, None, None], qs[:, 1, None, None]
    return np.clip((b - lo) / np.maximum(hi - lo, 1e-6), 0, 1).astype(b.dtype)


def fuse_variant(a: np.ndarray, b: np.ndarray, v: Variant) -> np.ndarray:
    if v.mri_only:
        return a.copy()
    ax, ay = forward_gradient(a)
    bx, by = forward_gradient(b)
    ea, eb = np.hypot(ax, ay), np.hypot(bx, by)
    if v.radius > 0:
        ea, eb = window_mean(ea, v.radius), window_mean(eb, v.radius)
    if v.gain != 1.0:
        g = np.where(eb < v.flat, v.gain, 1.0).astype(a.dtype)
        ax, ay = ax * g, ay * g
    if v.weight == "wta":
        w = (ea >= v.bias * eb).astype(a.dtype)
    elif v.weight == "soft":
        ep_a, ep_b = ea ** v.p, eb ** v.p
        w = (ep_a / np.maximum(ep_a + ep_b, 1e-12)).astype(a.dtype)
        w = np.where(ep_a + ep_b > 0, w, 0.5).astype(a.dtype)
    if v.weight == "maxabs":
        gx = np.where(np.abs(ax) >= np.abs(bx), ax, bx)
        gy = np.where(np.abs(ay) >= np.abs(by), ay, by)
    else:
        gx, gy = w * ax + (1 - w) * bx, w * ay + (1 - w) * by
    if v.anchor == "max":
        m = np.maximum(a, b)
    elif v.anchor == "hot":
        fg = b > 2 / 255
        cut = np.array([np.quantile(b[i][fg[i]], v.hot_q) if fg[i].any() else 1.0 for i in range(len(b))],
                       dtype=a.dtype)[:, None, None]
        s = np.clip((b - cut) / v.ramp + 0.5, 0, 1)
        m = s * np.maximum(a, b) + (1 - s) * a
    elif v.anchor == "ramp":
        s = ramp(b, v.q_lo, v.q_hi)
        m = a + s * np.maximum(b - a, 0)
        if v.gate:
            gx, gy = (1 - s) * ax + s * gx, (1 - s) * ay + s * gy
    else:
        raise ValueError(v.anchor)
    if v.alpha != 1.0:
        mx, my = forward_gradient(m)
        gx, gy = mx + v.alpha * (gx - mx), my + v.alpha * (gy - my)
    f = np.clip(screened_poisson(m.astype(a.dtype), gx, gy, v.lam), 0, 1)
    if v.outside:
        s = ramp(b, v.q_lo, v.q_hi)
        f = (1 - s) * a + s * f
    return f


def load(subset: str, which: str) -> tuple[np.ndarray, np.ndarray]:
    pairs = harvard_pairs(subset=subset)
    idx = [i for i in range(len(pairs)) if which == "all" or (i % 4 == 0) == (which == "tune")]
    mri = np.stack([load_image(pairs[i].mri) for i in idx])
    other = np.stack([load_image(pairs[i].other) for i in idx])
    a, b, _ = split_colour(to_unit(mri), to_unit(other))
    return np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)


def scores(f01: np.ndarray, a: np.ndarray, b: np.ndarray, subset: str, vif_every: int) -> dict[str, float]:
    a255, b255 = np.round(a * 255).astype(np.float32), np.round(b * 255).astype(np.float32)
    f255 = stretch255(f01)
    sh = np.array([qabf_shares(f255[i], a255[i], b255[i]) for i in range(len(f01))])
    kept = bone_kept if subset == "MRI_CT" else uptake_kept
    out = {"Qabf": sh.sum(1).mean(), "Q_MRI": sh[:, 0].mean(),
           "SSIM": np.mean([papers.SSIM(f255[i], a255[i], b255[i]) for i in range(len(f01))]),
           "kept": np.nanmean([kept(f01[i], b[i]) for i in range(len(f01))])}
    if vif_every:
        va = [_vifp_mscale(a255[i], f255[i]) for i in range(0, len(f01), vif_every)]
        vb = [_vifp_mscale(b255[i], f255[i]) for i in range(0, len(f01), vif_every)]
        out.update(VIF_a=float(np.mean(va)), VIF_b=float(np.mean(vb)), VIF=float(np.mean(va) + np.mean(vb)))
    return out


#: the candidates of docs/faithful-tuning.md; any other: ``--config lam=0.3,weight=soft``
CONFIGS: dict[str, Variant] = {
    "current": Variant(),
    "lam 0.03": Variant(lam=0.03),
    "lam 0.3": Variant(lam=0.3),
    "lam 1": Variant(lam=1.0),
    "lam 3": Variant(lam=3.0),
    "lam 10": Variant(lam=10.0),
    "soft p1": Variant(weight="soft", p=1),
    "soft p2": Variant(weight="soft", p=2),
    "soft p4": Variant(weight="soft", p=4),
    "maxabs": Variant(weight="maxabs"),
    "bias 0.5": Variant(bias=0.5),
    "bias 2": Variant(bias=2.0),
    "bias 4": Variant(bias=4.0),
    "radius 3": Variant(radius=3),
    "alpha 0.5": Variant(alpha=0.5),
    "hot q.5": Variant(anchor="hot", hot_q=0.5),
    "hot q.8": Variant(anchor="hot", hot_q=0.8),
    "gain 1.5": Variant(gain=1.5),
    "gain 1.2": Variant(gain=1.2, flat=0.005),
    "ramp anchor, gated": Variant(anchor="ramp", gate=True, q_lo=0.8),
    "MRI outside hot 5-10 %": Variant(outside=True, q_lo=0.9, q_hi=0.95),
    "MRI only": Variant(mri_only=True),
}


def row(name: str, s: dict[str, float], cbf: dict[str, float], mx: dict[str, float], secs: float) -> str:
    vif = f"{s['VIF']:.3f} ({s['VIF_a']:.2f}+{s['VIF_b']:.2f}) {s['VIF'] - mx['VIF'] + VIF_MARGIN:+.3f}" \
        if "VIF" in s else "-"
    return (f"| {name} | {s['Qabf']:.3f} {s['Qabf'] - max(cbf['Qabf'], mx['Qabf']):+.3f} "
            f"| {s['Q_MRI']:.3f} {s['Q_MRI'] - cbf['Q_MRI']:+.3f} | {vif} "
            f"| {s['SSIM']:.3f} {s['SSIM'] - mx['SSIM'] + SSIM_MARGIN:+.3f} | {s['kept']:.3f} | {secs:.1f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subset", action="append")
    ap.add_argument("--pairs", choices=("tune", "held", "all"), default="tune")
    ap.add_argument("--vif-every", type=int, default=2, help="VIF on every N-th selected pair; 0: none")
    ap.add_argument("--config", action="append", help="names of CONFIGS, or 'k=v,k=v' Variant fields")
    args = ap.parse_args(argv)
    if not harvard_pairs():
        print("Harvard pairs not found (../shared/data/harvard)", file=sys.stderr)
        return 2
    configs = {}
    for c in args.config or list(CONFIGS):
        if c in CONFIGS:
            configs[c] = CONFIGS[c]
        else:
            kv = dict(x.split("=") for x in c.split(","))
            typed = {k: (str(val) if k in ("weight", "anchor") else val == "1" if k in ("gate", "outside", "mri_only") else int(val) if k == "radius" else float(val))
                     for k, val in kv.items()}
            configs[c] = replace(Variant(), **typed)
    print(f"`python benchmarks/faithful_tuning.py {shlex.join(argv if argv is not None else sys.argv[1:])}`; "
          f"CPU, load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores. Each cell: the value, "
          "then its margin to the bar (Qabf: to the best of CBF and the max rule; Q_MRI: to CBF; VIF: to the max "
          f"rule - {VIF_MARGIN}; SSIM: to the max rule - {SSIM_MARGIN}); kept: bone (CT) / uptake, bar {KEPT}; "
          "s: seconds to fuse the stack.")
    for subset in args.subset or SUBSETS:
        a, b = load(subset, args.pairs)
        cbf = scores(np.asarray(get_method("cbf")(a, b)), a, b, subset, args.vif_every)
        mx = scores(np.maximum(a, b), a, b, subset, args.vif_every)
        print(f"\n## {subset}, {args.pairs} pairs ({len(a)}; VIF on every {args.vif_every}th)\n")
        print("| variant | Qabf (vs best of CBF/max) | Q_MRI (vs CBF) | VIF = a+b (bar margin) "
              "| SSIM (bar margin) | kept | s |")
        print("|---|---|---|---|---|---|---|")
        print(row("cbf", cbf, cbf, mx, 0))
        print(row("max", mx, cbf, mx, 0))
        for name, v in configs.items():
            t0 = time.perf_counter()
            f = fuse_variant(a, b, v)
            secs = time.perf_counter() - t0
            print(row(name, scores(f, a, b, subset, args.vif_every), cbf, mx, secs), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
