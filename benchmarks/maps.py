"""Map benchmark at city scale: a streamed map build of route-like descriptors, then, in a fresh
process, load time, resident memory and batch-1 search latency, and recall against exact search.

The generator (``route_views``) makes descriptors the way a robot's map looks, in chunks, so any
size streams to disk without being held:

* ``routes`` paths; along each, a latent place descriptor walks on the unit sphere
  (p[t+1] = normalise(p[t] + 0.3 g / sqrt(D)), g Gaussian): consecutive views are near-duplicates
  (cosine ~0.96), views 20 steps apart are different places (cosine ~0.4);
* ``traversals`` passes over every route, each under its own appearance (a fixed direction per
  traversal, weight 0.5: season, daylight) and at its own sub-step offsets along the path
  (interpolated between neighbouring latents), plus per-view noise (weight 0.3);
* a shared mean direction (weight 1.0), as real VPR descriptors have;
* Gaussian vectors (walk steps, view noise) are sums of two rows of a seeded bank of 8192
  Gaussian rows with random signs, scaled by 1/sqrt(2): still N(0, 1) per coordinate, at a tenth
  of the cost of drawing 8448 normals per view (what makes 1M x 8448 generable on 2 cores);
* queries: one more traversal under an appearance no map traversal has, at random places.

Recall is measured against exact inner-product search over the store (a streamed brute force over
its rows); the cost of the float16 store is the agreement of that exact top-1 with exact top-1 over
the float32 rows (regenerated chunk by chunk; ``--no-fp32-truth`` skips it).

    python benchmarks/maps.py --n 100000 --dim 8448 [--index auto] [--memory-budget 1GB] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, List, Tuple

import numpy as np

from common import ROOT, save, table
from runtime.cli_util import ArgumentParser, run_cli  # noqa: E402
from runtime.maps import load_map, map_info, open_build  # noqa: E402
from runtime.units import parse_size  # noqa: E402

CHUNK = 4096
STEP, APPEARANCE, NOISE, MEAN = 0.3, 0.5, 0.3, 1.0
BANK = 8192


def _gaussian(rng: np.random.Generator, bank: np.ndarray, m: int) -> np.ndarray:
    """``m`` Gaussian rows: sums of two random bank rows with random signs, over sqrt(2)."""
    i = rng.integers(0, len(bank), (2, m))
    s = rng.choice(np.array([-1.0, 1.0], np.float32), (2, m, 1))
    return (bank[i[0]] * s[0] + bank[i[1]] * s[1]) * np.float32(1 / np.sqrt(2))


def _unit(rng: np.random.Generator, d: int) -> np.ndarray:
    v = rng.standard_normal(d).astype(np.float32)
    return v / np.linalg.norm(v)


def _layout(n: int, traversals: int) -> Tuple[int, int]:
    routes = max(1, n // (traversals * 10_000))
    return routes, -(-n // (routes * traversals))  # views per traversal of a route


def route_views(n: int, d: int, seed: int = 0, traversals: int = 4, queries: int = 0,
                query_list: list = None) -> Iterator[Tuple[List[str], np.ndarray]]:
    """``n`` map descriptors as (names, float32 rows) chunks; with ``queries``, also appends
    ``queries`` query descriptors (another traversal) to ``query_list`` on the way."""
    routes, length = _layout(n, traversals)
    rng = np.random.default_rng(seed)
    mean = _unit(rng, d)
    looks = [_unit(rng, d) for _ in range(traversals + 1)]  # the last one: the queries'
    bank = rng.standard_normal((BANK, d), dtype=np.float32)
    qrng = np.random.default_rng(seed + 1)
    q_pos = set(map(int, qrng.choice(routes * length, min(queries, routes * length), replace=False))) if queries else set()
    emitted = 0
    for r in range(routes):
        rr = np.random.default_rng([seed, r])
        qr = np.random.default_rng([seed, r, 1])
        p = _unit(rr, d)
        for start in range(0, length, CHUNK // traversals):
            count = min(CHUNK // traversals, length - start)
            steps = _gaussian(rr, bank, count + 1) * (STEP / np.sqrt(d))
            lat = np.empty((count + 1, d), np.float32)
            for i in range(count + 1):  # the walk: each latent from the previous
                p = p + steps[i]
                p /= np.linalg.norm(p)
                lat[i] = p
            p = lat[-2].copy()  # the chunk's last position continues the walk
            for t in range(traversals + (1 if q_pos else 0)):
                if t == traversals:
                    keep = [i for i in range(count) if r * length + start + i in q_pos]
                    if not keep:
                        continue
                else:
                    keep = list(range(count))
                if t < traversals and emitted >= n:
                    break
                keep = keep[: n - emitted] if t < traversals else keep
                g = rr if t < traversals else qr  # queries draw from their own stream: the map is the same with or without
                off = g.uniform(0, 1, (len(keep), 1)).astype(np.float32)
                base = lat[keep] * (1 - off) + lat[[k + 1 for k in keep]] * off
                noise = _gaussian(g, bank, len(keep)) * (NOISE / np.sqrt(d))
                v = base + MEAN * mean + APPEARANCE * looks[t] + noise
                v /= np.linalg.norm(v, axis=1, keepdims=True)
                if t == traversals:
                    if query_list is not None:
                        query_list.extend(v)
                    continue
                emitted += len(keep)
                yield [f"r{r:03d}/t{t}/{start + i:06d}.jpg" for i in keep], v
    if emitted < n:
        raise RuntimeError(f"generator produced {emitted} of {n}")


def exact_topk(chunks: Iterator[np.ndarray], q: np.ndarray, k: int = 10) -> np.ndarray:
    """Exact top-k ids by inner product over rows given chunk by chunk (a streamed brute force)."""
    best_s = np.full((len(q), 0), -np.inf, np.float32)
    best_i = np.zeros((len(q), 0), np.int64)
    offset = 0
    for x in chunks:
        s = q @ np.asarray(x, dtype=np.float32).T
        scores = np.concatenate([best_s, s], axis=1)
        ids = np.concatenate([best_i, np.broadcast_to(np.arange(offset, offset + len(x)), s.shape)], axis=1)
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(scores, top, 1), np.take_along_axis(ids, top, 1)
        offset += len(x)
    return best_i


PROBE = r"""
import json, os, sys, time
import numpy as np
sys.path.insert(0, {root!r})
import faiss
faiss.omp_set_num_threads({threads})
def status():
    out = {{}}
    for line in open("/proc/self/status"):
        if line.startswith(("RssAnon", "RssFile", "VmHWM")):
            k, v = line.split(":")
            out[k] = int(v.split()[0]) * 1024
    return out
from runtime.maps import load_map
before = status()
t = time.perf_counter()
m = load_map({folder!r})
load_s = time.perf_counter() - t
after_load = status()
q = np.load({queries!r})
res = {{"load_s": load_s, "rss_anon_before": before["RssAnon"], "rss_anon_loaded": after_load["RssAnon"]}}
def fadvise_out():
    for seg in m.descriptors.parts:
        fd = os.open(seg.filename, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
runs = []
for nprobe, shortlist in {settings!r}:
    if m.kind == "ivfpq":
        m.meta["index"]["params"]["shortlist"] = shortlist
        faiss.extract_index_ivf(m.index).nprobe = nprobe
    for cache in ("warm", "cold"):
        if cache == "cold":
            if m.kind != "ivfpq":
                continue
            fadvise_out()
        m.search(q[:5], 10)
        if cache == "cold":
            fadvise_out()
        lat, ids = [], []
        for i in range(len(q)):
            t = time.perf_counter()
            _, r = m.search(q[i:i + 1], 10)
            lat.append((time.perf_counter() - t) * 1000)
            ids.append(r[0].tolist())
        runs.append({{"nprobe": nprobe, "shortlist": shortlist, "cache": cache, "latency_ms": lat, "ids": ids}})
end = status()
res.update(runs=runs, rss_anon_end=end["RssAnon"], rss_file_end=end["RssFile"], vm_hwm=end["VmHWM"])
print(json.dumps(res))
"""


def probe(folder: Path, queries: np.ndarray, settings, threads: int, tmp: Path) -> dict:
    qpath = tmp / "queries.npy"
    np.save(qpath, queries)
    code = PROBE.format(root=str(ROOT), threads=threads, folder=str(folder), queries=str(qpath), settings=settings)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={
        **os.environ, "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads)})
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def recall(ids: np.ndarray, truth: np.ndarray, k: int) -> float:
    if k == 1:
        return float(np.mean(ids[:, 0] == truth[:, 0]))
    return float(np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(ids, truth)]))


def main() -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000, help="map size")
    p.add_argument("--dim", type=int, default=8448)
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--traversals", type=int, default=4)
    p.add_argument("--index", default="auto")
    p.add_argument("--memory-budget", type=parse_size, default=parse_size("1GB"))
    p.add_argument("--settings", default="32:100", help="nprobe:shortlist pairs to time, e.g. 16:100,32:100,32:200")
    p.add_argument("--store-dtype", default="float16", choices=("float16", "float32"))
    p.add_argument("--threads", default="2", help="search threads to time, e.g. 1,2 (each in a fresh process)")
    p.add_argument("--workdir", type=Path, default=None, help="where the map is written (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the map afterwards")
    p.add_argument("--no-fp32-truth", action="store_true",
                   help="skip exact search over the float32 rows (the float16 store's cost; halves the truth pass)")
    args = p.parse_args()
    settings = [tuple(int(v) for v in s.split(":")) for s in args.settings.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="vpr-maps-", dir=args.workdir))
    folder = tmp / "map"
    try:
        load_before = os.getloadavg()
        ident = {"model": "synthetic-route", "dim": args.dim, "preprocessing": {}, "batch_mode": "independent",
                 "weights": "synthetic", "precision": "fp32", "onnx_sha256": ""}
        queries: list = []
        gen_s = 0.0
        t0 = time.perf_counter()
        with open_build(folder, ident, args.index, args.memory_budget, args.store_dtype) as w:
            it = route_views(args.n, args.dim, 0, args.traversals, args.queries, queries)
            while True:
                t = time.perf_counter()
                try:
                    names, x = next(it)
                except StopIteration:
                    break
                gen_s += time.perf_counter() - t
                w.append(names, x)
            store_s = time.perf_counter() - t0
            w.commit()
        build_s = time.perf_counter() - t0
        build_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        q = np.stack(queries).astype(np.float32)
        m = load_map(folder)
        info = map_info(m)
        t = time.perf_counter()
        truth16 = exact_topk((x for _, x in m.descriptors.chunks(8192)), q)  # over the store
        truth_s = time.perf_counter() - t
        m.close()
        truth32 = None if args.no_fp32_truth else exact_topk(
            (x for _, x in route_views(args.n, args.dim, 0, args.traversals)), q)  # the float32 rows, regenerated
        rows, runs = [], []
        for threads in [int(v) for v in args.threads.split(",")]:
            res = probe(folder, q, settings, threads, tmp)
            for run in res.pop("runs"):
                run["threads"] = threads
                runs.append(run)
        for run in runs:
            ids = np.array(run.pop("ids"))
            lat = run.pop("latency_ms")
            r = run  # its figures are added in place
            r.update(p50_ms=float(np.percentile(lat, 50)), p95_ms=float(np.percentile(lat, 95)),
                     r1=recall(ids, truth16, 1), r10=recall(ids, truth16, 10))
            rows.append([args.n, args.dim, info["index"], r["threads"], f"{r['nprobe']}/{r['shortlist']}", r["cache"],
                         r["p50_ms"], r["p95_ms"], r["r1"], r["r10"]])
        resident = res["rss_anon_end"] - res["rss_anon_before"]
        summary = {"n": args.n, "dim": args.dim, "index": info["index"], "build_s": build_s, "generate_s": gen_s,
                   "store_s_incl_generate": store_s, "index_s": build_s - store_s, "truth_s": truth_s,
                   "build_peak_rss_mb": build_peak / 2 ** 20, "load_s": res["load_s"],
                   "resident_mb": resident / 2 ** 20, "store_mb": info["store_bytes"] / 2 ** 20,
                   "store_pages_resident_mb": res["rss_file_end"] / 2 ** 20,
                   "fp16_store_top1_agreement": None if truth32 is None else recall(truth16, truth32, 1),
                   "index_estimate_mb": info["index_bytes_estimate"] / 2 ** 20,
                   "load_average_before": load_before, "load_average_after": os.getloadavg()}
        print(table(["n", "dim", "index", "threads", "nprobe/shortlist", "cache", "b1 p50 ms", "b1 p95 ms", "R@1 vs exact",
                     "R@10 vs exact"], rows))
        print(table(["build s", "of which generating", "index s", "build peak RSS MB", "load s", "resident MB",
                     "store MB (on disk)", "fp16 top-1 = fp32 top-1", "load avg"],
                    [[build_s, gen_s, summary["index_s"], summary["build_peak_rss_mb"], res["load_s"],
                      summary["resident_mb"], summary["store_mb"], str(summary["fp16_store_top1_agreement"]),
                      f"{load_before[0]:.1f}-{summary['load_average_after'][0]:.1f}"]]))
        print("wrote", save(f"maps-{args.n}", {"args": {k: str(v) for k, v in vars(args).items()},
                                                "summary": summary, "runs": runs}))
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print("map kept in", folder)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
