"""CPU engine attempts for one FP32 bundle: each variant timed in its own process, same images,
same threads, batch 1; cosine to the FP32 bundle. Variants that need a missing package are
skipped with a note.

    python benchmarks/cpu_attempts.py --bundle engines/salad-fp32 [--threads 2] [--calibration-count 64]

Variants:
  ort-fp32              the bundle as built
  ort-fp32-fused        onnxruntime.transformers graph fusions (attention, LayerNorm, GELU)
  ort-int8-s8s8         the Q/DQ graph vpr-edge builds (symmetric int8 activations: TensorRT's format)
  ort-int8-u8s8         asymmetric uint8 activations, int8 weights (the x86 integer GEMM's native format)
  openvino-fp32         OpenVINO CPU plugin on the FP32 graph
  openvino-int8         OpenVINO CPU plugin on the S8S8 Q/DQ graph
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from common import ROOT, run_python, save, table
from runtime.cli_util import ArgumentParser, run_cli  # noqa: E402

sys.path.insert(0, str(ROOT))

IMAGES = ROOT / "data" / "vprbench_corridor" / "queries"

TIMER = r"""
import json, sys, time, numpy as np
sys.path.insert(0, {root!r})
from runtime.bundle import load_bundle
from runtime.preprocess import list_images, preprocess_file
pre = load_bundle({bundle!r}).preprocessing
x = np.stack([preprocess_file(f, pre) for f in list_images({images!r})[:1]])
kind, path, threads = {kind!r}, {path!r}, {threads}
if kind == "ort":
    import onnxruntime as ort
    from runtime.backends.ort_backend import session_options
    s = ort.InferenceSession(path, session_options(threads), providers=["CPUExecutionProvider"])
    run = lambda: s.run(["descriptor"], {{"images": x}})[0]
else:
    import openvino as ov
    core = ov.Core()
    m = core.compile_model(path, "CPU", {{"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}})
    req = m.create_infer_request()
    run = lambda: req.infer({{0: x}})[m.output("descriptor")]
for _ in range(2): run()
times = []
for _ in range({iterations}):
    t = time.perf_counter(); out = run(); times.append(time.perf_counter() - t)
np.save({out!r}, np.asarray(out))
print(json.dumps({{"median_s": float(np.median(times))}}))
"""


def main() -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iterations", type=int, default=8)
    p.add_argument("--calibration-count", type=int, default=64)
    args = p.parse_args()
    import numpy as np
    import onnx
    from onnxruntime.quantization import QuantType, quantize_static

    from calibration.dataset import calibration_set
    from calibration.quantize import QUANTIZED_OPS, _Reader, _stride, quantize_onnx
    from runtime.bundle import load_bundle

    bundle = load_bundle(args.bundle)
    fp32 = bundle.file("onnx")
    islands = bundle.manifest["export"]["fp32_nodes"]
    cfg = bundle.manifest["model"]
    data = calibration_set([ROOT / "data" / "vprbench_corridor" / "database",
                            ROOT / "data" / "nordland_summer_winter_64x32" / "database"],
                           bundle.preprocessing, args.calibration_count)
    variants, notes = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        variants["ort-fp32"] = ("ort", fp32)
        try:
            from onnxruntime.transformers.optimizer import optimize_model
            heads = {"vits14": 6, "vitb14": 12, "vitl14": 16, "vitg14": 24}[cfg["arch"]]
            hidden = {"vits14": 384, "vitb14": 768, "vitl14": 1024, "vitg14": 1536}[cfg["arch"]]
            opt = optimize_model(str(fp32), model_type="vit", num_heads=heads, hidden_size=hidden, opt_level=1)
            opt.save_model_to_file(str(tmp / "fused.onnx"))
            notes["ort-fp32-fused"] = str({k: v for k, v in opt.get_fused_operator_statistics().items() if v})
            variants["ort-fp32-fused"] = ("ort", tmp / "fused.onnx")
        except Exception as exc:  # noqa: BLE001 - an attempt that does not apply is reported
            notes["ort-fp32-fused"] = f"skipped: {exc}"
        quantize_onnx(fp32, tmp / "s8s8.onnx", data, "minmax", exclude=islands)
        variants["ort-int8-s8s8"] = ("ort", tmp / "s8s8.onnx")
        input_name = onnx.load(str(fp32), load_external_data=False).graph.input[0].name
        quantize_static(str(fp32), str(tmp / "u8s8.onnx"), _Reader(data, input_name), activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=QUANTIZED_OPS,
                        nodes_to_exclude=islands, extra_options={"WeightSymmetric": True, "CalibStridedMinMax": _stride(len(data)),
                                                                 "OpTypesToExcludeOutputQuantization": QUANTIZED_OPS})
        variants["ort-int8-u8s8"] = ("ort", tmp / "u8s8.onnx")
        try:
            import openvino  # noqa: F401
            variants["openvino-fp32"] = ("ov", fp32)
            variants["openvino-int8"] = ("ov", tmp / "s8s8.onnx")
        except ImportError:
            notes["openvino"] = "skipped: openvino is not installed (pip install openvino)"
        results = {}
        for name, (kind, path) in variants.items():
            results[name] = run_python(TIMER.format(root=str(ROOT), bundle=str(args.bundle), images=str(IMAGES), kind=kind,
                                                    path=str(path), threads=args.threads, iterations=args.iterations,
                                                    out=str(tmp / f"{name}.npy")))
        ref = np.load(tmp / "ort-fp32.npy")
        base = results["ort-fp32"]["median_s"]
        rows = []
        for name, r in results.items():
            out = np.load(tmp / f"{name}.npy")
            r["cosine_to_fp32"] = float(((out * ref).sum() / (np.linalg.norm(out) * np.linalg.norm(ref))))
            r["speedup_vs_ort_fp32"] = base / r["median_s"]
            rows.append([name, r["median_s"] * 1000, r["speedup_vs_ort_fp32"], r["cosine_to_fp32"], notes.get(name, "")])
    print(f"{cfg['name']} at {bundle.preprocessing.size[0]}², batch 1, {args.threads} threads, real image")
    print(table(["variant", "ms/img", "× ORT FP32", "cosine to FP32", "note"], rows))
    for k, v in notes.items():
        if k not in results:
            print(f"{k}: {v}")
    print("wrote", save(f"cpu-attempts-{cfg['name']}", {"args": {k: str(v) for k, v in vars(args).items()},
                                                       "results": results, "notes": notes}))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
