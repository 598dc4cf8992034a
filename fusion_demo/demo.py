"""The embedded default jobs, runnable on a bare machine.

``run_node_demo``: start a node, send it a CT and an MR series over DICOM,
let it register, fuse and send the fused series to a local destination, and
write PNG previews of what arrived.  ``run_pair_demo``: fuse the Harvard
image pairs (or a generated phantom) and write montages.  Both fetch the VGG16
weights if they are not cached and say plainly if they fall back to image
gradients.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dicom_node import logs
from fusion_demo.samples import harvard_pairs, load_image, synthetic_pair

if TYPE_CHECKING:
    from pynetdicom import evt

    from fusion.features import VGG16Features
    from fusion.gradients import FeatureSource

log = logging.getLogger("fusion_demo.demo")


def _prepare_model(device: str) -> tuple[VGG16Features | None, FeatureSource]:
    from dicom_node.provision import fetch_vgg16
    from fusion.backend import resolve_device
    from fusion.features import load_vgg16
    from fusion.weights import WeightsUnavailableError

    try:
        print("VGG16 weights: checking the cache (first run fetches them, ~64 MB) ...", flush=True)
        fetch_vgg16()
        return load_vgg16(device=resolve_device(device)), "vgg"
    except WeightsUnavailableError as exc:
        print(f"WARNING: VGG16 weights unavailable, this demo uses image gradients instead.\n  {exc}", flush=True)
        return None, "image"


def _pairs(max_pairs: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    pairs = []
    for subset in ("MRI_CT", "MRI_PET", "MRI_SPECT"):
        for p in harvard_pairs(subset=subset)[:max_pairs]:
            assert p.mri is not None and p.other is not None  # harvard_pairs lists only pairs with both files
            pairs.append((f"{p.subset}_{p.name}", load_image(p.mri), load_image(p.other)))
    if not pairs:
        mr, ct = synthetic_pair()
        pairs.append(("SYNTHETIC_phantom", mr, ct))
    return pairs


def run_pair_demo(out: Path, device: str = "auto", max_pairs: int = 2) -> int:
    from PIL import Image

    from fusion.api import DEFAULT_METHOD, default_trio, dmf_stack, fuse_grey, merge_colour, split_colour
    from fusion.backend import resolve_device, to_device, to_numpy
    from fusion.intensity import to_uint8, to_unit
    from fusion.preview import montage

    dev = resolve_device(device)
    out.mkdir(parents=True, exist_ok=True)
    model, source = _prepare_model(dev)
    pairs = _pairs(max_pairs)
    print(f"Fusing {len(pairs)} sample pair(s) with the default {DEFAULT_METHOD} and, beside it, the paper's DMF "
          f"(paper trios, {source} gradients) on {dev}", flush=True)
    for i, (name, mri, other) in enumerate(pairs, 1):
        t0 = time.perf_counter()
        a, b, chroma = split_colour(to_unit(to_device(mri, dev)), to_unit(to_device(other, dev)))
        trio = default_trio("CT" if name.startswith(("MRI_CT", "SYNTHETIC")) else "PT", "dmf_paper")
        res = dmf_stack(a[None], b[None], trio=trio, feature_source=source, model=model)
        fused = to_numpy(merge_colour(fuse_grey(a[None], b[None], method=DEFAULT_METHOD)[0], chroma))
        paper = to_numpy(merge_colour(res.fused[0], chroma))
        exposures = [to_numpy(merge_colour(e[0], chroma)) for e in res.exposures]
        weights = [to_numpy(w[0]) for w in res.weights]
        fused_png = out / f"{name}_fused.png"
        Image.fromarray(to_uint8(fused)).save(fused_png)
        blank = np.zeros_like(weights[0])
        rows = [[mri, other, *exposures, paper, fused], [blank, blank, *weights, blank, blank]]
        labels = [["MRI", name.split("_")[1], *[m.upper() for m in trio], "paper DMF", f"{DEFAULT_METHOD} (default)"],
                  ["", "", *[f"DMF weight {m.upper()}" for m in trio], "", ""]]
        montage_png = out / f"{name}_montage.png"
        montage(rows, labels).save(montage_png)
        seconds = time.perf_counter() - t0
        log.debug("demo.pair.done", extra=logs.fields(pair=name, seconds=round(seconds, 3), source=source))
        print(f"[{i}/{len(pairs)}] {name}: {seconds:.1f} s -> {fused_png.name}, {montage_png.name}", flush=True)
    print(f"\nDone. Open the PNGs in {out.resolve()}/ (*_fused.png: the default {DEFAULT_METHOD}; the "
          "*_montage.png files show the inputs, the paper DMF's three exposures, its result and weight maps, "
          "and the default beside it).")
    return 0


# -- the node demo ---------------------------------------------------------------------


class LocalDestination:
    """A Storage SCP standing in for the PACS: writes what it receives into a folder."""

    def __init__(self, folder: Path, ae_title: str = "DEMOPACS"):
        from pydicom.uid import SecondaryCaptureImageStorage, SpatialRegistrationStorage
        from pynetdicom import AE, evt

        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title=ae_title)
        for cls in (SecondaryCaptureImageStorage, SpatialRegistrationStorage):
            ae.add_supported_context(cls)
        server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        assert server is not None  # non-blocking: start_server returns the running server
        self._server = server
        self.ae_title, self.port = ae_title, self._server.server_address[1]

    def _on_store(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        ds.save_as(self.folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        return 0x0000

    def stop(self) -> None:
        self._server.shutdown()


def send_series(folders: list[Path], port: int, called_ae: str, calling_ae: str = "DEMOSCU") -> int:
    """C-STORE every file of the folders to 127.0.0.1:port; returns how many succeeded."""
    import pydicom
    from pynetdicom import AE

    files = sorted(p for f in folders for p in f.iterdir() if p.suffix.lower() == ".dcm")
    ae = AE(ae_title=calling_ae)
    for uid in sorted({pydicom.dcmread(f, stop_before_pixels=True).SOPClassUID for f in files}):
        ae.add_requested_context(uid)
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    if not assoc.is_established:
        raise RuntimeError(f"the node at port {port} did not accept the association")
    ok = 0
    try:
        for f in files:
            status = assoc.send_c_store(pydicom.dcmread(f))
            ok += int(getattr(status, "Status", 0xFFFF) == 0x0000)
    finally:
        assoc.release()
    return ok


def run_node_demo(out: Path, device: str = "auto", sample: str = "synthetic", timeout_s: float = 1800.0) -> int:
    """Start a node, send it a pair over DICOM, wait for the fused series at a local destination."""
    import tempfile

    import pydicom
    from PIL import Image

    from dicom_node.config import parse_config
    from dicom_node.workflow.node import Node
    from fusion.preview import montage
    from fusion_demo.samples import shared_dir, write_synthetic_pair

    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    _, source = _prepare_model(device)
    if sample == "cirs":
        base = shared_dir() / "data" / "cirs057a"
        folders, match = [base / "CT", base / "MR"], "rule"  # the phantom pair has two patient IDs
        if not base.is_dir():
            print(f"CIRS pair not found at {base}; use --sample synthetic", flush=True)
            return 2
    else:
        folders, match = list(write_synthetic_pair(Path(tempfile.mkdtemp(prefix="fusion-demo-")))), "study"
    received = out / "received"
    dest = LocalDestination(received)
    settings = parse_config({
        "device": device,
        "node": {"ae_title": "FUSIONNODE", "host": "127.0.0.1", "port": 0},
        "storage": {"root": str(out / "node-data")},
        "settle": {"quiet_seconds": 5, "sweep_interval_s": 0.5},
        "destinations": [{"name": "local", "ae_title": dest.ae_title, "host": "127.0.0.1", "port": dest.port}],
        "pipelines": [{"name": "demo-ct-mr", "match": match, "destinations": ["local"],
                       "feature_source": source,
                       "base": {"modality": ["CT"], "min_instances": 10},
                       "overlay": {"modality": ["MR"], "min_instances": 10}}],
    })
    node = Node(settings).start()
    try:
        print(f"Node listening on port {node.port}; sending {sample} CT and MR series ...", flush=True)
        t0 = time.perf_counter()
        sent = send_series(folders, node.port, settings.node.ae_title)
        print(f"sent {sent} instances in {time.perf_counter() - t0:.1f} s; waiting for the fused series ...", flush=True)
        deadline, last = time.monotonic() + timeout_s, None
        while time.monotonic() < deadline:
            jobs = node.jobs.list()
            done = [j for j in jobs if j.state in ("done", "failed")]
            state = (node.store.counts(), node.jobs.counts(), node.outbox.summary())
            if state != last:
                print(f"  jobs {node.jobs.counts() or '{}'}  outbox {node.outbox.summary() or '{}'}", flush=True)
                last = state
            if done and node.outbox.wait_idle(0.1):
                break
            time.sleep(1.0)
        else:
            print("timed out waiting for the node", flush=True)
            return 1
    finally:
        node.stop()
        dest.stop()
    job = done[0]
    if job.state == "failed":
        print(f"the fusion job failed: {job.error}", flush=True)
        return 1
    sc = sorted((pydicom.dcmread(p) for p in received.glob("*.dcm")), key=lambda d: int(getattr(d, "InstanceNumber", 0)))
    sc = [d for d in sc if d.Modality != "REG"]
    picks = sc[:: max(1, len(sc) // 8)][:8]
    tiles = [d.pixel_array for d in picks]
    preview = out / "fused-series-preview.png"
    montage([tiles[:4], tiles[4:8]] if len(tiles) > 4 else [tiles],
            [[f"slice {d.InstanceNumber}" for d in picks[:4]], [f"slice {d.InstanceNumber}" for d in picks[4:8]]]
            if len(tiles) > 4 else [[f"slice {d.InstanceNumber}" for d in picks]]).save(preview)
    middle = out / "fused-middle-slice.png"
    Image.fromarray(sc[len(sc) // 2].pixel_array).save(middle)
    r = job.result or {}
    print(f"\nDone: {len(sc)} fused images and a REG object arrived at the local destination ({received}).")
    print(f"Registration moved the MR by {r.get('translation_mm')} mm, rotation {r.get('rotation_deg')} deg.")
    print(f"Stage times (s): {r.get('seconds')}")
    print(f"Previews: {preview} and {middle}")
    if r.get("registration_picture"):
        print(f"Registration check (slices and checkerboards before/after): {r['registration_picture']}")
    return 0
