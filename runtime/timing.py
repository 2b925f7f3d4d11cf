"""Per-stage latency bookkeeping: p50/p95/p99/max per stage, and a markdown table of them."""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Dict, Iterator, List

import numpy as np

STAGES = ("decode", "queue", "preprocess", "h2d", "inference", "d2h", "aggregation", "search", "rerank", "total")


class StageTimer:
    """Collects durations (milliseconds) per named stage."""

    def __init__(self) -> None:
        self.samples: Dict[str, List[float]] = defaultdict(list)

    @contextmanager
    def stage(self, name: str, count: int = 1) -> Iterator[None]:
        """Time a block; with ``count`` > 1 the duration is shared by that many items (a batch)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, (time.perf_counter() - t0) * 1000.0, count)

    def add(self, name: str, ms: float, count: int = 1) -> None:
        self.samples[name].extend([ms / count] * count)

    def merge(self, other: "StageTimer") -> None:
        for k, v in other.samples.items():
            self.samples[k].extend(v)

    def summary(self) -> Dict[str, Dict[str, float]]:
        out = {}
        for name in sorted(self.samples, key=lambda s: (STAGES.index(s) if s in STAGES else len(STAGES), s)):
            a = np.asarray(self.samples[name])
            out[name] = {"n": int(a.size), "mean": float(a.mean()), "p50": float(np.percentile(a, 50)),
                         "p95": float(np.percentile(a, 95)), "p99": float(np.percentile(a, 99)), "max": float(a.max())}
        return out

    def table(self) -> str:
        rows = ["| stage | n | mean ms | p50 ms | p95 ms | p99 ms | max ms |", "|---|---|---|---|---|---|---|"]
        for name, s in self.summary().items():
            rows.append(f"| {name} | {s['n']} | {s['mean']:.2f} | {s['p50']:.2f} | {s['p95']:.2f} | {s['p99']:.2f} | {s['max']:.2f} |")
        return "\n".join(rows)
