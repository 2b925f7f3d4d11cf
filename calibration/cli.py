"""``python -m calibration``: the INT8 steps on their own, torch-free.

    sample    make (and cache) a calibration set from image folders
    quantize  an exported FP32 bundle -> an INT8 (Q/DQ) bundle calibrated on real images
    report    FP32 vs FP16 vs INT8 bundles of one model on a dataset with ground truth
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np

from runtime.bundle import BundleError, file_entry, load_bundle, write_manifest
from runtime.datasets import DatasetError, load_dataset
from runtime.errors import UserError
from runtime.files import replace_dir

from .dataset import DEFAULT_COUNT, calibration_set
from .quantize import METHODS, integer_ops, quantize_onnx
from .report import format_report, precision_report, write_report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m calibration", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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
    q.add_argument("--output", required=True, type=Path, help="the INT8 bundle folder")
    r = sub.add_parser("report", help="what each precision costs, in cosine, agreement, recall and latency")
    r.add_argument("--bundle", required=True, type=Path, action="append",
                   help="a bundle (repeat: the FP32 one and those to compare with it)")
    r.add_argument("--dataset", required=True, type=Path)
    r.add_argument("--format", default="auto", choices=("auto", "ours", "gmberton", "vprbench"))
    r.add_argument("--threads", type=int, default=None)
    r.add_argument("--output", type=Path, help="also write the report JSON here")
    return p


def cmd_sample(args) -> int:
    bundle = load_bundle(args.bundle)
    data = calibration_set(args.images, bundle.preprocessing, args.count, args.seed)
    np.save(args.output, np.asarray(data))
    print(f"wrote {args.output}: {data.shape[0]} images {tuple(data.shape[1:])}")
    return 0


def cmd_quantize(args) -> int:
    src = load_bundle(args.bundle)
    if src.precision != "fp32" or src.manifest.get("split"):
        raise BundleError(f"{args.bundle}: quantize takes an FP32 (fused) bundle, this one is {src.precision}")
    data = calibration_set(args.calibration_images, src.preprocessing, args.count, args.seed)
    staging = args.output.with_name(f".{args.output.name}.partial-{os.getpid()}")
    staging.mkdir(parents=True)
    try:
        facts = quantize_onnx(src.file("onnx"), staging / "model.onnx", data, args.method,
                              exclude=src.manifest["export"].get("fp32_nodes", []))
        facts.update(mode="explicit Q/DQ", integer_ops=integer_ops(staging / "model.onnx"))
        manifest = {k: v for k, v in src.manifest.items() if k not in ("tensorrt",)}
        manifest.update(precision="int8", backend="onnxruntime", calibration=facts,
                        files={"onnx": file_entry(staging / "model.onnx")})
        checks = manifest.setdefault("checks", {})
        checks["onnxruntime_integer_ops"] = facts["integer_ops"]
        _tensorrt_checks(staging / "model.onnx", manifest, checks)
        write_manifest(staging, manifest)
        replace_dir(staging, args.output)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote {args.output}: {facts['quantize_nodes']} QuantizeLinear ({facts['method']}, {facts['images']} images); "
          f"ONNX Runtime integer kernels: {facts['integer_ops']}")
    if "tensorrt_rtx" in checks:
        from export.trt_rtx import describe_check
        print(describe_check(checks["tensorrt_rtx"]) + ": passed")
    return 0


def _tensorrt_checks(onnx_path: Path, manifest: dict, checks: dict) -> None:
    """The graph a device's TensorRT will get: the static check, then TensorRT-RTX's parser and
    builder where it imports (both raise, one line, naming the node)."""
    from export.trt_check import check_graph
    from export.trt_rtx import rtx_check

    check_graph(onnx_path, manifest.get("export", {}).get("target", "trt10"))
    checks.pop("tensorrt_rtx", None)
    entry = rtx_check(onnx_path, manifest["batch"], "int8", manifest.get("export", {}).get("fp32_nodes", []))
    if entry is not None:
        checks["tensorrt_rtx"] = entry


def cmd_report(args) -> int:
    bundles = [load_bundle(b) for b in args.bundle]
    report = precision_report(bundles, load_dataset(args.dataset, args.format), threads=args.threads)
    print(format_report(report))
    for path in write_report(report, bundles):
        print(f"written into {path}")
    if args.output:
        args.output.write_text(json.dumps(report, indent=2))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"sample": cmd_sample, "quantize": cmd_quantize, "report": cmd_report}[args.command](args)
    except (BundleError, DatasetError, FileNotFoundError, ValueError, UserError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
