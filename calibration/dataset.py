"""Calibration sets: images sampled from one or more folders, seeded and spread over each whole
sequence (a random image in each of N equal strata, not the first N), preprocessed by the
runtime's own preprocessing (exactly what deployment feeds the engine), cached as an array file
so that a rebuild does not decode again.

Default count 500: NVIDIA's ModelOpt ONNX PTQ guide advises at least 500 calibration images for
CNNs and ViTs (examples/onnx_ptq/README.md); fewer are allowed with a warning.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np

from runtime.datasets import DatasetError
from runtime.encoder import decode
from runtime.errors import PathError
from runtime.files import atomic_write
from runtime.preprocess import Preprocessing, list_images

DEFAULT_COUNT = 500
DEFAULT_CACHE = Path(os.environ.get("VPR_EDGE_CACHE", Path.home() / ".cache" / "vpr-edge")) / "calibration"


def sample_files(folders: Sequence[Union[str, Path]], count: int = DEFAULT_COUNT, seed: int = 0) -> List[Path]:
    """``count`` files spread over the folders' sorted sequences, proportionally to their size."""
    per_folder = [list_images(f) for f in folders]
    files = [p for group in per_folder for p in group]
    if not files:
        raise PathError(f"no images in {', '.join(map(str, folders))}; calibration needs real place images")
    if count >= len(files):
        if count > len(files):
            print(f"warning: {count} calibration images asked for, only {len(files)} available; using all",
                  file=sys.stderr)
        return files
    rng = np.random.default_rng(seed)
    edges = np.linspace(0, len(files), count + 1)
    picks = [int(rng.integers(int(lo), max(int(lo) + 1, int(hi)))) for lo, hi in zip(edges[:-1], edges[1:])]
    return [files[i] for i in picks]


def _cache_key(files: Sequence[Path], pre: Preprocessing) -> str:
    h = hashlib.sha256(json.dumps(pre.to_dict(), sort_keys=True).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def calibration_set(folders: Sequence[Union[str, Path]], pre: Preprocessing, count: int = DEFAULT_COUNT,
                    seed: int = 0, cache_dir: Optional[Path] = DEFAULT_CACHE) -> np.ndarray:
    """(N, 3, H, W) float32, memory-mapped from the cache. Unreadable files are reported and skipped."""
    if count < DEFAULT_COUNT:
        print(f"warning: {count} calibration images; NVIDIA advises at least {DEFAULT_COUNT} for ViTs",
              file=sys.stderr)
    files = sample_files(folders, count, seed)
    key = _cache_key(files, pre)
    path = Path(cache_dir) / f"calib-{key}.npy" if cache_dir else None
    if path is not None and path.is_file():
        return np.load(path, mmap_mode="r")
    arrays = []
    for f in files:
        d = decode(f, pre)
        if d.error:
            print(f"error: {f}: {d.error} (skipped)", file=sys.stderr)
            continue
        arrays.append(d.image)
    if not arrays:
        raise DatasetError(f"none of the {len(files)} calibration images sampled from "
                           f"{', '.join(map(str, folders))} could be read (listed above)")
    if len(arrays) < len(files):
        print(f"{len(files) - len(arrays)} of {len(files)} calibration images could not be read; "
              f"calibrating on {len(arrays)}", file=sys.stderr)
    data = np.stack(arrays).astype(np.float32)
    if path is None:
        return data
    atomic_write(path, lambda fh: np.save(fh, data))
    return np.load(path, mmap_mode="r")
