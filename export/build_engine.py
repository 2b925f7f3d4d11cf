"""Build an engine bundle: PyTorch model -> ONNX (fixed H x W, dynamic batch) -> precision in the
graph -> TensorRT engine, or an ONNX Runtime bundle where TensorRT is absent.

    python export/build_engine.py --model salad-dinov2-vitb14 --checkpoint dino_salad.ckpt \\
        --precision fp16 --batch 1:8:32 --output engines/salad-vitb14-fp16

    # on the target device (a Jetson, usually without torch): engine from an exported bundle
    python export/build_engine.py --from-bundle engines/salad-vitb14-fp16 --backend tensorrt

The bundle (engines/README.md) is written to a staging folder and moved into place only when
complete: an interrupted build never leaves a half bundle.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import List, Optional

import numpy as np

if __package__ in (None, ""):  # run as a script: python export/build_engine.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.bundle import describe, file_entry, load_bundle, write_manifest  # noqa: E402
from runtime import units  # noqa: E402
from runtime.files import replace_dir  # noqa: E402
from runtime.trt_env import gpu_info, tensorrt_version  # noqa: E402
from export.registry import parse_image_size  # noqa: E402 (torch-free)

FORMAT_VERSION = 1
BUILD_ERRORS = (ValueError, RuntimeError, FileNotFoundError)  # Checkpoint/TRT errors subclass these


def parse_size(text: str) -> int:
    try:
        return units.parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_batch(text: str) -> dict:
    parts = text.split(":")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch {text!r}: expected MIN:OPT:MAX, e.g. 1:8:32") from None
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or not 1 <= values[0] <= values[1] <= values[2]:
        raise argparse.ArgumentTypeError(f"--batch {text!r}: expected 1 <= MIN <= OPT <= MAX")
    return dict(zip(("min", "opt", "max"), values))


def choose_backend(requested: str) -> tuple:
    trt_ver, gpu = tensorrt_version(), gpu_info()
    if requested == "onnxruntime":
        return "onnxruntime", "requested"
    if trt_ver and gpu:
        return "tensorrt", f"TensorRT {trt_ver} and {gpu['name']} found"
    why = "TensorRT does not import" if not trt_ver else "no usable CUDA GPU"
    if requested == "tensorrt":
        raise SystemExit(f"error: --backend tensorrt: {why} on this machine. Build the bundle with --backend "
                         "onnxruntime here, then run --from-bundle DIR --backend tensorrt on the target device.")
    return "onnxruntime", f"{why}: using ONNX Runtime (CPU)"


def step(msg: str) -> float:
    print(f"[build] {msg}", file=sys.stderr, flush=True)
    return time.time()


def export_bundle(args, staging: Path, backend: str) -> dict:
    """The torch side: model -> checked ONNX (+ precision) in ``staging``; returns the manifest."""
    import onnx
    import torch

    from export.onnx_export import decompose_layernorms, export_onnx, io_specs, save_onnx
    from export.precision import fp32_island_nodes, to_fp16
    from export.registry import get_config
    from export.trt_check import check_graph
    from export.zoo import create_model

    cfg = get_config(args.model, image_size=args.image_size, depth=args.depth)
    t = step(f"building {cfg.name} at {cfg.image_size[0]}x{cfg.image_size[1]} "
             f"({'RANDOM WEIGHTS' if args.random_weights else 'checkpoint ' + args.checkpoint})")
    model, cfg, weights = create_model(cfg, checkpoint=args.checkpoint, random_weights=args.random_weights)
    target = args.target
    decomposed = 0
    if target == "trt8.5":
        decomposed = decompose_layernorms(model)
    outputs = list(cfg.outputs())
    split = None
    if args.split:
        from export.models.salad import SaladSplit
        model = SaladSplit(model)
        split = model.split_info()
        outputs = ["token", "cluster_features", "scores"]
    fp32_path = staging / "model.onnx"
    step(f"exporting ONNX (opset {args.opset}, dynamic batch){f', {decomposed} LayerNorms decomposed' if decomposed else ''}")
    export_onnx(model, cfg.image_size, outputs, fp32_path, opset=args.opset)
    graph = onnx.load(str(fp32_path))
    ops = check_graph(graph, target)
    islands = fp32_island_nodes(graph)
    step(f"static TensorRT check passed for {target}: {sum(ops.values())} nodes, {len(ops)} op types")
    weak_trt = backend == "tensorrt" and not _trt_strongly_typed()
    if args.precision == "fp16" and not weak_trt:
        step(f"FP16 graph with {len(islands)} FP32 island nodes (LayerNorm, softmax, Sinkhorn, L2 norms)")
        save_onnx(to_fp16(graph), fp32_path)
    del graph
    calibration = None
    if args.precision == "int8":
        calibration = _quantize(args, cfg.preprocessing, fp32_path, islands, implicit=weak_trt and args.trt_calibrator)

    if args.precision != "fp32":  # the graph that ships is checked too
        from export.onnx_export import check_onnx
        check_onnx(fp32_path)
        check_graph(str(fp32_path), target)
    specs = io_specs(fp32_path)
    checks = {"onnx_checker": True, "tensorrt_static_check": target, "onnx_ops": ops}
    if not args.skip_parity:
        checks["parity_vs_pytorch"] = _parity(model, cfg, fp32_path, split)
        step(f"ONNX Runtime vs PyTorch on {checks['parity_vs_pytorch']['images']} sample images: "
             f"min cosine {checks['parity_vs_pytorch']['min_cosine']:.6f}")
    manifest = {
        "format_version": FORMAT_VERSION,
        "model": cfg.to_dict(),
        "preprocessing": cfg.preprocessing.to_dict(),
        "precision": args.precision,
        "backend": backend,
        "inputs": specs["inputs"],
        "outputs": specs["outputs"],
        "batch": args.batch,
        "files": {},
        "weights": {k: v for k, v in weights.items() if k != "path"},
        "export": {"exporter": f"torch.onnx TorchScript exporter (torch {torch.__version__})", "opset": args.opset,
                   "target": target, "decomposed_layernorm": bool(decomposed), "fp32_nodes": islands},
        "checks": checks,
    }
    if split:
        manifest["split"] = split
    if calibration:
        manifest["calibration"] = calibration
        if "integer_ops" in calibration:
            checks["onnxruntime_integer_ops"] = calibration["integer_ops"]
    step(f"exported in {time.time() - t:.1f} s")
    return manifest


def _quantize(args, pre, onnx_path: Path, islands, implicit: bool) -> dict:
    """INT8: the calibration set from real images, then the Q/DQ graph (or, for TensorRT 8.x's
    implicit calibrator, the FP32 graph plus the set kept for the builder)."""
    from calibration.dataset import calibration_set
    from calibration.quantize import integer_ops, quantize_onnx

    t = step(f"calibration set: {args.calibration_count} images from {', '.join(map(str, args.calibration_images))}")
    data = calibration_set(args.calibration_images, pre, args.calibration_count, args.calibration_seed)
    args.calibration_data = data
    if implicit:
        return {"mode": "implicit", "images": int(len(data)), "method": "entropy (IInt8EntropyCalibrator2)"}
    step(f"{len(data)} images ready in {time.time() - t:.1f} s; calibrating ({args.calibration_method}) "
         "and writing the Q/DQ graph")
    fp32 = onnx_path.with_name("model_fp32.onnx")
    os.replace(onnx_path, fp32)
    facts = quantize_onnx(fp32, onnx_path, data, args.calibration_method, exclude=islands)
    fp32.unlink()
    facts["mode"] = "explicit Q/DQ"
    facts["integer_ops"] = integer_ops(onnx_path)
    if not facts["integer_ops"]:
        print("warning: ONNX Runtime runs no integer kernel for this graph (dequantised FP32 everywhere)", file=sys.stderr)
    step(f"Q/DQ graph: {facts['quantize_nodes']} QuantizeLinear; ONNX Runtime integer kernels: {facts['integer_ops']}")
    return facts


def _trt_strongly_typed() -> bool:
    from export.trt_builder import capabilities
    return capabilities()["strongly_typed"]


def _parity(model, cfg, onnx_path: Path, split: Optional[dict] = None) -> dict:
    """Descriptors of the bundle's graph (ONNX Runtime) against the PyTorch model on real images."""
    import numpy as np
    import onnxruntime as ort

    from runtime.compare import row_cosine
    from runtime.preprocess import preprocess_file

    data = Path(__file__).resolve().parents[1] / "data"
    files = sorted(data.glob("*/queries/*"))[:2] if data.is_dir() else []
    if files:
        x = np.stack([preprocess_file(f, cfg.preprocessing) for f in files])
    else:
        x = np.random.default_rng(0).standard_normal((2, 3, *cfg.image_size)).astype(np.float32)
    import torch

    from runtime.sinkhorn import salad_aggregate

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        if split:  # the fused PyTorch model against the split graph finished by the numpy Sinkhorn
            ref = model.model(torch.from_numpy(x))["descriptor"].float().numpy()
            token, feats, scores = session.run(["token", "cluster_features", "scores"], {"images": x})
            got = salad_aggregate(token, feats, scores, split["dust_bin"], split["iterations"])
        else:
            ref = model(torch.from_numpy(x))["descriptor"].float().numpy()
            got = session.run(["descriptor"], {"images": x})[0]
    cos = row_cosine(ref, got)
    return {"images": len(x), "min_cosine": float(cos.min()), "max_abs": float(np.abs(ref - got).max())}


def add_engine(args, staging: Path, manifest: dict) -> None:
    from export.trt_builder import build_engine

    t = step(f"building TensorRT {tensorrt_version()} engine ({manifest['precision']}, batch "
             f"{manifest['batch']['min']}:{manifest['batch']['opt']}:{manifest['batch']['max']})")
    calibrator = None
    if manifest.get("calibration", {}).get("mode") == "implicit":
        from calibration.trt_calibrator import CACHE_NAME, make_entropy_calibrator
        h, w = manifest["preprocessing"]["size"]
        data = getattr(args, "calibration_data", None)
        calibrator = make_entropy_calibrator(data if data is not None else np.zeros((0, 3, h, w), np.float32),
                                             staging / CACHE_NAME)
    facts = build_engine(staging / "model.onnx", staging / "engine.plan", next(iter(manifest["inputs"])),
                         manifest["preprocessing"]["size"], manifest["batch"], manifest["precision"],
                         manifest["export"].get("fp32_nodes", []), workspace=args.workspace,
                         timing_cache=args.timing_cache, opt_level=args.opt_level,
                         version_compatible=args.version_compatible, hardware_compatible=args.hardware_compatible,
                         calibrator=calibrator)
    manifest["tensorrt"] = facts
    step(f"engine built in {time.time() - t:.1f} s")


def finish(staging: Path, output: Path, manifest: dict) -> None:
    manifest["files"] = {"onnx": file_entry(staging / "model.onnx")}
    if (staging / "model.onnx.data").exists():
        manifest["files"]["onnx_data"] = file_entry(staging / "model.onnx.data")
    if (staging / "engine.plan").exists():
        manifest["files"]["engine"] = file_entry(staging / "engine.plan")
    if (staging / "calibration.cache").exists():
        manifest["files"]["calibration_cache"] = file_entry(staging / "calibration.cache")
    if manifest["backend"] == "onnxruntime":
        manifest["onnxruntime"] = {"graph_optimization": "ORT_ENABLE_ALL, applied at session creation (portable)"}
    manifest["build"] = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                         "host": platform.node(), "platform": platform.platform(), "python": platform.python_version()}
    write_manifest(staging, manifest)
    replace_dir(staging, output)


def build_parser() -> argparse.ArgumentParser:
    from runtime.bundle import PRECISIONS
    p = argparse.ArgumentParser(prog="python export/build_engine.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="NAME", help="registry model name (python -m export.encode --help lists them)")
    src.add_argument("--from-bundle", type=Path, metavar="DIR",
                     help="build from an exported bundle's model.onnx, without torch (on the target device)")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--checkpoint", metavar="PATH|URL", help="official checkpoint (or https:// URL, cached)")
    w.add_argument("--random-weights", action="store_true",
                   help="seeded random weights, labelled as such in the manifest: for tests and benchmarks")
    p.add_argument("--image-size", type=parse_image_size, metavar="N|HxW",
                   help="input size, square N or HxW, e.g. 240x320 (default: the model's official one)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp16",
                   help="fp32; fp16 (FP16 graph with FP32 LayerNorm/softmax/Sinkhorn/L2 islands); "
                        "int8 (Q/DQ graph calibrated on --calibration-images)")
    p.add_argument("--backend", choices=("auto", "tensorrt", "onnxruntime"), default="auto",
                   help="auto: TensorRT when it imports and a GPU is present, else ONNX Runtime (CPU)")
    p.add_argument("--batch", type=parse_batch, default=None, metavar="MIN:OPT:MAX",
                   help="optimisation profile of the batch axis (default 1:8:32)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--target", choices=("trt8.5", "trt8.6", "trt10", "trt11"), default=None,
                   help="TensorRT generation the graph must suit (default: the installed one, else trt10); "
                        "trt8.5 (JetPack 5) decomposes LayerNorm")
    p.add_argument("--workspace", type=parse_size, default=None, help="TensorRT workspace limit, e.g. 4GB")
    p.add_argument("--timing-cache", type=Path, default=None, help="TensorRT timing cache file, read and updated")
    p.add_argument("--opt-level", type=int, choices=range(0, 6), default=None, metavar="0-5",
                   help="TensorRT builder optimisation level (default: TensorRT's, 3)")
    p.add_argument("--version-compatible", action="store_true", help="engine that later TensorRT versions can run")
    p.add_argument("--hardware-compatible", action="store_true", help="engine for any Ampere-or-newer GPU")
    p.add_argument("--calibration-images", type=Path, nargs="+", metavar="DIR",
                   help="int8: folders of real place images to calibrate on (sampled over each whole sequence)")
    p.add_argument("--calibration-count", type=int, default=500,
                   help="int8: calibration images (default 500, NVIDIA's advice for ViTs; fewer warn)")
    p.add_argument("--calibration-method", choices=("entropy", "minmax", "percentile"), default="entropy",
                   help="int8: how activation ranges are chosen (default entropy)")
    p.add_argument("--calibration-seed", type=int, default=0, help="int8: sampling seed")
    p.add_argument("--trt-calibrator", action="store_true",
                   help="int8 on TensorRT 8.x: implicit calibration (IInt8EntropyCalibrator2, cache kept in the "
                        "bundle) instead of the Q/DQ graph")
    p.add_argument("--split", action="store_true",
                   help="SALAD only: end the graph before the optimal transport; the runtime's numpy Sinkhorn "
                        "finishes the descriptor (keeps exp/log-sum-exp out of reduced-precision engines)")
    p.add_argument("--skip-parity", action="store_true", help="skip the ONNX Runtime vs PyTorch check on sample images")
    p.add_argument("--output", type=Path, help="bundle directory (default engines/<model>-<precision>)")
    p.add_argument("--depth", type=int, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.model and not (args.checkpoint or args.random_weights):
        parser.error("--model needs --checkpoint PATH|URL or --random-weights")
    if args.precision == "int8" and args.model and not args.calibration_images:
        parser.error("--precision int8 needs --calibration-images DIR (real place images, e.g. the map's own)")
    args.batch_given = args.batch is not None
    if args.batch is None:
        args.batch = parse_batch("1:8:32")
    backend, why = choose_backend(args.backend)
    print(f"[build] backend: {backend} ({why})", file=sys.stderr)
    if args.target is None:
        if backend == "tensorrt":
            from export.trt_builder import default_target
            args.target = default_target()
        else:
            args.target = "trt10"
    try:
        if args.from_bundle:
            output = args.output or args.from_bundle
            _write_bundle(output, lambda staging: _from_bundle(args, staging, backend))
        else:
            output = args.output or Path("engines") / f"{args.model}-{args.precision}"
            _write_bundle(output, lambda staging: _from_model(args, staging, backend))
    except BUILD_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _summary(output)
    return 0


def _write_bundle(output: Path, fill) -> None:
    """Run ``fill(staging)`` (returns the manifest) in a staging folder, then move it into place."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.with_name(f".{output.name}.partial-{os.getpid()}")
    staging.mkdir()
    try:
        finish(staging, output, fill(staging))
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _from_model(args, staging: Path, backend: str) -> dict:
    manifest = export_bundle(args, staging, backend)
    if backend == "tensorrt":
        add_engine(args, staging, manifest)
    return manifest


def _from_bundle(args, staging: Path, backend: str) -> dict:
    """The source bundle's graph, verified, with a new engine (its old engine is not needed)."""
    from runtime.bundle import read_manifest, verify_files

    src = read_manifest(args.from_bundle)
    graph_files = {k: v for k, v in src["files"].items() if k != "engine"}
    verify_files(args.from_bundle, {**src, "files": graph_files})
    for entry in graph_files.values():
        shutil.copy2(args.from_bundle / entry["name"], staging / entry["name"])
    manifest = {k: v for k, v in src.items() if k != "tensorrt"}
    manifest.update(backend=backend, files=graph_files)
    if args.batch_given:
        manifest["batch"] = args.batch
    if backend == "tensorrt":
        add_engine(args, staging, manifest)
    return manifest


def _summary(output: Path) -> None:
    bundle = load_bundle(output)
    for line in describe(bundle):
        print(line)
    for role, entry in bundle.manifest["files"].items():
        print(f"  {role}: {entry['name']} {entry['size'] / 1e6:.1f} MB sha256 {entry['sha256'][:12]}")
    checks = bundle.manifest.get("checks", {})
    passed = ["manifest and sha256 verified", "onnx.checker"]
    if "tensorrt_static_check" in checks:
        passed.append(f"TensorRT static check ({checks['tensorrt_static_check']})")
    if "parity_vs_pytorch" in checks:
        passed.append(f"parity vs PyTorch (min cosine {checks['parity_vs_pytorch']['min_cosine']:.6f})")
    print("  checks passed: " + ", ".join(passed))


if __name__ == "__main__":
    sys.exit(main())
