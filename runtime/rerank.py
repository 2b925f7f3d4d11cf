"""SelaVPR re-ranking: order candidates by the number of mutual nearest neighbours (MNN) between
their dense local features and the query's (official ``local_matching.match_batch_tensor``).

The official code builds one (K, 3721, 3721) similarity tensor per query (about 5.5 GB at
K = 100, shared/research/sela-crica-sota.md §1.5). Here candidates are scored in chunks whose
similarity block stays under ``max_bytes``, so memory is bounded whatever K is.

Two documented differences from the official code, neither of which changes a ranking it could
produce: a pair with exactly one MNN scores 1 (the official ``squeeze`` quirk scores it 0), and
equal counts keep their first-stage order (the official ``argsort()[::-1]`` leaves ties arbitrary).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def _flatten(local: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(local.reshape(local.shape[0], -1, local.shape[-1]), dtype=np.float32)


def mnn_counts(query: np.ndarray, candidates: np.ndarray, max_bytes: int = 256 << 20) -> np.ndarray:
    """Mutual-nearest-neighbour counts between one query and each candidate.

    query: (H, W, D) or (L, D) L2-normalised local features; candidates: (K, H, W, D) or (K, L, D).
    Returns (K,) int64.
    """
    q = _flatten(query[None])[0]  # (L, D)
    c = _flatten(candidates)  # (K, L, D)
    k, lc, _ = c.shape
    lq = q.shape[0]
    per_candidate = lc * lq * 4
    chunk = max(1, int(max_bytes // per_candidate))
    counts = np.empty(k, dtype=np.int64)
    arange_q = np.arange(lq)
    for start in range(0, k, chunk):
        sim = np.matmul(c[start:start + chunk], q.T)  # (k', Lc, Lq): candidate location x query location
        best_c = sim.argmax(axis=1)  # (k', Lq): best candidate location for each query location
        best_q = sim.argmax(axis=2)  # (k', Lc): best query location for each candidate location
        back = np.take_along_axis(best_q, best_c, axis=1)  # query -> candidate -> query
        counts[start:start + chunk] = (back == arange_q).sum(axis=1)
    return counts


def rerank(candidates: Sequence[int], counts: np.ndarray) -> np.ndarray:
    """Candidates re-ordered by descending MNN count; ties keep their first-stage order."""
    order = np.argsort(-np.asarray(counts), kind="stable")
    return np.asarray(candidates)[order]


def rerank_shortlist(query_local: np.ndarray, database_local: np.ndarray, ids: np.ndarray,
                     max_bytes: int = 256 << 20) -> tuple:
    """Re-order database indices ``ids`` (first-stage order) for one query by MNN count.

    ``database_local`` may be a memory map: only the candidates' rows are read.
    Returns (reordered ids, counts in the new order).
    """
    ids = np.asarray(ids)
    ids = ids[ids >= 0]
    cand = np.asarray(database_local[np.sort(ids)], dtype=np.float32)
    order_in_sorted = np.argsort(np.argsort(ids))  # position of each id within the sorted read
    counts = mnn_counts(np.asarray(query_local, dtype=np.float32), cand[order_in_sorted], max_bytes)
    order = np.argsort(-counts, kind="stable")
    return ids[order], counts[order]
