"""Segments: descriptors (and names, poses, local features) streamed to disk as they are encoded.

A segment's descriptors are raw rows (``descriptors.f16`` or ``.f32``; the shape is in the
version manifest) written chunk by chunk and hashed on the way, so writing costs one pass and
the memory of one chunk. Reading them (``Rows``) reads only the rows asked for, with ``pread``
(``StoreFiles`` says why not through a memory map).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import weakref
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


def _close_all(fds: List[int]) -> None:
    for fd in fds:
        os.close(fd)


class StoreFiles:
    """Chosen rows of segment files, read with ``pread``.

    Opened for random access (``POSIX_FADV_RANDOM``: the kernel reads the bytes asked for, not a
    read-ahead window around them), one read per run of consecutive ids (views along a route are
    consecutive rows, and so are the near-duplicates a search shortlists), after telling the
    kernel every range it will need (``POSIX_FADV_WILLNEED``), so that the runs of rows outside
    the page cache are read concurrently. A memory map instead reads one page fault after the
    other, each with the device's read-around (8 MB on this machine's disk), and keeps every page
    touched in the process's resident memory."""

    def __init__(self, paths: Sequence[Path], counts: Sequence[int], row_bytes: int) -> None:
        self.paths = [Path(p) for p in paths]
        self.row_bytes = int(row_bytes)
        self.offsets = np.cumsum([0] + [int(c) for c in counts])
        self.fds: List[int] = []
        try:
            for p in self.paths:
                self.fds.append(os.open(p, os.O_RDONLY))
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(self.fds[-1], 0, 0, os.POSIX_FADV_RANDOM)
        except BaseException:
            _close_all(self.fds)
            raise
        weakref.finalize(self, _close_all, list(self.fds))

    def runs(self, ids: np.ndarray) -> List[Tuple[int, int, int, int]]:
        """(segment, its first row, start, end in ``ids``) per run of consecutive sorted ids."""
        seg = np.searchsorted(self.offsets, ids, side="right") - 1
        local = ids - self.offsets[seg]
        cut = np.flatnonzero((np.diff(local) != 1) | (np.diff(seg) != 0)) + 1
        starts, ends = np.concatenate([[0], cut]), np.concatenate([cut, [len(ids)]])
        return [(int(seg[a]), int(local[a]), int(a), int(b)) for a, b in zip(starts, ends)]

    def read(self, ids: np.ndarray, out: np.ndarray) -> None:
        """Read rows ``ids`` (sorted, unique) into ``out`` (C-contiguous, len(ids) rows or more)."""
        if len(ids) == 0:
            return
        rb = self.row_bytes
        runs = self.runs(ids)
        if len(runs) > 1 and hasattr(os, "posix_fadvise"):
            for s, first, a, b in runs:
                os.posix_fadvise(self.fds[s], first * rb, (b - a) * rb, os.POSIX_FADV_WILLNEED)
        view = memoryview(out).cast("B")
        for s, first, a, b in runs:
            self._pread(s, view[a * rb:b * rb], first)

    def _pread(self, s: int, view: memoryview, first: int) -> None:
        got = os.preadv(self.fds[s], [view], first * self.row_bytes)
        if got != len(view):
            raise MapError(f"{self.paths[s]}: {got} bytes where {len(view)} were expected from row {first} "
                           "(the file was truncated or replaced since the map was loaded); run "
                           "python -m runtime map verify")


class Rows:
    """Rows of several segment files seen as one (N, ...) array. Indexing with an int, a slice or
    an array of ids reads only those rows; ``chunks`` streams them in order. Rows are read with
    ``pread`` (StoreFiles), never memory-mapped: what a search or a training pass reads does not
    stay in the process's resident memory. ``parts`` maps whole segments when asked."""

    def __init__(self, paths: Sequence[Path], counts: Sequence[int], dtype: str, row_shape: Sequence[int]) -> None:
        self.dtype = np.dtype(dtype)
        self.counts = [int(c) for c in counts]
        self.row_shape = tuple(int(v) for v in row_shape)
        row_bytes = int(np.prod(self.row_shape)) * self.dtype.itemsize
        for path, count in zip(paths, self.counts):
            check_size(Path(path), count * row_bytes)
        self.files = StoreFiles(paths, self.counts, row_bytes)
        self.offsets = self.files.offsets
        self.shape = (int(self.offsets[-1]),) + self.row_shape

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def parts(self) -> List[np.ndarray]:
        """Each segment's rows, memory-mapped (read-only)."""
        return [np.memmap(p, dtype=self.dtype, mode="r", shape=(c, *self.row_shape))
                for p, c in zip(self.files.paths, self.counts)]

    def segment(self, s: int) -> "Rows":
        """The rows of one segment (negative: from the end)."""
        s = range(len(self.counts))[s]
        return Rows([self.files.paths[s]], [self.counts[s]], self.dtype.name, self.row_shape)

    def _rows(self, ids: np.ndarray) -> np.ndarray:
        out = np.empty((len(ids),) + self.row_shape, dtype=self.dtype)
        self.files.read(ids, out)
        return out

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            i = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"row {key} of {len(self)}")
            return self._rows(np.array([i]))[0]
        if isinstance(key, slice):
            ids = np.arange(*key.indices(len(self)))
            return self._rows(ids) if (key.step or 1) > 0 else self._rows(ids[::-1])[::-1]
        ids = np.asarray(key, dtype=np.int64)
        if ids.ndim != 1:
            raise IndexError("rows are indexed by an int, a slice or a 1-D array of ids")
        ids = np.where(ids < 0, ids + len(self), ids)
        if len(ids) and (ids.min() < 0 or ids.max() >= len(self)):
            raise IndexError(f"row ids out of range for {len(self)} rows")
        uniq, inverse = np.unique(ids, return_inverse=True)
        rows = self._rows(uniq)
        return rows if len(uniq) == len(ids) and (np.diff(ids) > 0).all() else rows[inverse]

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    def chunks(self, size: int = 8192) -> Iterator[Tuple[int, np.ndarray]]:
        """(first row, float32 rows) in order, ``size`` rows at a time (read sequentially, with
        the kernel's read-ahead)."""
        for s, count in enumerate(self.counts):
            with open(self.files.paths[s], "rb", buffering=0) as f:
                for i in range(0, count, size):
                    out = np.empty((min(size, count - i),) + self.row_shape, dtype=self.dtype)
                    got = f.readinto(memoryview(out).cast("B"))
                    if got != out.nbytes:
                        raise MapError(f"{self.files.paths[s]}: ends {got} bytes into row {i}: truncated or replaced "
                                       "since the map was loaded; run python -m runtime map verify")
                    yield int(self.offsets[s]) + i, out.astype(np.float32, copy=False)


def check_size(path: Path, expected: int) -> None:
    size = path.stat().st_size
    if size != expected:
        raise MapError(f"{path}: {size} bytes, the manifest says {expected} (truncated or replaced); "
                       "run python -m runtime map verify and rebuild the map or restore the file")
