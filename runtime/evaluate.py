"""Recall@K of a bundle on a dataset with ground truth, with the per-stage latency table.

Recall@K: the fraction of queries with at least one positive among the first K retrieved
database images (exact inner-product search; with ``rerank`` the top ``rerank`` are re-ordered
by SelaVPR's MNN count first).
"""
from __future__ import annotations

import time
from typing import Dict, Optional, Sequence, Set

import numpy as np

from .backends import open_backend
from .bundle import Bundle
from .datasets import Dataset, DatasetError
from .encoder import Encoder
from .errors import OptionError
from .rerank import rerank_shortlist
from .timing import StageTimer

KS = (1, 5, 10, 20)


def recall_at_k(ranked: np.ndarray, positives: Sequence[Set[int]], ks: Sequence[int] = KS) -> Dict[int, float]:
    """ranked: (Q, >= max k) database indices, best first."""
    hits = np.array([[bool(set(row[:k].tolist()) & pos) for k in ks] for row, pos in zip(ranked, positives)])
    return {k: float(hits[:, i].mean()) if len(hits) else 0.0 for i, k in enumerate(ks)}


def retrieve(queries: np.ndarray, database: np.ndarray, k: int, timer: Optional[StageTimer] = None) -> np.ndarray:
    """Exact top-k by inner product (FAISS flat index)."""
    import faiss

    index = faiss.IndexFlatIP(database.shape[1])
    index.add(np.ascontiguousarray(database, dtype=np.float32))
    t0 = time.perf_counter()
    _, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, len(database)))
    if timer is not None and len(queries):
        timer.add("search", (time.perf_counter() - t0) * 1000, len(queries))
    return ids


def evaluate(bundle: Bundle, dataset: Dataset, rerank: int = 0, ks: Sequence[int] = KS,
             batch_size: Optional[int] = None, backend=None, progress: bool = False) -> dict:
    local = rerank > 0
    if local and "local_features" not in bundle.outputs:
        raise OptionError(f"--rerank needs local features; {bundle.manifest['model']['name']} has none")
    timer = StageTimer()
    encoder = Encoder(bundle, backend or open_backend(bundle), batch_size=batch_size, timer=timer)
    keep = ("descriptor", "local_features") if local else ("descriptor",)
    db = encoder.encode_files(dataset.database, progress=progress, keep=keep)
    if not db.names:
        raise DatasetError(f"{dataset.root}: none of the {len(dataset.database)} database images could be read "
                           "(listed above); nothing to search")
    q = encoder.encode_files(dataset.queries, progress=progress, keep=keep)
    failures = db.failures + q.failures
    # ground truth refers to dataset indices: map encoded rows back to them
    db_encoded, q_encoded = set(db.names), set(q.names)
    db_index = np.array([i for i, p in enumerate(dataset.database) if p.name in db_encoded])
    q_keep = [i for i, p in enumerate(dataset.queries) if p.name in q_encoded]
    positives = [dataset.positives[i] for i in q_keep]
    depth = max(max(ks), rerank)
    ranked = retrieve(q.outputs["descriptor"], db.outputs["descriptor"], depth, timer)
    first_stage = db_index[ranked]
    results = {"first_stage": recall_at_k(first_stage, positives, ks)}
    if local:
        reranked = []
        for qi in range(len(ranked)):
            with timer.stage("rerank"):
                ids, _ = rerank_shortlist(q.outputs["local_features"][qi], db.outputs["local_features"], ranked[qi, :rerank])
            reranked.append(np.concatenate([ids, ranked[qi, rerank:]]))
        results["reranked"] = recall_at_k(db_index[np.array(reranked)], positives, ks)
    return {"dataset": str(dataset.root), "format": dataset.format, "queries": len(q_keep),
            "database": len(db_index), "recall": results["reranked" if local else "first_stage"],
            "recall_first_stage": results["first_stage"], "rerank": rerank, "failures": failures,
            "latency": timer.summary(), "latency_table": timer.table(),
            "bundle": {"model": bundle.manifest["model"]["name"], "precision": bundle.precision,
                       "backend": bundle.backend, "random_weights": bool(bundle.manifest["weights"].get("random_weights"))}}


def format_recall(recall: Dict[int, float]) -> str:
    return " ".join(f"R@{k} {v:.4f}" for k, v in recall.items())
