"""Loop benchmark: end-to-end frames/s of the localization loop (``runtime localize``) on the
sample queries, and the share of wall time spent outside inference (decode, preprocess, search,
queueing, Python).

    python benchmarks/loop.py --bundle engines/demo-gem-dinov2-vits14 [--threads 2] [--batch-size 8]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from common import ROOT, save, table
from runtime.cli_util import ArgumentParser, run_cli  # noqa: E402

sys.path.insert(0, str(ROOT))
from runtime.backends import open_backend  # noqa: E402
from runtime.bundle import load_bundle  # noqa: E402
from runtime.encoder import Encoder  # noqa: E402
from runtime.loop import Localizer, LoopConfig  # noqa: E402
from runtime.maps import bundle_identity, save_map  # noqa: E402
from runtime.sources import FolderSource  # noqa: E402

DATA = ROOT / "data" / "vprbench_corridor"


def main() -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-sizes", default="1,4,8")
    args = p.parse_args()
    bundle = load_bundle(args.bundle)
    rows, results = [], []
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        enc = Encoder(bundle, open_backend(bundle, threads=args.threads))
        db = enc.encode_files(sorted((DATA / "database").iterdir()))
        place_map = save_map(Path(tmp) / "map", db.outputs["descriptor"], db.names, bundle_identity(bundle))
        for b in (int(v) for v in args.batch_sizes.split(",")):
            if b > bundle.batch["max"]:
                continue
            enc = Encoder(bundle, open_backend(bundle, threads=args.threads), batch_size=b)
            loop = Localizer(enc, place_map, LoopConfig(top_k=5))
            t = time.perf_counter()
            stats = loop.run(FolderSource(DATA / "queries"))
            wall = time.perf_counter() - t
            s = loop.timer.summary()
            inference_s = s["inference"]["mean"] * s["inference"]["n"] / 1000
            r = {"batch": b, "frames": stats.processed, "wall_s": wall, "fps": stats.processed / wall,
                 "inference_share": inference_s / wall, "outside_inference_share": 1 - inference_s / wall,
                 "stages": s}
            results.append(r)
            rows.append([b, stats.processed, wall, r["fps"], r["outside_inference_share"]])
    print(f"{bundle.manifest['model']['name']} {bundle.precision} on {bundle.backend}, {args.threads} threads, "
          f"{len(place_map)}-image map, queries from {DATA.relative_to(ROOT)}")
    print(table(["batch", "frames", "wall s", "frames/s", "share outside inference"], rows))
    print("wrote", save(f"loop-{bundle.manifest['model']['name']}", {"args": {k: str(v) for k, v in vars(args).items()},
                                                                     "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
