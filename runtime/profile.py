"""Latency profiling of a bundle on this machine: per-stage p50/p95/p99/max for each batch size,
throughput, host peak RSS, and on TensorRT the device memory and a per-layer profile.

Stages: decode, preprocess (per image, from real files), h2d / inference / d2h (TensorRT times
them separately; ONNX Runtime's copies are inside its inference), aggregation (split bundles),
search (a FAISS flat map of ``--map-size`` descriptors, batch queries) and re-rank (bundles with
local features). The first ``--warmup`` iterations of each batch size are run and discarded.

With ``cuda_graph`` (TensorRT) each batch size is replayed from a captured CUDA graph, as
``--cuda-graph`` runs it; a profiled context cannot be captured, so the per-layer times and the
separate copy times are then left out and "inference" includes the copies.
"""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from .backends import open_backend
from .bundle import ENGINE_BACKENDS, Bundle, describe
from .encoder import decode
from .errors import OptionError, PathError
from .files import atomic_write
from .preprocess import ImageDecodeError, list_images
from .rerank import rerank_shortlist
from .sinkhorn import salad_aggregate
from .timing import StageTimer


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _images(bundle: Bundle, folder: Optional[Path], count: int) -> np.ndarray:
    pre = bundle.preprocessing
    if folder is None:
        return np.random.default_rng(0).standard_normal((count, 3, *pre.size)).astype(np.float32)
    files = list_images(folder)[:count]
    if not files:
        raise PathError(f"{folder}: no images found")
    decoded = [decode(f, pre) for f in files]
    good = [d.image for d in decoded if d.image is not None]
    if not good:
        raise ImageDecodeError(f"{folder}: none of its first {len(files)} images could be read")
    return np.stack([good[i % len(good)] for i in range(count)])


def profile_bundle(bundle: Bundle, batches: Sequence[int], iterations: int = 20, warmup: int = 3,
                   images: Optional[Path] = None, map_size: int = 10000, rerank: int = 0,
                   threads: Optional[int] = None, device: str = "cpu", cuda_graph: bool = False) -> dict:
    lo, hi = bundle.batch["min"], bundle.batch["max"]
    inside = [b for b in batches if lo <= b <= hi]
    if not inside:
        raise OptionError(f"--batch {','.join(map(str, batches))}: every size is outside the bundle's profile "
                          f"{lo}..{hi}; choose sizes in it, or rebuild the bundle with --batch")
    for b in batches:
        if b not in inside:
            print(f"skipping batch {b}: outside the bundle's profile {lo}..{hi}", file=sys.stderr)
    batches = inside
    backend = open_backend(bundle, threads=threads, device=device, cuda_graph=cuda_graph)
    if bundle.backend in ENGINE_BACKENDS and not cuda_graph:
        backend.enable_profiling()
    results: Dict[str, dict] = {}
    max_b = max(batches)
    data = _images(bundle, images, max_b)
    # decode + preprocess, per image, from the real files
    pre_timer = StageTimer()
    if images is not None:
        for f in list_images(images)[:max(2 * max_b, 16)]:
            d = decode(f, bundle.preprocessing)
            if d.image is not None:
                pre_timer.add("decode", d.decode_ms)
                pre_timer.add("preprocess", d.preprocess_ms)
    split = bundle.manifest.get("split")
    dim = split["descriptor_dim"] if split else bundle.outputs["descriptor"]["shape"][-1]
    rng = np.random.default_rng(1)
    db = rng.standard_normal((map_size, dim)).astype(np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    import faiss
    index = faiss.IndexFlatIP(dim)
    index.add(db)
    has_local = "local_features" in bundle.outputs and rerank > 0
    for b in batches:
        timer = StageTimer()
        x = np.ascontiguousarray(data[:b])
        local_db = None
        for it in range(warmup + iterations):
            record = it >= warmup
            t0 = time.perf_counter()
            out = backend.run(x)
            t1 = time.perf_counter()
            if record:
                stages = getattr(backend, "last_timings", None)
                if stages:
                    for k, v in stages.items():
                        timer.add(k, v, b)
                else:
                    timer.add("inference", (t1 - t0) * 1000, b)
            if split:
                t2 = time.perf_counter()
                out = {"descriptor": salad_aggregate(out["token"], out["cluster_features"], out["scores"],
                                                     split["dust_bin"], split["iterations"])}
                if record:
                    timer.add("aggregation", (time.perf_counter() - t2) * 1000, b)
            t3 = time.perf_counter()
            _, ids = index.search(np.ascontiguousarray(out["descriptor"], dtype=np.float32), max(rerank, 10))
            if record:
                timer.add("search", (time.perf_counter() - t3) * 1000, b)
            if has_local:
                if local_db is None:
                    local_db = np.repeat(out["local_features"][:1], rerank, axis=0).astype(np.float16)
                t4 = time.perf_counter()
                rerank_shortlist(out["local_features"][0], local_db, np.arange(rerank))
                if record:
                    timer.add("rerank", (time.perf_counter() - t4) * 1000)
            if record:
                timer.add("batch_ms", (time.perf_counter() - t0) * 1000)
        summary = timer.summary()
        batch_ms = summary.pop("batch_ms")
        results[str(b)] = {"stages": summary, "batch_ms": batch_ms,
                           "images_per_s": b * 1000.0 / batch_ms["p50"]}
    report = {
        "bundle": str(bundle.path), "model": bundle.manifest["model"]["name"], "precision": bundle.precision,
        "backend": bundle.backend, "providers": getattr(backend, "providers", None), "threads": threads,
        "device": device, "cuda_graph": cuda_graph,
        "iterations": iterations, "warmup_excluded": warmup, "map_size": map_size,
        "per_image": pre_timer.summary(), "batches": results, "peak_rss_mb": peak_rss_mb(),
        "summary": describe(bundle),
    }
    if bundle.backend in ENGINE_BACKENDS:
        report["device_memory_mb"] = backend.device_memory_bytes() / 2 ** 20
        report["layers"] = backend.layer_times()
    backend.close()
    return report


def markdown(report: dict) -> str:
    lines = [f"# Profile: {report['model']} {report['precision']} on {report['backend']}", "",
             f"{report['iterations']} timed iterations per batch size after {report['warmup_excluded']} warm-up "
             f"iterations (excluded); search against a {report['map_size']}-image flat map; "
             f"host peak RSS {report['peak_rss_mb']:.0f} MB"
             + (f"; device memory {report['device_memory_mb']:.0f} MB" if "device_memory_mb" in report else ""), ""]
    if report["per_image"]:
        lines += ["| per image | p50 ms | p95 ms | p99 ms | max ms |", "|---|---|---|---|---|"]
        for k, s in report["per_image"].items():
            lines.append(f"| {k} | {s['p50']:.2f} | {s['p95']:.2f} | {s['p99']:.2f} | {s['max']:.2f} |")
        lines.append("")
    lines += ["| batch | stage | p50 ms/img | p95 | p99 | max | images/s |", "|---|---|---|---|---|---|---|"]
    for b, r in report["batches"].items():
        for k, s in r["stages"].items():
            lines.append(f"| {b} | {k} | {s['p50']:.2f} | {s['p95']:.2f} | {s['p99']:.2f} | {s['max']:.2f} | "
                         f"{r['images_per_s']:.1f} |")
    if report.get("layers"):
        lines += ["", "| layer (TensorRT) | mean ms |", "|---|---|"]
        for name, ms in sorted(report["layers"].items(), key=lambda kv: -kv[1])[:25]:
            lines.append(f"| {name} | {ms:.3f} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> bool:
    """Latency and throughput against batch size (PNG); False when matplotlib is absent."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    bs = [int(b) for b in report["batches"]]
    lat = [report["batches"][str(b)]["batch_ms"]["p50"] for b in bs]
    p95 = [report["batches"][str(b)]["batch_ms"]["p95"] for b in bs]
    thr = [report["batches"][str(b)]["images_per_s"] for b in bs]
    fig, ax1 = plt.subplots(figsize=(6, 4))
    ax1.plot(bs, lat, "o-", label="batch latency p50")
    ax1.plot(bs, p95, "o--", label="batch latency p95")
    ax1.set_xlabel("batch size")
    ax1.set_ylabel("ms per batch")
    ax2 = ax1.twinx()
    ax2.plot(bs, thr, "s-", color="tab:green", label="images/s")
    ax2.set_ylabel("images/s")
    ax1.set_xticks(bs)
    ax1.set_title(f"{report['model']} {report['precision']} on {report['backend']}")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.legend(loc="lower center", ncol=3, fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write(report: dict, folder: Path) -> List[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / "profile.json", folder / "profile.md"]
    atomic_write(written[0], lambda f: f.write(json.dumps(report, indent=2).encode()))
    atomic_write(written[1], lambda f: f.write(markdown(report).encode()))
    if plot(report, folder / "profile.png"):
        written.append(folder / "profile.png")
    return written
