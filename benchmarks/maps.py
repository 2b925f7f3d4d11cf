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

Search is timed in a fresh process, one query at a time (k = 10), for each nprobe:shortlist pair:
"warm" after the same queries were searched once (the rows they re-rank are in the page cache),
"cold" with the store evicted from the page cache (``POSIX_FADV_DONTNEED``) before every query.
Each query's CPU time (its thread's) is reported beside its wall time: on a loaded machine the
difference is time spent waiting for a core. "preempted" is the share of queries during which the
thread was switched out involuntarily (another process took its core; ``ru_nivcsw``), over all
queries and over the slowest 5 %: where the latter is near 1 and the CPU p95 is low, the tail is
the machine's load, not the search. "blocked" is the same for voluntary switches (``ru_nvcsw``:
the thread waited, for the disk or for a lock). "resident" is the process's anonymous memory after
loading and searching, less what it held before loading; file-backed pages are reported apart.

    python benchmarks/maps.py --n 100000 --dim 8448 [--index auto] [--memory-budget 1GB] [--keep]
    python benchmarks/maps.py --reuse DIR --settings 32:100,64:50   # probe a kept map again

``--keep`` keeps the map with its queries and their exact truth (``queries.npy``, ``truth16.npy``,
``truth32.npy``), so that search settings can be compared again without building.
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
from runtime.maps import index as index_module  # noqa: E402
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
import json, os, resource, sys, time
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
        m.tune(nprobe=nprobe, shortlist=shortlist)
    for cache in ("warm", "cold"):
        if cache == "cold" and m.kind != "ivfpq":
            continue
        if cache == "warm":
            m.search(q, 10)  # every row these queries re-rank is now in the page cache
        lat, cpu, switched, blocked, ids = [], [], [], [], []
        for i in range(len(q)):
            if cache == "cold":
                fadvise_out()  # none of them is
            u = resource.getrusage(resource.RUSAGE_THREAD)
            t, c = time.perf_counter(), time.thread_time()
            _, r = m.search(q[i:i + 1], 10)
            lat.append((time.perf_counter() - t) * 1000)
            cpu.append((time.thread_time() - c) * 1000)
            v = resource.getrusage(resource.RUSAGE_THREAD)
            switched.append(v.ru_nivcsw - u.ru_nivcsw)
            blocked.append(v.ru_nvcsw - u.ru_nvcsw)
            ids.append(r[0].tolist())
        runs.append({{"nprobe": nprobe, "shortlist": shortlist, "cache": cache, "latency_ms": lat, "cpu_ms": cpu,
                      "preempted": switched, "blocked": blocked, "ids": ids}})
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


def build(args, folder: Path) -> dict:
    """Stream the generated map into ``folder``; returns the build's figures and the queries."""
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
    return {"build_s": build_s, "generate_s": gen_s, "store_s_incl_generate": store_s, "index_s": build_s - store_s,
            "build_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "queries": np.stack(queries).astype(np.float32)}


def main() -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000, help="map size")
    p.add_argument("--dim", type=int, default=8448)
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--traversals", type=int, default=4)
    p.add_argument("--index", default="auto")
    p.add_argument("--memory-budget", type=parse_size, default=parse_size("1GB"))
    p.add_argument("--coarse", choices=("auto", "hnsw"), default="auto",
                   help="hnsw: the HNSW coarse quantizer at any size (as from 1M places up), to study it on small maps")
    p.add_argument("--settings", default="32:100", help="nprobe:shortlist pairs to time, e.g. 16:100,32:100,32:200")
    p.add_argument("--store-dtype", default="float16", choices=("float16", "float32"))
    p.add_argument("--threads", default="2", help="search threads to time, e.g. 1,2 (each in a fresh process)")
    p.add_argument("--workdir", type=Path, default=None, help="where the map is written (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the map, its queries and their exact truth afterwards")
    p.add_argument("--reuse", type=Path, default=None, help="probe a map kept by --keep (the folder printed)")
    p.add_argument("--no-fp32-truth", action="store_true",
                   help="skip exact search over the float32 rows (the float16 store's cost; halves the truth pass)")
    args = p.parse_args()
    settings = [tuple(int(v) for v in s.split(":")) for s in args.settings.split(",")]
    if args.coarse == "hnsw":
        index_module.HNSW_COARSE_LISTS = 0
    tmp = args.reuse or Path(tempfile.mkdtemp(prefix="vpr-maps-", dir=args.workdir))
    folder = tmp / "map"
    try:
        load_before = os.getloadavg()
        if args.reuse:
            built = json.loads((tmp / "build.json").read_text())
            q = np.load(tmp / "queries.npy")
            truth16 = np.load(tmp / "truth16.npy")
            truth32 = np.load(tmp / "truth32.npy") if (tmp / "truth32.npy").exists() else None
        else:
            built = build(args, folder)
            q = built.pop("queries")
            np.save(tmp / "queries.npy", q)
            m = load_map(folder)
            t = time.perf_counter()
            truth16 = exact_topk((x for _, x in m.descriptors.chunks(8192)), q)  # over the store
            built["truth_s"] = time.perf_counter() - t
            m.close()
            np.save(tmp / "truth16.npy", truth16)
            truth32 = None
            if not args.no_fp32_truth:  # the float32 rows, regenerated
                truth32 = exact_topk((x for _, x in route_views(args.n, args.dim, 0, args.traversals)), q)
                np.save(tmp / "truth32.npy", truth32)
            (tmp / "build.json").write_text(json.dumps(built))
        m = load_map(folder, verify="none")
        info = map_info(m)
        params = dict(m.meta["index"].get("params", {}))
        m.close()
        rows, runs = [], []
        for threads in [int(v) for v in args.threads.split(",")]:
            res = probe(folder, q, settings, threads, tmp)
            for run in res.pop("runs"):
                run["threads"] = threads
                runs.append(run)
        for run in runs:
            ids = np.array(run.pop("ids"))
            lat, cpu = np.array(run.pop("latency_ms")), run.pop("cpu_ms")
            switched = np.array(run.pop("preempted")) > 0
            blocked = np.array(run.pop("blocked")) > 0
            slow = lat >= np.percentile(lat, 95)
            r = run  # its figures are added in place
            r.update(p50_ms=float(np.percentile(lat, 50)), p95_ms=float(np.percentile(lat, 95)),
                     cpu_p50_ms=float(np.percentile(cpu, 50)), cpu_p95_ms=float(np.percentile(cpu, 95)),
                     preempted=float(switched.mean()), slowest_preempted=float(switched[slow].mean()),
                     blocked=float(blocked.mean()), slowest_blocked=float(blocked[slow].mean()),
                     r1=recall(ids, truth16, 1), r10=recall(ids, truth16, 10))
            rows.append([info["count"], info["dim"], info["index"], r["threads"], f"{r['nprobe']}/{r['shortlist']}",
                         r["cache"], r["p50_ms"], r["p95_ms"], r["cpu_p50_ms"], r["cpu_p95_ms"],
                         f"{r['preempted']:.2f} / {r['slowest_preempted']:.2f}",
                         f"{r['blocked']:.2f} / {r['slowest_blocked']:.2f}", r["r1"], r["r10"]])
        resident = res["rss_anon_end"] - res["rss_anon_before"]
        summary = {**built, "n": info["count"], "dim": info["dim"], "index": info["index"], "params": params,
                   "load_s": res["load_s"], "resident_mb": resident / 2 ** 20,
                   "store_mb": info["store_bytes"] / 2 ** 20,
                   "store_pages_resident_mb": res["rss_file_end"] / 2 ** 20,
                   "fp16_store_top1_agreement": None if truth32 is None else recall(truth16, truth32, 1),
                   "index_estimate_mb": info["index_bytes_estimate"] / 2 ** 20,
                   "load_average_before": load_before, "load_average_after": os.getloadavg()}
        print(table(["n", "dim", "index", "threads", "nprobe/shortlist", "cache", "b1 p50 ms", "b1 p95 ms",
                     "CPU p50 ms", "CPU p95 ms", "preempted (all / slowest 5 %)", "blocked (all / slowest 5 %)",
                     "R@1 vs exact", "R@10 vs exact"],
                    rows))
        print(table(["build s", "of which generating", "index s", "build peak RSS MB", "load s", "resident MB",
                     "file-backed MB", "store MB (on disk)", "fp16 top-1 = fp32 top-1", "load avg"],
                    [[built["build_s"], built["generate_s"], built["index_s"], built["build_peak_rss_mb"],
                      res["load_s"], summary["resident_mb"], summary["store_pages_resident_mb"], summary["store_mb"],
                      str(summary["fp16_store_top1_agreement"]),
                      f"{load_before[0]:.1f}-{summary['load_average_after'][0]:.1f}"]]))
        print("wrote", save(f"maps-{info['count']}", {"args": {k: str(v) for k, v in vars(args).items()},
                                                      "summary": summary, "runs": runs}))
    finally:
        if not (args.keep or args.reuse):
            shutil.rmtree(tmp, ignore_errors=True)
        elif not args.reuse:
            print("map kept in", tmp, "(probe it again with --reuse)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
