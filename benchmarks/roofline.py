"""Roofline: the model's FLOPs counted from its ONNX graph x images/s, over this machine's dense
GEMM rate measured in the same run at the same precision (one large MatMul on ONNX Runtime, FP32,
and INT8 through a Q/DQ MatMul): the fraction of the limit each bundle reaches.

    python benchmarks/roofline.py --bundle engines/x-fp32 [--bundle engines/x-int8] [--threads 2]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from common import save, table
from runtime.cli_util import ArgumentParser, run_cli  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from runtime.backends import open_backend  # noqa: E402
from runtime.backends.ort_backend import session_options  # noqa: E402
from runtime.bundle import load_bundle  # noqa: E402


def count_flops(path: Path, where: Optional[Callable[[onnx.NodeProto], bool]] = None) -> float:
    """Multiply-adds x 2 of MatMul / Gemm / Conv / ConvTranspose for one image (of the nodes
    ``where`` accepts)."""
    model = onnx.load(str(path))
    for v in list(model.graph.input) + list(model.graph.output):
        for d in v.type.tensor_type.shape.dim:
            if d.dim_param:
                d.dim_value = 1
    del model.graph.value_info[:]  # re-infer every shape at batch 1, through the Shape/Reshape arithmetic
    model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes = {}
    for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        shapes[v.name] = [d.dim_value for d in v.type.tensor_type.shape.dim]
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    flops = 0.0
    for n in model.graph.node:
        if where is not None and not where(n):
            continue
        out = shapes.get(n.output[0])
        if not out or any(d == 0 for d in out):
            continue
        if n.op_type in ("MatMul", "Gemm"):
            a = shapes.get(n.input[0])
            if not a:
                continue
            trans_a = any(x.name == "transA" and x.i for x in n.attribute)
            k = a[-2] if trans_a else a[-1]
            flops += 2.0 * float(np.prod(out)) * k
        elif n.op_type == "Conv":
            w = shapes.get(n.input[1])
            if w:
                flops += 2.0 * float(np.prod(out)) * float(np.prod(w[1:]))
        elif n.op_type == "ConvTranspose":
            w, x = shapes.get(n.input[1]), shapes.get(n.input[0])
            if w and x:
                flops += 2.0 * float(np.prod(x)) * float(np.prod(w[1:]))
    return flops


def gemm_rate(precision: str, threads: int, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of an n x n x n MatMul on ONNX Runtime at this precision."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((n, n)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, n])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])
    if precision == "int8":
        s = helper.make_tensor("s", TensorProto.FLOAT, [], [0.05])
        z = helper.make_tensor("z", TensorProto.INT8, [], [0])
        wq = numpy_helper.from_array(np.clip(np.round(w / 0.05), -127, 127).astype(np.int8), "wq")
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
                 helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
                 helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["wd"]),
                 helper.make_node("MatMul", ["xd", "wd"], ["y"])]
        inits = [s, z, wq]
    else:
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
        inits = [numpy_helper.from_array(w, "w")]
    model = helper.make_model(helper.make_graph(nodes, "gemm", [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gemm.onnx"
        onnx.save(model, str(path))
        sess = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
        a = rng.standard_normal((n, n)).astype(np.float32)
        sess.run(None, {"x": a})
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            sess.run(None, {"x": a})
            times.append(time.perf_counter() - t)
    return 2.0 * n ** 3 / float(np.median(times))


def images_per_s(bundle_path: Path, threads: int, iterations: int = 8) -> float:
    b = load_bundle(bundle_path)
    backend = open_backend(b, threads=threads)
    x = np.random.default_rng(0).standard_normal((1, 3, *b.preprocessing.size)).astype(np.float32)
    backend.run(x)
    times = []
    for _ in range(iterations):
        t = time.perf_counter()
        backend.run(x)
        times.append(time.perf_counter() - t)
    return 1.0 / float(np.median(times))


def main() -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, action="append", required=True)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    rates = {prec: gemm_rate(prec, args.threads) for prec in ("fp32", "int8")}
    rows, results = [], []
    for path in args.bundle:
        b = load_bundle(path)
        flops = count_flops(b.file("onnx"))
        ips = images_per_s(path, args.threads)
        roof = rates["int8" if b.precision == "int8" else "fp32"]
        frac = flops * ips / roof
        results.append({"bundle": str(path), "model": b.manifest["model"]["name"], "precision": b.precision,
                        "gflops_per_image": flops / 1e9, "images_per_s": ips, "achieved_gflops": flops * ips / 1e9,
                        "gemm_roof_gflops": roof / 1e9, "fraction_of_roof": frac,
                        "floor_ms_per_image": 1000.0 * flops / roof})
        rows.append([b.manifest["model"]["name"], b.precision, flops / 1e9, ips, flops * ips / 1e9, roof / 1e9, frac,
                     1000.0 * flops / roof])
    print(f"GEMM roof on this machine ({args.threads} threads, ONNX Runtime 2048^3 MatMul): "
          f"FP32 {rates['fp32'] / 1e9:.0f} GFLOP/s, INT8 {rates['int8'] / 1e9:.0f} GOP/s")
    print(table(["model", "precision", "GFLOP/img", "img/s", "achieved GFLOP/s", "roof GFLOP/s", "fraction",
                 "floor ms/img"], rows))
    print("wrote", save("roofline", {"gemm_rates": rates, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
