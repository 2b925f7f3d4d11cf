"""From decoded frames to matches: preprocess, inference (+ aggregation in split mode), map
search, optional re-ranking, decision, with each frame's stage times.

The localization loop runs ``Pipeline.run`` on every micro-batch it admits; a single image is a
batch of one through the same code.

Stage times in a ``Match`` are what that frame lived through, in milliseconds: ``decode``,
``queue`` (decoded until its batch started), then its batch's ``preprocess``, ``inference``,
``aggregation`` and ``search``, its own ``rerank``, ``service`` (batch start to its result) and
``total`` (capture to result). A stage that did not run is ``None``.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from .decisions import Decider, DecisionRule
from .encoder import Encoder
from .errors import OptionError
from .maps import PlaceMap
from .preprocess import preprocess_image
from .rerank import rerank_shortlist
from .sources import Frame
from .timing import StageTimer


@dataclass
class Candidate:
    place: str
    index: int
    score: float


@dataclass
class Match:
    """One frame's result: its best place, whether to trust it, the top K and its stage times."""

    frame: int
    name: str
    timestamp: float  # wall clock at capture
    place: Optional[str]
    index: Optional[int]
    score: Optional[float]
    accepted: bool
    reason: str
    consistent: int
    top_k: List[Candidate]
    times_ms: Dict[str, Optional[float]]
    batch: int
    reranked: bool = False
    mnn_count: Optional[int] = None
    pose: Optional[List[float]] = None

    def to_dict(self) -> dict:
        """The JSON-ready record (``status`` processed; ``mnn_count`` and ``pose`` where known)."""
        d = {"status": "processed", "frame": self.frame, "name": self.name, "timestamp": self.timestamp,
             "place": self.place, "index": self.index, "score": self.score, "accepted": self.accepted,
             "reason": self.reason, "consistent": self.consistent,
             "top_k": [{"place": c.place, "index": c.index, "score": c.score} for c in self.top_k],
             "times_ms": dict(self.times_ms), "batch": self.batch, "reranked": self.reranked}
        if self.mnn_count is not None:
            d["mnn_count"] = self.mnn_count
        if self.pose is not None:
            d["pose"] = self.pose
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


def rerank_row(query_local: np.ndarray, database_local: np.ndarray, ids: np.ndarray, scores: np.ndarray,
               k: int) -> Tuple[np.ndarray, np.ndarray, Optional[int]]:
    """One query's ranking with its first ``k`` re-ordered by MNN count (SelaVPR); each place
    keeps its global score. Returns (ids, scores, MNN count of the new first place)."""
    valid = ids >= 0
    ids, scores = ids[valid], scores[valid]
    head, counts = rerank_shortlist(query_local, database_local, ids[:k])
    score_of = dict(zip(ids.tolist(), scores.tolist()))
    ids = np.concatenate([head, ids[k:]])
    return ids, np.array([score_of[j] for j in ids.tolist()], dtype=np.float32), int(counts[0]) if len(counts) else None


class Pipeline:
    """Encoder + map + re-ranking + decisions. Keeps the decision chain across calls: feed it
    the frames of one stream in order."""

    def __init__(self, encoder: Encoder, place_map: PlaceMap, top_k: int = 5, rerank: int = 0,
                 rule: DecisionRule = DecisionRule(), timer: Optional[StageTimer] = None) -> None:
        if rerank and place_map.local is None:
            raise OptionError("--rerank needs a map with local features (built with a SelaVPR bundle)")
        if top_k < 1:
            raise OptionError(f"--top-k {top_k}: expected at least 1")
        self.encoder, self.map = encoder, place_map
        self.top_k, self.rerank = top_k, rerank
        self.decider = Decider(rule)
        self.timer = timer or StageTimer()

    def run(self, frames: List[Frame], start: Optional[float] = None,
            allow_rerank: Callable[[int], bool] = lambda n: True) -> List[Match]:
        """Matches for decoded frames, in order. ``start``: when the batch left the queue;
        ``allow_rerank(n)`` is asked after the search whether the batch may still be re-ranked."""
        start = time.perf_counter() if start is None else start
        t0 = time.perf_counter()
        images = np.stack([preprocess_image(f.image, self.encoder.pre) for f in frames])
        preprocess_ms = (time.perf_counter() - t0) * 1000
        batch_times: Dict[str, float] = {}
        out = self.encoder.infer(images, batch_times)
        t1 = time.perf_counter()
        scores, ids = self.map.search(out["descriptor"], max(self.top_k, self.rerank))
        search_ms = (time.perf_counter() - t1) * 1000
        do_rerank = bool(self.rerank) and allow_rerank(len(frames))
        matches = []
        for i, frame in enumerate(frames):
            row_ids, row_scores = ids[i], scores[i]
            rerank_ms = count = None
            if do_rerank:
                t2 = time.perf_counter()
                row_ids, row_scores, count = rerank_row(out["local_features"][i], self.map.local, row_ids, row_scores,
                                                        self.rerank)
                rerank_ms = (time.perf_counter() - t2) * 1000
            top = [Candidate(self.map.names[j], int(j), float(s))
                   for j, s in zip(row_ids[:self.top_k], row_scores[:self.top_k]) if j >= 0]
            best = top[0] if top else None
            decision = self.decider.decide(best.index if best else None, best.score if best else None)
            done = time.perf_counter()
            times = {"decode": frame.decode_ms, "queue": max(0.0, (start - frame.ready) * 1000),
                     "preprocess": preprocess_ms, "inference": batch_times["inference"],
                     "aggregation": batch_times.get("aggregation"), "search": search_ms, "rerank": rerank_ms,
                     "service": (done - start) * 1000, "total": (done - frame.arrival) * 1000}
            for stage, ms in times.items():
                if ms is not None:
                    self.timer.add(stage, ms)
            pose = self.map.poses[best.index].tolist() if best and self.map.poses is not None else None
            matches.append(Match(frame.index, frame.name, frame.timestamp, best.place if best else None,
                                 best.index if best else None, best.score if best else None, decision.accepted,
                                 decision.reason, decision.consistent, top, times, len(frames), do_rerank, count, pose))
        return matches
