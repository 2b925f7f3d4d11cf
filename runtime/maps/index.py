"""The FAISS index of a map: choice, training, per-segment parts, assembly at load.

Choice (``auto``) from the map's size and the memory budget: Flat inner product while it fits and
the map is small enough for brute force (100k); otherwise PCA + IVF-PQ whose shortlist is
re-ranked exactly from the descriptor store; SQfp16 for a small map over budget. HNSW and SQfp16
stay available with ``--index``. Measured in BENCHMARKS.md §5.

PCA + IVF-PQ (the recipe of shared/research/round2-anchors.md §5, autofaiss' choice at 1M): PCA
to 256-D by a randomized SVD (seconds at 8448-D, where faiss's PCAMatrix eigen-decomposes the
full covariance on one thread), whitened; an IVF of 4 sqrt(n) lists, PQ codes of 4 dimensions per
byte on the residuals, L2 in the whitened space. The shortlist is then re-ranked exactly (inner
products of the full descriptors) from the store (search.py), so the whitened space only has to
bring the right rows into the shortlist, not to order them.

Why whitened (PCA-whitening, Jégou & Chum, ECCV 2012; the reduction NetVLAD and MegaLoc use):
the few directions of largest variance across a map are mostly appearance (each traversal's
season or daylight), shared by every place seen under it. Unwhitened, they dominate L2 in the
reduced space: on the 1M benchmark map k-means gave every list views of a single traversal, a
place's views sat in one list per traversal, and a query under an appearance the map has not seen,
about equally far from all of them, found the list of its best match ranked 76th at p90 and 279th
at p99 of 4096 (R@1 0.82 at nprobe 32). Scaled to unit variance, those directions weigh no more
than any other, a place's traversals share a list, and that list ranked first for 298 of the 300
queries and second for the other 2 (R@1 1.00 from nprobe 2; the default probes 16). Measured with
benchmarks/maps_coarse.py, BENCHMARKS.md §5. The exact re-rank orders the candidates, so noisy
low-variance components cost candidates, not order; their variance is floored at
``WHITEN_FLOOR`` of the largest (at most 100x in scale). Maps trained before (``params`` without
``whiten``) keep their unwhitened transform, stored with their training, until retrained.

The coarse quantizer is flat (exact) up to 8192 lists (8M places) and an HNSW graph over the
centroids beyond. Flat costs nlist x 256 multiply-adds per query (0.08 ms at 4096 lists). The
graph is not trusted below (BENCHMARKS.md §5): over the 4096 centroids of the 1M benchmark map an
HNSW32 graph (efConstruction 40) returned a query's nearest list for 0.60 of the queries at
efSearch 256 (whitened centroids) and for 0.91 even with every node allowed. efSearch is in
effect; the limit is reachability: faiss's neighbour pruning keeps each node's links to hub-like
central centroids, up to 444 of the 4096 get no incoming link at level 0, and the compact list of
a query's own place is often one of those. From 16384 lists the graph is used, searched deeply
(efSearch 1024) and with the rows assigned at efSearch 512.

Incremental: the index is trained once, on a seeded sample of the map (bounded: 30k rows for the
PCA, 40 per centroid for the IVF, 200k at most). Each segment's part (its inverted-list numbers
and PQ codes) is computed from its own descriptors when it is added, so ``map add`` costs
O(added). It is retrained (every part recomputed, descriptors untouched) when the map has grown
to 4x the size it was trained at, or when ``auto`` would now choose another index type. Flat and
SQfp16 have nothing to train: they are filled from the store at load. HNSW's graph is one
structure: ``map add`` extends a copy of it (O(map) in index size). The whitening is part of the
training: an added segment is projected with it (an appearance the training never saw lies mostly
outside its 256 components, as a query's does).
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, Optional, Tuple

import faiss
import numpy as np

from .layout import MapError

INDEX_TYPES = ("flat", "sqfp16", "hnsw", "ivfpq")
FLAT_MAX = 100_000  # above this, brute force costs > 0.2 s per 8448-D query on 2 cores (BENCHMARKS.md §5)
IVFPQ_MIN = 1000  # IVF-PQ needs this many vectors to train
HNSW_COARSE_LISTS = 16_384  # an HNSW graph over the IVF centroids from this many lists up (module doc)
HNSW_M = 32
PCA_DIM = 256
PCA_SAMPLE = 30_000
WHITEN_FLOOR = 1e-4  # smallest component variance whitened, relative to the largest (pca_transform)
IVF_SAMPLE_PER_LIST = 40
IVF_SAMPLE_MAX = 200_000
RETRAIN_GROWTH = 4
SEED = 0
NPROBE = 16  # lists probed per query by default (BENCHMARKS.md §5); PlaceMap.tune sets it per reader


def ivf_params(n: int, d: int) -> dict:
    pca = min(d, PCA_DIM)
    nlist = int(2 ** round(math.log2(max(8.0, 4 * math.sqrt(n)))))
    nlist = max(8, min(nlist, n // IVF_SAMPLE_PER_LIST, 65536))
    return {"pca_dim": pca, "whiten": True, "nlist": nlist, "pq_m": max(1, pca // 4), "nbits": 8,
            "coarse": "hnsw" if nlist >= HNSW_COARSE_LISTS else "flat", "nprobe": min(nlist, NPROBE),
            "shortlist": 100}


def index_bytes(kind: str, n: int, d: int) -> int:
    """Approximate resident memory of an index over n vectors of dimension d."""
    if kind == "flat":
        return n * d * 4
    if kind == "sqfp16":
        return n * d * 2
    if kind == "hnsw":
        return n * d * 4 + n * HNSW_M * 2 * 4
    p = ivf_params(max(n, IVFPQ_MIN), d)
    coarse = p["nlist"] * p["pca_dim"] * 4 + (p["nlist"] * HNSW_M * 2 * 4 if p["coarse"] == "hnsw" else 0)
    return n * (p["pq_m"] + 8) + p["pca_dim"] * d * 4 + coarse  # codes + ids + PCA + centroids


def choose_index(n: int, d: int, budget: Optional[int], requested: str = "auto") -> str:
    if requested != "auto":
        if requested not in INDEX_TYPES:
            raise MapError(f"unknown index type {requested!r}; expected auto or one of {INDEX_TYPES}")
        return requested
    budget = budget if budget is not None else 1 << 62
    if index_bytes("flat", n, d) <= budget and n <= FLAT_MAX:
        return "flat"
    if n >= IVFPQ_MIN:
        return "ivfpq"
    return "sqfp16" if index_bytes("sqfp16", n, d) <= budget else "flat"


def needs_retrain(index_meta: dict, total: int, d: int) -> bool:
    """Whether adding images to ``total`` should retrain the index (see the module's doc)."""
    kind = index_meta["type"]
    if not index_meta.get("pinned") and choose_index(total, d, index_meta.get("memory_budget")) != kind:
        return True
    return kind == "ivfpq" and total >= RETRAIN_GROWTH * index_meta.get("trained_on", total)


def _orthonormal(y: np.ndarray) -> np.ndarray:
    """An orthonormal basis of y's columns from the eigen-decomposition of the small Gram matrix
    (matrix products only: LAPACK's threaded QR slows down tenfold on a loaded 2-core machine)."""
    w, v = np.linalg.eigh((y.T @ y).astype(np.float64))
    keep = w > w.max() * 1e-10
    return (y @ (v[:, keep] / np.sqrt(w[keep])).astype(np.float32)).astype(np.float32)


def pca_transform(x: np.ndarray, k: int, whiten: bool = False) -> faiss.LinearTransform:
    """PCA to ``k`` dimensions by a randomized SVD (Halko et al. 2011: range finder with two power
    iterations), in matrix products and small eigen-decompositions. ``whiten``: each component
    scaled to unit variance (PCA-whitening, module doc), its variance floored at ``WHITEN_FLOOR``
    of the largest so that directions the sample barely spans are not blown up."""
    n, d = x.shape
    if k >= d and not whiten:
        return _linear_transform(np.eye(d, dtype=np.float32), np.zeros(d, dtype=np.float32))
    mean = x.mean(axis=0)
    xc = x - mean
    if k >= d:  # every component: the eigen-decomposition of the small covariance
        w, u = np.linalg.eigh((xc.T @ xc).astype(np.float64))
        top = np.argsort(w)[::-1][:d]
        w, a = w[top], np.ascontiguousarray(u[:, top].T, dtype=np.float32)
    else:
        rng = np.random.default_rng(SEED)
        y = xc @ rng.standard_normal((d, min(d, k + 16))).astype(np.float32)
        for _ in range(2):
            y = _orthonormal(y)
            y = xc @ (xc.T @ y)
        q = _orthonormal(y)
        bmat = q.T @ xc  # (l, d): its right singular vectors are the principal axes
        w, u = np.linalg.eigh((bmat @ bmat.T).astype(np.float64))
        top = np.argsort(w)[::-1][:k]
        w = w[top]  # squared singular values of xc: n x the variance along each axis
        a = np.ascontiguousarray((u[:, top] / np.sqrt(np.maximum(w, 1e-30))).T.astype(np.float32) @ bmat)
    if whiten:
        var = np.maximum(w, 0) / max(n, 1)
        a *= (1 / np.sqrt(np.maximum(var, max(var.max(), 1e-30) * WHITEN_FLOOR))).astype(np.float32)[:, None]
    return _linear_transform(a, (-a @ mean).astype(np.float32))


def _linear_transform(a: np.ndarray, b: np.ndarray) -> faiss.LinearTransform:
    """faiss's y = A x + b, trained, from ``a`` (out x in) and ``b``."""
    lt = faiss.LinearTransform(a.shape[1], a.shape[0], True)
    faiss.copy_array_to_vector(np.ascontiguousarray(a, dtype=np.float32).ravel(), lt.A)
    faiss.copy_array_to_vector(b, lt.b)
    lt.is_trained = True
    return lt


def sample_ids(n: int, count: int, seed: int = SEED) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(n, min(n, count), replace=False))


def train_ivfpq(rows, n: int) -> Tuple[faiss.Index, dict]:
    """An empty, trained PCA + IVF-PQ index from a seeded sample of ``rows``."""
    d = rows.shape[1]
    p = ivf_params(n, d)
    pca = pca_transform(np.asarray(rows[sample_ids(n, PCA_SAMPLE)], dtype=np.float32), p["pca_dim"],
                        p.get("whiten", False))
    ids = ivf_sample(n, p["nlist"])
    xt = np.concatenate([pca.apply(np.asarray(rows[ids[i:i + 8192]], dtype=np.float32))
                         for i in range(0, len(ids), 8192)])
    return faiss.IndexPreTransform(pca, train_ivf(xt, p)), p


def ivf_sample(n: int, nlist: int) -> np.ndarray:
    """The rows (of ``n``) the IVF's k-means and the PQ codebooks are trained on."""
    return sample_ids(n, min(IVF_SAMPLE_MAX, max(PCA_SAMPLE, IVF_SAMPLE_PER_LIST * nlist)), SEED + 1)


def train_ivf(xt: np.ndarray, p: dict) -> faiss.IndexIVFPQ:
    """An empty IVF-PQ index trained on reduced rows ``xt`` (k-means lists, PQ on the residuals)."""
    dp = xt.shape[1]
    quantizer = faiss.IndexHNSWFlat(dp, HNSW_M) if p["coarse"] == "hnsw" else faiss.IndexFlatL2(dp)
    ivf = faiss.IndexIVFPQ(quantizer, dp, p["nlist"], p["pq_m"], p["nbits"])
    clustering = faiss.IndexFlatL2(dp)  # exact k-means; a graph quantizer only serves assignment
    if p["coarse"] == "hnsw":
        ivf.clustering_index = clustering  # a pointer faiss does not own: ``clustering`` keeps it alive
        quantizer.hnsw.efConstruction = 40
        quantizer.hnsw.efSearch = 512  # assigning the map's rows to their lists (module doc)
    ivf.use_precomputed_table = -1  # no precomputed distance tables (see read_trained)
    ivf.cp.niter = 10
    ivf.cp.seed = ivf.pq.cp.seed = SEED
    ivf.cp.min_points_per_centroid = ivf.pq.cp.min_points_per_centroid = 1  # sample sizes are ours (quiet)
    ivf.cp.max_points_per_centroid = 1 << 20  # the IVF sample is already bounded; PQ keeps faiss' 256 per code
    ivf.train(xt)
    ivf.clustering_index = None
    return ivf


def read_trained(path) -> faiss.Index:
    """A trained index as written, without faiss's precomputed IVF-PQ distance tables: they take
    nlist x 64 x 256 floats (268 MB of resident memory at 1M places, 4096 lists) and did not make
    a batch-1 search faster (2.0 ms with or without them at 200k, identical results; BENCHMARKS.md
    §5): the table of each of the 32 lists probed is computed at query time instead."""
    return faiss.read_index(str(path), faiss.IO_FLAG_SKIP_PRECOMPUTE_TABLE)


def _ivf(index: faiss.Index) -> faiss.IndexIVF:
    return faiss.extract_index_ivf(index)


def ivfpq_part(trained: faiss.Index, chunks: Iterable[np.ndarray]) -> Dict[str, np.ndarray]:
    """A segment's part of a trained PCA + IVF-PQ index: inverted-list number and PQ code per row."""
    pre = faiss.downcast_VectorTransform(faiss.downcast_index(trained).chain.at(0))
    ivf = _ivf(trained)
    lists, codes = [], []
    for x in chunks:
        xt = np.ascontiguousarray(pre.apply(np.ascontiguousarray(x, dtype=np.float32)))
        _, assign = ivf.quantizer.search(xt, 1)
        assign = np.ascontiguousarray(assign.ravel())
        c = np.empty((len(xt), ivf.code_size), dtype=np.uint8)
        ivf.encode_vectors(len(xt), faiss.swig_ptr(xt), faiss.swig_ptr(assign), faiss.swig_ptr(c))
        lists.append(assign.astype(np.int32))
        codes.append(c)
    return {"lists": np.concatenate(lists), "codes": np.concatenate(codes)}


def fill_ivfpq(trained: faiss.Index, parts: Iterable[Tuple[int, Dict[str, np.ndarray]]], params: dict) -> faiss.Index:
    """Put each segment's codes (with global ids from its offset) into the trained index."""
    ivf = _ivf(trained)
    total = 0
    for offset, part in parts:
        lists, codes = part["lists"].astype(np.int64), part["codes"]
        if len(lists) != len(codes) or codes.shape[1:] != (ivf.code_size,) or \
                (len(lists) and (lists.min() < 0 or lists.max() >= ivf.nlist)):
            raise MapError("an index part does not fit its training; rebuild the map")
        order = np.argsort(lists, kind="stable")
        ids = (offset + order).astype(np.int64)
        sorted_codes = np.ascontiguousarray(codes[order])
        counts = np.bincount(lists, minlength=ivf.nlist)
        starts = np.concatenate([[0], np.cumsum(counts)])
        for li in np.flatnonzero(counts):
            a, b = starts[li], starts[li + 1]
            ivf.invlists.add_entries(int(li), int(b - a), faiss.swig_ptr(ids[a:b]), faiss.swig_ptr(sorted_codes[a:b]))
        total += len(lists)
    ivf.ntotal = total
    trained.ntotal = total
    set_search_params(trained, params)
    return trained


def set_search_params(index: faiss.Index, params: dict) -> None:
    ivf = _ivf(index)
    ivf.nprobe = min(int(params["nprobe"]), ivf.nlist)
    if params.get("coarse") == "hnsw":  # queries choose their lists deeply (module doc)
        faiss.downcast_index(ivf.quantizer).hnsw.efSearch = max(1024, 16 * ivf.nprobe)


def new_hnsw(d: int) -> faiss.Index:
    index = faiss.IndexHNSWFlat(d, HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 40
    index.hnsw.efSearch = 64
    return index


def filled_flat(kind: str, d: int, chunks: Iterable[np.ndarray]) -> faiss.Index:
    """Flat or SQfp16 (inner product) filled from the store."""
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    else:
        index = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    for x in chunks:
        index.add(np.ascontiguousarray(x, dtype=np.float32))
    return index
