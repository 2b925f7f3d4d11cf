"""PyTorch reference encoder: every image of a folder -> descriptors (the truth engines are
compared with).

    python -m export.encode --model salad-dinov2-vitb14 --checkpoint dino_salad.ckpt \\
        --images data/vprbench_corridor/queries --output out/queries.npy

Writes ``queries.npy`` (N, D) float32, rows in file-name order, and ``queries.txt`` with the
file names, one per line. CricaVPR in ``batched`` mode forms its batches from consecutive files
in that order, as the official test loop does, so the batch size changes its descriptors.
A file that cannot be read is reported (file and problem) and left out; the rest is encoded
(exit 1 with ``--strict``, or when no file could be read).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
from tqdm import tqdm

from runtime.cli_util import ArgumentParser, add_verbose, configure_logs, run_cli
from runtime.errors import OptionError, PathError
from runtime.files import save_descriptors
from runtime.preprocess import ImageDecodeError, list_images, preprocess_file

from .registry import get_config, list_models, parse_image_size
from .zoo import create_model


@dataclass
class Encoded:
    outputs: dict  # name -> (N, ...) float32, rows in the order of ``files``
    files: List[Path]  # the files encoded
    failures: List[Tuple[Path, str]] = field(default_factory=list)  # (file, problem), left out


def encode_files(model: torch.nn.Module, cfg, files: List[Path], batch_size: int = 16,
                 with_local: bool = False, progress: bool = True) -> Encoded:
    """Run the model over ``files`` in consecutive batches; a file that cannot be read is
    reported on stderr and left out (its batch is one smaller)."""
    parts: dict = {"descriptor": []}
    if with_local:
        parts["local_features"] = []
    pre = cfg.preprocessing
    done, failures = [], []
    bar = tqdm(total=len(files), unit="img", desc=f"encode {cfg.name}", disable=not progress)
    with torch.inference_mode():
        for start in range(0, len(files), batch_size):
            chunk, arrays = [], []
            for f in files[start:start + batch_size]:
                try:
                    arrays.append(preprocess_file(f, pre))
                    chunk.append(f)
                except ImageDecodeError as exc:
                    failures.append((f, str(exc)))
                    bar.write(f"error: {f}: {exc} (skipped)", file=sys.stderr)
            if arrays:
                result = model(torch.from_numpy(np.stack(arrays)))
                for name in parts:
                    parts[name].append(result[name].float().numpy())
                done += chunk
            bar.update(min(batch_size, len(files) - start))
    bar.close()
    return Encoded({name: np.concatenate(p) if p else np.zeros((0,)) for name, p in parts.items()}, done, failures)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
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
    p.add_argument("--strict", action="store_true", help="exit 1 if any image cannot be read")
    add_verbose(p)
    p.add_argument("--depth", type=int, default=None, help=argparse.SUPPRESS)  # reduced models for tests
    return p


def main(argv: Optional[List[str]] = None) -> int:
    return run_cli(lambda: _main(build_parser().parse_args(argv)))


def _main(args: argparse.Namespace) -> int:
    configure_logs(args.verbose)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch_size < 1:
        raise OptionError(f"--batch-size {args.batch_size}: must be at least 1")
    cfg = get_config(args.model, image_size=args.image_size, depth=args.depth)
    files = list_images(args.images)
    if not files:
        raise PathError(f"{args.images}: no images found")
    if args.save_local and "local_features" not in cfg.outputs():
        raise OptionError(f"--save-local: {cfg.name} has no local features")
    model, cfg, info = create_model(cfg, checkpoint=args.checkpoint, random_weights=args.random_weights)
    weights = "RANDOM WEIGHTS (not a trained model)" if args.random_weights else f"{info['format']} checkpoint {info['path']}"
    print(f"{cfg.name}: {cfg.image_size[0]}x{cfg.image_size[1]}, {weights}, {len(files)} images", file=sys.stderr)
    enc = encode_files(model, cfg, files, args.batch_size, with_local=args.save_local)
    if enc.failures:
        print(f"{len(enc.failures)} of {len(files)} images could not be read (listed above); the others were encoded",
              file=sys.stderr)
    if not enc.files:
        print("error: no image could be encoded", file=sys.stderr)
        return 1
    written = save_descriptors(args.output, [f.name for f in enc.files], enc.outputs)
    d = enc.outputs["descriptor"]
    print(f"wrote {d.shape[0]} x {d.shape[1]} descriptors: {', '.join(str(w) for w in written)}", file=sys.stderr)
    return 1 if (args.strict and enc.failures) else 0


if __name__ == "__main__":
    sys.exit(main())
