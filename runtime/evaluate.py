"""Recall@K and match decisions of a bundle on a dataset with ground truth, with the per-stage
latency table.

Recall@K: the fraction of queries with at least one positive among the first K retrieved
database images (exact inner-product search over the encoded database, or the search of a map
given with ``place_map``, exactly as ``localize`` runs it; with ``rerank`` the top ``rerank`` are
re-ordered by SelaVPR's MNN count first).

Decisions: each query's best place is accepted or not by a ``DecisionRule`` (queries in file-name
order form the stream that ``consistency`` looks at). Over score thresholds: precision = correct
accepted / accepted, recall = correct accepted / queries whose true place is in the database
(the usual VPR definition, e.g. VPR-Bench). Recall@100% precision is the highest recall with no
wrong acceptance.
"""
from __future__ import annotations

import dataclasses
import textwrap
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, Tuple

import numpy as np

from .backends import open_backend
from .bundle import Bundle
from .datasets import Dataset, DatasetError
from .decisions import Decider, DecisionRule
from .encoder import Encoder
from .errors import OptionError
from .maps import PlaceMap
from .pipeline import rerank_row
from .timing import StageTimer

KS = (1, 5, 10, 20)
MAX_THRESHOLDS = 500  # a stream rule (consistency > 1) is replayed once per threshold


def recall_at_k(ranked: np.ndarray, positives: Sequence[Set[int]], ks: Sequence[int] = KS) -> Dict[int, float]:
    """ranked: (Q, >= max k) database indices, best first."""
    hits = np.array([[bool(set(row[:k].tolist()) & pos) for k in ks] for row, pos in zip(ranked, positives)])
    return {k: float(hits[:, i].mean()) if len(hits) else 0.0 for i, k in enumerate(ks)}


def exact_search(queries: np.ndarray, database: np.ndarray, k: int,
                 timer: Optional[StageTimer] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product (FAISS flat index): (scores, ids)."""
    import faiss

    index = faiss.IndexFlatIP(database.shape[1])
    index.add(np.ascontiguousarray(database, dtype=np.float32))
    t0 = time.perf_counter()
    scores, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, len(database)))
    if timer is not None and len(queries):
        timer.add("search", (time.perf_counter() - t0) * 1000, len(queries))
    return scores, ids


def retrieve(queries: np.ndarray, database: np.ndarray, k: int, timer: Optional[StageTimer] = None) -> np.ndarray:
    """Exact top-k database indices by inner product."""
    return exact_search(queries, database, k, timer)[1]


def precision_recall(scores: Sequence[float], places: Sequence[int], correct: Sequence[bool],
                     has_match: Sequence[bool], rule: DecisionRule = DecisionRule()) -> Dict[str, List[float]]:
    """Precision and recall of the accepted matches at each score threshold (ascending): the
    distinct best-match scores, or ``MAX_THRESHOLDS`` quantiles of them. ``places``: each query's
    best place (database or map index), which the rule's consistency compares."""
    scores = np.asarray(scores, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    positives = max(int(np.sum(has_match)), 1)
    thresholds = np.unique(scores)
    if len(thresholds) > MAX_THRESHOLDS:
        thresholds = np.unique(np.quantile(scores, np.linspace(0, 1, MAX_THRESHOLDS), method="lower"))
    accepted, right = [], []
    if rule.consistency == 1:  # each query on its own: count from the sorted scores
        order = np.sort(scores)
        ok = np.sort(scores[correct])
        accepted = (len(order) - np.searchsorted(order, thresholds, side="left")).tolist()
        right = (len(ok) - np.searchsorted(ok, thresholds, side="left")).tolist()
    else:
        for t in thresholds:
            decider = Decider(dataclasses.replace(rule, min_score=float(t)))
            flags = [decider.decide(int(p), float(s)).accepted for p, s in zip(places, scores)]
            accepted.append(int(np.sum(flags)))
            right.append(int(np.sum(np.asarray(flags) & correct)))
    precision = [r / a if a else 1.0 for r, a in zip(right, accepted)]
    return {"thresholds": thresholds.tolist(), "accepted": list(map(int, accepted)), "precision": precision,
            "recall": [r / positives for r in right]}


def operating_points(pr: Dict[str, List[float]], target_precision: float) -> dict:
    """Recall@100% precision, and the threshold with the highest recall at ``target_precision``
    or more (None when no threshold reaches it)."""
    def best(min_precision: float) -> Optional[dict]:
        rows = [(r, t, p, a) for t, p, r, a in zip(pr["thresholds"], pr["precision"], pr["recall"], pr["accepted"])
                if a > 0 and p >= min_precision]
        if not rows:
            return None
        r, t, p, a = max(rows, key=lambda x: (x[0], x[1]))  # highest recall; then the stricter threshold
        return {"threshold": t, "precision": p, "recall": r, "accepted": a}

    full = best(1.0)
    return {"recall_at_100_precision": full["recall"] if full else 0.0,
            "threshold_at_100_precision": full["threshold"] if full else None,
            "target_precision": target_precision, "at_target": best(target_precision)}


def plot_precision_recall(pr: Dict[str, List[float]], points: dict, path: Path, title: str) -> bool:
    """The precision-recall curve as a PNG; False when matplotlib is absent (``profile`` extra)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 4))
    # from the strictest threshold to the loosest: recall grows
    ax.plot(pr["recall"][::-1], pr["precision"][::-1], ".-", markersize=3, label="accepted matches")
    target = points["at_target"]
    if target:
        ax.plot([target["recall"]], [target["precision"]], "o",
                label=f"precision >= {points['target_precision']:g}: score >= {target['threshold']:.3f}")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(textwrap.fill(title, 60), fontsize=8)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def evaluate(bundle: Bundle, dataset: Dataset, rerank: int = 0, ks: Sequence[int] = KS,
             batch_size: Optional[int] = None, backend=None, progress: bool = False,
             place_map: Optional[PlaceMap] = None, rule: DecisionRule = DecisionRule()) -> dict:
    local = rerank > 0
    if local and "local_features" not in bundle.outputs:
        raise OptionError(f"--rerank needs local features; {bundle.manifest['model']['name']} has none")
    if local and place_map is not None and place_map.local is None:
        raise OptionError(f"--rerank needs a map with local features; {place_map.folder} has none")
    timer = StageTimer()
    encoder = Encoder(bundle, backend or open_backend(bundle), batch_size=batch_size, timer=timer)
    keep = ("descriptor", "local_features") if local else ("descriptor",)
    q = encoder.encode_files(dataset.queries, progress=progress, keep=keep)
    failures = list(q.failures)
    q_encoded = set(q.names)
    q_keep = [i for i, p in enumerate(dataset.queries) if p.name in q_encoded]
    positives = [dataset.positives[i] for i in q_keep]
    depth = max(max(ks), rerank)
    if place_map is None:
        db = encoder.encode_files(dataset.database, progress=progress, keep=keep)
        if not db.names:
            raise DatasetError(f"{dataset.root}: none of the {len(dataset.database)} database images could be read "
                               "(listed above); nothing to search")
        failures += db.failures
        db_encoded = set(db.names)
        # ground truth refers to dataset indices: map encoded rows back to them
        db_index = np.array([i for i, p in enumerate(dataset.database) if p.name in db_encoded])
        scores, ids = exact_search(q.outputs["descriptor"], db.outputs["descriptor"], depth, timer)
        db_local = db.outputs.get("local_features")
    else:
        by_name = {p.name: i for i, p in enumerate(dataset.database)}
        db_index = np.array([by_name.get(n, -1) for n in place_map.names])  # map places outside the dataset: -1
        t0 = time.perf_counter()
        scores, ids = place_map.search(q.outputs["descriptor"], depth)
        if len(ids):
            timer.add("search", (time.perf_counter() - t0) * 1000, len(ids))
        db_local = place_map.local

    def to_dataset(rows: np.ndarray) -> np.ndarray:
        return np.where(rows >= 0, db_index[np.maximum(rows, 0)], -1)

    results = {"first_stage": recall_at_k(to_dataset(ids), positives, ks)}
    if local:
        for qi in range(len(ids)):
            with timer.stage("rerank"):
                row_ids, row_scores, _ = rerank_row(q.outputs["local_features"][qi], db_local, ids[qi], scores[qi], rerank)
            ids[qi, :len(row_ids)], scores[qi, :len(row_ids)] = row_ids, row_scores
        results["reranked"] = recall_at_k(to_dataset(ids), positives, ks)
    best = to_dataset(ids[:, :1])[:, 0] if len(ids) else np.zeros(0, dtype=np.int64)
    in_db = set(db_index[db_index >= 0].tolist())
    correct = [int(b) in pos for b, pos in zip(best, positives)]
    has_match = [bool(pos & in_db) for pos in positives]
    pr = precision_recall(scores[:, 0] if len(ids) else [], ids[:, 0] if len(ids) else [], correct, has_match, rule)
    return {"dataset": str(dataset.root), "format": dataset.format, "queries": len(q_keep),
            "database": len(db_index), "map": str(place_map.folder) if place_map is not None else None,
            "recall": results["reranked" if local else "first_stage"],
            "recall_first_stage": results["first_stage"], "rerank": rerank, "failures": failures,
            "decisions": {"rule": dataclasses.asdict(rule), "queries_with_a_true_place": int(sum(has_match)), **pr},
            "latency": timer.summary(), "latency_table": timer.table(),
            "bundle": {"model": bundle.manifest["model"]["name"], "precision": bundle.precision,
                       "backend": bundle.backend, "random_weights": bool(bundle.manifest["weights"].get("random_weights"))}}


class StreamRecall:
    """Recall@K and the precision of accepted matches of a localization run, against a dataset's
    ground truth, accumulated record by record: memory follows the dataset, not the run."""

    def __init__(self, dataset: Dataset, ks: Sequence[int]) -> None:
        self.query = {p.name: i for i, p in enumerate(dataset.queries)}
        self.database = {p.name: i for i, p in enumerate(dataset.database)}
        self.positives = dataset.positives
        self.ks = list(ks)
        self.hits = {k: 0 for k in self.ks}
        self.n = self.accepted = self.accepted_correct = 0

    def add(self, record: dict) -> None:
        qi = self.query.get(record.get("name"))
        if record.get("status") != "processed" or qi is None:
            return
        pos = self.positives[qi]
        ranked = [self.database.get(c["place"], -1) for c in record["top_k"]]
        self.n += 1
        for k in self.ks:
            self.hits[k] += bool(set(ranked[:k]) & pos)
        if record["accepted"]:
            self.accepted += 1
            self.accepted_correct += bool(ranked) and ranked[0] in pos

    def report(self) -> str:
        if not self.n:
            return "no localized frame matches the dataset's queries"
        recall = {k: h / self.n for k, h in self.hits.items()}
        precision = f"{self.accepted_correct / self.accepted:.4f}" if self.accepted else "n/a"
        return (f"Recall over {self.n} localized queries: {format_recall(recall)}; accepted {self.accepted}, "
                f"{self.accepted_correct} correct (precision {precision})")


def format_recall(recall: Dict[int, float]) -> str:
    return " ".join(f"R@{k} {v:.4f}" for k, v in recall.items())
