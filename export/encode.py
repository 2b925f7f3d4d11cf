"""PyTorch reference encoder: every image of a folder -> descriptors (the truth engines are
compared with).

    python -m export.encode --model salad-dinov2-vitb14 --checkpoint dino_salad.ckpt \\
        --images data/vprbench_corridor/queries --output out/queries.npy

Writes ``queries.npy`` (N, D) float32, rows in file-name order, and ``queries.txt`` with the
file names, one per line. CricaVPR in ``batched`` mode forms its batches from consecutive files
in that order, as the official test loop does, so the batch size changes its descriptors.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
from tqdm import tqdm

from runtime.files import save_descriptors
from runtime.preprocess import list_images, preprocess_file

from .registry import get_config, list_models, parse_image_size
from .zoo import create_model


def encode_files(model: torch.nn.Module, cfg, files: List[Path], batch_size: int = 16,
                 with_local: bool = False, progress: bool = True) -> dict:
    """Run the model over ``files`` in consecutive batches; returns stacked outputs by name."""
    outputs: dict = {"descriptor": []}
    if with_local:
        outputs["local_features"] = []
    pre = cfg.preprocessing
    bar = tqdm(total=len(files), unit="img", desc=f"encode {cfg.name}", disable=not progress)
    with torch.inference_mode():
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            batch = torch.from_numpy(np.stack([preprocess_file(f, pre) for f in chunk]))
            result = model(batch)
            for name in outputs:
                outputs[name].append(result[name].float().numpy())
            bar.update(len(chunk))
    bar.close()
    return {name: np.concatenate(parts) for name, parts in outputs.items()}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m export.encode", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="NAME",
                   help="registry name; one of: " + ", ".join(list_models()))
    w = p.add_mutually_exclusive_group(required=True)
    w.add_argument("--checkpoint", metavar="PATH|URL",
                   help="official checkpoint file, or an https:// URL downloaded once into the cache")
    w.add_argument("--random-weights", action="store_true",
                   help="random weights (seeded): for tests and benchmarks only, descriptors mean nothing")
    p.add_argument("--images", required=True, type=Path, help="folder of images (sorted by file name)")
    p.add_argument("--output", required=True, type=Path, help="descriptor file (.npy); names go to .txt beside it")
    p.add_argument("--image-size", type=parse_image_size, metavar="N|HxW",
                   help="input size, square N or HxW (e.g. 240x320); default: the model's official size")
    p.add_argument("--batch-size", type=int, default=16,
                   help="images per forward pass (default 16: CricaVPR's official test batch)")
    p.add_argument("--save-local", action="store_true", help="also save SelaVPR's local features (X.local.npy)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--depth", type=int, default=None, help=argparse.SUPPRESS)  # reduced models for tests
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch_size < 1:
        print("error: --batch-size must be at least 1", file=sys.stderr)
        return 2
    try:
        cfg = get_config(args.model, image_size=args.image_size, depth=args.depth)
        files = list_images(args.images)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not files:
        print(f"error: {args.images}: no images found", file=sys.stderr)
        return 2
    if args.save_local and "local_features" not in cfg.outputs():
        print(f"error: --save-local: {cfg.name} has no local features", file=sys.stderr)
        return 2
    model, cfg, info = create_model(cfg, checkpoint=args.checkpoint, random_weights=args.random_weights)
    weights = "RANDOM WEIGHTS (not a trained model)" if args.random_weights else f"{info['format']} checkpoint {info['path']}"
    print(f"{cfg.name}: {cfg.image_size[0]}x{cfg.image_size[1]}, {weights}, {len(files)} images", file=sys.stderr)
    outputs = encode_files(model, cfg, files, args.batch_size, with_local=args.save_local)
    written = save_descriptors(args.output, [f.name for f in files], outputs)
    d = outputs["descriptor"]
    print(f"wrote {d.shape[0]} x {d.shape[1]} descriptors: {', '.join(str(w) for w in written)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
