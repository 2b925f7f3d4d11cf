"""Loop benchmark: the localization loop (``runtime localize``) on the sample data.

1. Throughput runs (the queries read as fast as possible) per batch size: frames/s, the share of
   wall time outside inference, service latency.
2. Live runs (the queries paced at ``--live-fps``, decoded in the reader thread as a camera's
   frames would be, batches of what is buffered up to the bundle's opt batch; ``--budget-ms``, 0:
   none) per thread setting: FAISS's OpenMP threads for the search (the machine's default, or
   one) and ONNX Runtime's intra-op threads. Search and inference percentiles show whether the
   stages contend for the cores.
3. Searches of flat maps of growing size, one or eight queries at a time with 5 ms of other work
   between them, on one FAISS thread and on the default number: where a parallel search pays
   (``runtime/loop.py``'s ``SMALL_SEARCH``).

    python benchmarks/loop.py --bundle engines/demo-gem-dinov2-vits14 [--batch-sizes 1,4,8] \\
        [--live-fps 50] [--live-frames 300] [--budget-ms 0]
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
from runtime.cli_util import ArgumentParser, run_cli  # noqa: E402
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
    enc = Encoder(bundle, open_backend(bundle, threads=ort_threads))
    loop = LocalizationLoop(enc, place_map, LoopConfig(budget_ms=budget, top_k=5, search_threads=search_threads))
    stats = loop.run(FolderSource(folder, fps=fps))
    st = loop.timer.summary()
    return {"search_threads": search_threads or "default", "ort_threads": ort_threads, "received": stats.received,
            "processed": stats.processed, "mean_batch": stats.processed / max(1, stats.batches),
            "search": st["search"], "inference": st["inference"], "total": st["total"]}


def search_threads(sizes, queries=(1, 8), repeats: int = 40) -> list:
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
        for nq in queries:
            q = x[:nq] + 0.01
            row = {"n": n, "dim": d, "queries": nq, "default_threads": default}
            for threads, key in ((1, "one"), (default, "default")):
                faiss.omp_set_num_threads(threads)
                ms = []
                for i in range(repeats + 3):
                    time.sleep(0.005)  # the loop's other stages run between two searches
                    t = time.perf_counter()
                    index.search(q, 5)
                    if i >= 3:
                        ms.append((time.perf_counter() - t) * 1000)
                row[f"{key}_p50_ms"], row[f"{key}_p99_ms"] = float(np.median(ms)), float(np.percentile(ms, 99))
            faiss.omp_set_num_threads(default)
            rows.append(row)
    return rows


def main() -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="ONNX Runtime threads of the throughput runs")
    p.add_argument("--batch-sizes", default="1,4,8")
    p.add_argument("--live-fps", type=float, default=50.0)
    p.add_argument("--live-frames", type=int, default=300)
    p.add_argument("--budget-ms", type=float, default=0.0)
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
    print(f"\nlive: {args.live_frames} frames paced at {args.live_fps:g} fps, budget {args.budget_ms:g} ms (0: none), "
          f"batches up to {bundle.batch['opt']}; FAISS threads 'default' = {cores} here")
    print(table(["FAISS threads", "ORT threads", "processed", "mean batch", "search p50 ms", "search p99 ms",
                 "search max ms", "inference p50 ms (batch)"],
                [[r["search_threads"], r["ort_threads"], f"{r['processed']}/{r['received']}", r["mean_batch"],
                  r["search"]["p50"], r["search"]["p99"], r["search"]["max"], r["inference"]["p50"]] for r in lives]))
    sizes = [(111, 384), (10_000, 384), (100_000, 384), (20_000, 8448)]
    searches = search_threads(sizes)
    print(f"\nsearches of a flat inner-product map, 5 ms apart: p50 / p99 ms on 1 FAISS thread and on the default "
          f"({searches[0]['default_threads']})")
    print(table(["images", "dim", "queries", "floats / 2^24", "1 thread p50", "1 thread p99", "default p50", "default p99"],
                [[r["n"], r["dim"], r["queries"], r["n"] * r["dim"] / 2 ** 24, r["one_p50_ms"], r["one_p99_ms"],
                  r["default_p50_ms"], r["default_p99_ms"]] for r in searches]))
    print("wrote", save(f"loop-{bundle.manifest['model']['name']}", {
        "args": {k: str(v) for k, v in vars(args).items()}, "throughput": runs, "live": lives, "search": searches}))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
