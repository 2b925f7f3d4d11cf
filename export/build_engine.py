"""Build an engine bundle: PyTorch model -> ONNX (fixed H x W, dynamic batch) -> precision in the
graph -> TensorRT engine, or an ONNX Runtime bundle where TensorRT is absent.

    python export/build_engine.py --model salad-dinov2-vitb14 --checkpoint dino_salad.ckpt \\
        --precision fp16 --batch 1:8:32 --output engines/salad-vitb14-fp16

    # on the target device (a Jetson, usually without torch): engine from an exported bundle
    python export/build_engine.py --from-bundle engines/salad-vitb14-fp16 --backend tensorrt

    # a CPU: the fastest faithful path for this machine's CPU (library and precision chosen)
    python export/build_engine.py --model salad-dinov2-vitb14 --checkpoint dino_salad.ckpt --target cpu

The bundle (engines/README.md) is written to a staging folder beside --output and swapped into
place when complete and checked: an interrupted or failed build leaves the previous bundle as it
was. An existing --output that is not a bundle is refused. The API is export.build.build_bundle.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

if __package__ in (None, ""):  # run as a script: python export/build_engine.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.build import BatchProfile, BuildConfig, CalibrationConfig, TensorRTConfig, build_bundle  # noqa: E402
from export.bundle_writer import summary_lines  # noqa: E402
from export.cpu_target import CPU_TARGETS  # noqa: E402
from export.registry import parse_image_size  # noqa: E402 (torch-free)
from export.trt_check import TARGETS  # noqa: E402
from runtime import units  # noqa: E402
from runtime.bundle import BACKENDS, PRECISIONS, load_bundle  # noqa: E402
from runtime.cli_util import ArgumentParser, add_verbose, configure_logs, run_cli  # noqa: E402


def _size(text: str) -> int:
    try:
        return units.parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python export/build_engine.py", description=__doc__,
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
                   help="input size, square N or HxW, e.g. 240x320 (default: the model's official one; "
                        "MegaLoc rounds each side to a multiple of 14 as its official code does)")
    p.add_argument("--precision", choices=[q for q in PRECISIONS if q != "bf16"], default=None,
                   help="fp32; fp16 (FP16 graph with FP32 LayerNorm/softmax/Sinkhorn/L2 islands; the default from "
                        "--model); int8 (Q/DQ graph calibrated on --calibration-images). --from-bundle keeps the "
                        "graph's precision")
    p.add_argument("--backend", choices=("auto",) + BACKENDS, default="auto",
                   help="auto: TensorRT when it imports and a GPU is present, else ONNX Runtime (CPU); "
                        "tensorrt-rtx: a TensorRT-RTX engine for RTX GPUs, built ahead of time (no GPU needed); "
                        "with a CPU --target: auto picks the fastest measured path, onnxruntime or openvino "
                        "(optional package) restricts it to that library")
    p.add_argument("--batch", default=None, metavar="MIN:OPT:MAX",
                   help="optimisation profile of the batch axis (default 1:8:32; --from-bundle: the bundle's)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17)")
    p.add_argument("--target", choices=TARGETS + CPU_TARGETS, default=None,
                   help="TensorRT generation the graph must suit (default: the installed one, else trt10; "
                        "trt8.5 (JetPack 5) decomposes LayerNorm), or a CPU: cpu (this machine's features) or "
                        "cpu-x86-avx2, cpu-x86-avx512, cpu-arm (another machine's); a CPU target picks the fastest "
                        "faithful library and precision for that CPU itself (no --precision)")
    p.add_argument("--workspace", type=_size, default=None, help="TensorRT workspace limit, e.g. 4GB")
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
                        "bundle) instead of the Q/DQ graph; with --from-bundle of an FP32 bundle, add --precision int8")
    p.add_argument("--split", action="store_true",
                   help="SALAD only: end the graph before the optimal transport; the runtime's numpy Sinkhorn "
                        "finishes the descriptor (keeps exp/log-sum-exp out of reduced-precision engines)")
    p.add_argument("--skip-parity", action="store_true", help="skip the ONNX Runtime vs PyTorch check on sample images")
    p.add_argument("--output", type=Path,
                   help="bundle folder (default engines/<model>-<precision>; --from-bundle: the source bundle). "
                        "An existing folder is replaced only if it is a bundle")
    p.add_argument("--depth", type=int, default=None, help=argparse.SUPPRESS)
    add_verbose(p)
    return p


def config_from_args(args: argparse.Namespace) -> BuildConfig:
    """The command line as a BuildConfig (the API's input)."""
    return BuildConfig(
        model=args.model, checkpoint=args.checkpoint, random_weights=args.random_weights,
        from_bundle=args.from_bundle, precision=args.precision, backend=args.backend,
        batch=BatchProfile.parse(args.batch) if args.batch else None, image_size=args.image_size,
        opset=args.opset, target=args.target, split=args.split, skip_parity=args.skip_parity, output=args.output,
        calibration=CalibrationConfig(images=tuple(args.calibration_images or ()), count=args.calibration_count,
                                      method=args.calibration_method, seed=args.calibration_seed,
                                      trt_calibrator=args.trt_calibrator),
        tensorrt=TensorRTConfig(workspace=args.workspace, timing_cache=args.timing_cache, opt_level=args.opt_level,
                                version_compatible=args.version_compatible,
                                hardware_compatible=args.hardware_compatible),
        depth=args.depth, verbose=args.verbose)


def main(argv: Optional[List[str]] = None) -> int:
    def body() -> int:
        args = build_parser().parse_args(argv)
        configure_logs(args.verbose)
        output = build_bundle(config_from_args(args))
        print("\n".join(summary_lines(load_bundle(output, check_engine=False))))
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
