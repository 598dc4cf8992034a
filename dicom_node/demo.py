"""The embedded default job: fuse sample pairs and leave PNGs a person can open.

Uses the Harvard pairs from ``../shared/data`` when they are there, a generated
phantom otherwise; fetches the VGG16 weights if they are not cached yet, and
says plainly if it has to fall back to image gradients.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from dicom_node import logs
from dicom_node.samples import harvard_pairs, load_image, synthetic_pair

log = logging.getLogger("dicom_node.demo")


def _prepare_model(device: str):
    from fusion.backend import resolve_device
    from fusion.features import load_vgg16
    from fusion.weights import WeightsUnavailableError, vgg16_weights_path

    try:
        print("VGG16 weights: checking the cache (first run fetches them, ~64 MB) ...", flush=True)
        vgg16_weights_path(allow_download=True)
        return load_vgg16(device=resolve_device(device)), "vgg"
    except WeightsUnavailableError as exc:
        print(f"WARNING: VGG16 weights unavailable, this demo uses image gradients instead.\n  {exc}", flush=True)
        return None, "image"


def _pairs(max_pairs: int):
    pairs = []
    for subset in ("MRI_CT", "MRI_PET", "MRI_SPECT"):
        for p in harvard_pairs(subset=subset)[:max_pairs]:
            pairs.append((f"{p.subset}_{p.name}", load_image(p.mri), load_image(p.other)))
    if not pairs:
        mr, ct = synthetic_pair()
        pairs.append(("SYNTHETIC_phantom", mr, ct))
    return pairs


def run_demo(out: Path, device: str = "auto", max_pairs: int = 2) -> int:
    from fusion.api import DEFAULT_TRIO, dmf_stack, merge_colour, split_colour
    from fusion.backend import resolve_device, to_device, to_numpy
    from fusion.intensity import to_uint8, to_unit
    from fusion.preview import montage
    from PIL import Image

    dev = resolve_device(device)
    out.mkdir(parents=True, exist_ok=True)
    model, source = _prepare_model(dev)
    pairs = _pairs(max_pairs)
    print(f"Fusing {len(pairs)} sample pair(s) with DMF ({'+'.join(DEFAULT_TRIO)}, {source} gradients) on {dev}", flush=True)
    for i, (name, mri, other) in enumerate(pairs, 1):
        t0 = time.perf_counter()
        a, b, chroma = split_colour(to_unit(to_device(mri, dev)), to_unit(to_device(other, dev)))
        res = dmf_stack(a[None], b[None], feature_source=source, model=model)
        fused = to_numpy(merge_colour(res.fused[0], chroma))
        exposures = [to_numpy(merge_colour(e[0], chroma)) for e in res.exposures]
        weights = [to_numpy(w[0]) for w in res.weights]
        fused_png = out / f"{name}_fused.png"
        Image.fromarray(to_uint8(fused)).save(fused_png)
        rows = [[mri, other, *exposures, fused], [np.zeros_like(weights[0]), np.zeros_like(weights[0]), *weights, np.zeros_like(weights[0])]]
        labels = [["MRI", name.split("_")[1], *[m.upper() for m in DEFAULT_TRIO], "DMF"],
                  ["", "", *[f"weight {m.upper()}" for m in DEFAULT_TRIO], ""]]
        montage_png = out / f"{name}_montage.png"
        montage(rows, labels).save(montage_png)
        seconds = time.perf_counter() - t0
        log.debug("demo.pair.done", extra=logs.fields(pair=name, seconds=round(seconds, 3), source=source))
        print(f"[{i}/{len(pairs)}] {name}: {seconds:.1f} s -> {fused_png.name}, {montage_png.name}", flush=True)
    print(f"\nDone. Open the PNGs in {out.resolve()}/ (the *_montage.png files show inputs, the three "
          "exposures, the DMF result and its weight maps).")
    return 0
