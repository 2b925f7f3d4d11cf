"""GPU check: FP32 and FP16 TensorRT engines of registry models, run through the runtime and
compared with ONNX Runtime and the PyTorch reference on real sample images. Prints a table and
writes JSON. Needs TensorRT, an NVIDIA GPU and the export extra (torch).

    python scripts/gpu_check.py [--models NAME ...] [--batch 2] [--output out/gpu_check.json]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runtime.backends import open_backend  # noqa: E402
from runtime.bundle import load_bundle  # noqa: E402
from runtime.compare import row_cosine  # noqa: E402
from runtime.preprocess import list_images, preprocess_file  # noqa: E402
from runtime.trt_env import gpu_info, tensorrt_version  # noqa: E402

DEFAULT_MODELS = ["gem-dinov2-vits14", "gem-dinov2-vitb14-reg", "salad-dinov2-vitb14", "selavpr-dinov2-vitl14",
                  "cricavpr-dinov2-vitb14", "cricavpr-dinov2-vitb14-independent", "megaloc-dinov2-vitb14",
                  "boq-dinov2-vitb14"]


def build(*args) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "export" / "build_engine.py"), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(row_cosine(a, b).min())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=DEFAULT_MODELS)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--depth", type=int, default=None, help="reduced depth, for a quicker check")
    p.add_argument("--output", type=Path, default=ROOT / "out" / "gpu_check.json")
    args = p.parse_args()
    if not (tensorrt_version() and gpu_info()):
        print(f"needs TensorRT and a GPU: tensorrt={tensorrt_version()}, gpu={gpu_info()}", file=sys.stderr)
        return 2
    import torch

    from export.zoo import create_model

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            t0 = time.time()
            depth = ["--depth", str(args.depth)] if args.depth else []
            onnx_dir = Path(tmp) / f"{name}-fp32"
            build("--model", name, "--random-weights", "--precision", "fp32", "--backend", "onnxruntime",
                  "--batch", f"1:{args.batch}:{args.batch}", "--output", str(onnx_dir), "--skip-parity", *depth)
            half_dir = Path(tmp) / f"{name}-fp16"
            build("--model", name, "--random-weights", "--precision", "fp16", "--backend", "onnxruntime",
                  "--batch", f"1:{args.batch}:{args.batch}", "--output", str(half_dir), "--skip-parity", *depth)
            ort_bundle = load_bundle(onnx_dir)
            files = list_images(ROOT / "data" / "vprbench_corridor" / "queries")[:args.batch]
            x = np.stack([preprocess_file(f, ort_bundle.preprocessing) for f in files])
            model, _, _ = create_model(name, random_weights=True, depth=args.depth)
            with torch.inference_mode():
                ref = model.cuda()(torch.from_numpy(x).cuda())["descriptor"].float().cpu().numpy()
            results = {"onnxruntime-fp32": open_backend(ort_bundle).run(x)["descriptor"]}
            for label, src in (("tensorrt-fp32", onnx_dir), ("tensorrt-fp16", half_dir)):
                engine = Path(tmp) / f"{name}-{label}"
                build("--from-bundle", str(src), "--backend", "tensorrt", "--output", str(engine))
                backend = open_backend(load_bundle(engine))
                results[label] = backend.run(x)["descriptor"]
                backend.close()
            for label, desc in results.items():
                rows.append({"model": name, "engine": label, "min_cosine_vs_pytorch": cosine(desc, ref),
                             "max_abs_vs_pytorch": float(np.abs(desc - ref).max())})
            print(f"{name}: done in {time.time() - t0:.0f} s", file=sys.stderr)
    print("| model | engine | min cosine vs PyTorch (CUDA fp32) | max abs |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['engine']} | {r['min_cosine_vs_pytorch']:.6f} | {r['max_abs_vs_pytorch']:.2e} |")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"tensorrt": tensorrt_version(), "gpu": gpu_info(), "rows": rows}, indent=2))
    return 0 if all(r["min_cosine_vs_pytorch"] >= (0.999 if "fp16" in r["engine"] else 0.9999) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
