"""Engine build time and size of every registry model, at its official size and full depth:
``export/build_engine.py --backend tensorrt-rtx`` as a user runs it (random weights, no parity
check), one process per build. TensorRT-RTX compiles ahead of time without a GPU, so these are
the AOT figures; the GPU-specific compilation happens at the engine's first run on the device.

    python benchmarks/tensorrt_rtx_builds.py [--models NAME ...] [--precision fp16 int8] [--batch 1:8:32]

The ViT-g/14 models (1.1 B parameters, a 4.4 GB FP32 graph) are left out unless named: their
export needs more memory than a shared 24 GB build machine can spare.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, save, table

sys.path.insert(0, str(ROOT))
from export.registry import list_models  # noqa: E402

CALIBRATION = [ROOT / "data" / "vprbench_corridor" / "database", ROOT / "data" / "nordland_summer_winter_64x32" / "database"]


def build(model: str, precision: str, batch: str, folder: Path) -> dict:
    cmd = [sys.executable, str(ROOT / "export" / "build_engine.py"), "--model", model, "--random-weights",
           "--precision", precision, "--batch", batch, "--backend", "tensorrt-rtx", "--skip-parity",
           "--output", str(folder)]
    if precision == "int8":
        cmd += ["--calibration-images", *map(str, CALIBRATION), "--calibration-count", "32"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        why = (f"killed by signal {-proc.returncode} (out of memory?)" if proc.returncode < 0
               else next((line for line in proc.stderr.splitlines() if line.startswith("error:")), "failed"))
        return {"model": model, "precision": precision, "error": why}
    m = json.loads((folder / "manifest.json").read_text())
    facts = m["tensorrt"]
    return {"model": model, "precision": precision, "image_size": m["preprocessing"]["size"], "batch": m["batch"],
            "onnx_mb": m["files"]["onnx"]["size"] / 1e6, "engine_mb": m["files"]["engine"]["size"] / 1e6,
            "layers": facts["layers"], "parse_s": facts["parse_s"], "build_s": facts["build_s"],
            "whole_build_s": wall}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=[m for m in list_models() if "vitg14" not in m])
    p.add_argument("--precision", nargs="+", default=["fp16"], choices=("fp32", "fp16", "int8"))
    p.add_argument("--batch", default="1:8:32")
    args = p.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for precision in args.precision:
                r = build(model, precision, args.batch, Path(tmp) / f"{model}-{precision}")
                results.append(r)
                print(json.dumps(r), file=sys.stderr, flush=True)
    rows = [[r["model"], r["precision"], "x".join(map(str, r.get("image_size", []))), r.get("onnx_mb", "-"),
             r.get("engine_mb", "-"), r.get("parse_s", "-"), r.get("build_s", r.get("error", "-")),
             r.get("whole_build_s", "-")] for r in results]
    print(table(["model", "precision", "size", "ONNX MB", "engine MB", "parse s", "AOT build s",
                 "whole build_engine.py s"], rows))
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2 ** 20
    print(f"peak memory of the largest build: {peak:.1f} GB")
    print(f"wrote {save('tensorrt_rtx_builds', {'batch': args.batch, 'results': results, 'peak_rss_gb': peak})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
