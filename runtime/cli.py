"""``python -m runtime``: encode, map build/add/info, localize, evaluate, profile. Torch-free.

Errors a user can cause print as one line ``error: ...`` (exit 2); ``-v`` shows third-party
warnings (runtime.cli_util)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np

from .backends import open_backend
from .bundle import load_bundle
from .cli_util import ArgumentParser, add_verbose, configure_logs, run_cli
from .datasets import load_dataset
from .encoder import Encoder
from .errors import OptionError, PathError
from .evaluate import KS, evaluate, format_recall, recall_at_k
from .files import save_descriptors
from .maps import add_to_map, bundle_identity, check_compatible, load_map, map_info, read_poses, save_map
from .preprocess import IMAGE_EXTENSIONS, list_images
from .units import parse_size


def _common(p: argparse.ArgumentParser, images: bool = True) -> None:
    p.add_argument("--bundle", required=True, type=Path, help="engine bundle (python export/build_engine.py)")
    if images:
        p.add_argument("--images", required=True, type=Path, help="folder of images, read in file-name order")
    p.add_argument("--batch-size", type=int, default=None, help="images per inference call (default: the bundle's opt batch)")
    _backend_args(p)
    p.add_argument("--strict", action="store_true", help="exit non-zero if any image fails to decode")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _backend_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime CPU threads (default: all cores)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="ONNX Runtime bundles: cuda uses the CUDA execution provider where present")
    p.add_argument("--cuda-graph", action="store_true", help="TensorRT bundles: capture each batch size in a CUDA graph")
    add_verbose(p)


def _open(bundle, args):
    return open_backend(bundle, threads=args.threads, device=args.device, cuda_graph=args.cuda_graph)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m runtime", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("encode", help="descriptors of every image of a folder")
    _common(e)
    e.add_argument("--output", required=True, type=Path, help="X.npy (names in X.txt)")
    e.add_argument("--save-local", action="store_true", help="also write SelaVPR local features (X.local.npy)")

    m = sub.add_parser("map", help="build, extend or describe a place map")
    msub = m.add_subparsers(dest="map_command", required=True)
    mb = msub.add_parser("build", help="a new map from a folder of images")
    _common(mb)
    mb.add_argument("--output", required=True, type=Path, help="map folder")
    mb.add_argument("--poses", type=Path, help="CSV 'name,x,y[,...]' or JSON {name: [x, y, ...]} per image")
    mb.add_argument("--index", default="auto", choices=("auto", "flat", "sqfp16", "hnsw", "ivfpq"),
                    help="FAISS index (auto: from the map's size and --memory-budget)")
    mb.add_argument("--memory-budget", type=parse_size, default=None, help="index memory budget, e.g. 2GB")
    ma = msub.add_parser("add", help="add the images of a folder to an existing map")
    _common(ma)
    ma.add_argument("--map", required=True, type=Path)
    ma.add_argument("--poses", type=Path)
    mi = msub.add_parser("info", help="describe a map")
    mi.add_argument("--map", required=True, type=Path)
    add_verbose(mi)

    lo = sub.add_parser("localize", help="the localization loop over a folder, video file or camera")
    lo.add_argument("--bundle", required=True, type=Path)
    lo.add_argument("--map", required=True, type=Path)
    lo.add_argument("--source", required=True, help="folder of images, video file, or camera index (0, 1, ...)")
    lo.add_argument("--budget-ms", type=float, default=0.0, help="per-frame latency budget in ms (0: none)")
    lo.add_argument("--rerank", type=int, default=0, metavar="K", help="re-rank the top K by local features (SelaVPR)")
    lo.add_argument("--top-k", type=int, default=5, help="places reported per frame")
    lo.add_argument("--fps", type=float, default=0.0, help="pace a folder like a live camera at this rate")
    lo.add_argument("--output", type=Path, help="results, one JSON line per frame")
    lo.add_argument("--ground-truth", type=Path, help="dataset folder: also print Recall@K of the results")
    lo.add_argument("--batch-size", type=int, default=None)
    lo.add_argument("--strict", action="store_true", help="exit non-zero if any frame fails to decode")
    _backend_args(lo)

    ev = sub.add_parser("evaluate", help="Recall@1/5/10/20 and latency on a dataset with ground truth")
    ev.add_argument("--bundle", required=True, type=Path)
    ev.add_argument("--dataset", required=True, type=Path, help="database/ + queries/ + ground truth")
    ev.add_argument("--format", default="auto", choices=("auto", "ours", "gmberton", "vprbench"))
    ev.add_argument("--rerank", type=int, default=0, metavar="K")
    ev.add_argument("--batch-size", type=int, default=None)
    ev.add_argument("--strict", action="store_true", help="exit non-zero if any image fails to decode")
    _backend_args(ev)
    ev.add_argument("--output", type=Path, help="write the results as JSON")
    ev.add_argument("--quiet", action="store_true")
    pr = sub.add_parser("profile", help="per-stage latency percentiles, throughput and memory per batch size")
    pr.add_argument("--bundle", required=True, type=Path)
    pr.add_argument("--batch", default="1,2,4,8", help="comma-separated batch sizes (default 1,2,4,8)")
    pr.add_argument("--iterations", type=int, default=20, help="timed iterations per batch size")
    pr.add_argument("--warmup", type=int, default=3, help="untimed iterations first (default 3)")
    pr.add_argument("--images", type=Path, help="real images to feed (default: random tensors; decode not timed)")
    pr.add_argument("--map-size", type=int, default=10000, help="descriptors in the synthetic search map")
    pr.add_argument("--rerank", type=int, default=0, metavar="K", help="time re-ranking of K candidates (SelaVPR)")
    _backend_args(pr)
    pr.add_argument("--output", type=Path, default=Path("out/profile"), help="folder for profile.json/.md/.png")
    return p


def cmd_profile(args) -> int:
    from .profile import markdown, profile_bundle, write

    try:
        batches = [int(b) for b in args.batch.split(",") if b.strip()]
    except ValueError:
        raise OptionError(f"--batch {args.batch!r}: expected comma-separated integers, e.g. 1,2,4,8") from None
    report = profile_bundle(load_bundle(args.bundle), batches, args.iterations, args.warmup, args.images,
                            args.map_size, args.rerank, args.threads, device=args.device, cuda_graph=args.cuda_graph)
    print(markdown(report))
    print("wrote " + ", ".join(str(p) for p in write(report, args.output)))
    return 0


def _encoder(args) -> Encoder:
    bundle = load_bundle(args.bundle)
    return Encoder(bundle, _open(bundle, args), batch_size=args.batch_size)


def _encode_folder(args, keep=("descriptor",)):
    files = list_images(args.images)
    if not files:
        raise PathError(f"{args.images}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
    enc = _encoder(args)
    if "local_features" in enc.bundle.outputs and "local_features" not in keep and args.command == "map":
        keep = ("descriptor", "local_features")  # SelaVPR maps keep local features for re-ranking
    result = enc.encode_files(files, progress=not args.quiet, keep=keep)
    _report(result.failures, len(files))
    return enc, result


def _report(failures, total: int) -> None:
    if failures:
        print(f"{len(failures)} of {total} images could not be read (listed above); the others were processed",
              file=sys.stderr)


def _status(args, result) -> int:
    if not result.names:
        print("error: no image could be processed", file=sys.stderr)
        return 1
    return 1 if (args.strict and result.failures) else 0


def cmd_encode(args) -> int:
    keep = ("descriptor", "local_features") if args.save_local else ("descriptor",)
    enc, result = _encode_folder(args, keep)
    if result.names:
        written = save_descriptors(args.output, result.names, result.outputs)
        print(f"wrote {len(result.names)} descriptors: {', '.join(map(str, written))}")
    return _status(args, result)


def cmd_map(args) -> int:
    if args.map_command == "info":
        print(json.dumps(map_info(load_map(args.map)), indent=2))
        return 0
    if args.map_command == "add":
        place_map = load_map(args.map)
        check_compatible(place_map.meta["bundle"], bundle_identity(load_bundle(args.bundle)), args.map)
    enc, result = _encode_folder(args)
    if not result.names:
        return _status(args, result)
    poses = read_poses(args.poses, result.names) if args.poses else None
    local = result.outputs.get("local_features")
    if args.map_command == "build":
        place_map = save_map(args.output, result.outputs["descriptor"], result.names, bundle_identity(enc.bundle),
                             args.index, args.memory_budget, poses, local)
    else:
        place_map = add_to_map(place_map, result.outputs["descriptor"], result.names, poses, local)
    info = map_info(place_map)
    print(f"map {info['folder']} ({info['version']}): {info['count']} places, {info['dim']}-D, index {info['index']}")
    return _status(args, result)


def cmd_localize(args) -> int:
    from .loop import JsonlWriter, Localizer, LoopConfig
    from .sources import open_source

    bundle = load_bundle(args.bundle)
    place_map = load_map(args.map)
    check_compatible(place_map.meta["bundle"], bundle_identity(bundle), args.map)
    if bundle.batch_mode == "batched":
        print("warning: this bundle's descriptors depend on their batch-mates (CricaVPR batched mode); "
              "the loop's micro-batches change them. Prefer the -independent model for localization.", file=sys.stderr)
    enc = Encoder(bundle, _open(bundle, args), batch_size=args.batch_size)
    results: List[dict] = []
    writer = JsonlWriter(args.output) if args.output else None

    def on_result(r: dict) -> None:
        if "error" in r:
            print(f"error: {r['name']}: {r['error']}", file=sys.stderr)
        results.append(r)
        if writer:
            writer(r)

    source = open_source(args.source, fps=args.fps)
    loop = Localizer(enc, place_map, LoopConfig(budget_ms=args.budget_ms, top_k=args.top_k, rerank=args.rerank), on_result)
    try:
        stats = loop.run(source, live=getattr(source, "live", False))
    finally:
        if writer:
            writer.close()
    print(f"frames: received {stats.received}, processed {stats.processed}, failed {stats.failed}, "
          f"dropped stale {stats.dropped_stale}, dropped at queue {stats.dropped_queue}; "
          f"re-rank skipped {stats.rerank_skipped}, batch shrinks {stats.batch_shrinks}, over budget {stats.over_budget}")
    if args.ground_truth:
        _loop_recall(results, args.ground_truth, place_map)
    print(loop.timer.table())
    if stats.processed == 0:
        print("error: no frame could be processed", file=sys.stderr)
        return 1
    return 1 if (args.strict and stats.failed) else 0


def _loop_recall(results: List[dict], dataset_dir: Path, place_map) -> None:
    ds = load_dataset(dataset_dir)
    by_name = {p.name: i for i, p in enumerate(ds.queries)}
    db_names = [p.name for p in ds.database]
    map_to_ds = {n: i for i, n in enumerate(db_names)}
    ranked, positives = [], []
    for r in results:
        if "top_k" in r and r["name"] in by_name:
            ranked.append([map_to_ds.get(t["place"], -1) for t in r["top_k"]])
            positives.append(ds.positives[by_name[r["name"]]])
    if not ranked:
        print("no localized frame matches the dataset's queries", file=sys.stderr)
        return
    depth = max(len(r) for r in ranked)
    ks = [k for k in KS if k <= depth]
    arr = np.array([r + [-1] * (depth - len(r)) for r in ranked])
    print(f"Recall over {len(ranked)} localized queries: {format_recall(recall_at_k(arr, positives, ks))}")


def cmd_evaluate(args) -> int:
    bundle = load_bundle(args.bundle)
    ds = load_dataset(args.dataset, args.format)
    res = evaluate(bundle, ds, rerank=args.rerank, batch_size=args.batch_size, backend=_open(bundle, args),
                   progress=not args.quiet)
    weights = " (RANDOM WEIGHTS: recall is meaningless)" if res["bundle"]["random_weights"] else ""
    print(f"{res['bundle']['model']} {res['bundle']['precision']} on {res['bundle']['backend']}{weights}")
    print(f"{ds.root} ({ds.format}): {res['queries']} queries, {res['database']} database images")
    if args.rerank:
        print(f"first stage:  {format_recall(res['recall_first_stage'])}")
        print(f"re-ranked {args.rerank}: {format_recall(res['recall'])}")
    else:
        print(format_recall(res["recall"]))
    print(res["latency_table"])
    if res["failures"]:
        print(f"{len(res['failures'])} images could not be read (listed above) and were left out", file=sys.stderr)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({k: v for k, v in res.items() if k != "latency_table"}, indent=2, default=list))
    if not res["queries"]:
        return 1
    return 1 if (args.strict and res["failures"]) else 0


def main(argv: Optional[List[str]] = None) -> int:
    def body() -> int:
        args = build_parser().parse_args(argv)
        configure_logs(args.verbose)
        handler = {"encode": cmd_encode, "map": cmd_map, "localize": cmd_localize, "evaluate": cmd_evaluate,
                   "profile": cmd_profile}[args.command]
        return handler(args)

    return run_cli(body)
