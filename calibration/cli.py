"""``python -m calibration``: the INT8 steps on their own, torch-free.

    sample    make (and cache) a calibration set from image folders
    quantize  an exported FP32 bundle -> an INT8 (Q/DQ) bundle calibrated on real images
    report    FP32 vs FP16 vs INT8 bundles of one model on a dataset with ground truth

``quantize`` writes its bundle as build_engine does (export.bundle_writer): staged, the same
checks on the Q/DQ graph (onnx.checker, the static TensorRT check for the bundle's target,
cosine to the FP32 graph >= 0.99), then swapped into place; an existing --output that is not a
bundle is refused.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np

from runtime.bundle import BundleError, load_bundle
from runtime.cli_util import ArgumentParser, add_verbose, configure_logs, run_cli
from runtime.datasets import load_dataset
from runtime.files import atomic_write

from .dataset import DEFAULT_COUNT, calibration_set
from .quantize import METHODS
from .report import TIE

PARITY_IMAGES = 8  # calibration images the INT8 graph is compared on with the FP32 graph


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m calibration", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_verbose(p)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sample", help="make a calibration set (cached) and save it as .npy")
    s.add_argument("--bundle", required=True, type=Path, help="bundle whose preprocessing to apply")
    s.add_argument("--images", required=True, type=Path, nargs="+", metavar="DIR")
    s.add_argument("--count", type=int, default=DEFAULT_COUNT)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--output", required=True, type=Path)
    q = sub.add_parser("quantize", help="FP32 bundle -> INT8 Q/DQ bundle (ONNX Runtime)")
    q.add_argument("--bundle", required=True, type=Path, help="an FP32 bundle from export/build_engine.py")
    q.add_argument("--calibration-images", required=True, type=Path, nargs="+", metavar="DIR")
    q.add_argument("--count", type=int, default=DEFAULT_COUNT)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--method", choices=sorted(METHODS), default="entropy")
    q.add_argument("--output", required=True, type=Path,
                   help="the INT8 bundle folder (an existing one is replaced only if it is a bundle)")
    r = sub.add_parser("report", help="what each precision costs, in cosine, agreement, recall and latency")
    r.add_argument("--bundle", required=True, type=Path, action="append",
                   help="a bundle (repeat: the FP32 one and those to compare with it)")
    r.add_argument("--dataset", required=True, type=Path)
    r.add_argument("--format", default="auto", choices=("auto", "ours", "gmberton", "vprbench"))
    r.add_argument("--threads", type=int, default=None)
    r.add_argument("--tie", type=float, default=TIE,
                   help=f"FP32 scores closer than this are a tie for the agreement up to ties (default {TIE:g})")
    r.add_argument("--output", type=Path, help="also write the report JSON here")
    return p


def cmd_sample(args) -> int:
    bundle = load_bundle(args.bundle)
    data = calibration_set(args.images, bundle.preprocessing, args.count, args.seed)
    atomic_write(args.output, lambda f: np.save(f, np.asarray(data)))
    print(f"wrote {args.output}: {data.shape[0]} images {tuple(data.shape[1:])}")
    return 0


def quantize_bundle(bundle: Path, images: List[Path], output: Path, count: int = DEFAULT_COUNT, seed: int = 0,
                    method: str = "entropy", verbose: bool = False) -> Path:
    """An FP32 bundle -> an INT8 Q/DQ bundle at ``output`` (ONNX Runtime backend); returns ``output``."""
    from export.bundle_writer import parity, run_graph, stage_bundle

    from .int8 import quantize_graph

    src = load_bundle(bundle)
    if src.precision != "fp32" or src.manifest.get("split"):
        raise BundleError(f"{bundle}: quantize takes an FP32 (fused) bundle, this one is "
                          f"{src.precision}{' split' if src.manifest.get('split') else ''}; build one with "
                          "python export/build_engine.py --precision fp32")
    with stage_bundle(output) as staged:
        data = calibration_set(images, src.preprocessing, count, seed)
        facts = quantize_graph(src.file("onnx"), staged.onnx, data, method,
                               exclude=src.manifest["export"].get("fp32_nodes", []), verbose=verbose)
        x = np.ascontiguousarray(data[:PARITY_IMAGES], dtype=np.float32)
        check = parity(run_graph(src.file("onnx"), x), run_graph(staged.onnx, x), "int8", "the FP32 graph")
        manifest = {k: v for k, v in src.manifest.items() if k not in ("tensorrt", "build", "files", "checks")}
        manifest.update(precision="int8", backend="onnxruntime", calibration=facts,
                        checks={"parity_vs_fp32_graph": check})
        return staged.publish(manifest)


def cmd_quantize(args) -> int:
    from export.bundle_writer import summary_lines

    output = quantize_bundle(args.bundle, args.calibration_images, args.output, args.count, args.seed, args.method,
                             args.verbose)
    print("\n".join(summary_lines(load_bundle(output))))
    return 0


def cmd_report(args) -> int:
    from .report import format_report, precision_report, write_report

    bundles = [load_bundle(b) for b in args.bundle]
    report = precision_report(bundles, load_dataset(args.dataset, args.format), threads=args.threads,
                              tie=args.tie)
    print(format_report(report))
    for path in write_report(report, bundles):
        print(f"written into {path}")
    if args.output:
        atomic_write(args.output, lambda f: f.write(json.dumps(report, indent=2).encode()))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    def body() -> int:
        args = build_parser().parse_args(argv)
        configure_logs(args.verbose)
        return {"sample": cmd_sample, "quantize": cmd_quantize, "report": cmd_report}[args.command](args)

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
