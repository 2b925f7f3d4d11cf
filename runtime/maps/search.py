"""Searching a PCA + IVF-PQ map: a shortlist from the index, re-ranked exactly from the store.

Measured at 200k x 8448 on this 2-core machine under load (BENCHMARKS.md §5), three things cost
far more than the arithmetic of a query (a 8448x256 projection, ~32 short inverted lists, 100
rows x 8448 inner products: well under 1 ms):

* **OpenMP.** A batch-1 faiss search took 8 ms with 2 OpenMP threads and 0.9 ms with one: the
  parallel regions wait for a second thread the loaded scheduler does not give them. A few
  queries are searched on one thread (``SMALL_BATCH``); larger batches keep faiss's threads.
* **float16 -> float32 in numpy** (1.4 ms for 100 rows of 8448; a SIMD conversion is ~20x
  faster). The shortlist's rows are read straight into the code buffer of a small faiss index in
  the store's own encoding (scalar quantizer fp16, or flat float32), which computes the exact
  inner products in SIMD: 0.06 ms for 100 rows.
* **Reading the rows through a memory map**: on a store outside the page cache, one page fault
  after the other, each reading 8 MB around it (this disk's read-ahead). They are read with
  ``pread`` instead, a run of consecutive rows at a time, the runs concurrently (store.StoreFiles).
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator, Optional, Tuple

import faiss
import numpy as np

from .store import StoreFiles

SMALL_BATCH = 8  # fewer queries than this are searched on one OpenMP thread


@contextmanager
def faiss_threads(n: Optional[int]) -> Iterator[None]:
    """Run faiss with ``n`` OpenMP threads inside the block (None: leave them as they are)."""
    if n is None:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


class ExactScorer:
    """A small faiss index in the store's encoding whose code buffer receives the shortlist's
    rows: searching it gives their exact inner products with a query, best first."""

    def __init__(self, dim: int, dtype: str, capacity: int = 256) -> None:
        if np.dtype(dtype) == np.float16:
            self.index = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
        else:
            self.index = faiss.IndexFlatIP(dim)
        self.row_bytes = int(self.index.code_size)
        self.capacity = 0
        self._grow(capacity)

    def _grow(self, capacity: int) -> None:
        self.index.codes.resize(capacity * self.row_bytes)
        self.capacity = capacity
        # a view of the index's own code buffer (valid until the next resize)
        self.buffer = faiss.rev_swig_ptr(self.index.codes.data(), capacity * self.row_bytes).reshape(
            capacity, self.row_bytes)

    def rows(self, m: int) -> np.ndarray:
        """The buffer for ``m`` rows (uint8, m x row bytes), to fill before ``top``."""
        if m > self.capacity:
            self._grow(max(m, 2 * self.capacity))
        return self.buffer[:m]

    def top(self, query: np.ndarray, m: int, k: int) -> Tuple[np.ndarray, np.ndarray]:
        """Scores and positions (among the ``m`` rows filled) of the best ``k``, best first."""
        self.index.ntotal = m
        scores, pos = self.index.search(query.reshape(1, -1), min(k, m))
        return scores[0], pos[0]


class ShortlistSearch:
    """The index's shortlist of each query, re-ranked by exact inner products from the store."""

    def __init__(self, index: faiss.Index, store: StoreFiles, dim: int, dtype: str) -> None:
        self.index, self.store, self.dim, self.dtype = index, store, dim, dtype
        self._local = threading.local()  # one scorer per thread (its buffer is per search)

    def _scorer(self) -> ExactScorer:
        scorer = getattr(self._local, "scorer", None)
        if scorer is None:
            scorer = self._local.scorer = ExactScorer(self.dim, self.dtype)
        return scorer

    def search(self, q: np.ndarray, k: int, depth: int) -> Tuple[np.ndarray, np.ndarray]:
        scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        ids = np.full((len(q), k), -1, dtype=np.int64)
        with faiss_threads(1 if len(q) < SMALL_BATCH else None):
            _, cand = self.index.search(q, depth)
        scorer = self._scorer()
        with faiss_threads(1):  # one query at a time
            for i, row in enumerate(cand):
                row = np.unique(row[row >= 0])  # sorted: runs of consecutive rows are read at once
                self.store.read(row, scorer.rows(len(row)))
                s, pos = scorer.top(q[i], len(row), k)
                ids[i, :len(pos)] = row[pos]
                scores[i, :len(pos)] = s
        return scores, ids
