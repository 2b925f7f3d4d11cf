"""The coarse stage of a kept city-scale map (``benchmarks/maps.py --keep``): which inverted lists a
query probes and what they cost, for variants of the IVF's reduced space and of the assignment of
rows to lists, compared in one process without rebuilding the map (BENCHMARKS.md §5).

The first run caches under ``DIR/coarse/``, from one pass over the map's store: every row reduced
by the runtime's PCA (unwhitened, float32: 1 GB at 1M x 256), the scale per component of the
runtime's whitened PCA (the same axes, rescaled), and the exact inner products of the queries with
every row (float32, 300 x n: 1.2 GB), which re-rank any shortlist exactly. Then, per variant, the
IVF is trained as the runtime trains it (``index.train_ivf``, on the same sample) and reported:

* **rank**: of the best-ranked list holding the query's exact top-1, among all lists ordered by the
  query's distance to their centroids (p50 / p90 / p99 / max);
* **hit@nprobe**: share of queries whose exact top-1 is in the ``nprobe`` lists probed, and the PQ
  codes scanned there (mean), the cost that deep probing multiplies;
* **R@1 / R@10** against exact search after the PQ shortlist (100) is re-ranked exactly (duplicates
  removed), and the CPU time of the IVF search alone (one thread, batch 1; the projection, the
  reading of the shortlist's rows and their exact scores add ~0.7 ms, BENCHMARKS.md §5).

Variants: ``plain`` (unwhitened PCA, as maps were trained before), ``spill`` (each row also in
its second-nearest list), ``soar`` (the second list by the loss of SOAR, Sun et al., NeurIPS 2023:
||r'||^2 + lambda <r, r'>^2 / ||r||^2, lambda 1), ``whiten-0.25`` (components scaled by
variance^-0.25), ``whitened`` (the runtime's: variance^-0.5). ``--hnsw`` also builds an HNSW32
graph (efConstruction 40) over each variant's centroids and reports how many have no incoming
link and how often the graph returns the query's exact nearest list.

    python benchmarks/maps.py --n 1000000 --dim 8448 --store-dtype float16 --keep --workdir W
    python benchmarks/maps_coarse.py W/vpr-maps-XXXX [--variants plain,whitened] [--hnsw]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Dict, List

import faiss
import numpy as np

from common import save, table
from runtime.cli_util import ArgumentParser, run_cli  # noqa: E402
from runtime.maps import load_map  # noqa: E402
from runtime.maps.index import PCA_SAMPLE, ivf_params, ivf_sample, pca_transform, sample_ids, train_ivf  # noqa: E402

VARIANTS = {"plain": (0.0, None), "spill": (0.0, "second"), "soar": (0.0, "soar"),
            "whiten-0.25": (-0.25, None), "whitened": (-0.5, None)}
CHUNK = 65536


def prepare(kept: Path) -> Path:
    """Cache the reduced rows, the whitening scale and the exact scores (one pass over the store)."""
    out = kept / "coarse"
    if (out / "done").exists():
        return out
    out.mkdir(exist_ok=True)
    m = load_map(kept / "map", verify="none")
    rows, n, d = m.descriptors, len(m), m.meta["dim"]
    k = ivf_params(n, d)["pca_dim"]
    q = np.load(kept / "queries.npy")
    sample = np.asarray(rows[sample_ids(n, PCA_SAMPLE)], dtype=np.float32)
    plain = pca_transform(sample, k)
    white = pca_transform(sample, k, whiten=True)
    del sample
    a = faiss.vector_to_array(plain.A).reshape(k, d)
    scale = np.linalg.norm(faiss.vector_to_array(white.A).reshape(k, d), axis=1) / np.linalg.norm(a, axis=1)
    np.save(out / "whiten_scale.npy", scale.astype(np.float32))
    np.save(out / "queries_reduced.npy", plain.apply(q))
    proj = np.lib.format.open_memmap(out / "rows_reduced.npy", "w+", np.float32, (n, k))
    scores = np.lib.format.open_memmap(out / "scores.npy", "w+", np.float32, (len(q), n))
    for start, x in rows.chunks(8192):
        x = np.asarray(x, dtype=np.float32)
        proj[start:start + len(x)] = plain.apply(x)
        scores[:, start:start + len(x)] = q @ x.T
    proj.flush()
    scores.flush()
    m.close()
    (out / "done").write_text("")
    return out


class Lab:
    """The cached rows and queries in one reduced space, and the queries' exact answers."""

    def __init__(self, cache: Path, truth: np.ndarray, power: float) -> None:
        s = np.load(cache / "whiten_scale.npy") ** (power / -0.5) if power else None
        self.x = np.load(cache / "rows_reduced.npy")
        self.q = np.load(cache / "queries_reduced.npy")
        if s is not None:
            self.x *= s
            self.q *= s
        self.scores = np.load(cache / "scores.npy", mmap_mode="r")
        self.truth = truth
        self.n = len(self.x)

    def nearest_lists(self, centroids: np.ndarray, k: int):
        index = faiss.IndexFlatL2(centroids.shape[1])
        index.add(centroids)
        dist, lists = np.empty((self.n, k), np.float32), np.empty((self.n, k), np.int64)
        for a in range(0, self.n, CHUNK):
            dist[a:a + CHUNK], lists[a:a + CHUNK] = index.search(self.x[a:a + CHUNK], k)
        return dist, lists

    def soar(self, centroids: np.ndarray, dist: np.ndarray, lists: np.ndarray, lam: float = 1.0) -> np.ndarray:
        """The second list of every row by SOAR's loss, among its nearest candidates."""
        out = np.empty(self.n, np.int64)
        for a in range(0, self.n, CHUNK // 4):
            x, cand = self.x[a:a + CHUNK // 4], lists[a:a + CHUNK // 4]
            r = x - centroids[cand[:, 0]]
            rr = np.maximum((r * r).sum(1), 1e-12)
            par = np.einsum("md,mkd->mk", r, x[:, None, :] - centroids[cand[:, 1:]])
            loss = dist[a:a + CHUNK // 4, 1:] + lam * par * par / rr[:, None]
            out[a:a + CHUNK // 4] = cand[:, 1:][np.arange(len(cand)), loss.argmin(1)]
        return out

    def fill(self, ivf: faiss.IndexIVFPQ, assignment: np.ndarray) -> None:
        """Every row encoded into each of its lists (its residual to that list's centroid)."""
        for col in range(assignment.shape[1]):
            for a in range(0, self.n, CHUNK):
                x = np.ascontiguousarray(self.x[a:a + CHUNK])
                lists = np.ascontiguousarray(assignment[a:a + CHUNK, col])
                ids = np.arange(a, a + len(x), dtype=np.int64)
                ivf.add_core(len(x), faiss.swig_ptr(x), faiss.swig_ptr(ids), faiss.swig_ptr(lists))

    def rerank(self, cand: np.ndarray, k: int = 10) -> np.ndarray:
        out = np.full((len(cand), k), -1)
        for i, row in enumerate(cand):
            row = np.unique(row[row >= 0])
            s = np.asarray(self.scores[i, row])
            top = np.lexsort((row, -s))[:k]
            out[i, :len(top)] = row[top]
        return out


def recall(ids: np.ndarray, truth: np.ndarray, k: int) -> float:
    if k == 1:
        return float(np.mean(ids[:, 0] == truth[:, 0]))
    return float(np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(ids, truth)]))


def coarse(lab: Lab, centroids: np.ndarray, assignment: np.ndarray, nprobes: List[int]) -> Dict[str, object]:
    """Rank of the exact top-1's best list, and per nprobe its hit share and the codes scanned."""
    sizes = np.bincount(assignment.ravel(), minlength=len(centroids))
    d = ((lab.q[:, None, :] - centroids[None]) ** 2).sum(-1)
    order = np.argsort(d, axis=1)
    rank = np.empty_like(order)
    rank[np.arange(len(order))[:, None], order] = np.arange(len(centroids))[None]
    r = rank[np.arange(len(order))[:, None], assignment[lab.truth[:, 0]]].min(1)
    codes = np.cumsum(sizes[order], axis=1)
    return {"rank": [float(np.percentile(r, p)) for p in (50, 90, 99)] + [int(r.max())],
            "sizes": [float(np.median(sizes)), float(np.percentile(sizes, 99)), int(sizes.max())],
            "hit": {p: float(np.mean(r < p)) for p in nprobes},
            "codes": {p: float(codes[:, p - 1].mean()) for p in nprobes}}


def searched(lab: Lab, ivf: faiss.IndexIVFPQ, nprobe: int, depth: int = 100) -> Dict[str, float]:
    faiss.omp_set_num_threads(1)
    ivf.nprobe = nprobe
    ivf.search(lab.q[:20], depth)  # warm
    cand, cpu = [], []
    for i in range(len(lab.q)):
        t = time.thread_time()
        _, ids = ivf.search(lab.q[i:i + 1], depth)
        cpu.append((time.thread_time() - t) * 1000)
        cand.append(ids[0])
    ids = lab.rerank(np.array(cand))
    return {"r1": recall(ids, lab.truth, 1), "r10": recall(ids, lab.truth, 10),
            "cpu_p50_ms": float(np.percentile(cpu, 50)), "cpu_p95_ms": float(np.percentile(cpu, 95))}


def hnsw_reach(lab: Lab, centroids: np.ndarray, efs: List[int]) -> Dict[str, object]:
    """An HNSW32 graph over the centroids: nodes without an incoming level-0 link, and the share of
    queries whose exact nearest list it returns first."""
    faiss.omp_set_num_threads(2)
    graph = faiss.IndexHNSWFlat(centroids.shape[1], 32)
    graph.hnsw.efConstruction = 40
    graph.add(centroids)
    faiss.omp_set_num_threads(1)
    hn = graph.hnsw
    offsets, links = faiss.vector_to_array(hn.offsets), faiss.vector_to_array(hn.neighbors)
    level0 = np.stack([links[offsets[v]:offsets[v] + hn.nb_neighbors(0)] for v in range(len(centroids))])
    orphans = int((np.bincount(level0[level0 >= 0], minlength=len(centroids)) == 0).sum())
    flat = faiss.IndexFlatL2(centroids.shape[1])
    flat.add(centroids)
    _, exact = flat.search(lab.q, 1)
    found = {}
    for ef in efs:
        hn.efSearch = ef
        _, got = graph.search(lab.q, 1)
        found[ef] = float(np.mean(got[:, 0] == exact[:, 0]))
    return {"orphans": orphans, "nearest_found": found}


def main() -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kept", type=Path, help="a folder kept by benchmarks/maps.py --keep")
    p.add_argument("--variants", default="plain,spill,soar,whiten-0.25,whitened",
                   help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--nprobe", default="1,2,4,8,16,32,64,128", help="lists probed, for hit share and codes")
    p.add_argument("--search", default="2,4,8,16,32", help="nprobe values searched with the PQ shortlist")
    p.add_argument("--hnsw", action="store_true", help="also an HNSW graph over each variant's centroids")
    args = p.parse_args()
    missing = [f for f in ("map", "queries.npy", "truth16.npy") if not (args.kept / f).exists()]
    if missing:
        p.error(f"{args.kept}: no {', '.join(missing)}; give a folder kept by benchmarks/maps.py --keep")
    names = args.variants.split(",")
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; expected some of {list(VARIANTS)}")
    nprobes = [int(v) for v in args.nprobe.split(",")]
    t = time.perf_counter()
    cache = prepare(args.kept)
    prepare_s = time.perf_counter() - t
    truth = np.load(args.kept / "truth16.npy")
    results, rows, search_rows, hnsw_rows = {}, [], [], []
    for name in names:
        power, spill = VARIANTS[name]
        lab = Lab(cache, truth, power)
        params = {**ivf_params(lab.n, lab.x.shape[1]), "coarse": "flat"}
        t = time.perf_counter()
        ivf = train_ivf(np.ascontiguousarray(lab.x[ivf_sample(lab.n, params["nlist"])]), params)
        centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
        dist, lists = lab.nearest_lists(centroids, 8 if spill == "soar" else 2)
        if spill is None:
            assignment = lists[:, :1]
        elif spill == "second":
            assignment = lists[:, :2]
        else:
            assignment = np.stack([lists[:, 0], lab.soar(centroids, dist, lists)], 1)
        train_s = time.perf_counter() - t
        res = coarse(lab, centroids, assignment, nprobes)
        lab.fill(ivf, assignment)
        res["search"] = {npb: searched(lab, ivf, npb) for npb in [int(v) for v in args.search.split(",")]}
        res["train_s"] = train_s
        if args.hnsw and spill is None:  # spilled variants share plain's centroids
            res["hnsw"] = hnsw_reach(lab, centroids, [64, 256, 1024, ivf.nlist])
            hnsw_rows.append([name, res["hnsw"]["orphans"]] + list(res["hnsw"]["nearest_found"].values()))
        results[name] = res
        rows.append([name, f"{res['sizes'][0]:.0f} / {res['sizes'][1]:.0f} / {res['sizes'][2]}",
                     " / ".join(f"{v:.0f}" for v in res["rank"])]
                    + [f"{res['hit'][p]:.3f} ({res['codes'][p] / 1000:.0f}k)" for p in nprobes])
        for npb, s in res["search"].items():
            search_rows.append([name, npb, s["r1"], s["r10"], s["cpu_p50_ms"], s["cpu_p95_ms"]])
        print(f"{name}: trained and assigned in {train_s:.0f} s", file=sys.stderr)
        del lab, ivf
    print(table(["variant", "list sizes p50 / p99 / max", "rank of top-1's list p50 / p90 / p99 / max"]
                + [f"hit@{p} (codes)" for p in nprobes], rows))
    print(table(["variant", "nprobe", "R@1 vs exact", "R@10 vs exact", "IVF CPU p50 ms", "IVF CPU p95 ms"],
                search_rows))
    if hnsw_rows:
        print(table(["variant", "centroids without an incoming link"]
                    + [f"nearest list found, efSearch {ef}" for ef in (64, 256, 1024, "all")], hnsw_rows))
    print("wrote", save("maps-coarse", {"kept": str(args.kept), "prepare_s": prepare_s, "variants": results}))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
