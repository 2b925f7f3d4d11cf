"""Exporting a model above protobuf's 2 GB: DINOv2 ViT-g/14 + GeM (1.1 B parameters, 4.5 GB in
FP32) through ``python export/build_engine.py`` with random weights, as an ONNX Runtime bundle.
Measures wall time, the build process's peak RSS (getrusage of the child) and the bundle's files;
prints a table and writes JSON. Mind the machine's memory: the build holds the weights about
twice at its peak.

    python benchmarks/large_export.py [--model gem-dinov2-vitg14] [--precision fp32] [--skip-parity]
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, machine, save, table
from runtime.cli_util import ArgumentParser, run_cli  # noqa: E402
from runtime.errors import UserError  # noqa: E402


def main() -> int:
    p = ArgumentParser(prog="python benchmarks/large_export.py", description=__doc__)
    p.add_argument("--model", default="gem-dinov2-vitg14")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16"))
    p.add_argument("--skip-parity", action="store_true")
    p.add_argument("--work-dir", type=Path, default=None, help="where the bundle is written (default: a temp dir)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        out = Path(tmp) / "bundle"
        cmd = [sys.executable, str(ROOT / "export" / "build_engine.py"), "--model", args.model, "--random-weights",
               "--precision", args.precision, "--backend", "onnxruntime", "--output", str(out)]
        if args.skip_parity:
            cmd.append("--skip-parity")
        load = machine()["load_average_1min_at_start"]
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.time() - t0
        peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2 ** 20
        if proc.returncode != 0:
            raise UserError(f"the build failed: {proc.stderr.strip().splitlines()[-1]}")
        manifest = json.loads((out / "manifest.json").read_text())
    files = {e["name"]: e["size"] for e in manifest["files"].values()}
    steps = [line for line in proc.stderr.splitlines() if line.startswith("[build]")]
    row = [args.model, args.precision, f"{wall:.0f}", f"{peak_gb:.1f}",
           ", ".join(f"{n} {s / 2 ** 30:.2f} GiB" if s >= 2 ** 30 else f"{n} {s / 2 ** 20:.1f} MiB"
                     for n, s in files.items()),
           manifest["checks"].get("parity_vs_pytorch", {}).get("min_cosine", "skipped")]
    print(table(["model", "precision", "wall s", "peak RSS GiB", "files", "parity min cosine"], [row]))
    print(f"load average at start: {load}")
    path = save("large_export", {"model": args.model, "precision": args.precision, "wall_s": wall,
                                 "peak_rss_gib": peak_gb, "files": files, "steps": steps,
                                 "checks": manifest["checks"]})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
