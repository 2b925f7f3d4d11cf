"""The do-it-yourself baseline: the official SALAD and MegaLoc aggregators exported as a user
would (``torch.onnx.export``, dynamic batch, opset 17) against ours, through TensorRT's own ONNX
parser and builder (TensorRT-RTX, ahead of time, no GPU needed), with a batch profile starting at
1 (the robot's case) and at 2.

The official heads (serizba/salad, GPL-3.0; gmberton/MegaLoc, MIT: MegaLoc's aggregator is SALAD's
with 256-D clusters plus a Linear 16640 -> 8448) are not copied: ``OfficialStyleSALAD`` below is
written in our words and reproduces the op pattern their code exports
(shared/research/salad-dinov2.md §1.3, §1.7): ``torch.logsumexp`` (-> ``ReduceLogSumExp``), the
axis-less ``.squeeze()`` after each log-sum-exp, the score matrix written into ``torch.empty`` by
in-place slice writes (-> ``ScatterND``) and the aggregation through ``repeat`` (-> ``Tile``).
Random weights: whether a graph builds does not depend on them.

    python benchmarks/trt_diy_baseline.py [--batch-max 32]
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

from common import save, table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from export.models.salad import SALAD  # noqa: E402
from export.trt_builder import TensorRTBuildError  # noqa: E402
from export.trt_check import find_problems  # noqa: E402
from export.trt_rtx import parse_and_build  # noqa: E402

GRID, CHANNELS = 23, 768  # DINOv2 ViT-B/14 at 322 x 322: 529 patches


class OfficialStyleSALAD(nn.Module):
    """SALAD's aggregator with the official code's op pattern (see the module docstring)."""

    def __init__(self, cluster_dim: int = 128, clusters: int = 64, token_dim: int = 256, hidden: int = 512,
                 out_dim: int = 0) -> None:
        super().__init__()
        self.clusters, self.cluster_dim = clusters, cluster_dim
        self.token_features = nn.Sequential(nn.Linear(CHANNELS, hidden), nn.ReLU(), nn.Linear(hidden, token_dim))
        self.cluster_features = nn.Sequential(nn.Conv2d(CHANNELS, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, cluster_dim, 1))
        self.score = nn.Sequential(nn.Conv2d(CHANNELS, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, clusters, 1))
        self.dust_bin = nn.Parameter(torch.tensor(1.0))
        self.linear = nn.Linear(token_dim + clusters * cluster_dim, out_dim) if out_dim else None  # MegaLoc

    def transport(self, scores: torch.Tensor) -> torch.Tensor:
        b, m, n = scores.shape
        full = torch.empty(b, m + 1, n, dtype=scores.dtype)
        full[:, :m, :] = scores  # in-place slice writes: ScatterND
        full[:, m, :] = self.dust_bin
        norm = -math.log(n + m)
        log_a = torch.full((m + 1,), norm)
        log_a[-1] = norm + math.log(n - m)
        log_a, log_b = log_a.expand(b, -1), torch.full((n,), norm).expand(b, -1)
        u, v = torch.zeros_like(log_a), torch.zeros_like(log_b)
        for _ in range(3):
            u = log_a - torch.logsumexp(full + v.unsqueeze(1), dim=2).squeeze()  # axis-less Squeeze
            v = log_b - torch.logsumexp(full + u.unsqueeze(2), dim=1).squeeze()
        return full + u.unsqueeze(2) + v.unsqueeze(1) - norm

    def forward(self, features: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        f = self.cluster_features(features).flatten(2)
        p = self.transport(self.score(features).flatten(2)).exp()[:, :-1, :]
        p = p.unsqueeze(1).repeat(1, self.cluster_dim, 1, 1)  # Tile
        f = f.unsqueeze(2).repeat(1, 1, self.clusters, 1)
        v = F.normalize((f * p).sum(dim=-1), dim=1).flatten(1)
        out = torch.cat([F.normalize(self.token_features(token), dim=-1), v], dim=-1)
        if self.linear is not None:
            out = self.linear(out)
        return F.normalize(out, dim=-1)


class OursSALAD(nn.Module):
    """Our SALAD head (export/models/salad.py) on the same inputs; ``out_dim``: MegaLoc's Linear."""

    def __init__(self, cluster_dim: int = 128, out_dim: int = 0) -> None:
        super().__init__()
        self.head = SALAD(CHANNELS, cluster_dim=cluster_dim, num_patches=GRID * GRID)
        self.linear = nn.Linear(self.head.dim, out_dim) if out_dim else None

    def forward(self, features: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        out = self.head(token, features.flatten(2).transpose(1, 2))["descriptor"]
        return F.normalize(self.linear(out), dim=-1) if self.linear is not None else out


HEADS = {
    "SALAD, official style": lambda: OfficialStyleSALAD(),
    "SALAD, ours": lambda: OursSALAD(),
    "MegaLoc, official style": lambda: OfficialStyleSALAD(cluster_dim=256, out_dim=8448),
    "MegaLoc, ours": lambda: OursSALAD(cluster_dim=256, out_dim=8448),
}
WATCHED = ("ReduceLogSumExp", "Squeeze", "ScatterND", "Tile")


def export_as_a_user_would(module: nn.Module, path: Path) -> None:
    torch.manual_seed(0)
    x = (torch.randn(2, CHANNELS, GRID, GRID), torch.randn(2, CHANNELS))
    with torch.inference_mode():
        torch.onnx.export(module.eval(), x, str(path), dynamo=False, opset_version=17,
                          input_names=["features", "token"], output_names=["descriptor"],
                          dynamic_axes={"features": {0: "batch"}, "token": {0: "batch"}, "descriptor": {0: "batch"}})


def onnxruntime_at_batch_1(path: Path) -> str:
    x = {"features": np.random.default_rng(0).standard_normal((1, CHANNELS, GRID, GRID)).astype(np.float32),
         "token": np.random.default_rng(1).standard_normal((1, CHANNELS)).astype(np.float32)}
    try:
        out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, x)[0]
    except Exception as exc:  # noqa: BLE001 - the failure is the measurement
        return "fails: " + " ".join(str(exc).split())[:160]
    return f"runs, output {list(out.shape)}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-max", type=int, default=32)
    args = p.parse_args()
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for label, make in HEADS.items():
            path = Path(tmp) / "head.onnx"
            export_as_a_user_would(make(), path)
            ops = [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]
            counts = {op: ops.count(op) for op in WATCHED}
            static = find_problems(str(path), "trt10")
            entry = {"head": label, "ops": counts, "static_check_problems": len(static),
                     "static_check_first": static[0] if static else None,
                     "onnxruntime_batch_1": onnxruntime_at_batch_1(path), "builds": {}}
            for low in (1, 2):
                batch = {"min": low, "opt": min(8, args.batch_max), "max": args.batch_max}
                t = time.perf_counter()
                try:
                    facts = parse_and_build(path, batch)
                    verdict = f"builds ({facts['engine_bytes'] / 1e6:.0f} MB, {facts['build_s']:.1f} s)"
                except TensorRTBuildError as exc:
                    verdict = "fails: " + str(exc).split(": ", 1)[1]
                entry["builds"][f"{low}:{batch['opt']}:{batch['max']}"] = {"result": verdict,
                                                                           "seconds": time.perf_counter() - t}
                print(f"[{label}] batch {low}:{batch['opt']}:{batch['max']}: {verdict}", file=sys.stderr, flush=True)
            results.append(entry)
            builds = list(entry["builds"].values())
            rows.append([label, " ".join(f"{k} {v}" for k, v in counts.items() if v) or "none",
                         len(static), builds[0]["result"], builds[1]["result"], entry["onnxruntime_batch_1"]])
    print(table(["aggregator (exported with torch.onnx.export, dynamic batch, opset 17)", "watched ops",
                 "static check problems", f"TensorRT-RTX, batch 1:8:{args.batch_max}",
                 f"TensorRT-RTX, batch 2:8:{args.batch_max}", "ONNX Runtime, batch 1"], rows))
    print(f"wrote {save('trt_diy_baseline', {'results': results})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
