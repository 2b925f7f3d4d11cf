"""Place maps: descriptors of known places in a FAISS index, with their metadata.

Layout of a map folder::

    MAP_DIR/CURRENT          name of the live version folder (replaced atomically)
    MAP_DIR/v000002/map.json format version, bundle identity, index choice, sha256 of every file
                   descriptors.npy  (N, D) float32, always kept: exact re-ranking, incremental add
                   names.json, poses.npy (optional), local.npy (SelaVPR, float16, memory-mapped)
                   index.faiss

A save writes a new version folder completely (each file through a temporary file, fsync,
rename), then replaces ``CURRENT``: a reader, or a save killed at any moment, sees either the
old map or the new one, never a mix. Loading verifies every file's size and sha256.

Index choice (``auto``) from the map's size and the memory budget: Flat inner product while it
fits and the map is small enough for brute force (100k); otherwise PCA (randomized SVD) + IVF-PQ
whose shortlist is re-ranked exactly from the memory-mapped descriptors; SQfp16 for a small map
over budget. Measured on clustered data (BENCHMARKS.md §5): IVF-PQ + exact re-rank keeps recall@1
0.975-1.0 against exact search at 8 ms per query and 14 MB for 100k x 8448, where HNSW (M 32,
efSearch 64) fell to 0.59-0.70 at 100k and SQfp16 to 0.81-0.97 among near-duplicate views;
shared/research/env-probe.md §5 found IVF-PQ alone at recall 0.14 at 8448-D. HNSW and SQfp16
stay available with ``--index``.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import faiss
import numpy as np

from .errors import UserError
from .files import atomic_write, sha256_file

FORMAT_VERSION = 1
INDEX_TYPES = ("flat", "sqfp16", "hnsw", "ivfpq")
FLAT_MAX = 100_000  # above this, brute force costs > 0.2 s per 8448-D query on 2 cores (BENCHMARKS.md §5)
IVFPQ_MIN = 1000  # IVF-PQ needs this many vectors to train
HNSW_M = 32


class MapError(UserError, ValueError):
    """A map that cannot be used; the message names the file and what to do."""


def bundle_identity(bundle) -> dict:
    """What a map must share with the bundle that queries it."""
    m = bundle.manifest
    desc = m.get("split", {}).get("descriptor_dim") or m["outputs"]["descriptor"]["shape"][-1]
    return {"model": m["model"]["name"], "dim": int(desc), "preprocessing": m["preprocessing"],
            "batch_mode": m["model"].get("batch_mode", "independent"),
            "precision": m["precision"], "onnx_sha256": m["files"]["onnx"]["sha256"]}


def check_compatible(map_identity: dict, bundle_id: dict, where: Path) -> None:
    for key in ("model", "dim", "preprocessing", "batch_mode"):
        if map_identity.get(key) != bundle_id.get(key):
            raise MapError(f"{where}: map built with another bundle ({key}: map {map_identity.get(key)!r}, "
                           f"bundle {bundle_id.get(key)!r}); rebuild the map with this bundle "
                           "(python -m runtime map build --bundle ...)")


def index_bytes(kind: str, n: int, d: int) -> int:
    """Approximate resident memory of an index over n vectors of dimension d."""
    if kind == "flat":
        return n * d * 4
    if kind == "sqfp16":
        return n * d * 2
    if kind == "hnsw":
        return n * d * 4 + n * HNSW_M * 2 * 4
    pq_dim = min(d, 256)
    return n * (pq_dim // 8 + 8) + pq_dim * d * 4  # PQ codes + ids + PCA matrix


def choose_index(n: int, d: int, budget: Optional[int], requested: str = "auto") -> str:
    if requested != "auto":
        if requested not in INDEX_TYPES:
            raise MapError(f"unknown index type {requested!r}; expected auto or one of {INDEX_TYPES}")
        return requested
    budget = budget if budget is not None else 1 << 62
    if index_bytes("flat", n, d) <= budget and n <= FLAT_MAX:
        return "flat"
    if n >= IVFPQ_MIN:
        return "ivfpq"
    return "sqfp16" if index_bytes("sqfp16", n, d) <= budget else "flat"


def _pca_transform(x: np.ndarray, k: int) -> faiss.LinearTransform:
    """PCA to ``k`` dimensions by a randomized SVD (Halko et al. 2011: range finder with two power
    iterations): seconds at 8448-D, where faiss's PCAMatrix eigen-decomposes the full d x d
    covariance on one thread (many minutes)."""
    n, d = x.shape
    if k >= d:
        a, b = np.eye(d, dtype=np.float32), np.zeros(d, dtype=np.float32)
    else:
        mean = x.mean(axis=0)
        xc = x - mean
        rng = np.random.default_rng(0)
        y = xc @ rng.standard_normal((d, min(d, k + 16))).astype(np.float32)
        for _ in range(2):
            y, _ = np.linalg.qr(y)
            y = xc @ (xc.T @ y)
        q, _ = np.linalg.qr(y)
        _, _, vt = np.linalg.svd(q.T @ xc, full_matrices=False)
        a = np.ascontiguousarray(vt[:k], dtype=np.float32)
        b = (-a @ mean).astype(np.float32)
    lt = faiss.LinearTransform(d, a.shape[0], True)
    faiss.copy_array_to_vector(a.ravel(), lt.A)
    faiss.copy_array_to_vector(b, lt.b)
    lt.is_trained = True
    return lt


def _build_index(kind: str, x: np.ndarray) -> faiss.Index:
    n, d = x.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "sqfp16":
        index = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 40
        index.hnsw.efSearch = 64
    else:
        pq_dim = min(d, 256)
        nlist = int(min(max(8, 4 * math.sqrt(n)), max(8, n // 39)))
        sample = np.ascontiguousarray(x[np.sort(np.random.default_rng(0).choice(n, min(n, 50_000), replace=False))])
        ivf = faiss.IndexIVFPQ(faiss.IndexFlatIP(pq_dim), pq_dim, nlist, pq_dim // 8, 8, faiss.METRIC_INNER_PRODUCT)
        index = faiss.IndexPreTransform(_pca_transform(sample, pq_dim), ivf)
        index.train(sample)  # a seeded sample: training cost stays bounded
        faiss.extract_index_ivf(index).nprobe = min(16, nlist)
    if not index.is_trained:
        index.train(x)
    index.add(x)
    return index


def check_finite(x: np.ndarray, names: Sequence[str]) -> None:
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        shown = ", ".join(str(names[i]) for i in np.flatnonzero(bad)[:5])
        raise MapError(f"{int(bad.sum())} descriptors contain NaN or Inf ({shown}); they were not added")


def read_poses(path: Union[str, Path], names: Sequence[str]) -> np.ndarray:
    """Poses/GPS per image from CSV (``name,x,y[,...]`` with a header) or JSON ({name: [x, y, ...]})."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".json":
            table = {str(k): [float(v) for v in vals] for k, vals in json.loads(path.read_text()).items()}
        else:
            lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
            table = {}
            for ln in lines[1:]:
                cells = [c.strip() for c in ln.split(",")]
                table[cells[0]] = [float(c) for c in cells[1:]]
    except (ValueError, OSError, AttributeError) as exc:
        raise MapError(f"{path}: unreadable poses file ({exc}); expected CSV 'name,x,y,...' or JSON {{name: [x, y]}}") from exc
    missing = [n for n in names if n not in table]
    if missing:
        raise MapError(f"{path}: no pose for {len(missing)} images (e.g. {', '.join(missing[:3])})")
    widths = {len(table[n]) for n in names}
    if len(widths) != 1:
        raise MapError(f"{path}: poses have different lengths {sorted(widths)}")
    return np.asarray([table[n] for n in names], dtype=np.float64)


@dataclass
class PlaceMap:
    """A loaded map. ``search`` returns inner-product scores and database indices."""

    folder: Path
    meta: dict
    descriptors: np.ndarray  # memory-mapped
    names: List[str]
    index: faiss.Index
    poses: Optional[np.ndarray] = None
    local: Optional[np.ndarray] = None  # memory-mapped (N, h, w, c) float16
    shortlist_factor: int = 16

    @property
    def kind(self) -> str:
        return self.meta["index"]["type"]

    def __len__(self) -> int:
        return len(self.names)

    def search(self, queries: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, len(self))
        if self.kind != "ivfpq":
            scores, ids = self.index.search(q, k)
            return scores, ids
        # PQ scores are coarse: re-rank a shortlist exactly from the stored descriptors
        _, cand = self.index.search(q, min(len(self), k * self.shortlist_factor))
        scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        ids = np.full((len(q), k), -1, dtype=np.int64)
        for i, row in enumerate(cand):
            row = row[row >= 0]
            exact = np.asarray(self.descriptors[np.sort(row)]) @ q[i]
            order = np.argsort(-exact, kind="stable")[:k]
            ids[i, :len(order)] = np.sort(row)[order]
            scores[i, :len(order)] = exact[order]
        return scores, ids


def _version_dirs(folder: Path) -> List[Path]:
    return sorted(p for p in folder.glob("v[0-9]*") if p.is_dir())


def _meta_problem(meta: dict) -> Optional[str]:
    files = meta.get("files")
    if not isinstance(files, dict) or not {"descriptors.npy", "names.json", "index.faiss"} <= set(files):
        return "the file list must name descriptors.npy, names.json and index.faiss"
    for name, e in files.items():
        if Path(name).name != name or not (isinstance(e, dict) and isinstance(e.get("size"), int)
                                            and isinstance(e.get("sha256"), str)):
            return f"bad file entry {name!r}"
    if not isinstance(meta.get("bundle"), dict) or not isinstance(meta.get("index"), dict) \
            or not isinstance(meta["index"].get("type"), str):
        return "bundle identity or index description missing"
    return None


def load_map(folder: Union[str, Path], verify: bool = True) -> PlaceMap:
    folder = Path(folder)
    current = folder / "CURRENT"
    if not current.is_file():
        raise MapError(f"{folder}: not a map (no CURRENT file); build one with python -m runtime map build")
    version = folder / current.read_text().strip()
    meta_path = version / "map.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MapError(f"{meta_path}: unreadable map metadata ({exc}); rebuild the map") from exc
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        got = meta.get("format_version") if isinstance(meta, dict) else None
        raise MapError(f"{meta_path}: map format {got!r}, this runtime reads {FORMAT_VERSION}; rebuild the map")
    problem = _meta_problem(meta)
    if problem:
        raise MapError(f"{meta_path}: malformed map metadata ({problem}); rebuild the map")
    if verify:
        for name, entry in meta["files"].items():
            f = version / name
            if not f.is_file() or f.stat().st_size != entry["size"] or sha256_file(f) != entry["sha256"]:
                raise MapError(f"{f}: missing, truncated or corrupted (checksum mismatch); rebuild the map")
    try:
        descriptors = np.load(version / "descriptors.npy", mmap_mode="r", allow_pickle=False)
        names = json.loads((version / "names.json").read_text())
        index = faiss.read_index(str(version / "index.faiss"))
        poses = np.load(version / "poses.npy", allow_pickle=False) if (version / "poses.npy").exists() else None
        local = np.load(version / "local.npy", mmap_mode="r", allow_pickle=False) if (version / "local.npy").exists() else None
    except (OSError, ValueError, RuntimeError) as exc:  # faiss raises RuntimeError on a bad index
        raise MapError(f"{version}: unreadable map file ({exc}); rebuild the map") from exc
    if len(names) != descriptors.shape[0] or index.ntotal != len(names):
        raise MapError(f"{version}: {len(names)} names, {descriptors.shape[0]} descriptors, {index.ntotal} indexed; rebuild the map")
    return PlaceMap(folder, meta, descriptors, names, index, poses, local)


def save_map(folder: Union[str, Path], descriptors: np.ndarray, names: Sequence[str], identity: dict,
             index_type: str = "auto", memory_budget: Optional[int] = None, poses: Optional[np.ndarray] = None,
             local: Optional[np.ndarray] = None, keep_versions: int = 1) -> PlaceMap:
    """Write a complete new version of the map in ``folder`` and make it current."""
    folder = Path(folder)
    descriptors = np.ascontiguousarray(descriptors, dtype=np.float32)
    names = [str(n) for n in names]
    if descriptors.ndim != 2 or len(descriptors) != len(names):
        raise MapError(f"{len(names)} names for descriptors of shape {descriptors.shape}")
    if len(names) == 0:
        raise MapError("no descriptors to put in the map")
    if len(set(names)) != len(names):
        raise MapError("image names in a map must be unique")
    if descriptors.shape[1] != identity["dim"]:
        raise MapError(f"descriptors are {descriptors.shape[1]}-D, the bundle's are {identity['dim']}-D")
    check_finite(descriptors, names)
    kind = choose_index(len(names), descriptors.shape[1], memory_budget, index_type)
    if kind == "ivfpq" and len(names) < IVFPQ_MIN:
        raise MapError(f"an IVF-PQ index needs at least {IVFPQ_MIN} images to train, the map has {len(names)}; "
                       "use flat or hnsw")
    index = _build_index(kind, descriptors)

    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".v*.partial-*"):  # left by a save that was killed (one writer at a time)
        shutil.rmtree(stale, ignore_errors=True)
    versions = _version_dirs(folder)
    number = int(versions[-1].name[1:]) + 1 if versions else 1
    version = folder / f"v{number:06d}"
    staging = folder / f".{version.name}.partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        atomic_write(staging / "descriptors.npy", lambda f: np.save(f, descriptors))
        atomic_write(staging / "names.json", lambda f: f.write(json.dumps(names).encode()))
        atomic_write(staging / "index.faiss", lambda f: f.write(faiss.serialize_index(index).tobytes()))
        if poses is not None:
            atomic_write(staging / "poses.npy", lambda f: np.save(f, np.asarray(poses, dtype=np.float64)))
        if local is not None:
            atomic_write(staging / "local.npy", lambda f: np.save(f, np.asarray(local, dtype=np.float16)))
        files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(staging.iterdir())}
        meta = {"format_version": FORMAT_VERSION, "count": len(names), "dim": int(descriptors.shape[1]),
                "bundle": identity, "index": {"type": kind, "pinned": index_type != "auto", "memory_budget": memory_budget,
                                              "bytes_estimate": index_bytes(kind, len(names), descriptors.shape[1])},
                "files": files}
        atomic_write(staging / "map.json", lambda f: f.write(json.dumps(meta, indent=2).encode()))
        os.replace(staging, version)
        atomic_write(folder / "CURRENT", lambda f: f.write(f"{version.name}\n".encode()))
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    for old in _version_dirs(folder)[:-keep_versions] if keep_versions > 0 else []:
        if old != version:
            shutil.rmtree(old, ignore_errors=True)
    return load_map(folder, verify=False)


def add_to_map(place_map: PlaceMap, descriptors: np.ndarray, names: Sequence[str],
               poses: Optional[np.ndarray] = None, local: Optional[np.ndarray] = None) -> PlaceMap:
    """A new version with more images (the index is rebuilt with the same choice rule)."""
    names = list(names)
    clash = sorted(set(names) & set(place_map.names))
    if clash:
        raise MapError(f"{len(clash)} images are already in the map (e.g. {', '.join(clash[:3])})")
    if (place_map.poses is None) != (poses is None):
        raise MapError("poses must be given for the new images exactly when the map has poses")
    if (place_map.local is None) != (local is None):
        raise MapError("local features must be given exactly when the map has them")
    check_finite(np.asarray(descriptors, dtype=np.float32), names)
    meta = place_map.meta
    requested = meta["index"]["type"] if meta["index"].get("pinned") else "auto"
    return save_map(place_map.folder, np.concatenate([np.asarray(place_map.descriptors), descriptors]),
                    place_map.names + names, meta["bundle"], requested, meta["index"]["memory_budget"],
                    None if poses is None else np.concatenate([place_map.poses, poses]),
                    None if local is None else np.concatenate([np.asarray(place_map.local), local]))


def map_info(place_map: PlaceMap) -> Dict[str, object]:
    m = place_map.meta
    return {"folder": str(place_map.folder), "version": (place_map.folder / "CURRENT").read_text().strip(),
            "count": m["count"], "dim": m["dim"], "index": m["index"]["type"],
            "index_bytes_estimate": m["index"]["bytes_estimate"], "model": m["bundle"]["model"],
            "precision": m["bundle"]["precision"], "poses": place_map.poses is not None,
            "local_features": place_map.local is not None}
