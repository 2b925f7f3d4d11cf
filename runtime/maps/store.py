"""Segments: descriptors (and names, poses, local features) streamed to disk as they are encoded.

A segment's descriptors are raw rows (``descriptors.f16`` or ``.f32``; the shape is in the
version manifest) written chunk by chunk and hashed on the way, so writing costs one pass and
the memory of one chunk. Loading memory-maps them: only the rows a search re-ranks are read.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..files import atomic_write, sha256_file
from .layout import MapError, segment_dir, store_file


def check_finite(x: np.ndarray, names: Sequence[str]) -> None:
    bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if bad.any():
        shown = ", ".join(str(names[i]) for i in np.flatnonzero(bad)[:5])
        raise MapError(f"{int(bad.sum())} descriptors contain NaN or Inf ({shown}); they were not added")


class HashedFile:
    """Appends bytes to a new file, hashing them on the way; ``close`` returns size and sha256."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = open(path, "wb")
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        self.file.write(view)
        self.hash.update(view)
        self.size += view.nbytes

    def close(self) -> dict:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        return {"size": self.size, "sha256": self.hash.hexdigest()}

    def discard(self) -> None:
        try:
            self.file.close()
        except OSError:
            pass  # unflushed bytes of a file being thrown away (a full disk)


class SegmentWriter:
    """One new segment, written in a staging folder and renamed into place by ``finish``."""

    def __init__(self, folder: Path, name: str, dim: int, store_dtype: str) -> None:
        self.name, self.dim, self.dtype = name, int(dim), np.dtype(store_dtype)
        self.store_dtype = store_dtype
        self.final = segment_dir(folder, name)
        self.staging = self.final.with_name(f".{name}.partial-{os.getpid()}")
        if self.staging.exists():
            shutil.rmtree(self.staging)
        self.staging.mkdir(parents=True)
        self.files: Dict[str, HashedFile] = {
            store_file(store_dtype): HashedFile(self.staging / store_file(store_dtype)),
            "names.jsonl": HashedFile(self.staging / "names.jsonl")}
        self.local_shape: Optional[Tuple[int, ...]] = None
        self.names: List[str] = []

    def append(self, names: Sequence[str], descriptors: np.ndarray, local: Optional[np.ndarray] = None) -> None:
        x = np.asarray(descriptors, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim or len(x) != len(names):
            raise MapError(f"{len(names)} names for descriptors of shape {x.shape}; the map's are {self.dim}-D")
        check_finite(x, names)
        if (local is None) != (self.local_shape is None) and self.names:
            raise MapError("local features must be given for every batch or for none")
        if local is not None:
            local = np.ascontiguousarray(local, dtype=np.float16)
            if self.local_shape is None:
                self.local_shape = tuple(int(v) for v in local.shape[1:])
                self.files["local.f16"] = HashedFile(self.staging / "local.f16")
            if tuple(local.shape[1:]) != self.local_shape or len(local) != len(names):
                raise MapError(f"local features of shape {local.shape}, expected (N, {self.local_shape})")
            check_finite(local, names)
        self.files[store_file(self.store_dtype)].write(np.ascontiguousarray(x, dtype=self.dtype))
        if local is not None:
            self.files["local.f16"].write(local)
        self.files["names.jsonl"].write("".join(json.dumps(str(n)) + "\n" for n in names).encode())
        self.names.extend(str(n) for n in names)

    @property
    def count(self) -> int:
        return len(self.names)

    def finish(self, poses: Optional[np.ndarray] = None) -> dict:
        """Close every file, move the segment into place; returns its manifest entry."""
        entries = {name: f.close() for name, f in self.files.items()}
        if poses is not None:
            atomic_write(self.staging / "poses.npy", lambda f: np.save(f, np.asarray(poses, dtype=np.float64)))
            entries["poses.npy"] = {"size": (self.staging / "poses.npy").stat().st_size,
                                    "sha256": sha256_file(self.staging / "poses.npy")}
        os.replace(self.staging, self.final)
        return {"name": self.name, "count": self.count, "files": dict(sorted(entries.items())),
                "local_shape": list(self.local_shape) if self.local_shape else None}

    def abort(self) -> None:
        for f in self.files.values():
            f.discard()
        shutil.rmtree(self.staging, ignore_errors=True)


class Rows:
    """Rows of several memory-mapped segment arrays seen as one (N, ...) array: indexing with an
    int, a slice or an array of ids reads only those rows."""

    def __init__(self, parts: List[np.ndarray]) -> None:
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])
        self.shape = (int(self.offsets[-1]),) + tuple(parts[0].shape[1:])
        self.dtype = parts[0].dtype

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            key = int(key) + (len(self) if key < 0 else 0)
            s = int(np.searchsorted(self.offsets, key, side="right")) - 1
            return self.parts[s][key - self.offsets[s]]
        if isinstance(key, slice):
            key = np.arange(*key.indices(len(self)))
        ids = np.asarray(key, dtype=np.int64)
        out = np.empty((len(ids),) + self.shape[1:], dtype=self.dtype)
        seg = np.searchsorted(self.offsets, ids, side="right") - 1
        for s in np.unique(seg):
            where = np.flatnonzero(seg == s)
            out[where] = self.parts[s][ids[where] - self.offsets[s]]
        return out

    def __array__(self, dtype=None, copy=None):
        out = np.concatenate([np.asarray(p) for p in self.parts])
        return out if dtype is None else out.astype(dtype)

    def chunks(self, size: int = 8192) -> Iterator[Tuple[int, np.ndarray]]:
        """(first row, float32 rows) in order, ``size`` rows at a time."""
        for s, part in enumerate(self.parts):
            for i in range(0, len(part), size):
                yield int(self.offsets[s]) + i, np.asarray(part[i:i + size], dtype=np.float32)


def open_rows(path: Path, dtype: str, count: int, row_shape: Sequence[int]) -> np.ndarray:
    expected = count * int(np.prod(row_shape)) * np.dtype(dtype).itemsize
    size = path.stat().st_size
    if size != expected:
        raise MapError(f"{path}: {size} bytes, the manifest says {expected} (truncated or replaced); "
                       "run python -m runtime map verify and rebuild the map or restore the file")
    return np.memmap(path, dtype=dtype, mode="r", shape=(count, *row_shape))
