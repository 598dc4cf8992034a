"""``fusion-node``: the operator's command line.

``serve`` runs the node; ``init-config`` writes a commented example config;
``status``, ``trigger``, ``jobs`` and ``outbox`` inspect and steer a node's
database; ``fuse`` fuses two image files; ``evaluate`` scores a fused image
(fusion-quality metrics, papers' or VIFB's convention); ``demo`` is the embedded default job;
``models fetch|info`` provisions the VGG16 weights ahead of time.  Errors are
printed as one line saying what to do, with exit status 2 for bad input and 3
for missing resources; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dicom_node import logs

if TYPE_CHECKING:
    from dicom_node.config import NodeSettings
    from dicom_node.index.store import Store
    from dicom_node.outbox import Outbox
    from dicom_node.workflow.jobs import JobQueue
    from fusion.features import VGG16Features

log = logging.getLogger("dicom_node.cli")

EXIT_USAGE = 2
EXIT_RESOURCE = 3


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


def _trio(text: str) -> tuple[str, ...]:
    names = tuple(t.strip().lower() for t in text.split(",") if t.strip())
    if len(names) < 2:
        raise argparse.ArgumentTypeError("a trio names at least two methods, e.g. adf,cbf,fpde")
    return names


def _load_model_or_fail(feature_source: str, device: str) -> VGG16Features | None:
    """The VGG model when DMF needs it, turning missing weights into an operator message."""
    if feature_source != "vgg":
        return None
    from fusion.backend import resolve_device
    from fusion.features import load_vgg16
    from fusion.weights import WeightsUnavailableError

    try:
        return load_vgg16(device=resolve_device(device))
    except WeightsUnavailableError as exc:
        raise CliError(str(exc), EXIT_RESOURCE) from exc


def cmd_fuse(args: argparse.Namespace) -> int:
    from fusion import fuse
    from fusion.api import resolve_trio, uses_vgg
    from fusion.imageio import read_image, write_image

    for p in (args.base, args.overlay):
        if not p.exists():
            raise CliError(f"input not found: {p}")
    a, b = read_image(args.base), read_image(args.overlay)
    model = _load_model_or_fail(args.feature_source, args.device) if uses_vgg(args.method, args.feature_source) else None
    t0 = time.perf_counter()
    try:
        # the library's rule: the overlay's modality when given, else colour = PET, grey = CT
        trio = resolve_trio(args.trio, args.modality, colour=b.ndim == 3 and b.shape[-1] == 3, method=args.method)
        out = fuse(a, b, method=args.method, trio=trio or None, device=args.device,
                   feature_source=args.feature_source, model=model)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    write_image(args.output, out)
    log.info("fuse.done", extra=logs.fields(method=args.method, trio=",".join(trio),
                                             seconds=round(time.perf_counter() - t0, 3), output=str(args.output)))
    print(args.output)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from fusion.metrics import CONVENTIONS, evaluate

    for p in (args.fused, args.src_a, args.src_b):
        if not p.exists():
            raise CliError(f"input not found: {p}")
    try:
        scores = evaluate(args.fused, args.src_a, args.src_b, convention=args.convention, gray=args.gray)
    except (ValueError, OSError) as exc:
        raise CliError(str(exc)) from exc
    suite = CONVENTIONS[args.convention]
    if args.json:
        print(json.dumps({"convention": args.convention, "fused": str(args.fused),
                          "sources": [str(args.src_a), str(args.src_b)],
                          "metrics": {k: (v if np.isfinite(v) else None) for k, v in scores.items()}}, indent=2))
        return 0
    print(f"{args.fused} vs {args.src_a}, {args.src_b} -- {suite.description}")
    for name, value in scores.items():
        print(f"  {name:5s} {value:12.5g}{'   (lower is better)' if name in suite.lower_is_better else ''}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from dicom_node import provision
    from fusion import weights

    if args.action == "fetch":
        try:
            path = provision.fetch_vgg16(force=args.force)
        except weights.WeightsUnavailableError as exc:
            raise CliError(str(exc), EXIT_RESOURCE) from exc
        print(f"VGG16 weights ready: {path}")
        return 0
    info = weights.weights_info()
    for key, value in info.items():
        print(f"{key}: {value}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from fusion_demo import demo

    if args.pairs_only:
        return demo.run_pair_demo(args.out, device=args.device, max_pairs=args.pairs)
    return demo.run_node_demo(args.out, device=args.device, sample=args.sample)


def _settings(args: argparse.Namespace) -> NodeSettings:
    from dicom_node.config import ConfigError, load_config

    try:
        return load_config(args.config)
    except ConfigError as exc:
        raise CliError(str(exc)) from exc


def cmd_init_config(args: argparse.Namespace) -> int:
    from dicom_node.config import EXAMPLE_TOML

    if args.path.exists() and not args.force:
        raise CliError(f"{args.path} exists; pass --force to overwrite it")
    args.path.write_text(EXAMPLE_TOML)
    print(f"wrote {args.path}; edit AE titles, destinations and pipelines, then: fusion-node serve --config {args.path}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import signal

    from dicom_node.workflow.node import Node

    node = Node(_settings(args)).start()
    cfg = node.settings.node
    ports = [f"TLS port {node.tls_port}"] if node.tls_port is not None else []
    if cfg.plain_enabled:
        ports.insert(0, f"port {node.port}")
    aes = [cfg.ae_title, *(p.ae_title for p in node.settings.pipelines if p.ae_title)]
    print(f"fusion-node listening as {', '.join(aes)} on {' and '.join(ports)}; Ctrl-C stops", flush=True)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: node.request_stop())
    node.wait()
    node.stop()
    return 0


def _offline_node(args: argparse.Namespace) -> tuple[NodeSettings, Store, JobQueue, Outbox]:
    """The node's database parts without the network side, for inspection commands."""
    from dicom_node.index.store import Store
    from dicom_node.outbox import Outbox
    from dicom_node.workflow.jobs import JobQueue

    settings = _settings(args)
    db_path = settings.storage.database_path
    store, jobs = Store(settings.storage.root, db_path), JobQueue(db_path)
    outbox = Outbox(db_path, settings, recover_interrupted=False)  # a running node may own 'sending' rows
    for part in (store, jobs, outbox):
        part.ensure_schema()
    return settings, store, jobs, outbox


def cmd_status(args: argparse.Namespace) -> int:
    _, store, jobs, outbox = _offline_node(args)
    print("series:", store.counts())
    print("jobs:  ", jobs.counts())
    print("outbox:", outbox.summary())
    return 0


def cmd_trigger(args: argparse.Namespace) -> int:
    from dicom_node.workflow.pairing import Pairing
    from dicom_node.workflow.settle import Settler

    settings, store, jobs_queue, _ = _offline_node(args)
    try:
        Settler(settings, store).trigger(args.series_uid)
    except KeyError as exc:
        raise CliError(str(exc)) from exc
    jobs = Pairing(settings, store, jobs_queue).pair_settled()
    print(f"series {args.series_uid} settled; new jobs: {jobs or 'none (partner missing or job exists)'}")
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    _, _, jobs, _ = _offline_node(args)
    if args.action == "retry":
        for job_id in args.ids:
            jobs.requeue(job_id)
        print(f"requeued {len(args.ids)} job(s); a running node picks them up")
        return 0
    if args.action == "show":
        for job_id in args.ids:
            job = jobs.get(job_id)
            if job is None:
                raise CliError(f"no job {job_id}; `fusion-node jobs list` shows them")
            print(json.dumps({"id": job.id, "state": job.state, "pipeline": job.pipeline, "attempts": job.attempts,
                              "error": job.error, "result": job.result}, indent=2, default=str))
        return 0
    for j in jobs.list(args.state):
        secs = (j.result or {}).get("seconds", "")
        print(f"{j.id:5d} {j.state:8s} {j.pipeline:12s} attempts={j.attempts} {j.error or ''} {secs}")
    return 0


def cmd_outbox(args: argparse.Namespace) -> int:
    _, _, _, outbox = _offline_node(args)
    if args.action == "retry":
        n = outbox.retry(args.ids or None, destination=args.destination)
        print(f"{n} item(s) due again; a running node sends them")
        return 0
    for item in outbox.list(state=args.state, destination=args.destination):
        print(f"{item.id:6d} {item.destination:10s} {item.state:8s} attempts={item.attempts} "
              f"{item.sop_instance_uid} {item.last_error or ''}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from fusion.api import DEFAULT_METHOD, fusion_methods

    p = argparse.ArgumentParser(prog="fusion-node", description=__doc__.splitlines()[0])
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("fuse", help="fuse two registered images (PNG/JPEG/.npy) into one")
    f.add_argument("base", type=Path, help="anatomical image (MRI)")
    f.add_argument("overlay", type=Path, help="CT, PET or SPECT image (colour kept in chroma)")
    f.add_argument("-o", "--output", type=Path, required=True, help="output .png (8-bit) or .npy (float32 0..1)")
    f.add_argument("--method", default=DEFAULT_METHOD, type=str.lower, choices=fusion_methods(),
                   help=f"fusion method (default {DEFAULT_METHOD}, docs/fidelity.md): {', '.join(fusion_methods())}")
    f.add_argument("--modality", type=str.upper, choices=("CT", "PT", "NM"), default=None,
                   help="the overlay's modality, which picks DMF's default trio "
                        "(default: PT for a colour overlay, CT for a grey one)")
    f.add_argument("--trio", type=_trio, default=None,
                   help="DMF exposures, e.g. cbf,tif,wls (default: per modality, see --modality)")
    f.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    f.add_argument("--feature-source", default="vgg", choices=("vgg", "image"),
                   help="gradients from VGG16 features (default) or the plain image")
    f.set_defaults(func=cmd_fuse)

    e = sub.add_parser("evaluate", help="fusion-quality metrics of a fused image against its two sources")
    e.add_argument("fused", type=Path, help="fused image (PNG/JPEG)")
    e.add_argument("src_a", type=Path, help="first source (MRI; VIFB's VI role)")
    e.add_argument("src_b", type=Path, help="second source (CT/PET/SPECT; VIFB's IR role)")
    e.add_argument("--convention", choices=("papers", "vifb"), default="papers",
                   help="papers: CDDFuse Evaluator on luminance (default); vifb: VIFB's MATLAB metrics")
    e.add_argument("--gray", action="store_true", help="with --convention vifb: rgb2gray colour images first")
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    e.set_defaults(func=cmd_evaluate)

    m = sub.add_parser("models", help="VGG16 weights: fetch ahead of time, or show what is installed")
    m.add_argument("action", choices=("fetch", "info"))
    m.add_argument("--force", action="store_true", help="fetch again even if cached")
    m.set_defaults(func=cmd_models)

    def with_config(parser):
        parser.add_argument("--config", type=Path, default=Path("node.toml"), help="node config (default ./node.toml)")
        return parser

    ic = sub.add_parser("init-config", help="write a commented example configuration")
    ic.add_argument("path", type=Path, nargs="?", default=Path("node.toml"))
    ic.add_argument("--force", action="store_true")
    ic.set_defaults(func=cmd_init_config)

    with_config(sub.add_parser("serve", help="run the node (SCP, pairing, jobs, outbox)")).set_defaults(func=cmd_serve)
    with_config(sub.add_parser("status", help="counts of series, jobs and outgoing items")).set_defaults(func=cmd_status)
    t = with_config(sub.add_parser("trigger", help="declare a series complete now and pair it"))
    t.add_argument("series_uid")
    t.set_defaults(func=cmd_trigger)
    j = with_config(sub.add_parser("jobs", help="list fusion jobs, show one (error, timings, registration quality), "
                                                "or retry failed ones"))
    j.add_argument("action", choices=("list", "show", "retry"))
    j.add_argument("ids", type=int, nargs="*")
    j.add_argument("--state", choices=("queued", "running", "done", "failed"))
    j.set_defaults(func=cmd_jobs)
    o = with_config(sub.add_parser("outbox", help="list outgoing instances, or make dead/pending ones due again"))
    o.add_argument("action", choices=("list", "retry"))
    o.add_argument("ids", type=int, nargs="*")
    o.add_argument("--state", choices=("pending", "sending", "sent", "dead"))
    o.add_argument("--destination")
    o.set_defaults(func=cmd_outbox)

    d = sub.add_parser("demo", help="embedded demo: a node receives a CT+MR pair, fuses it, sends it to a local "
                                    "destination; PNG previews (no services needed)")
    d.add_argument("--sample", choices=("synthetic", "cirs"), default="synthetic",
                   help="generated phantom pair (default, ~1 min) or the real CIRS phantom pair from ../shared")
    d.add_argument("--pairs-only", action="store_true", help="instead: fuse Harvard image pairs into PNG montages")
    d.add_argument("--out", type=Path, default=Path("demo-output"), help="folder for the PNGs (default ./demo-output)")
    d.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    d.add_argument("--pairs", type=int, default=2, help="with --pairs-only: pairs per modality subset (default 2)")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.setup(args.log_level)
    try:
        return args.func(args)
    except CliError as exc:
        if args.debug:
            raise
        print(f"fusion-node: error: {exc}", file=sys.stderr)
        return exc.code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
