"""Encoder benchmark: ONNX Runtime bundles (FP32, INT8, ...) against the PyTorch eager model
(FP32, and bf16 autocast where the CPU supports it), same weights, same threads, same real
images, each timed in its own process, in one run. Prints images/s and the ratio to PyTorch FP32.

    python benchmarks/encoder.py --model salad-dinov2-vitb14 [--checkpoint C] [--threads 2]
        [--batch 1] [--iterations 10] [--int8-calibration-count 64]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, run_python, save, table
from export.registry import parse_image_size  # noqa: E402
from runtime.cli_util import ArgumentParser, run_cli  # noqa: E402

IMAGES = ROOT / "data" / "vprbench_corridor" / "queries"

TORCH = r"""
import json, sys, time, numpy as np, torch
sys.path.insert(0, {root!r})
torch.set_num_threads({threads})
from export.zoo import create_model
from runtime.preprocess import list_images, preprocess_file
model, cfg, _ = create_model({model!r}, checkpoint={checkpoint!r}, random_weights={random!r}, image_size={size!r})
files = list_images({images!r})[:{batch}]
x = torch.from_numpy(np.stack([preprocess_file(f, cfg.preprocessing) for f in files]))
cuda = {cuda!r}
if cuda:
    model, x = model.cuda(), x.cuda()
def run():
    with torch.inference_mode():
        if cuda:  # the authors' own reference: CUDA FP16 autocast
            with torch.autocast("cuda", dtype=torch.float16):
                out = model(x)["descriptor"].float()
            torch.cuda.synchronize()
            return out.cpu()
        if {bf16!r}:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return model(x)["descriptor"].float()
        return model(x)["descriptor"]
for _ in range({warmup}): run()
times = []
for _ in range({iterations}):
    t = time.perf_counter(); out = run(); times.append(time.perf_counter() - t)
np.save({out!r}, out.numpy())
print(json.dumps({{"median_s": float(np.median(times)), "p90_s": float(np.percentile(times, 90))}}))
"""

ORT = r"""
import json, sys, time, numpy as np
sys.path.insert(0, {root!r})
from runtime.backends import open_backend
from runtime.bundle import load_bundle
from runtime.preprocess import list_images, preprocess_file
b = load_bundle({bundle!r})
backend = open_backend(b, threads={threads})
files = list_images({images!r})[:{batch}]
x = np.stack([preprocess_file(f, b.preprocessing) for f in files])
for _ in range({warmup}): backend.run(x)
times = []
for _ in range({iterations}):
    t = time.perf_counter(); out = backend.run(x); times.append(time.perf_counter() - t)
np.save({out!r}, out["descriptor"])
print(json.dumps({{"median_s": float(np.median(times)), "p90_s": float(np.percentile(times, 90)), "providers": getattr(backend, "providers", backend.name)}}))
"""


def cuda_available() -> bool:
    from runtime.trt_env import gpu_info
    return gpu_info() is not None


def tensorrt_usable() -> bool:
    from runtime.trt_env import tensorrt_usable as usable
    return usable()


def bf16_supported() -> bool:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


def build(model: str, weights: list, precision: str, out: Path, extra: list) -> None:
    cmd = [sys.executable, str(ROOT / "export" / "build_engine.py"), "--model", model, *weights,
           "--precision", precision, "--backend", "onnxruntime", "--batch", "1:8:16", "--skip-parity",
           "--output", str(out), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])


def main() -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="salad-dinov2-vitb14")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--image-size", type=parse_image_size, default=None, metavar="N|HxW")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--precisions", default="fp32,int8", help="bundle precisions to build and time")
    p.add_argument("--int8-calibration-count", type=int, default=64)
    p.add_argument("--int8-method", default="minmax")
    args = p.parse_args()
    weights = ["--checkpoint", args.checkpoint] if args.checkpoint else ["--random-weights"]
    size = ["--image-size", "x".join(map(str, args.image_size))] if args.image_size else []
    rows, results = [], {}
    common = dict(root=str(ROOT), threads=args.threads, images=str(IMAGES), batch=args.batch,
                  warmup=args.warmup, iterations=args.iterations)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch_cfgs = [("pytorch-fp32", False, False)] + ([("pytorch-bf16-autocast", True, False)] if bf16_supported() else [])
        if cuda_available():
            torch_cfgs.append(("pytorch-cuda-fp16-autocast", False, True))
        for label, bf16, cuda in torch_cfgs:
            results[label] = run_python(TORCH.format(model=args.model, checkpoint=args.checkpoint,
                                                     random=not args.checkpoint, size=args.image_size, bf16=bf16,
                                                     cuda=cuda, out=str(tmp / f"{label}.npy"), **common))
        for prec in args.precisions.split(","):
            extra = list(size)
            if prec == "int8":
                extra += ["--calibration-images", str(ROOT / "data" / "vprbench_corridor" / "database"),
                          str(ROOT / "data" / "nordland_summer_winter_64x32" / "database"),
                          "--calibration-count", str(args.int8_calibration_count),
                          "--calibration-method", args.int8_method]
            build(args.model, weights, prec, tmp / prec, extra)
            results[f"onnxruntime-{prec}"] = run_python(ORT.format(bundle=str(tmp / prec), out=str(tmp / f"ort-{prec}.npy"),
                                                                   **common))
            if tensorrt_usable():  # on a GPU machine: the same bundle as a TensorRT engine
                trt_dir = tmp / f"trt-{prec}"
                subprocess.run([sys.executable, str(ROOT / "export" / "build_engine.py"), "--from-bundle", str(tmp / prec),
                                "--backend", "tensorrt", "--output", str(trt_dir)], cwd=ROOT, check=True,
                               capture_output=True)
                results[f"tensorrt-{prec}"] = run_python(ORT.format(bundle=str(trt_dir), out=str(tmp / f"ort-trt{prec}.npy"),
                                                                    **common))
        import numpy as np
        ref = np.load(tmp / "pytorch-fp32.npy")
        base = results["pytorch-fp32"]["median_s"]
        for label, r in results.items():
            if label.startswith("pytorch"):
                out = np.load(tmp / f"{label}.npy")
            elif label.startswith("tensorrt"):
                out = np.load(tmp / f"ort-trt{label.split('-')[1]}.npy")
            else:
                out = np.load(tmp / f"ort-{label.split('-')[1]}.npy")
            cos = float(((out * ref).sum(-1) / (np.linalg.norm(out, axis=-1) * np.linalg.norm(ref, axis=-1))).min())
            r.update(images_per_s=args.batch / r["median_s"], ratio_to_pytorch_fp32=base / r["median_s"], min_cosine_to_fp32=cos)
            rows.append([label, args.batch, r["median_s"] * 1000 / args.batch, r["images_per_s"], r["ratio_to_pytorch_fp32"], cos])
    print(f"{args.model} ({'checkpoint' if args.checkpoint else 'random weights'}), {args.threads} threads, batch {args.batch}, "
          f"real images from {IMAGES.relative_to(ROOT)}, median of {args.iterations}")
    print(table(["engine", "batch", "ms/img", "images/s", "x PyTorch FP32", "min cosine to PyTorch FP32"], rows))
    print("wrote", save(f"encoder-{args.model}-b{args.batch}", {"args": vars(args), "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
