"""INT8 Q/DQ layouts on the two backends: the layout ``calibration/quantize.py`` writes (ModelOpt's,
what TensorRT parses and fuses) against the one this project wrote before it (ONNX Runtime's
defaults: INT32 biases, every MatMul/Gemm/Conv input outside the FP32 islands, heads and all
attention products included). Per layout: ONNX Runtime CPU latency (batch 1, the same session
options as the runtime, layouts interleaved), the integer kernels ONNX Runtime runs, the min
cosine to the FP32 graph on real images, and whether the TensorRT-RTX parser and builder take it.

    python benchmarks/int8_layout.py [--models salad-dinov2-vitb14 cricavpr-dinov2-vitb14-independent]
                                     [--depth N] [--threads 2] [--iterations 10]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

from common import ROOT, save, table

sys.path.insert(0, str(ROOT))
from calibration.quantize import QUANTIZED_OPS, _Reader, _stride, integer_ops, quantize_onnx  # noqa: E402
from export.onnx_export import export_onnx  # noqa: E402
from export.precision import fp32_island_nodes  # noqa: E402
from export.trt_builder import TensorRTBuildError  # noqa: E402
from export.trt_rtx import parse_and_build  # noqa: E402
from export.zoo import create_model  # noqa: E402
from runtime.backends.ort_backend import session_options  # noqa: E402
from runtime.compare import row_cosine  # noqa: E402
from runtime.preprocess import list_images, preprocess_file  # noqa: E402

DATA = ROOT / "data"


def previous_layout(fp32: Path, out: Path, data: np.ndarray, islands) -> None:
    """The Q/DQ graph this project wrote before (for comparison only)."""
    quantize_static(str(fp32), str(out), _Reader(data, "images"), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                    op_types_to_quantize=QUANTIZED_OPS, nodes_to_exclude=list(islands),
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                   "CalibStridedMinMax": _stride(len(data)), "CalibTensorRangeSymmetric": True,
                                   "OpTypesToExcludeOutputQuantization": QUANTIZED_OPS})


def tensorrt_verdict(path: Path) -> str:
    try:
        facts = parse_and_build(path, {"min": 1, "opt": 8, "max": 32}, "int8")
    except TensorRTBuildError as exc:
        return "refused: " + str(exc).split("refused ", 1)[-1][:120]
    return f"builds ({facts['engine_bytes'] / 1e6:.0f} MB)"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["salad-dinov2-vitb14", "cricavpr-dinov2-vitb14-independent"])
    p.add_argument("--depth", type=int, default=None, help="reduced depth (default: the full model)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--calibration-count", type=int, default=32)
    args = p.parse_args()
    files = sorted(list_images(DATA / "vprbench_corridor" / "database") + list_images(DATA / "nordland_summer_winter_64x32" / "database"))
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model, cfg, _ = create_model(name, random_weights=True, depth=args.depth)
            fp32 = export_onnx(model, cfg.image_size, ["descriptor"], Path(tmp) / "fp32.onnx")
            islands = fp32_island_nodes(onnx.load(str(fp32), load_external_data=False))
            x = np.stack([preprocess_file(f, cfg.preprocessing) for f in files[::max(1, len(files) // (args.calibration_count + 8))]])
            calib, test = x[:args.calibration_count], x[args.calibration_count:][:8]
            paths = {"FP32": fp32, "INT8 previous layout": Path(tmp) / "prev.onnx", "INT8 TensorRT layout": Path(tmp) / "trt.onnx"}
            previous_layout(fp32, paths["INT8 previous layout"], calib, islands)
            quantize_onnx(fp32, paths["INT8 TensorRT layout"], calib, "entropy", exclude=islands)
            sessions = {k: ort.InferenceSession(str(v), session_options(args.threads), providers=["CPUExecutionProvider"])
                        for k, v in paths.items()}
            ref = sessions["FP32"].run(["descriptor"], {"images": test})[0]
            times = {k: [] for k in paths}
            for s in sessions.values():
                s.run(["descriptor"], {"images": test[:1]})  # warm-up
            for _ in range(args.iterations):  # interleaved: the machine's load hits every layout alike
                for k, s in sessions.items():
                    t = time.perf_counter()
                    s.run(["descriptor"], {"images": test[:1]})
                    times[k].append((time.perf_counter() - t) * 1000)
            base = float(np.median(times["FP32"]))
            for k, path in paths.items():
                out = sessions[k].run(["descriptor"], {"images": test})[0]
                r = {"model": name, "depth": args.depth or "full", "graph": k, "ms_per_image": float(np.median(times[k])),
                     "speedup_vs_fp32": base / float(np.median(times[k])), "min_cosine_to_fp32": float(row_cosine(ref, out).min()),
                     "integer_kernels": sum(integer_ops(path).values()) if k != "FP32" else 0,
                     "tensorrt_rtx": tensorrt_verdict(path) if k != "FP32" else "-"}
                results.append(r)
                rows.append([name, k, r["ms_per_image"], r["speedup_vs_fp32"], f"{r['min_cosine_to_fp32']:.5f}",
                             r["integer_kernels"], r["tensorrt_rtx"]])
                print(rows[-1], file=sys.stderr, flush=True)
    print(table(["model", "graph", "ONNX Runtime ms/img", "x FP32", "min cosine to FP32", "integer kernels",
                 "TensorRT-RTX (batch 1:8:32)"], rows))
    print(f"wrote {save('int8_layout', {'threads': args.threads, 'results': results})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
