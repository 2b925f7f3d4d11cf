"""SALAD's aggregation in numpy, for bundles exported in split mode (the graph ends with the
token, the per-patch cluster features and the cluster scores).

Same function as ``export/models/salad.py``: log-domain Sinkhorn with a dustbin row (reg 1,
max-shifted log-sum-exp, float32), dustbin dropped, per-cluster L2, token first, channel-major.
"""
from __future__ import annotations

import numpy as np


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    shift = x.max(axis=axis, keepdims=True)
    return shift + np.log(np.exp(x - shift).sum(axis=axis, keepdims=True))


def log_sinkhorn(scores: np.ndarray, dust_bin: float, iterations: int = 3) -> np.ndarray:
    """scores (B, m, n) -> log transport plan (B, m + 1, n) scaled so every column sums to 1."""
    b, m, n = scores.shape
    if n <= m:
        raise ValueError(f"Sinkhorn needs more patches ({n}) than clusters ({m})")
    s = np.concatenate([scores.astype(np.float32), np.full((b, 1, n), dust_bin, dtype=np.float32)], axis=1)
    norm = -np.log(np.float32(n + m))
    log_a = np.full((1, m + 1, 1), norm, dtype=np.float32)
    log_a[0, -1, 0] += np.float32(np.log(n - m))
    log_b = np.full((1, 1, n), norm, dtype=np.float32)
    v = np.zeros((b, 1, n), dtype=np.float32)
    for _ in range(iterations):
        u = log_a - _logsumexp(s + v, axis=2)
        v = log_b - _logsumexp(s + u, axis=1)
    return s + u + v - norm


def _l2(x: np.ndarray, axis: int) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def salad_aggregate(token: np.ndarray, features: np.ndarray, scores: np.ndarray, dust_bin: float,
                    iterations: int = 3) -> np.ndarray:
    """token (B, t), features (B, n, l), scores (B, m, n) -> descriptor (B, t + m * l)."""
    m = scores.shape[1]
    plan = np.exp(log_sinkhorn(scores, dust_bin, iterations)[:, :m, :])  # (B, m, n)
    clusters = np.matmul(features.transpose(0, 2, 1), plan.transpose(0, 2, 1))  # (B, l, m)
    clusters = _l2(clusters, axis=1).reshape(len(clusters), -1)
    return _l2(np.concatenate([_l2(token, axis=-1), clusters], axis=-1), axis=-1).astype(np.float32)
