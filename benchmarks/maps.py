"""Map benchmark: for each size x dimension, every index type the runtime can choose: build time,
memory (serialized index size), search latency p50/p95 per query at batch 1 and batched, and
recall@1/@10 against exact search.

Data: clustered unit vectors (places with several nearby views) and queries that are noisy
copies of database vectors, generated in chunks into a memory-mapped file so large maps fit.

    python benchmarks/maps.py [--sizes 10000,100000] [--dims 384,1024,8448] [--types auto]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from common import save, table
from runtime.cli_util import ArgumentParser, run_cli  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from runtime.maps import PlaceMap, _build_index, choose_index, index_bytes  # noqa: E402

MEMORY_LIMIT = 8 << 30  # raw vectors above this are skipped on a 24 GB machine


def make_data(n: int, d: int, folder: Path, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 100), d)).astype(np.float32)
    x = np.lib.format.open_memmap(folder / f"db-{n}-{d}.npy", mode="w+", dtype=np.float32, shape=(n, d))
    for s in range(0, n, 20000):
        e = min(n, s + 20000)
        v = centres[rng.integers(0, len(centres), e - s)] + rng.standard_normal((e - s, d)).astype(np.float32) * (0.6 / np.sqrt(d))
        x[s:e] = v / np.linalg.norm(v, axis=1, keepdims=True)
    src = rng.choice(n, 200, replace=False)
    q = x[np.sort(src)] + rng.standard_normal((200, d)).astype(np.float32) * (0.5 / np.sqrt(d))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return x, q.astype(np.float32)


def exact_topk(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    index = faiss.IndexFlatIP(x.shape[1])
    for s in range(0, len(x), 50000):
        index.add(np.ascontiguousarray(x[s:s + 50000]))
    return index.search(q, k)[1]


def bench(kind: str, x, q, truth) -> dict:
    t = time.perf_counter()
    index = _build_index(kind, np.ascontiguousarray(x))
    build_s = time.perf_counter() - t
    m = PlaceMap(Path("."), {"index": {"type": kind}}, x, [str(i) for i in range(len(x))], index)
    single = []
    for i in range(min(50, len(q))):
        t = time.perf_counter()
        m.search(q[i:i + 1], 10)
        single.append((time.perf_counter() - t) * 1000)
    t = time.perf_counter()
    _, ids = m.search(q, 10)
    batched_ms = (time.perf_counter() - t) * 1000 / len(q)
    r1 = float(np.mean(ids[:, 0] == truth[:, 0]))
    r10 = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth)]))
    return {"type": kind, "build_s": build_s, "index_mb": faiss.serialize_index(index).nbytes / 2 ** 20,
            "estimate_mb": index_bytes(kind, *x.shape) / 2 ** 20, "b1_p50_ms": float(np.percentile(single, 50)),
            "b1_p95_ms": float(np.percentile(single, 95)), "batched_ms_per_query": batched_ms,
            "recall1_vs_exact": r1, "recall10_vs_exact": r10}


def main() -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,100000")
    p.add_argument("--dims", default="384,1024,8448")
    p.add_argument("--types", default="flat,sqfp16,hnsw,ivfpq", help="index types to time (auto: the runtime's choice)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    faiss.omp_set_num_threads(args.threads)
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(v) for v in args.sizes.split(",")):
            for d in (int(v) for v in args.dims.split(",")):
                if n * d * 4 > MEMORY_LIMIT:
                    print(f"skipping {n} x {d}: {n * d * 4 / 2 ** 30:.0f} GB of raw vectors exceeds this machine's budget",
                          file=sys.stderr)
                    continue
                x, q = make_data(n, d, Path(tmp))
                truth = exact_topk(x, q, 10)
                chosen = choose_index(n, d, None)
                kinds = [chosen] if args.types == "auto" else args.types.split(",")
                for kind in kinds:
                    if kind == "ivfpq" and n < 1000:
                        continue
                    print(f"{n} x {d}: {kind} ...", file=sys.stderr, flush=True)
                    r = {"n": n, "dim": d, "auto_choice": chosen, **bench(kind, x, q, truth)}
                    results.append(r)
                    rows.append([n, d, kind + (" (auto)" if kind == chosen else ""), r["build_s"], r["index_mb"],
                                 r["b1_p50_ms"], r["b1_p95_ms"], r["batched_ms_per_query"], r["recall1_vs_exact"],
                                 r["recall10_vs_exact"]])
                del x
    print(table(["n", "dim", "index", "build s", "index MB", "b1 p50 ms", "b1 p95 ms", "batched ms/q",
                 "R@1 vs exact", "R@10 vs exact"], rows))
    print("wrote", save("maps", {"args": vars(args), "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
