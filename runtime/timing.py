"""Per-stage latency bookkeeping in bounded memory: count, mean, p50/p95/p99, min and max per
stage, and a markdown table of them.

A run of any length keeps the same few kilobytes per stage: samples go into a fixed histogram of
log-spaced bins (each 1 % wide, from 0.1 µs to 10^7 ms), not into a list. A percentile is read
from the bins with numpy's default (linear) interpolation between the two order statistics it
falls between; each order statistic is its bin's geometric centre (clamped to the exact min and
max), at most 0.5 % from the true sample, so p50/p95/p99 stay within 1 % of the exact values
(``tests/test_timing.py`` checks this against ``numpy.percentile``).
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from typing import Dict, Iterator

import numpy as np

STAGES = ("decode", "queue", "preprocess", "h2d", "inference", "d2h", "aggregation", "search", "rerank",
          "service", "total")

_RATIO = 1.01  # bin width: a bin's centre is within sqrt(1.01) - 1 < 0.5 % of any value in it
_LOW_MS = 1e-4  # values below (and zero) share bin 0
_HIGH_MS = 1e7  # values above share the last bin
_LOG_RATIO = math.log(_RATIO)
_BINS = int(math.ceil(math.log(_HIGH_MS / _LOW_MS) / _LOG_RATIO)) + 2


class Histogram:
    """Samples (milliseconds) in fixed log-spaced bins, plus their exact count, sum, min and max."""

    __slots__ = ("counts", "n", "total", "low", "high")

    def __init__(self) -> None:
        self.counts = np.zeros(_BINS, dtype=np.int64)
        self.n = 0
        self.total = 0.0
        self.low = math.inf
        self.high = -math.inf

    def add(self, value: float, count: int = 1) -> None:
        if value < _LOW_MS:
            b = 0
        elif value >= _HIGH_MS:
            b = _BINS - 1
        else:
            b = min(1 + int(math.log(value / _LOW_MS) / _LOG_RATIO), _BINS - 2)
        self.counts[b] += count
        self.n += count
        self.total += value * count
        self.low = min(self.low, value)
        self.high = max(self.high, value)

    def _order_statistic(self, cum: np.ndarray, k: int) -> float:
        """The k-th smallest sample (0-based), to within half a bin."""
        b = int(np.searchsorted(cum, k, side="right"))
        if b == 0:
            centre = _LOW_MS / 2
        elif b == _BINS - 1:
            centre = _HIGH_MS
        else:
            centre = _LOW_MS * _RATIO ** (b - 0.5)
        return min(max(centre, self.low), self.high)

    def quantile(self, q: float) -> float:
        """Like ``numpy.percentile(samples, 100 * q)`` (linear interpolation), within 1 %."""
        if not self.n:
            return math.nan
        cum = np.cumsum(self.counts)
        h = (self.n - 1) * q
        lo = int(math.floor(h))
        x0 = self._order_statistic(cum, lo)
        if h == lo:
            return x0
        x1 = self._order_statistic(cum, min(lo + 1, self.n - 1))
        return x0 + (h - lo) * (x1 - x0)

    def summary(self) -> Dict[str, float]:
        return {"n": int(self.n), "mean": self.total / self.n if self.n else math.nan,
                "p50": self.quantile(0.50), "p95": self.quantile(0.95), "p99": self.quantile(0.99),
                "min": self.low, "max": self.high}


class StageTimer:
    """Durations (milliseconds) per named stage, in bounded memory whatever the run's length."""

    def __init__(self) -> None:
        self.stages: Dict[str, Histogram] = {}

    @contextmanager
    def stage(self, name: str, count: int = 1) -> Iterator[None]:
        """Time a block; with ``count`` > 1 the duration is shared by that many items (a batch)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, (time.perf_counter() - t0) * 1000.0, count)

    def add(self, name: str, ms: float, count: int = 1) -> None:
        """``count`` samples of ``ms / count`` each (a batch's time shared by its items)."""
        hist = self.stages.get(name)
        if hist is None:
            hist = self.stages[name] = Histogram()
        hist.add(ms / count, count)

    def summary(self) -> Dict[str, Dict[str, float]]:
        order = sorted(self.stages, key=lambda s: (STAGES.index(s) if s in STAGES else len(STAGES), s))
        return {name: self.stages[name].summary() for name in order}

    def table(self, only=None) -> str:
        """Markdown table of every stage (or of the stages named in ``only``)."""
        rows = ["| stage | n | mean ms | p50 ms | p95 ms | p99 ms | max ms |", "|---|---|---|---|---|---|---|"]
        for name, s in self.summary().items():
            if only is None or name in only:
                rows.append(f"| {name} | {s['n']} | {s['mean']:.2f} | {s['p50']:.2f} | {s['p95']:.2f} | "
                            f"{s['p99']:.2f} | {s['max']:.2f} |")
        return "\n".join(rows)
