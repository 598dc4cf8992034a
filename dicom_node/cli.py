"""``fusion-node``: the operator's command line.

Subcommands so far: ``fuse`` (two image files to one), ``demo`` (the embedded
default job), ``models fetch|info`` (VGG16 weights ahead of time).  Errors are
printed as one line saying what to do, with exit status 2 for bad input and 3
for missing resources; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from dicom_node import logs

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


def _save(path: Path, img: np.ndarray) -> None:
    from fusion.intensity import to_uint8

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".npy":
        np.save(path, img.astype(np.float32))
        return
    from PIL import Image

    Image.fromarray(to_uint8(img)).save(path)


def _load_model_or_fail(feature_source: str, device: str):
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
    from dicom_node.samples import load_image
    from fusion import fuse

    for p in (args.base, args.overlay):
        if not p.exists():
            raise CliError(f"input not found: {p}")
    a, b = load_image(args.base), load_image(args.overlay)
    model = _load_model_or_fail(args.feature_source, args.device) if args.method == "dmf" else None
    t0 = time.perf_counter()
    try:
        out = fuse(a, b, method=args.method, trio=args.trio, device=args.device,
                   feature_source=args.feature_source, model=model)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    _save(args.output, out)
    log.info("fuse.done", extra=logs.fields(method=args.method, trio=",".join(args.trio),
                                             seconds=round(time.perf_counter() - t0, 3), output=str(args.output)))
    print(args.output)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from fusion import weights

    if args.action == "fetch":
        try:
            path = weights.fetch_vgg16(force=args.force)
        except weights.WeightsUnavailableError as exc:
            raise CliError(str(exc), EXIT_RESOURCE) from exc
        print(f"VGG16 weights ready: {path}")
        return 0
    info = weights.weights_info()
    for key, value in info.items():
        print(f"{key}: {value}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from dicom_node.demo import run_demo

    return run_demo(args.out, device=args.device, max_pairs=args.pairs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fusion-node", description=__doc__.splitlines()[0])
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("fuse", help="fuse two registered images (PNG/JPEG/.npy) into one")
    f.add_argument("base", type=Path, help="anatomical image (MRI)")
    f.add_argument("overlay", type=Path, help="CT, PET or SPECT image (colour kept in chroma)")
    f.add_argument("-o", "--output", type=Path, required=True, help="output .png (8-bit) or .npy (float32 0..1)")
    f.add_argument("--method", default="dmf", help="dmf (default) or a single method: adf, cbf, fpde")
    f.add_argument("--trio", type=_trio, default=("adf", "cbf", "fpde"), help="DMF exposures (default adf,cbf,fpde)")
    f.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    f.add_argument("--feature-source", default="vgg", choices=("vgg", "image"),
                   help="gradients from VGG16 features (default) or the plain image")
    f.set_defaults(func=cmd_fuse)

    m = sub.add_parser("models", help="VGG16 weights: fetch ahead of time, or show what is installed")
    m.add_argument("action", choices=("fetch", "info"))
    m.add_argument("--force", action="store_true", help="fetch again even if cached")
    m.set_defaults(func=cmd_models)

    d = sub.add_parser("demo", help="fuse sample pairs and write PNG previews (no services needed)")
    d.add_argument("--out", type=Path, default=Path("demo-output"), help="folder for the PNGs (default ./demo-output)")
    d.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    d.add_argument("--pairs", type=int, default=2, help="sample pairs per modality subset (default 2)")
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
