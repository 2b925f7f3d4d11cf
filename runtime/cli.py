"""``python -m runtime``: encode, map build/add/info, localize, evaluate, profile. Torch-free.

Errors a user can cause print as one line ``error: ...`` (exit 2); ``-v`` shows third-party
warnings (runtime.cli_util)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from .backends import open_backend
from .bundle import load_bundle
from .cli_util import ArgumentParser, add_verbose, configure_logs, run_cli
from .datasets import load_dataset
from .decisions import DecisionRule, load_acceptance, save_acceptance
from .encoder import Encoder
from .errors import OptionError
from .evaluate import KS, evaluate, format_recall
from .files import save_descriptors
from .images import find_images
from .maps import (
    bundle_identity,
    check_compatible,
    load_map,
    map_info,
    open_add,
    open_build,
    poses_for,
    read_pose_table,
    verify_map,
)
from .units import parse_size


def _common(p: argparse.ArgumentParser, images: bool = True) -> None:
    p.add_argument("--bundle", required=True, type=Path, help="engine bundle (python export/build_engine.py)")
    if images:
        p.add_argument("--images", required=True, type=Path,
                       help="a folder (searched recursively), a list file (.txt, one path a line) or a glob "
                            "('city/**/*.jpg'); each image is named by its path relative to that root")
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

    m = sub.add_parser("map", help="build, extend, check or describe a place map")
    msub = m.add_subparsers(dest="map_command", required=True)
    mb = msub.add_parser("build", help="a new map from images (streamed: memory does not grow with their number)")
    _common(mb)
    mb.add_argument("--output", required=True, type=Path,
                    help="map folder: new, empty, or an existing map whose content is replaced by a new version")
    mb.add_argument("--poses", type=Path, help="CSV 'name,x,y[,...]' or JSON {name: [x, y, ...]} per image")
    mb.add_argument("--index", default="auto", choices=("auto", "flat", "sqfp16", "hnsw", "ivfpq"),
                    help="FAISS index (auto: from the map's size and --memory-budget)")
    mb.add_argument("--memory-budget", type=parse_size, default=None, help="index memory budget, e.g. 1GB")
    mb.add_argument("--store-dtype", default="float32", choices=("float16", "float32"),
                    help="descriptor store on disk, read by search and re-ranking (float16: half the disk, for "
                         "city-scale maps; its cost is in BENCHMARKS.md §5)")
    mb.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                    help="encode on a Ray cluster (ADDRESS, e.g. 10.0.0.1:6379; none: a local cluster); needs the ray extra")
    mb.add_argument("--ray-workers", type=int, default=None, help="encoder actors (default: one per CPU / GPU of the cluster)")
    ma = msub.add_parser("add", help="add images to an existing map (a new segment: costs what is added)")
    _common(ma)
    ma.add_argument("--map", required=True, type=Path)
    ma.add_argument("--poses", type=Path)
    mi = msub.add_parser("info", help="describe a map")
    mi.add_argument("--map", required=True, type=Path)
    add_verbose(mi)
    mv = msub.add_parser("verify", help="hash every file of a map (loading hashes all but the large stores)")
    mv.add_argument("--map", required=True, type=Path)
    add_verbose(mv)

    lo = sub.add_parser("localize", help="the localization loop over a folder, video file or camera",
                        description="The localization loop. One JSON line per frame (--output): its best place, "
                                    "whether to accept it and why, the top K, and its per-stage times. A camera, a video "
                                    "and a folder paced with --fps are live runs (latency: capture to result); a folder "
                                    "read as fast as possible is a throughput run (frames/s, service latency). Exit "
                                    "status: 0 done; 1 nothing processed (or --strict and a frame failed); 2 bad input; "
                                    "3 the source was lost (camera disconnected, video cut short); 128+N stopped by "
                                    "signal N (SIGINT 130, SIGTERM 143), after writing the summary.")
    lo.add_argument("--bundle", required=True, type=Path)
    lo.add_argument("--map", required=True, type=Path)
    lo.add_argument("--source", required=True, help="folder of images, video file, or camera index (0, 1, ...)")
    lo.add_argument("--budget-ms", type=float, default=0.0, help="per-frame latency budget in ms (0: none)")
    lo.add_argument("--rerank", type=int, default=0, metavar="K", help="re-rank the top K by local features (SelaVPR)")
    lo.add_argument("--top-k", type=int, default=5, help="places reported per frame")
    lo.add_argument("--fps", type=float, default=None,
                    help="pace a recording like a live camera at this rate (default: a folder as fast as possible, "
                         "a video at its recorded rate; 0: as fast as possible)")
    lo.add_argument("--min-score", type=float, default=None,
                    help="accept a place only at or above this similarity (default: the threshold saved with the map "
                         "by evaluate --save-threshold, else any score)")
    lo.add_argument("--consistency", type=int, default=None, metavar="K",
                    help="accept only when K consecutive frames agree on the place (ORB-SLAM uses 3; default 1)")
    lo.add_argument("--consistency-window", type=int, default=None, metavar="W",
                    help="places (in map order) within which consecutive frames agree (default 3)")
    lo.add_argument("--output", type=Path, help="results, one JSON line per frame, flushed line by line")
    lo.add_argument("--summary", type=Path, help="also write the end-of-run summary as JSON")
    lo.add_argument("--ground-truth", type=Path, help="dataset folder: also print Recall@K and the precision of accepted matches")
    lo.add_argument("--batch-size", type=int, default=None)
    lo.add_argument("--search-threads", type=int, default=None,
                    help="FAISS threads for the map search (default: 1 up to 2^26 floats per query, e.g. 100k x 384; "
                         "above, FAISS's default; 0: FAISS's default)")
    lo.add_argument("--strict", action="store_true", help="exit non-zero if any frame fails to decode")
    _backend_args(lo)

    ev = sub.add_parser("evaluate", help="Recall@1/5/10/20, match decisions (precision-recall) and latency on a dataset with ground truth")
    ev.add_argument("--bundle", required=True, type=Path)
    ev.add_argument("--dataset", required=True, type=Path, help="database/ + queries/ + ground truth")
    ev.add_argument("--format", default="auto", choices=("auto", "ours", "gmberton", "vprbench"))
    ev.add_argument("--map", type=Path, help="search this map (as localize does) instead of encoding the dataset's "
                                             "database; its places are matched to the ground truth by image name")
    ev.add_argument("--rerank", type=int, default=0, metavar="K")
    ev.add_argument("--consistency", type=int, default=1, metavar="K",
                    help="decisions need K consecutive queries (file-name order) to agree (default 1)")
    ev.add_argument("--consistency-window", type=int, default=3, metavar="W", help="places within which they agree")
    ev.add_argument("--target-precision", type=float, default=0.99,
                    help="report the score threshold with the highest recall at this precision (default 0.99)")
    ev.add_argument("--save-threshold", action="store_true",
                    help="store that threshold (and the consistency rule) with --map: localize then uses it")
    ev.add_argument("--pr-curve", type=Path, default=Path("out/evaluate/pr-curve.png"),
                    help="precision-recall curve PNG (default out/evaluate/pr-curve.png; needs matplotlib)")
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
    images = find_images(args.images)
    enc = _encoder(args)
    result = enc.encode_files(images.files, progress=not args.quiet, keep=keep, names=images.names)
    _report(result.failures, len(images))
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
    if args.map_command == "verify":
        version, problems, hashed = verify_map(args.map)
        for p in problems:
            print(f"error: {p}", file=sys.stderr)
        print(f"map {args.map} ({version}): {'damaged' if problems else 'intact'}, {hashed / 2 ** 30:.2f} GiB hashed")
        return 2 if problems else 0
    table = read_pose_table(args.poses) if args.poses else None  # a bad poses file fails before encoding
    if args.map_command == "build" and args.ray is not None:
        from .ray_build import ray_build_map
        summary = ray_build_map(args.bundle, args.images, args.output, address=args.ray or None,
                                workers=args.ray_workers, batch_size=args.batch_size, threads=args.threads,
                                device=args.device, index_type=args.index, memory_budget=args.memory_budget,
                                store_dtype=args.store_dtype, poses=table, poses_path=args.poses,
                                progress=not args.quiet)
        _report(summary["failures"], summary["images"])
        print(f"map {args.output} ({summary['version']}): {summary['count']} places")
        return 1 if (args.strict and summary["failures"]) else 0
    images = find_images(args.images)
    bundle = load_bundle(args.bundle)
    identity = bundle_identity(bundle)
    if args.map_command == "build":
        writer = open_build(args.output, identity, args.index, args.memory_budget, args.store_dtype)
    else:
        writer = open_add(args.map, identity)
    with writer:
        writer.check_names(images.names)
        enc = Encoder(bundle, _open(bundle, args), batch_size=args.batch_size)
        keep = ("descriptor", "local_features") if "local_features" in bundle.outputs else ("descriptor",)
        failures: list = []
        for names, out in enc.stream(images.files, images.names, keep, not args.quiet, failures):
            writer.append(names, out["descriptor"], out.get("local_features"))
        _report(failures, len(images))
        if writer.count == 0:
            print("error: no image could be processed; the map is unchanged", file=sys.stderr)
            return 1
        version = writer.commit(poses_for(table, writer.names, args.poses) if table is not None else None)
    folder = args.output if args.map_command == "build" else args.map
    print(f"map {folder} ({version}): {writer.count} images added")
    return 1 if (args.strict and failures) else 0


def _decision_rule(args, place_map, identity: dict) -> DecisionRule:
    """The rule from the options, falling back to the one saved with the map, then to defaults."""
    saved = load_acceptance(place_map)
    base = DecisionRule()
    if saved is not None:
        where = f"the rule saved with {args.map}"
        if any(saved["bundle"].get(k) != identity.get(k) for k in ("model", "dim", "preprocessing", "batch_mode")):
            print(f"warning: {where} was measured with another model; ignored (run evaluate --save-threshold again)",
                  file=sys.stderr)
        else:
            base = saved["rule"]
            if saved["bundle"].get("onnx_sha256") != identity.get("onnx_sha256"):
                print(f"warning: {where} was measured with another build of this model "
                      f"({saved['bundle'].get('precision')}); check it with evaluate", file=sys.stderr)
            if args.min_score is None and base.min_score is not None:
                m = saved["measured"]
                print(f"min score {base.min_score:.4f} from {where} (precision {m.get('precision', float('nan')):.4f}, "
                      f"recall {m.get('recall', float('nan')):.4f} on {m.get('dataset', '?')})")
    return DecisionRule(base.min_score if args.min_score is None else args.min_score,
                        base.consistency if args.consistency is None else args.consistency,
                        base.window if args.consistency_window is None else args.consistency_window)


def _log_to_stderr() -> None:
    """The loop's warnings (best effort, a failed source) as plain lines on stderr."""
    import logging

    logger = logging.getLogger("runtime")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # the root handler of configure_logs would print each line again


def cmd_localize(args) -> int:
    import signal

    from .evaluate import StreamRecall
    from .files import atomic_write
    from .loop import JsonlWriter, LocalizationLoop, LoopConfig, format_summary
    from .sources import open_source

    bundle = load_bundle(args.bundle)
    place_map = load_map(args.map)
    identity = bundle_identity(bundle)
    for warning in check_compatible(place_map.meta["bundle"], identity, args.map):
        print(f"warning: {warning}", file=sys.stderr)
    if bundle.batch_mode == "batched":
        print("warning: this bundle's descriptors depend on their batch-mates (CricaVPR batched mode); "
              "the loop's micro-batches change them. Prefer the -independent model for localization.", file=sys.stderr)
    config = LoopConfig(budget_ms=args.budget_ms, top_k=args.top_k, rerank=args.rerank, rule=_decision_rule(args, place_map, identity),
                        search_threads=args.search_threads)
    recall = StreamRecall(load_dataset(args.ground_truth), [k for k in KS if k <= args.top_k]) if args.ground_truth else None
    enc = Encoder(bundle, _open(bundle, args), batch_size=args.batch_size)
    source = open_source(args.source, fps=args.fps)
    _log_to_stderr()
    writer = JsonlWriter(args.output) if args.output else None

    def on_result(r: dict) -> None:
        if r["status"] == "failed":
            print(f"error: {r['name']}: {r['error']}", file=sys.stderr)
        if writer:
            writer(r)
        if recall:
            recall.add(r)

    loop = LocalizationLoop(enc, place_map, config, on_result)
    signals: List[int] = []

    def on_signal(signum, _frame) -> None:
        if signals:  # a second signal: stop now, without the summary
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
        signals.append(signum)
        loop.stop(signal.Signals(signum).name)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        loop.run(source)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if writer:
            writer.close()
    summary = loop.summary()
    print(format_summary(summary, loop.timer))
    if recall:
        print(recall.report())
    if args.summary:
        atomic_write(args.summary, lambda f: f.write(json.dumps(summary, indent=2).encode()))
    if signals:
        return 128 + signals[0]
    if summary["end"] in ("disconnected", "truncated", "failed"):
        print(f"error: the source was lost: {summary['end_detail']}", file=sys.stderr)
        return 3
    if loop.stats.processed == 0:
        print("error: no frame could be processed", file=sys.stderr)
        return 1
    return 1 if (args.strict and loop.stats.failed) else 0


def cmd_evaluate(args) -> int:
    from .evaluate import operating_points, plot_precision_recall

    if args.save_threshold and not args.map:
        raise OptionError("--save-threshold stores the threshold with a map: give the map with --map")
    if not 0 < args.target_precision <= 1:
        raise OptionError(f"--target-precision {args.target_precision}: expected a precision in (0, 1]")
    bundle = load_bundle(args.bundle)
    identity = bundle_identity(bundle)
    place_map = None
    if args.map:
        place_map = load_map(args.map)
        check_compatible(place_map.meta["bundle"], identity, args.map)
    rule = DecisionRule(None, args.consistency, args.consistency_window)
    ds = load_dataset(args.dataset, args.format)
    res = evaluate(bundle, ds, rerank=args.rerank, batch_size=args.batch_size, backend=_open(bundle, args),
                   progress=not args.quiet, place_map=place_map, rule=rule)
    weights = " (RANDOM WEIGHTS: recall is meaningless)" if res["bundle"]["random_weights"] else ""
    print(f"{res['bundle']['model']} {res['bundle']['precision']} on {res['bundle']['backend']}{weights}")
    against = f"the map {args.map} ({res['database']} places)" if args.map else f"{res['database']} database images"
    print(f"{ds.root} ({ds.format}): {res['queries']} queries, {against}")
    if args.rerank:
        print(f"first stage:  {format_recall(res['recall_first_stage'])}")
        print(f"re-ranked {args.rerank}: {format_recall(res['recall'])}")
    else:
        print(format_recall(res["recall"]))
    dec = res["decisions"]
    points = operating_points(dec, args.target_precision)
    res["decisions"]["operating_points"] = points
    print(_decision_table(dec, rule))
    at100 = points["threshold_at_100_precision"]
    print(f"Recall@100% precision: {points['recall_at_100_precision']:.4f}"
          + (f" (score >= {at100:.4f})" if at100 is not None else ""))
    target = points["at_target"]
    if target:
        print(f"precision >= {args.target_precision:g}: score >= {target['threshold']:.4f} "
              f"(precision {target['precision']:.4f}, recall {target['recall']:.4f}, {target['accepted']} accepted)")
    else:
        print(f"no score threshold reaches precision {args.target_precision:g}")
    swept = rule.describe().replace("any score", "score threshold swept")
    title = f"{res['bundle']['model']} {res['bundle']['precision']} on {Path(str(ds.root)).name} ({swept})"
    if plot_precision_recall(dec, points, args.pr_curve, title):
        print(f"wrote {args.pr_curve}")
    else:
        print("no precision-recall PNG: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
    print(res["latency_table"])
    if res["failures"]:
        print(f"{len(res['failures'])} images could not be read (listed above) and were left out", file=sys.stderr)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({k: v for k, v in res.items() if k != "latency_table"}, indent=2, default=list))
    if not res["queries"]:
        return 1
    if args.save_threshold:
        if not target:
            print(f"error: nothing saved: no score threshold reaches precision {args.target_precision:g}", file=sys.stderr)
            return 1
        saved = DecisionRule(target["threshold"], rule.consistency, rule.window)
        version = save_acceptance(args.map, saved, {**target, "target_precision": args.target_precision,
                                                    "dataset": str(ds.root), "queries": res["queries"]}, identity)
        print(f"saved with the map: {args.map} ({version}, {saved.describe()}); localize uses it unless "
              "--min-score is given")
    return 1 if (args.strict and res["failures"]) else 0


def _decision_table(dec: dict, rule) -> str:
    """Precision and recall at ten score thresholds (deciles of the best-match scores)."""
    n = len(dec["thresholds"])
    rows = [f"decisions ({rule.describe().replace('any score', 'score >= threshold')}), "
            f"{dec['queries_with_a_true_place']} queries with a true place:",
            "| score >= | accepted | precision | recall |", "|---|---|---|---|"]
    for i in sorted({int(round(j * (n - 1) / 9)) for j in range(10)} if n else set()):
        rows.append(f"| {dec['thresholds'][i]:.4f} | {dec['accepted'][i]} | {dec['precision'][i]:.4f} | "
                    f"{dec['recall'][i]:.4f} |")
    return "\n".join(rows)


def main(argv: Optional[List[str]] = None) -> int:
    def body() -> int:
        args = build_parser().parse_args(argv)
        configure_logs(args.verbose)
        handler = {"encode": cmd_encode, "map": cmd_map, "localize": cmd_localize, "evaluate": cmd_evaluate,
                   "profile": cmd_profile}[args.command]
        return handler(args)

    return run_cli(body)
