"""The on-device localization loop: a source's frames -> admission -> micro-batches -> pipeline
(preprocess, inference, search, re-rank, decision) -> one record per frame, for runs of any
length.

A reader thread takes frames from the source into a bounded buffer: a live source never waits
(when the buffer is full its oldest frame is dropped), a recorded one waits for room. The worker
(the thread calling ``run``) forms micro-batches: up to the current batch size, or until the
oldest frame has waited ``batch_wait`` of the budget (not at all when the frames to fill the batch
are not due within that wait).

**Budget control** (``budget_ms``), built so that it cannot latch:

1. *Admission.* A frame is admitted when its age plus the expected time of its batch fits the
   budget; older frames are dropped as stale. The expected time follows the machine both ways:
   per batch size, the second-longest of the last five batches. A one-off stall (a GC pause, a
   page-fault storm, SIGSTOP, a 5 s hang in the backend) is the longest and moves nothing, so
   frames arriving after it are admitted at once; a lasting slowdown (thermal throttling, other
   processes) raises it after two batches, and the recovery brings it back after four.
2. *Best effort.* When even a fresh frame alone cannot meet the budget (its decoding plus the
   estimate for a batch of one exceed it), the loop processes the newest frame, one at a time,
   and drops the others: every Nth frame at the pace the machine can keep. The log and the
   summary say so, once.
3. *Probe.* Whatever the estimate says, once ``probe_interval`` has passed without a processed
   frame, the newest frame is processed: the estimate is measured again and the loop can never
   stop localizing for good.
4. Within an admitted batch: re-ranking is skipped when it would overrun the budget; the batch
   size halves after a batch that overran the budget or when its estimate exceeds what the budget
   leaves after waiting for a batch, and grows back by one while a bigger batch fits in half the
   budget.

**Accounting.** ``received = processed + failed + dropped`` (stale, queue, stop); every frame
gets one record (``status`` processed, failed or dropped).

**Bounded memory.** The buffer is bounded; each record goes to ``on_result`` as soon as it exists
(``JsonlWriter`` writes and flushes it); stage statistics are fixed histograms
(``runtime/timing.py``); cost estimates keep five samples per batch size.

**Threads.** The stages run one after another on two cores; a search on a small map runs on one
FAISS thread (BENCHMARKS.md §4: idle OpenMP threads waking up cost more than they save there, and
they compete with ONNX Runtime's), and ONNX Runtime never spin-waits (``backends/ort_backend.py``).
"""
from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Deque, Dict, Iterable, List, Optional, Tuple

from .decisions import DecisionRule
from .encoder import Encoder
from .errors import OptionError
from .maps import PlaceMap
from .maps.search import faiss_threads
from .pipeline import Pipeline
from .sources import COMPLETE, Frame
from .timing import StageTimer

log = logging.getLogger(__name__)

# floats a flat search scans per query up to which it runs on one FAISS thread (BENCHMARKS.md §4:
# 100k x 384 takes about 11 ms on one thread here; OpenMP threads waking up on busy cores cost more)
SMALL_SEARCH = 1 << 26


@dataclass
class LoopConfig:
    budget_ms: float = 0.0  # 0: no budget
    top_k: int = 5
    rerank: int = 0
    queue_size: int = 16
    batch_wait: float = 0.25  # share of the budget a batch may wait to fill
    probe_interval: float = 0.5  # seconds without a processed frame before one is forced through
    rule: DecisionRule = field(default_factory=DecisionRule)
    search_threads: Optional[int] = None  # None: 1 for a small map, else FAISS's default; 0: FAISS's default

    def __post_init__(self) -> None:
        if not (math.isfinite(self.budget_ms) and self.budget_ms >= 0):
            raise OptionError(f"--budget-ms {self.budget_ms}: expected milliseconds >= 0 (0: no budget)")
        if self.search_threads is not None and self.search_threads < 0:
            raise OptionError(f"--search-threads {self.search_threads}: expected a count >= 0 (0: FAISS's default)")
        if self.rerank < 0 or self.queue_size < 1 or not 0 <= self.batch_wait <= 1 or self.probe_interval <= 0:
            raise OptionError(f"loop options out of range: {self}")


@dataclass
class LoopStats:
    received: int = 0
    processed: int = 0
    failed: int = 0
    dropped_stale: int = 0
    dropped_queue: int = 0
    dropped_stop: int = 0
    accepted: int = 0
    over_budget: int = 0
    best_effort: int = 0  # frames processed while the budget could not be met
    probes: int = 0
    rerank_skipped: int = 0
    batch_shrinks: int = 0
    batches: int = 0

    @property
    def dropped(self) -> int:
        return self.dropped_stale + self.dropped_queue + self.dropped_stop

    def accounted(self) -> bool:
        return self.received == self.processed + self.failed + self.dropped


class CostModel:
    """Expected milliseconds of a batch per batch size: the second-longest of its last five
    batches (the only one while there is one), so that a single stall counts for nothing while
    two slow batches in five count; a size not seen yet is scaled from the nearest one seen."""

    WINDOW = 5

    def __init__(self) -> None:
        self._samples: Dict[int, Deque[float]] = {}

    def observe(self, size: int, ms: float) -> None:
        self._samples.setdefault(size, deque(maxlen=self.WINDOW)).append(ms)

    def estimate(self, size: int) -> float:
        if not self._samples:
            return 0.0
        near = size if size in self._samples else min(self._samples, key=lambda s: (abs(s - size), s))
        window = sorted(self._samples[near])
        return window[-2 if len(window) > 1 else 0] * size / near


def admit(frames: List[Frame], now: float, budget_ms: float, batch_size: int,
          estimate: Callable[[int], float]) -> Tuple[List[Frame], List[Frame], List[Frame]]:
    """Split buffered frames (oldest first) into (stale, batch, rest): the oldest frames are stale
    while their age plus the expected time of the batch they would join exceeds the budget."""
    i = 0
    while i < len(frames):
        n = min(batch_size, len(frames) - i)
        if (now - frames[i].arrival) * 1000 + estimate(n) <= budget_ms:
            break
        i += 1
    return frames[:i], frames[i:i + batch_size], frames[i + batch_size:]


class FrameBuffer:
    """The bounded buffer between the reader and the worker."""

    def __init__(self, size: int, live: bool, on_overflow: Callable[[Frame], None]) -> None:
        self.size, self.live, self.on_overflow = max(1, size), live, on_overflow
        self.items: Deque[Frame] = deque()
        self.cond = threading.Condition()
        self.closed = False

    def put(self, frame: Frame) -> bool:
        """Add a frame (a live source drops the oldest when full; a recorded one waits).
        False when the buffer is closed: the frame was not taken."""
        overflow = []
        with self.cond:
            while not self.live and len(self.items) >= self.size and not self.closed:
                self.cond.wait(0.1)
            if self.closed:
                return False
            while len(self.items) >= self.size:
                overflow.append(self.items.popleft())
            self.items.append(frame)
            self.cond.notify_all()
        for old in overflow:
            self.on_overflow(old)
        return True

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def wait(self, count: int, until: float, abort: Callable[[], bool]) -> int:
        """Wait until ``count`` frames are here, the buffer is closed, ``time.perf_counter()``
        reaches ``until`` or ``abort()``; returns how many frames are here."""
        with self.cond:
            while len(self.items) < count and not self.closed and not abort():
                left = until - time.perf_counter()
                if left <= 0:
                    break
                self.cond.wait(min(left, 0.1))
            return len(self.items)

    def oldest(self) -> Optional[Frame]:
        with self.cond:
            return self.items[0] if self.items else None

    def take_all(self) -> List[Frame]:
        with self.cond:
            items = list(self.items)
            self.items.clear()
            self.cond.notify_all()
            return items

    def give_back(self, frames: List[Frame]) -> None:
        if frames:
            with self.cond:
                self.items.extendleft(reversed(frames))


def search_threads(place_map: PlaceMap, requested: Optional[int] = None) -> Optional[int]:
    """FAISS threads for a map's search (None: FAISS's default): ``requested`` if given (0: the
    default), else one thread unless a flat search scans more than ``SMALL_SEARCH`` floats."""
    if requested is not None:
        return requested or None
    big_flat = place_map.kind in ("flat", "sqfp16") and len(place_map) * place_map.descriptors.shape[1] > SMALL_SEARCH
    return None if big_flat else 1


def _record(frame: Frame, status: str, **extra) -> dict:
    return {"status": status, "frame": frame.index, "name": frame.name, "timestamp": frame.timestamp, **extra}


class LocalizationLoop:
    """Runs a source through the pipeline under a latency budget; see the module docstring."""

    def __init__(self, encoder: Encoder, place_map: PlaceMap, config: LoopConfig = LoopConfig(),
                 on_result: Optional[Callable[[dict], None]] = None) -> None:
        self.cfg = config
        self.encoder, self.map = encoder, place_map
        self.timer = StageTimer()
        self.pipeline = Pipeline(encoder, place_map, config.top_k, config.rerank, config.rule, self.timer)
        self.on_result = on_result or (lambda r: None)
        self.stats = LoopStats()
        self.batch_size = encoder.batch_size
        self.cost = CostModel()  # per batch
        self.rerank_cost = CostModel()  # per frame
        self.ready_delay = CostModel()  # capture to decoded, per frame: latency no batch can avoid
        self.period = CostModel()  # ms between consecutive frames reaching the worker
        self._last_arrival: Optional[float] = None
        self.best_effort_note: Optional[str] = None
        self.source_error: Optional[str] = None
        self.source = None
        self.live = False
        self.wall_s = 0.0
        self._lock = threading.Lock()  # records and the reader's counters
        self._finished = False
        self._stop: Optional[str] = None
        self._started = self._last_processed = 0.0

    def stop(self, reason: str = "stopped") -> None:
        """Finish soon: the batch in progress completes, buffered frames are dropped (one record
        each) and ``run`` returns. Safe in a signal handler: it only sets a flag."""
        if self._stop is None:
            self._stop = reason

    # -- the run --------------------------------------------------------------------------------
    def run(self, source: Iterable[Frame], live: Optional[bool] = None) -> LoopStats:
        self.source = source
        self.live = bool(getattr(source, "live", False)) if live is None else live
        buffer = FrameBuffer(self.cfg.queue_size, self.live, lambda f: self._drop(f, "queue"))
        reader = threading.Thread(target=self._read, args=(source, buffer), name="frame-reader", daemon=True)
        self._started = self._last_processed = time.perf_counter()
        with faiss_threads(search_threads(self.map, self.cfg.search_threads)):
            reader.start()
            try:
                while self._stop is None:
                    batch = self._next_batch(buffer)
                    if batch is None:
                        break
                    if batch:
                        self._process(batch)
            finally:
                buffer.close()
                for frame in buffer.take_all():
                    self._drop(frame, "stop")
                reader.join(timeout=1.0)  # a reader blocked in a camera stays behind, muted
                with self._lock:
                    self._finished = True
                self.wall_s = time.perf_counter() - self._started
        return self.stats

    # -- reader thread --------------------------------------------------------------------------
    def _read(self, source: Iterable[Frame], buffer: FrameBuffer) -> None:
        frames = iter(source)
        try:
            for frame in frames:
                with self._lock:
                    if self._stop is not None or self._finished:
                        return
                    self.stats.received += 1
                    if frame.error is not None:
                        self.stats.failed += 1
                        self.on_result(_record(frame, "failed", error=frame.error))
                        continue
                if not buffer.put(frame):
                    self._drop(frame, "stop")
                    return
        except Exception as exc:  # noqa: BLE001 - a broken source ends the run, which says why
            self.source_error = f"{type(exc).__name__}: {exc}"
            log.error("error: the source failed: %s", self.source_error, exc_info=log.isEnabledFor(logging.DEBUG))
        finally:
            buffer.close()
            close = getattr(frames, "close", None)
            if close is not None:
                close()  # a generator's cleanup (a camera's release) runs now

    # -- worker ---------------------------------------------------------------------------------
    def _drop(self, frame: Frame, why: str) -> None:
        with self._lock:
            if self._finished:
                return
            setattr(self.stats, f"dropped_{why}", getattr(self.stats, f"dropped_{why}") + 1)
            self.on_result(_record(frame, "dropped", dropped=why))

    def _next_batch(self, buffer: FrameBuffer) -> Optional[List[Frame]]:
        """The next batch to process; [] when there is none yet; None at the end of the source."""
        cfg, budget = self.cfg, self.cfg.budget_ms
        stopping = lambda: self._stop is not None  # noqa: E731
        have = buffer.wait(1, time.perf_counter() + 0.1, stopping)
        if not have:
            return None if buffer.closed else []
        if budget:
            # wait for a fuller batch only when the frames it needs are due within the wait allowed
            wait_ms = budget * cfg.batch_wait
            oldest = buffer.oldest()
            if self.batch_size > have and oldest is not None \
                    and self.period.estimate(1) * (self.batch_size - have) <= wait_ms:
                buffer.wait(self.batch_size, oldest.arrival + wait_ms / 1000, stopping)
        elif not self.live:
            buffer.wait(self.batch_size, math.inf, stopping)  # a recorded source: full batches
        frames = buffer.take_all()
        for f in frames:
            if self._last_arrival is not None and f.arrival > self._last_arrival:
                self.period.observe(1, (f.arrival - self._last_arrival) * 1000)
            self._last_arrival = f.arrival if self._last_arrival is None else max(self._last_arrival, f.arrival)
        if not budget:
            buffer.give_back(frames[self.batch_size:])
            return frames[:self.batch_size]
        now = time.perf_counter()
        self.ready_delay.observe(1, (frames[-1].ready - frames[-1].arrival) * 1000)
        stale, batch, rest = admit(frames, now, budget, self.batch_size, self.cost.estimate)
        buffer.give_back(rest)
        if not batch:
            newest = stale.pop()
            if self.ready_delay.estimate(1) + self.cost.estimate(1) > budget:
                self._best_effort(budget, now)
                batch = [newest]
            elif now - self._last_processed >= cfg.probe_interval:
                self.stats.probes += 1
                batch = [newest]
            else:
                stale.append(newest)
        for frame in stale:
            self._drop(frame, "stale")
        return batch

    def _best_effort(self, budget: float, now: float) -> None:
        self.stats.best_effort += 1
        if self.best_effort_note is None:
            one = self.ready_delay.estimate(1) + self.cost.estimate(1)
            rate = self.stats.received / max(now - self._started, 1e-9)
            every = max(1, math.ceil(one / 1000 * rate))
            self.best_effort_note = (f"the {budget:g} ms budget cannot be met (one frame takes about {one:.0f} ms "
                                     f"here): best effort, one frame at a time, the newest: about 1 in {every} "
                                     f"frames at {rate:.1f} frames/s")
            log.warning("warning: %s", self.best_effort_note)

    def _process(self, batch: List[Frame]) -> None:
        budget = self.cfg.budget_ms
        start = time.perf_counter()
        oldest = min(f.arrival for f in batch)

        def allow_rerank(n: int) -> bool:
            if not budget or (time.perf_counter() - oldest) * 1000 + self.rerank_cost.estimate(1) * n <= budget:
                return True
            self.stats.rerank_skipped += n
            return False

        matches = self.pipeline.run(batch, start, allow_rerank)
        end = time.perf_counter()
        self.stats.batches += 1
        self.cost.observe(len(batch), (end - start) * 1000)
        self._last_processed = end
        for m in matches:
            if m.times_ms["rerank"] is not None:
                self.rerank_cost.observe(1, m.times_ms["rerank"])
            with self._lock:
                self.stats.processed += 1
                self.stats.accepted += m.accepted
                self.stats.over_budget += bool(budget and m.times_ms["total"] > budget)
                self.on_result(m.to_dict())
        if budget:
            room = budget * (1 - self.cfg.batch_wait)
            late = (end - oldest) * 1000 > budget  # a smaller batch now costs nothing lasting: it grows back
            if self.batch_size > 1 and (late or self.cost.estimate(self.batch_size) > room):
                self.batch_size = max(1, self.batch_size // 2)
                self.stats.batch_shrinks += 1
            elif self.batch_size < self.encoder.batch_size and self.cost.estimate(self.batch_size + 1) <= budget / 2:
                self.batch_size += 1

    # -- the summary ----------------------------------------------------------------------------
    @property
    def end(self) -> Tuple[str, str]:
        """How the run ended: (``complete`` | ``disconnected`` | ``truncated`` | ``failed`` |
        ``interrupted``, detail)."""
        if self._stop is not None:
            return "interrupted", self._stop
        if self.source_error is not None:
            return "failed", self.source_error
        return getattr(self.source, "end", None) or COMPLETE, getattr(self.source, "detail", "")

    def summary(self) -> dict:
        s = self.stats
        stages = self.timer.summary()
        end, detail = self.end
        latency = "total" if self.live else "service"
        return {"run": "live" if self.live else "throughput",
                "source": getattr(self.source, "kind", type(self.source).__name__), "end": end, "end_detail": detail,
                "budget_ms": self.cfg.budget_ms or None, "rule": asdict(self.cfg.rule),
                "wall_s": self.wall_s, "frames_per_s": s.processed / self.wall_s if self.wall_s else 0.0,
                "frames": {**asdict(s), "dropped": s.dropped}, "best_effort": self.best_effort_note,
                "latency": {"measure": "capture to result" if self.live else "service: dequeue to result",
                            **stages.get(latency, {})},
                "stages": stages}


def format_summary(summary: dict, timer: StageTimer) -> str:
    """The end-of-run report, for people: what kind of run, how it ended, every frame accounted
    for, the decisions, the budget's interventions, latency and the stage table."""
    f, lat = summary["frames"], summary["latency"]
    live = summary["run"] == "live"
    lines = [f"run: {summary['run']} ({'latency is capture to result' if live else 'frames read as fast as possible; latency is service time, dequeue to result'})",
             f"source: {summary['source']}; ended: {summary['end']}" + (f" ({summary['end_detail']})" if summary["end_detail"] else ""),
             f"frames: received {f['received']}, processed {f['processed']}, failed {f['failed']}, dropped {f['dropped']} "
             f"(stale {f['dropped_stale']}, at queue {f['dropped_queue']}, at stop {f['dropped_stop']}); "
             f"accepted {f['accepted']} of {f['processed']} ({DecisionRule(**summary['rule']).describe()})"]
    if summary["budget_ms"]:
        lines.append(f"budget {summary['budget_ms']:g} ms: over budget {f['over_budget']}, best effort {f['best_effort']}, "
                     f"probes {f['probes']}, re-rank skipped {f['rerank_skipped']}, batch shrinks {f['batch_shrinks']}")
    if summary["best_effort"]:
        lines.append(f"best effort: {summary['best_effort']}")
    if lat.get("n"):
        lines.append(f"{summary['frames_per_s']:.1f} frames/s over {summary['wall_s']:.1f} s; latency ({lat['measure']}): "
                     f"p50 {lat['p50']:.1f} ms, p95 {lat['p95']:.1f} ms, p99 {lat['p99']:.1f} ms, max {lat['max']:.1f} ms")
    shown = None if live else [s for s in timer.stages if s not in ("queue", "total")]
    lines.append(timer.table(shown))
    return "\n".join(lines)


class JsonlWriter:
    """Records, one JSON object per line, written and flushed as they come: a run of any length
    holds none of them in memory, and a stopped run leaves whole lines."""

    def __init__(self, path) -> None:
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.f = open(path, "w")
        except OSError as exc:
            raise OptionError(f"{path}: cannot write the results here ({exc.strerror or exc})") from exc
        self.lock = threading.Lock()

    def __call__(self, record: dict) -> None:
        line = json.dumps(record) + "\n"
        with self.lock:
            self.f.write(line)
            self.f.flush()

    def close(self) -> None:
        with self.lock:
            self.f.close()
