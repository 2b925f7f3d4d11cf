"""Loop benchmark: the localization loop (``runtime localize``) on the sample data.

1. Throughput runs (the queries read as fast as possible) per batch size: frames/s, the share of
   wall time outside inference, service latency.
2. Live runs (the queries paced at ``--live-fps`` under ``--budget-ms``, decoded in the reader
   thread as a camera's frames would be) per thread setting: FAISS's OpenMP threads for the
   search (the machine's default, or one) and ONNX Runtime's intra-op threads. Search, inference
   and capture-to-result percentiles show whether the stages contend for the cores.
3. One query against flat maps of growing size, on one FAISS thread and on the default number:
   where a parallel search starts to pay (``runtime/loop.py``'s ``SMALL_SEARCH``).

    python benchmarks/loop.py --bundle engines/demo-gem-dinov2-vits14 [--batch-sizes 1,4,8] \\
        [--live-fps 50] [--live-frames 500] [--budget-ms 100]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, machine, save, table

sys.path.insert(0, str(ROOT))
from runtime.backends import open_backend  # noqa: E402
from runtime.bundle import load_bundle  # noqa: E402
from runtime.encoder import Encoder  # noqa: E402
from runtime.loop import LocalizationLoop, LoopConfig  # noqa: E402
from runtime.maps import bundle_identity, save_map  # noqa: E402
from runtime.sources import FolderSource  # noqa: E402

DATA = ROOT / "data" / "vprbench_corridor"


def throughput(bundle, place_map, batch: int, threads: int) -> dict:
    enc = Encoder(bundle, open_backend(bundle, threads=threads), batch_size=batch)
    loop = LocalizationLoop(enc, place_map, LoopConfig(top_k=5))
    stats = loop.run(FolderSource(DATA / "queries"))
    inference_s = enc.timer.summary()["inference"]["mean"] * enc.timer.summary()["inference"]["n"] / 1000
    s = loop.summary()
    return {"batch": batch, "frames": stats.processed, "wall_s": s["wall_s"], "fps": s["frames_per_s"],
            "outside_inference_share": 1 - inference_s / s["wall_s"], "service_p50_ms": s["latency"]["p50"],
            "stages": s["stages"]}


def live(bundle, place_map, folder: Path, fps: float, budget: float, search_threads: int, ort_threads: int) -> dict:
    enc = Encoder(bundle, open_backend(bundle, threads=ort_threads), batch_size=1)
    loop = LocalizationLoop(enc, place_map, LoopConfig(budget_ms=budget, top_k=5, search_threads=search_threads))
    stats = loop.run(FolderSource(folder, fps=fps))
    st = loop.timer.summary()
    return {"search_threads": search_threads or "default", "ort_threads": ort_threads, "received": stats.received,
            "processed": stats.processed, "search": st["search"], "inference": st["inference"], "total": st["total"],
            "best_effort": stats.best_effort}


def search_threads(sizes, repeats: int = 30) -> list:
    import faiss
    import numpy as np

    rng = np.random.default_rng(0)
    default = faiss.omp_get_max_threads()
    rows = []
    for n, d in sizes:
        x = rng.standard_normal((n, d)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        index = faiss.IndexFlatIP(d)
        index.add(x)
        q = x[:1] + 0.01
        row = {"n": n, "dim": d, "floats_per_query": n * d, "default_threads": default}
        for threads, key in ((1, "p50_ms_1"), (default, "p50_ms_default")):
            faiss.omp_set_num_threads(threads)
            for _ in range(3):
                index.search(q, 5)
            ms = []
            for _ in range(repeats):
                t = time.perf_counter()
                index.search(q, 5)
                ms.append((time.perf_counter() - t) * 1000)
            row[key] = float(np.median(ms))
        faiss.omp_set_num_threads(default)
        rows.append(row)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="ONNX Runtime threads of the throughput runs")
    p.add_argument("--batch-sizes", default="1,4,8")
    p.add_argument("--live-fps", type=float, default=50.0)
    p.add_argument("--live-frames", type=int, default=500)
    p.add_argument("--budget-ms", type=float, default=100.0)
    args = p.parse_args()
    bundle = load_bundle(args.bundle)
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        db = Encoder(bundle, open_backend(bundle, threads=args.threads)).encode_files(sorted((DATA / "database").iterdir()))
        place_map = save_map(Path(tmp) / "map", db.outputs["descriptor"], db.names, bundle_identity(bundle))
        runs = [throughput(bundle, place_map, b, args.threads) for b in (int(v) for v in args.batch_sizes.split(","))
                if b <= bundle.batch["max"]]
        print(f"\n{bundle.manifest['model']['name']} {bundle.precision} on {bundle.backend}, {args.threads} threads, "
              f"{len(place_map)}-image map, queries from {DATA.relative_to(ROOT)} read as fast as possible")
        print(table(["batch", "frames", "wall s", "frames/s", "share outside inference", "service p50 ms"],
                    [[r["batch"], r["frames"], r["wall_s"], r["fps"], r["outside_inference_share"], r["service_p50_ms"]]
                     for r in runs]))

        frames = Path(tmp) / "frames"  # the queries, repeated: a longer live run
        frames.mkdir()
        queries = sorted((DATA / "queries").iterdir())
        for i in range(args.live_frames):
            os.symlink(queries[i % len(queries)], frames / f"{i:06d}{queries[i % len(queries)].suffix}")
        cores = os.cpu_count() or 1
        settings = [(0, cores), (1, cores), (1, max(1, cores - 1))]
        lives = [live(bundle, place_map, frames, args.live_fps, args.budget_ms, s, o) for s, o in settings]
    print(f"\nlive: {args.live_frames} frames paced at {args.live_fps:g} fps, budget {args.budget_ms:g} ms, batch 1 "
          f"(FAISS threads 'default' = {cores} here)")
    print(table(["FAISS threads", "ORT threads", "processed", "search p50 ms", "search p99 ms", "search max ms",
                 "inference p50 ms", "total p50 ms", "total p99 ms"],
                [[r["search_threads"], r["ort_threads"], f"{r['processed']}/{r['received']}", r["search"]["p50"],
                  r["search"]["p99"], r["search"]["max"], r["inference"]["p50"], r["total"]["p50"], r["total"]["p99"]]
                 for r in lives]))
    sizes = [(1_000, 384), (10_000, 384), (10_000, 1024), (100_000, 384), (20_000, 8448), (100_000, 1024)]
    searches = search_threads(sizes)
    print(f"\none query, flat inner-product map, p50 ms on 1 FAISS thread and on the default "
          f"({searches[0]['default_threads']}):")
    print(table(["images", "dim", "floats / 2^24", "1 thread ms", "default threads ms"],
                [[r["n"], r["dim"], r["floats_per_query"] / 2 ** 24, r["p50_ms_1"], r["p50_ms_default"]] for r in searches]))
    print("wrote", save(f"loop-{bundle.manifest['model']['name']}", {
        "args": {k: str(v) for k, v in vars(args).items()}, "throughput": runs, "live": lives, "search": searches}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
