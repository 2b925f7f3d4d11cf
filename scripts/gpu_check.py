"""GPU check: FP32 and FP16 TensorRT engines of registry models, run through the runtime and
compared with ONNX Runtime and the PyTorch reference on real sample images. Needs TensorRT,
cuda-python, an NVIDIA GPU and the export extra (torch).

    python scripts/gpu_check.py [--models NAME ...] [--batch 2] [--time-limit 570] [--output out/gpu_check.json]

Each row is printed as soon as it is measured and the JSON is rewritten after every model, so a
run cut short still shows what it finished. The time limit is shared out as a budget per model;
a model whose builds overrun its budget is reported as such and the check goes on with the next.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runtime.backends import open_backend  # noqa: E402
from runtime.bundle import load_bundle  # noqa: E402
from runtime.cli_util import ArgumentParser, run_cli  # noqa: E402
from runtime.compare import row_cosine  # noqa: E402
from runtime.errors import UserError  # noqa: E402
from runtime.files import atomic_write  # noqa: E402
from runtime.preprocess import list_images, preprocess_file  # noqa: E402
from runtime.trt_env import gpu_info, tensorrt_version  # noqa: E402

DEFAULT_MODELS = ["gem-dinov2-vits14", "gem-dinov2-vitb14-reg", "salad-dinov2-vitb14", "selavpr-dinov2-vitl14",
                  "cricavpr-dinov2-vitb14", "cricavpr-dinov2-vitb14-independent", "megaloc-dinov2-vitb14",
                  "boq-dinov2-vitb14"]
THRESHOLDS = {"fp32": 0.9999, "fp16": 0.999}  # min cosine vs PyTorch (CUDA, FP32)


class OverBudget(Exception):
    pass


def build(deadline: float, *args: str) -> None:
    """One build_engine run, killed at ``deadline`` (time.time())."""
    left = deadline - time.time()
    if left <= 0:
        raise OverBudget("no time left")
    try:
        proc = subprocess.run([sys.executable, str(ROOT / "export" / "build_engine.py"), *args],
                              capture_output=True, text=True, timeout=left)
    except subprocess.TimeoutExpired:
        raise OverBudget(f"build_engine {' '.join(args[:2])} ran past the budget") from None
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])


def check_model(name: str, batch: int, depth: Optional[int], deadline: float, tmp: Path) -> List[dict]:
    """Rows (one per engine) of one model, or raise OverBudget."""
    import torch

    from export.zoo import create_model

    common = ["--model", name, "--random-weights", "--backend", "onnxruntime", "--batch", f"1:{batch}:{batch}",
              "--skip-parity"] + (["--depth", str(depth)] if depth else [])
    sources = {}
    for precision in ("fp32", "fp16"):
        sources[precision] = tmp / f"{name}-{precision}"
        build(deadline, *common, "--precision", precision, "--output", str(sources[precision]))
    ort_bundle = load_bundle(sources["fp32"])
    files = list_images(ROOT / "data" / "vprbench_corridor" / "queries")[:batch]
    x = np.stack([preprocess_file(f, ort_bundle.preprocessing) for f in files])
    model, _, _ = create_model(name, random_weights=True, depth=depth)
    with torch.inference_mode():
        ref = model.cuda()(torch.from_numpy(x).cuda())["descriptor"].float().cpu().numpy()
    del model
    torch.cuda.empty_cache()
    results = {"onnxruntime-fp32": open_backend(ort_bundle).run(x)["descriptor"]}
    for precision, src in sources.items():
        engine = tmp / f"{name}-tensorrt-{precision}"
        build(deadline, "--from-bundle", str(src), "--backend", "tensorrt", "--output", str(engine))
        backend = open_backend(load_bundle(engine))
        results[f"tensorrt-{precision}"] = backend.run(x)["descriptor"]
        backend.close()
    rows = []
    for label, desc in results.items():
        cos = float(row_cosine(desc, ref).min())
        threshold = THRESHOLDS[label.rsplit("-", 1)[1]]
        rows.append({"model": name, "engine": label, "min_cosine_vs_pytorch": cos,
                     "max_abs_vs_pytorch": float(np.abs(desc - ref).max()), "threshold": threshold,
                     "status": "ok" if cos >= threshold else "FAIL"})
    return rows


def print_row(r: dict) -> None:
    if "min_cosine_vs_pytorch" in r:
        print(f"| {r['model']} | {r['engine']} | {r['min_cosine_vs_pytorch']:.6f} | {r['max_abs_vs_pytorch']:.2e} | "
              f"{r['status']} | {r['seconds']:.0f} |", flush=True)
    else:
        print(f"| {r['model']} | - | - | - | {r['status']} | {r['seconds']:.0f} |", flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    p = ArgumentParser(prog="python scripts/gpu_check.py", description=__doc__)
    p.add_argument("--models", nargs="*", default=DEFAULT_MODELS)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--depth", type=int, default=None, help="reduced depth, for a quicker check")
    p.add_argument("--time-limit", type=float, default=570.0,
                   help="seconds for the whole check (default 570: scripts/gpu_check.sh stops it at 600)")
    p.add_argument("--output", type=Path, default=ROOT / "out" / "gpu_check.json")
    args = p.parse_args(argv)
    if not (tensorrt_version() and gpu_info()):
        raise UserError(f"needs TensorRT, cuda-python and an NVIDIA GPU: tensorrt={tensorrt_version()}, "
                        f"gpu={gpu_info()}")
    start = time.time()
    end = start + args.time_limit
    payload = {"tensorrt": tensorrt_version(), "gpu": gpu_info(), "time_limit_s": args.time_limit, "rows": []}
    print("| model | engine | min cosine vs PyTorch (CUDA fp32) | max abs | status | s |\n|---|---|---|---|---|---|",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(args.models):
            t0 = time.time()
            budget = (end - t0) / (len(args.models) - i)  # what is left, shared by the models left
            try:
                rows = check_model(name, args.batch, args.depth, t0 + budget, Path(tmp))
            except OverBudget as exc:
                rows = [{"model": name, "status": f"over its {budget:.0f} s budget ({exc})"}]
            except Exception as exc:  # noqa: BLE001 - one model's failure is a row; the check goes on
                rows = [{"model": name, "status": f"error: {str(exc).strip().splitlines()[-1][:200]}"}]
            for r in rows:
                r["seconds"] = time.time() - t0
                print_row(r)
            payload["rows"] += rows
            atomic_write(args.output, lambda f: f.write(json.dumps(payload, indent=2).encode()))
    print(f"wrote {args.output} ({time.time() - start:.0f} s)", file=sys.stderr)
    return 0 if all(r["status"] == "ok" for r in payload["rows"]) else 1


if __name__ == "__main__":
    sys.exit(run_cli(main))
