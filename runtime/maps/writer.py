"""Writing a map: one writer at a time, streaming into a new segment, then a new version.

``open_build`` starts a map (or a new content for an existing map folder), ``open_add`` extends
the current version. Either returns a ``MapWriter``: ``append`` streams batches of descriptors to
the new segment's store, ``commit`` indexes the segment and switches ``CURRENT`` to a new version
manifest. Until ``commit`` switches ``CURRENT``, the previous version is untouched and loadable:
a writer that fails (a bad batch, a full disk, SIGKILL) leaves only a staging folder, which the
next writer removes. Garbage collection (after each commit and when a writer starts) deletes old
versions nobody reads (see lock.py) and the segments and index files no kept version lists; it
only ever deletes names of the map's own layout, nothing else in the folder.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

import faiss
import numpy as np

from ..files import atomic_write, sha256_file
from .identity import check_compatible
from .index import IVFPQ_MIN, choose_index, index_bytes, ivfpq_part, needs_retrain, new_hnsw, train_ivfpq
from .layout import (
    FORMAT_VERSION,
    SEGMENT_RE,
    STORE_DTYPES,
    TRAINING_RE,
    VERSION_RE,
    MapError,
    current_version,
    is_map,
    next_name,
    numbered,
    read_manifest,
    segment_dir,
    store_file,
    training_dir,
    version_path,
    versions_dir,
    write_current,
)
from .lock import WriterLock, try_claim
from .reader import PlaceMap, load_map, read_names
from .store import Rows, SegmentWriter, open_rows

CHUNK = 8192


def _entry(path: Path) -> dict:
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def _segment_rows(folder: Path, dtype: str, seg: dict, dim: int) -> np.ndarray:
    return open_rows(segment_dir(folder, seg["name"]) / store_file(dtype), dtype, seg["count"], (dim,))


class MapWriter:
    """One writing session on a map folder (holds its lock). Use ``open_build`` / ``open_add``."""

    def __init__(self, folder: Path, identity: dict, previous: Optional[dict], index_type: str,
                 memory_budget: Optional[int], store_dtype: str, keep_versions: int, lock: WriterLock) -> None:
        self.folder, self.identity, self.previous = folder, identity, previous
        self.index_type, self.memory_budget = index_type, memory_budget
        self.store_dtype, self.keep_versions, self.lock = store_dtype, max(1, keep_versions), lock
        self.dim = int(identity["dim"])
        self.previous_version = current_version(folder) if is_map(folder) else None
        self.existing: set = set()
        if previous is not None:
            for seg in previous["segments"]:
                self.existing.update(read_names(segment_dir(folder, seg["name"]) / "names.jsonl", seg["count"]))
        segments = numbered(folder / "segments", SEGMENT_RE)
        self.segment = SegmentWriter(folder, next_name("s", segments), self.dim, store_dtype)
        self._staging: List[Path] = []
        self._seen: set = set()

    # -- streaming ---------------------------------------------------------------------------
    def check_names(self, names: Sequence[str]) -> None:
        """Refuse names already in the map, or given twice (before any work is done on them)."""
        names = [str(n) for n in names]
        clash = [n for n in names if n in self.existing or n in self._seen]
        if clash:
            raise MapError(f"image names in a map must be unique: {len(clash)} already in the map "
                           f"(e.g. {', '.join(clash[:3])})")
        if len(set(names)) != len(names):
            raise MapError("image names in a map must be unique: some are given twice")

    def append(self, names: Sequence[str], descriptors: np.ndarray, local: Optional[np.ndarray] = None) -> None:
        """Add a batch to the new segment (written to disk at once; nothing is kept in RAM)."""
        names = [str(n) for n in names]
        self.check_names(names)
        if self.previous is not None:
            has_local = any(s.get("local_shape") for s in self.previous["segments"])
            if has_local != (local is not None):
                raise MapError("local features must be given for the new images exactly when the map has them")
        with self._disk("writing the new segment"):
            self.segment.append(names, descriptors, local)
        self._seen.update(names)

    @contextmanager
    def _disk(self, what: str):
        """A full disk or a file-size limit becomes one line; the map stays as it was."""
        try:
            yield
        except OSError as exc:
            was = f"still {self.previous_version}" if self.previous_version else "no map was written"
            raise MapError(f"{self.folder}: {what} failed ({exc.strerror or exc}); the map is unchanged ({was})") from exc

    @property
    def count(self) -> int:
        return self.segment.count

    @property
    def names(self) -> List[str]:
        return self.segment.names

    # -- commit ------------------------------------------------------------------------------
    def commit(self, poses: Optional[np.ndarray] = None, metadata: Optional[dict] = None) -> str:
        """Index the new segment and make a new version current; returns its name."""
        try:
            if self.count == 0:
                raise MapError("no descriptors to put in the map")
            if self.previous is not None:
                has_poses = any("poses.npy" in s["files"] for s in self.previous["segments"])
                if has_poses != (poses is not None):
                    raise MapError("poses must be given for the new images exactly when the map has poses")
            if poses is not None and len(poses) != self.count:
                raise MapError(f"{len(poses)} poses for {self.count} images")
            with self._disk("writing the new segment"):
                seg = self.segment.finish(poses)
            segments = (self.previous["segments"] if self.previous else []) + [seg]
            with self._disk("writing the index"):
                index = self._index(segments)
            meta = {"format_version": FORMAT_VERSION, "created": time.time(),
                    "count": sum(s["count"] for s in segments), "dim": self.dim, "store_dtype": self.store_dtype,
                    "bundle": self.identity, "segments": segments, "index": index,
                    "metadata": dict(self.previous.get("metadata", {})) if self.previous else {}}
            if metadata:
                meta["metadata"].update(metadata)
            with self._disk("writing the version manifest"):
                version = write_version(self.folder, meta)
        except BaseException:
            self.abort()
            raise
        collect_garbage(self.folder, self.keep_versions)
        self.lock.release()
        return version

    def abort(self) -> None:
        """Forget the new segment; the map stays as it was."""
        self.segment.abort()
        if self.segment.final.exists():  # finished but never listed by a version
            shutil.rmtree(self.segment.final, ignore_errors=True)
        for p in self._staging:
            shutil.rmtree(p, ignore_errors=True)
        self.lock.release()

    def __enter__(self) -> "MapWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.lock.held:
            self.abort()

    # -- index -------------------------------------------------------------------------------
    def _rows(self, segments: List[dict]) -> Rows:
        return Rows([_segment_rows(self.folder, self.store_dtype, s, self.dim) for s in segments])

    def _index(self, segments: List[dict]) -> dict:
        total = sum(s["count"] for s in segments)
        prev = self.previous["index"] if self.previous else None
        if prev is None or needs_retrain(prev, total, self.dim):
            requested = self.index_type if prev is None else (prev["type"] if prev.get("pinned") else "auto")
            kind = choose_index(total, self.dim, self.memory_budget, requested)
            pinned = requested != "auto"
            retrain = True
        else:
            kind, pinned, retrain = prev["type"], bool(prev.get("pinned")), False
        if kind == "ivfpq" and total < IVFPQ_MIN:
            raise MapError(f"an IVF-PQ index needs at least {IVFPQ_MIN} images to train, the map has {total}; "
                           "use flat or hnsw")
        meta = {"type": kind, "pinned": pinned, "memory_budget": self.memory_budget,
                "bytes_estimate": index_bytes(kind, total, self.dim), "training": None, "files": {},
                "trained_on": total if retrain else prev.get("trained_on", total)}
        if kind in ("flat", "sqfp16"):
            return meta
        if retrain or kind == "hnsw":
            return {**meta, **self._new_training(kind, segments, prev if not retrain else None)}
        # the existing training encodes the new segment; earlier parts are shared
        where = training_dir(self.folder, prev["training"])
        trained = faiss.read_index(str(where / "trained.faiss"))
        seg = segments[-1]
        part_file = where / f"{seg['name']}.npz"
        self._write_part(part_file, trained, seg)
        return {**meta, "params": prev["params"], "training": prev["training"],
                "files": {**prev["files"], part_file.name: _entry(part_file)}}

    def _new_training(self, kind: str, segments: List[dict], prev: Optional[dict]) -> dict:
        trainings = numbered(self.folder / "index", TRAINING_RE)
        name = next_name("t", trainings)
        staging = training_dir(self.folder, f".{name}.partial-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        self._staging.append(staging)
        rows = self._rows(segments)
        if kind == "hnsw":
            if prev is not None:  # extend a copy of the graph with the new segment
                index = faiss.read_index(str(training_dir(self.folder, prev["training"]) / "hnsw.faiss"))
                chunks = (x for _, x in Rows([rows.parts[-1]]).chunks(CHUNK))
            else:
                index = new_hnsw(self.dim)
                chunks = (x for _, x in rows.chunks(CHUNK))
            for x in chunks:
                index.add(x)
            faiss.write_index(index, str(staging / "hnsw.faiss"))
            params = {}
        else:
            trained, params = train_ivfpq(rows, len(rows))
            faiss.write_index(trained, str(staging / "trained.faiss"))
            for seg in segments:
                self._write_part(staging / f"{seg['name']}.npz", trained, seg)
        files = {p.name: _entry(p) for p in sorted(staging.iterdir()) if not p.name.startswith(".")}
        os.replace(staging, training_dir(self.folder, name))
        self._staging.remove(staging)
        return {"training": name, "params": params, "files": files}

    def _write_part(self, path: Path, trained: faiss.Index, seg: dict) -> None:
        rows = _segment_rows(self.folder, self.store_dtype, seg, self.dim)
        part = ivfpq_part(trained, (np.asarray(rows[i:i + CHUNK], dtype=np.float32) for i in range(0, len(rows), CHUNK)))
        atomic_write(path, lambda f: np.savez(f, **part))


def write_version(folder: Path, meta: dict) -> str:
    """Write a new version manifest and make it current (the one atomic switch)."""
    version = next_name("v", numbered(versions_dir(folder), VERSION_RE))
    text = json.dumps(meta, indent=1)
    atomic_write(version_path(folder, version), lambda f: f.write(text.encode()))
    write_current(folder, version)
    return version


def _check_output(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise MapError(f"{folder}: exists and is not a folder; choose another --output")
    if folder.is_dir() and not is_map(folder) and any(folder.iterdir()):
        raise MapError(f"{folder}: exists and is not a map (not empty, no CURRENT); choose a new or empty folder "
                       "for --output, or an existing map to replace")
    if is_map(folder):
        current_version(folder)  # refuses maps of another format


def _writer_lock(folder: Path) -> WriterLock:
    lock = WriterLock(folder).acquire()
    try:
        collect_garbage(folder, None)
    except BaseException:
        lock.release()
        raise
    return lock


def open_build(folder: Union[str, Path], identity: dict, index_type: str = "auto",
               memory_budget: Optional[int] = None, store_dtype: str = "float32",
               keep_versions: int = 1) -> MapWriter:
    """A writer for a new map in ``folder`` (new, empty, or an existing map whose content it
    replaces with a new version; nothing outside the map's own files is touched)."""
    folder = Path(folder)
    if store_dtype not in STORE_DTYPES:
        raise MapError(f"store dtype {store_dtype!r}: expected one of {sorted(STORE_DTYPES)}")
    choose_index(1, 1, None, index_type)  # an unknown type fails before any work
    _check_output(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = _writer_lock(folder)
    try:
        return MapWriter(folder, identity, None, index_type, memory_budget, store_dtype, keep_versions, lock)
    except BaseException:
        lock.release()
        raise


def open_add(folder: Union[str, Path], identity: Optional[dict] = None, keep_versions: int = 1) -> MapWriter:
    """A writer that adds a segment to the current version of the map in ``folder``. With
    ``identity`` (the querying bundle's), a map from other weights or another model is refused."""
    folder = Path(folder)
    current_version(folder)
    lock = _writer_lock(folder)
    try:
        previous = read_manifest(version_path(folder, current_version(folder)))
        if identity is not None:
            check_compatible(previous["bundle"], identity, folder)
        return MapWriter(folder, previous["bundle"], previous, previous["index"]["type"],
                         previous["index"].get("memory_budget"), previous["store_dtype"], keep_versions, lock)
    except BaseException:
        lock.release()
        raise


def set_metadata(folder: Union[str, Path], entries: Dict[str, object]) -> str:
    """Store small entries with the map (e.g. a match threshold) in a new version; returns it."""
    folder = Path(folder)
    lock = _writer_lock(folder)
    try:
        meta = read_manifest(version_path(folder, current_version(folder)))
        meta["metadata"] = {**meta.get("metadata", {}), **entries}
        json.dumps(meta)  # entries must be JSON
        version = write_version(folder, meta)
        collect_garbage(folder, 1)
        return version
    finally:
        lock.release()


def collect_garbage(folder: Path, keep_versions: Optional[int]) -> None:
    """Delete versions nobody reads beyond the newest ``keep_versions`` up to the current one
    (None: keep every version manifest), then segments and index files no kept version lists,
    and what killed writers left. Call with the writer lock held."""
    current = current_version(folder) if is_map(folder) else None
    versions = numbered(versions_dir(folder), VERSION_RE)
    keep = set(versions) if keep_versions is None or current is None else \
        set([v for v in versions if v <= current][-keep_versions:])
    for v in versions:
        if v in keep:
            continue
        claim = try_claim(version_path(folder, v))
        if claim is None:
            keep.add(v)  # a reader holds it
            continue
        try:
            version_path(folder, v).unlink()
        finally:
            claim.close()
    segments, trainings = set(), {}
    for v in keep:
        try:
            meta = read_manifest(version_path(folder, v))
        except MapError:
            return  # an unreadable version: delete nothing it might list
        segments.update(s["name"] for s in meta["segments"])
        if meta["index"].get("training"):
            trainings.setdefault(meta["index"]["training"], set()).update(meta["index"].get("files", {}))
    for parent, pattern, used in ((folder / "segments", SEGMENT_RE, segments), (folder / "index", TRAINING_RE, trainings)):
        if not parent.is_dir():
            continue
        for p in parent.iterdir():
            if p.name.startswith(".") and ".partial-" in p.name:
                shutil.rmtree(p, ignore_errors=True)  # left by a killed writer (we hold the lock)
            elif pattern.fullmatch(p.name) and p.name not in used:
                shutil.rmtree(p, ignore_errors=True)
    for name, files in trainings.items():
        for p in training_dir(folder, name).glob("*"):
            if p.name not in files and (p.suffix in (".npz", ".faiss") or p.name.endswith(".tmp")):
                p.unlink()
    for p in versions_dir(folder).glob(".v*.tmp") if versions_dir(folder).is_dir() else []:
        p.unlink()


# -- whole-array conveniences (tests, benchmarks, small maps) -----------------------------------
def _batches(n: int) -> Iterable[slice]:
    return (slice(i, min(n, i + CHUNK)) for i in range(0, n, CHUNK))


def save_map(folder: Union[str, Path], descriptors: np.ndarray, names: Sequence[str], identity: dict,
             index_type: str = "auto", memory_budget: Optional[int] = None, poses: Optional[np.ndarray] = None,
             local: Optional[np.ndarray] = None, keep_versions: int = 1, store_dtype: str = "float32") -> PlaceMap:
    """Build a map from arrays in memory (``open_build`` streams)."""
    descriptors = np.asarray(descriptors)
    if descriptors.ndim != 2 or len(descriptors) != len(names):
        raise MapError(f"{len(names)} names for descriptors of shape {descriptors.shape}")
    if descriptors.shape[1] != identity["dim"]:
        raise MapError(f"descriptors are {descriptors.shape[1]}-D, the bundle's are {identity['dim']}-D")
    with open_build(folder, identity, index_type, memory_budget, store_dtype, keep_versions) as w:
        for s in _batches(len(names)):
            w.append(list(names[s]), descriptors[s], None if local is None else local[s])
        w.commit(poses)
    return load_map(folder)


def add_to_map(place_map: PlaceMap, descriptors: np.ndarray, names: Sequence[str],
               poses: Optional[np.ndarray] = None, local: Optional[np.ndarray] = None) -> PlaceMap:
    """Add images (arrays in memory) to a loaded map as a new segment; returns the new version."""
    with open_add(place_map.folder, place_map.meta["bundle"]) as w:
        for s in _batches(len(names)):
            w.append(list(names[s]), descriptors[s], None if local is None else local[s])
        w.commit(poses)
    return load_map(place_map.folder)


def read_pose_table(path: Union[str, Path]) -> Dict[str, List[float]]:
    """Poses/GPS per image from CSV (``name,x,y[,...]`` with a header) or JSON ({name: [x, y, ...]})."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".json":
            return {str(k): [float(v) for v in vals] for k, vals in json.loads(path.read_text()).items()}
        table = {}
        for ln in [ln for ln in path.read_text().splitlines() if ln.strip()][1:]:
            cells = [c.strip() for c in ln.split(",")]
            table[cells[0]] = [float(c) for c in cells[1:]]
        return table
    except (ValueError, OSError, AttributeError, TypeError) as exc:
        raise MapError(f"{path}: unreadable poses file ({exc}); expected CSV 'name,x,y,...' or JSON {{name: [x, y]}}") from exc


def poses_for(table: Dict[str, List[float]], names: Sequence[str], path: Union[str, Path]) -> np.ndarray:
    missing = [n for n in names if n not in table]
    if missing:
        raise MapError(f"{path}: no pose for {len(missing)} images (e.g. {', '.join(missing[:3])})")
    widths = {len(table[n]) for n in names}
    if len(widths) != 1:
        raise MapError(f"{path}: poses have different lengths {sorted(widths)}")
    return np.asarray([table[n] for n in names], dtype=np.float64)


def read_poses(path: Union[str, Path], names: Sequence[str]) -> np.ndarray:
    return poses_for(read_pose_table(path), names, path)

