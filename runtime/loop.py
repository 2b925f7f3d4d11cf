"""The on-device localization loop: frames -> micro-batches -> descriptors -> map search ->
(optional) re-ranking -> place, score, top-K and per-stage timings for every frame.

A reader thread takes frames from the source into a bounded queue (memory stays bounded
whatever the input rate). The worker forms a micro-batch: up to the current batch size, or until
the oldest frame in it has waited ``batch_wait`` of the budget. When the per-frame latency budget
is exceeded the loop degrades, in this order, and counts each step:

1. **skip re-ranking** for a batch whose frames would otherwise exceed the budget;
2. **smaller batches**: a batch that ran over the budget halves the batch size (it grows back by
   one after each batch finishing under half the budget);
3. **drop stale frames**: a frame that cannot finish within the budget when its batch forms (its
   age plus the running estimate of a batch's processing time) is dropped; with a live source, a
   full queue drops its oldest frame to admit the newest.

Every frame is accounted for: ``received = processed + dropped_stale + dropped_queue + failed``.
"""
from __future__ import annotations

import json
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional

import numpy as np

from .encoder import Encoder
from .errors import OptionError
from .maps import PlaceMap
from .preprocess import preprocess_image
from .rerank import rerank_shortlist
from .sources import Frame

_END = object()


@dataclass
class LoopStats:
    received: int = 0
    processed: int = 0
    failed: int = 0
    dropped_stale: int = 0
    dropped_queue: int = 0
    rerank_skipped: int = 0
    batch_shrinks: int = 0
    over_budget: int = 0

    def accounted(self) -> bool:
        return self.received == self.processed + self.failed + self.dropped_stale + self.dropped_queue


@dataclass
class LoopConfig:
    budget_ms: float = 0.0  # 0: no budget
    top_k: int = 5
    rerank: int = 0
    queue_size: int = 16
    batch_wait: float = 0.25  # share of the budget a batch may wait to fill


class Localizer:
    def __init__(self, encoder: Encoder, place_map: PlaceMap, config: LoopConfig,
                 on_result: Optional[Callable[[dict], None]] = None) -> None:
        if config.rerank and place_map.local is None:
            raise OptionError("--rerank needs a map with local features (built with a SelaVPR bundle)")
        self.encoder, self.map, self.cfg = encoder, place_map, config
        self.on_result = on_result or (lambda r: None)
        self.stats = LoopStats()
        self.timer = encoder.timer
        self.batch_size = encoder.batch_size
        self.rerank_ms = 0.0  # running estimate per frame
        self.batch_ms = 0.0  # running estimate of one batch's processing time

    # -- reader ---------------------------------------------------------------------------------
    def _read(self, source: Iterable[Frame], q: "queue.Queue", live: bool) -> None:
        for frame in source:
            self.stats.received += 1
            if frame.error is not None:
                self.stats.failed += 1
                self.on_result({"frame": frame.index, "name": frame.name, "error": frame.error})
                continue
            if live:
                while True:
                    try:
                        q.put_nowait(frame)
                        break
                    except queue.Full:
                        try:
                            old = q.get_nowait()
                        except queue.Empty:
                            continue
                        if old is not _END:
                            self.stats.dropped_queue += 1
                            self.on_result({"frame": old.index, "name": old.name, "dropped": "queue"})
            else:
                q.put(frame)  # a recorded source waits: nothing is lost
        q.put(_END)

    # -- worker ---------------------------------------------------------------------------------
    def run(self, source: Iterable[Frame], live: bool = False) -> LoopStats:
        q: "queue.Queue" = queue.Queue(maxsize=self.cfg.queue_size)
        reader = threading.Thread(target=self._read, args=(source, q, live), daemon=True)
        reader.start()
        done = False
        while not done:
            batch, done = self._collect(q)
            if batch:
                self._process(batch)
        reader.join()
        return self.stats

    def _collect(self, q: "queue.Queue"):
        budget = self.cfg.budget_ms / 1000.0
        batch: List[Frame] = []
        first = q.get()
        if first is _END:
            return batch, True
        batch.append(first)
        deadline = first.arrival + (budget * self.cfg.batch_wait if budget else 0.0)
        while len(batch) < self.batch_size:
            timeout = deadline - time.perf_counter()
            try:
                item = q.get(timeout=max(timeout, 0)) if timeout > 0 else q.get_nowait()
            except queue.Empty:
                break
            if item is _END:
                return self._drop_stale(batch), True
            batch.append(item)
        return self._drop_stale(batch), False

    def _drop_stale(self, batch: List[Frame]) -> List[Frame]:
        if not self.cfg.budget_ms:
            return batch
        now = time.perf_counter()
        # admission: a frame that cannot finish within the budget (its age plus the expected
        # processing time of a batch) is dropped now rather than late
        keep = [f for f in batch if (now - f.arrival) * 1000 + self.batch_ms <= self.cfg.budget_ms]
        for f in batch:
            if f not in keep:
                self.stats.dropped_stale += 1
                self.on_result({"frame": f.index, "name": f.name, "dropped": "stale"})
        return keep

    def _process(self, batch: List[Frame]) -> None:
        t_start = time.perf_counter()
        for f in batch:
            self.timer.add("decode", f.decode_ms)
            self.timer.add("queue", (t_start - f.arrival) * 1000)  # waiting for the loop: part of "total"
        with self.timer.stage("preprocess", len(batch)):
            images = np.stack([preprocess_image(f.image, self.encoder.pre) for f in batch])
        out = self.encoder.infer(images)
        t0 = time.perf_counter()
        k = max(self.cfg.top_k, self.cfg.rerank)
        scores, ids = self.map.search(out["descriptor"], k)
        self.timer.add("search", (time.perf_counter() - t0) * 1000, len(batch))
        budget = self.cfg.budget_ms
        do_rerank = bool(self.cfg.rerank)
        if do_rerank and budget:
            elapsed = (time.perf_counter() - min(f.arrival for f in batch)) * 1000
            if elapsed + self.rerank_ms * len(batch) > budget:
                do_rerank = False
                self.stats.rerank_skipped += len(batch)
        for i, frame in enumerate(batch):
            row_ids, row_scores = ids[i], scores[i]
            counts = None
            if do_rerank:
                t1 = time.perf_counter()
                head, counts = rerank_shortlist(out["local_features"][i], self.map.local, row_ids[:self.cfg.rerank])
                ms = (time.perf_counter() - t1) * 1000
                self.timer.add("rerank", ms)
                self.rerank_ms = ms if not self.rerank_ms else 0.8 * self.rerank_ms + 0.2 * ms
                score_of = dict(zip(row_ids.tolist(), row_scores.tolist()))
                row_ids = np.concatenate([head, row_ids[self.cfg.rerank:]])
                row_scores = np.array([score_of[j] for j in row_ids])
            latency = (time.perf_counter() - frame.arrival) * 1000
            self.timer.add("total", latency)
            if budget and latency > budget:
                self.stats.over_budget += 1
            top = [{"place": self.map.names[j], "index": int(j), "score": float(s)}
                   for j, s in zip(row_ids[:self.cfg.top_k], row_scores[:self.cfg.top_k]) if j >= 0]
            result = {"frame": frame.index, "name": frame.name, "place": top[0]["place"] if top else None,
                      "score": top[0]["score"] if top else None, "top_k": top,
                      "reranked": do_rerank, "latency_ms": latency}
            if counts is not None:
                result["mnn_count"] = int(counts[0])
            if self.map.poses is not None and top:
                result["pose"] = self.map.poses[top[0]["index"]].tolist()
            self.stats.processed += 1
            self.on_result(result)
        batch_ms = (time.perf_counter() - min(f.arrival for f in batch)) * 1000
        work_ms = (time.perf_counter() - t_start) * 1000
        self.batch_ms = work_ms if not self.batch_ms else 0.7 * self.batch_ms + 0.3 * work_ms
        if budget:
            if batch_ms > budget and self.batch_size > 1:
                self.batch_size = max(1, self.batch_size // 2)
                self.stats.batch_shrinks += 1
            elif batch_ms < budget / 2 and self.batch_size < self.encoder.batch_size:
                self.batch_size += 1


class JsonlWriter:
    """Results, one JSON object per line, flushed as they come."""

    def __init__(self, path) -> None:
        self.f = open(path, "w")
        self.lock = threading.Lock()

    def __call__(self, result: dict) -> None:
        with self.lock:
            self.f.write(json.dumps(result) + "\n")
            self.f.flush()

    def close(self) -> None:
        self.f.close()
