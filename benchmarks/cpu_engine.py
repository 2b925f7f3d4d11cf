"""The CPU engine against PyTorch's best CPU mode, and every path against this CPU's roof.

Engines (same random weights, same real image, same threads, batch 1), timed interleaved in one
run (each in its own process, one inference each in turn: benchmarks/interleave.py):
  pytorch-fp32            PyTorch eager FP32
  pytorch-bf16-autocast   PyTorch with CPU bf16 autocast (where the CPU has bf16 arithmetic)
  ort-fp32                the ONNX Runtime FP32 bundle (--backend onnxruntime --precision fp32)
  ort-int8-dynamic        attempt: dynamic U8S8 INT8 of the FP32 graph, attention left unfused
  cpu-bundle              what --target cpu builds (the path it picks for this CPU)
  openvino-fp32           attempt: OpenVINO on the FP32 graph, FP32 inference precision
  openvino-bf16           --target cpu --backend openvino (bf16 where the CPU has it)

Roofline: the peak derived from the CPU's features (vector width, FMA, bf16 and INT8 dot products)
and its measured clock, the same instructions' measured throughput (benchmarks/native/peak.c,
needs gcc), and GEMM roofs of each library's best kernel on the model's own MLP shape (530
tokens x 768 x 3072 for ViT-B at 322²). Each path's fraction: its achieved rate over the floor
time its own kernels set for the model's FLOPs (INT8 MatMuls at the INT8 roof, the rest at FP32).

    python benchmarks/cpu_engine.py --model salad-dinov2-vitb14 [--rounds 10] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import ROOT, save, table
from interleave import interleaved
from runtime.cli_util import ArgumentParser, run_cli  # noqa: E402

IMAGES = ROOT / "data" / "vprbench_corridor" / "queries"
FEATURES = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16",
            "amx_int8", "asimd", "asimddp", "i8mm", "bf16", "sve")


def build(config_kw: dict, out: Path) -> Path:
    from export.build import BatchProfile, BuildConfig, build_bundle
    return build_bundle(BuildConfig(batch=BatchProfile(1, 1, 8), skip_parity=True, output=out, **config_kw))


def derived_peak(cpu, ghz: float, cores: int) -> dict:
    """GFLOP/s from the features: 2 FMA pipes per core (an assumption: true of recent x86 server
    cores; Zen 4 splits a 512-bit FMA in two, so its 512-bit rate equals its 256-bit one), FP32
    lanes from the vector width; a bf16 dot product doubles and a VNNI INT8 dot product
    quadruples the FP32 multiply-adds per instruction; AMX tiles: 1024 bf16 / 2048 INT8
    multiply-adds per cycle."""
    lanes = 16 if cpu.has("avx512f") else 8 if cpu.has("avx2") else 4
    fp32 = 2 * 2 * lanes * ghz * cores
    peak = {"fp32": fp32, "assumed_fma_pipes": 2, "lanes": lanes}
    if cpu.has("amx_bf16"):
        peak["bf16"] = 2 * 1024 * ghz * cores
    elif cpu.has("avx512_bf16"):
        peak["bf16"] = 2 * fp32
    if cpu.has("amx_int8"):
        peak["int8"] = 2 * 2048 * ghz * cores
    elif cpu.has("avx512_vnni") or cpu.has("avx_vnni"):
        peak["int8"] = 4 * fp32
    else:
        peak["int8"] = 2 * fp32  # vpmaddubsw + vpmaddwd: twice the FP32 rate
    return peak


def measured_peak(threads: int, tmp: Path) -> dict:
    if shutil.which("gcc") is None:
        return {"note": "gcc not found: instruction throughput not measured"}
    exe = tmp / "peak"
    proc = subprocess.run(["gcc", "-O3", "-march=native", "-fopenmp", "-include", "stdlib.h", "-o", str(exe),
                           str(ROOT / "benchmarks" / "native" / "peak.c")], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"note": f"peak.c did not compile: {proc.stderr.strip()[-300:]}"}
    runs = [json.loads(subprocess.run([str(exe), str(threads)], capture_output=True, text=True, check=True).stdout)
            for _ in range(3)]
    return {k: max(r[k] for r in runs) for k in runs[0]}  # the best of 3: other users only slow it down


GEMM = r"""
import json, sys, time, numpy as np
sys.path.insert(0, {root!r})
kind, m, k, n, threads = {kind!r}, {m}, {k}, {n}, {threads}
rng = np.random.default_rng(0)
a = rng.standard_normal((m, k)).astype(np.float32); w = rng.standard_normal((k, n)).astype(np.float32) * 0.05
if kind.startswith("torch"):
    import torch
    torch.set_num_threads(threads)
    ta, tw = torch.from_numpy(a), torch.from_numpy(np.ascontiguousarray(w.T))
    def run():  # what the model's Linear layers execute, under autocast for bf16
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=kind == "torch-bf16"):
            return torch.nn.functional.linear(ta, tw)
else:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k]); y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]); model.ir_version = 8
    path = {tmp!r} + f"/gemm-{{kind}}.onnx"; onnx.save(model, path)
    if kind == "ort-int8":
        from export.cpu_graph import quantize_dynamic_u8s8
        quantize_dynamic_u8s8(path, path + ".q.onnx", scope=""); path += ".q.onnx"
    if kind.startswith("ort"):
        import onnxruntime as ort
        from runtime.backends.ort_backend import session_options
        s = ort.InferenceSession(path, session_options(threads), providers=["CPUExecutionProvider"])
        run = lambda: s.run(None, {{"x": a}})
    else:
        from runtime.backends.openvino_backend import compile_graph
        c = compile_graph(path, threads, {{"inference_precision": kind.split("-")[1]}}); r = c.create_infer_request()
        run = lambda: r.infer({{0: a}})
for _ in range(3): run()
times = []
for _ in range(20):
    t = time.perf_counter(); run(); times.append(time.perf_counter() - t)
print(json.dumps({{"gflops": 2.0 * m * k * n / float(np.min(times)) / 1e9}}))
"""


def gemm_roofs(kinds, shape, threads: int, tmp: Path) -> dict:
    from common import run_python
    m, k, n = shape
    out = {}
    for kind in kinds:
        try:
            out[kind] = run_python(GEMM.format(root=str(ROOT), kind=kind, m=m, k=k, n=n, threads=threads, tmp=str(tmp)))["gflops"]
        except RuntimeError as exc:  # a library that is absent is reported, not fatal
            out[kind] = None
            print(f"GEMM roof {kind}: skipped ({str(exc).strip().splitlines()[-1]})", file=sys.stderr)
    return out


def split_flops(fp32_onnx: Path) -> dict:
    """Per image: FLOPs of the backbone's constant-weight MatMuls (INT8 on the INT8 paths) and the
    rest (attention products, patch embedding, head: FP32)."""
    import onnx

    from roofline import count_flops
    model = onnx.load(str(fp32_onnx), load_external_data=False)
    weights = {i.name for i in model.graph.initializer}
    int8 = {n.name for n in model.graph.node
            if n.op_type == "MatMul" and "/backbone/" in n.name and n.input[1] in weights}
    total = count_flops(fp32_onnx)
    quantized = count_flops(fp32_onnx, where=lambda node: node.name in int8)
    return {"total": total, "int8_matmuls": quantized, "other": total - quantized}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))).min())


def main() -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="salad-dinov2-vitb14")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--depth", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--workdir", type=Path, default=None, help="keep the built bundles here (reused when present)")
    p.add_argument("--engines", default=None, help="comma-separated subset of the engines above (default: all)")
    p.add_argument("--no-roofline", action="store_true")
    args = p.parse_args()
    from export.cpu_target import BF16, openvino_available
    from export.registry import get_config
    from runtime.cpu_features import this_cpu
    from runtime.preprocess import list_images, preprocess_file

    cpu = this_cpu()
    print(f"CPU: {cpu.model}, {cpu.arch}, {cpu.cores} cores; features: "
          f"{' '.join(f for f in FEATURES if f in cpu.flags) or 'none of interest'}; load {os.getloadavg()}")
    cfg = get_config(args.model, image_size=args.image_size, depth=args.depth)
    bf16 = cpu.has(BF16[1]) or cpu.has(BF16[0])
    ov = openvino_available()
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        work = args.workdir or tmp
        work.mkdir(parents=True, exist_ok=True)
        common = {"model": args.model, "random_weights": True, "image_size": args.image_size, "depth": args.depth}
        bundles = {}
        for name, kw in [("fp32", {"precision": "fp32", "backend": "onnxruntime"}), ("cpu", {"target": "cpu"})] + \
                ([("openvino", {"target": "cpu", "backend": "openvino"})] if ov else []):
            out = work / f"{cfg.name}-{name}"
            if not (out / "manifest.json").is_file():
                t = time.time()
                build({**common, **kw}, out)
                print(f"built {name} bundle in {time.time() - t:.0f} s", file=sys.stderr)
            bundles[name] = out
        from runtime.bundle import load_bundle
        fp32 = load_bundle(bundles["fp32"])
        cpu_bundle = load_bundle(bundles["cpu"])
        unfused = work / f"{cfg.name}-int8-unfused.onnx"
        if not unfused.is_file():
            from export.cpu_graph import quantize_dynamic_u8s8
            quantize_dynamic_u8s8(fp32.file("onnx"), unfused, exclude=fp32.manifest["export"]["fp32_nodes"])
        specs = {"pytorch-fp32": {"kind": "torch", "model": args.model, "image_size": args.image_size, "depth": args.depth}}
        if bf16:
            specs["pytorch-bf16-autocast"] = {**specs["pytorch-fp32"], "bf16": True}
        specs["ort-fp32"] = {"kind": "bundle", "path": str(bundles["fp32"])}
        specs["ort-int8-dynamic"] = {"kind": "ort", "path": str(unfused)}
        specs["cpu-bundle"] = {"kind": "bundle", "path": str(bundles["cpu"])}
        if ov:
            specs["openvino-fp32"] = {"kind": "openvino", "path": str(fp32.file("onnx")), "hint": "f32"}
            specs["openvino-bf16"] = {"kind": "bundle", "path": str(bundles["openvino"])}
        if args.engines:
            keep = set(args.engines.split(",")) | {"pytorch-fp32"}  # the reference of every cosine
            specs = {k: v for k, v in specs.items() if k in keep}
        x = np.stack([preprocess_file(f, fp32.preprocessing) for f in list_images(IMAGES)[:1]])
        load_before = os.getloadavg()
        results = interleaved(specs, x, args.threads, args.rounds, tmp)
        load_after = os.getloadavg()
        ref = np.load(tmp / "pytorch-fp32.npy")
        best_torch = "pytorch-bf16-autocast" if "pytorch-bf16-autocast" in results else "pytorch-fp32"
        for name, r in results.items():
            r["cosine_to_pytorch_fp32"] = cosine(np.load(tmp / f"{name}.npy"), ref)
            r["x_pytorch_fp32"] = results["pytorch-fp32"]["median_s"] / r["median_s"]
            r["x_best_pytorch"] = results[best_torch]["median_s"] / r["median_s"]
        roof = {}
        if not args.no_roofline:
            flops = split_flops(fp32.file("onnx"))
            peak_measured = measured_peak(args.threads, tmp)
            ghz = peak_measured.get("clock_ghz") or (cpu.mhz or 0.0) / 1000
            peak = derived_peak(cpu, ghz, args.threads)
            shape = (cfg.grid[0] * cfg.grid[1] + 1, cfg.embed_dim, 4 * cfg.embed_dim)
            kinds = ["torch-fp32", "ort-fp32", "ort-int8"] + (["torch-bf16"] if bf16 else []) + \
                (["ov-f32"] + (["ov-bf16"] if bf16 else []) if ov else [])
            roofs = gemm_roofs(kinds, shape, args.threads, tmp)
            uses = {"pytorch-fp32": ("torch-fp32", None), "pytorch-bf16-autocast": ("torch-bf16", None),
                    "ort-fp32": ("ort-fp32", None), "ort-int8-dynamic": ("ort-fp32", "ort-int8"),
                    "cpu-bundle": ("ort-fp32", "ort-int8") if cpu_bundle.precision == "int8" else ("ort-fp32", None),
                    "openvino-fp32": ("ov-f32", None), "openvino-bf16": ("ov-bf16" if bf16 else "ov-f32", None)}
            for name, r in results.items():
                rest, int8 = uses.get(name, (None, None))
                if roofs.get(rest) is None or (int8 and roofs.get(int8) is None):
                    continue
                floor = (flops["other"] / (roofs[rest] * 1e9) + flops["int8_matmuls"] / (roofs[int8] * 1e9)) if int8 \
                    else flops["total"] / (roofs[rest] * 1e9)
                r["roof"] = f"{int8} + {rest}" if int8 else rest
                r["floor_ms"] = 1000 * floor
                r["fraction_of_roof"] = floor / r["median_s"]
                r["achieved_gflops"] = flops["total"] / r["median_s"] / 1e9
            roof = {"flops_per_image": flops, "derived_peak_gflops": peak, "measured_peak": peak_measured,
                    "gemm_shape": shape, "gemm_roofs_gflops": roofs}
    rows = [[n, f"{r['median_s'] * 1000:.0f}", f"{r['min_s'] * 1000:.0f}", f"{r['x_pytorch_fp32']:.2f}",
             f"{r['x_best_pytorch']:.2f}", f"{r['cosine_to_pytorch_fp32']:.6f}",
             f"{r['achieved_gflops']:.0f}" if "achieved_gflops" in r else "", r.get("roof", ""),
             f"{r['fraction_of_roof']:.2f}" if "fraction_of_roof" in r else ""]
            for n, r in results.items()]
    print(f"{cfg.name} at {cfg.image_size[0]}², batch 1, {args.threads} threads, random weights, one real image, "
          f"median of {args.rounds} interleaved rounds; load {load_before[0]:.1f} -> {load_after[0]:.1f}")
    print(f"cpu-bundle path: {cpu_bundle.manifest['cpu']['path']} ({cpu_bundle.precision} on {cpu_bundle.backend})")
    print(table(["engine", "ms (median)", "ms (min)", "x PyTorch FP32", f"x {best_torch}", "cosine to PyTorch FP32",
                 "achieved GFLOP/s", "roof (kernels)", "fraction of roof"], rows))
    if roof:
        print(f"FLOPs per image: {roof['flops_per_image']['total'] / 1e9:.1f} G "
              f"({roof['flops_per_image']['int8_matmuls'] / 1e9:.1f} G in the MatMuls the INT8 path quantizes)")
        print("peak from features x clock (GFLOP/s):", {k: round(v, 1) if isinstance(v, float) else v
                                                        for k, v in roof["derived_peak_gflops"].items()})
        print("measured instruction throughput:", roof["measured_peak"])
        print(f"GEMM roofs on {roof['gemm_shape']} (GFLOP/s):", {k: round(v, 1) if v else v
                                                               for k, v in roof["gemm_roofs_gflops"].items()})
    print("wrote", save(f"cpu-engine-{cfg.name}-t{args.threads}", {"args": {k: str(v) for k, v in vars(args).items()},
                                                  "cpu": {"model": cpu.model, "arch": cpu.arch,
                                                          "features": sorted(f for f in FEATURES if f in cpu.flags)},
                                                  "load": {"before": load_before, "after": load_after},
                                                  "results": results, "roofline": roof}))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
