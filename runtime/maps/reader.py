"""Loading a map: lease the current version, check its files, open the stores, assemble
the index. Loading never waits for a writer and never sees half a version.

What loading checks (``verify``): ``quick`` (the default) checks the size of every file and the
sha256 of every file up to 256 MB (names, poses, index training and parts); the large files (the
descriptor and local-feature stores, an HNSW graph: 17 GB for 1M places at 8448-D) are checked by
size only, so a 1M-place map loads in seconds. ``full`` hashes everything, as
``python -m runtime map verify`` does; ``none`` checks sizes only.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import faiss
import numpy as np

from ..files import check_listed_file
from .index import fill_ivfpq, filled_flat, read_trained, set_search_params
from .layout import MapError, read_manifest, segment_dir, store_file, training_dir, version_path
from .lock import Lease, take_lease
from .search import ShortlistSearch
from .store import Rows

QUICK_HASH_MAX = 256 << 20
VERIFY_LEVELS = ("none", "quick", "full")


@dataclass
class PlaceMap:
    """A loaded map. ``search`` returns inner-product scores and place indices, best first."""

    folder: Path
    meta: dict
    version: str
    descriptors: Rows  # the segment stores (rows read on demand)
    names: List[str]
    index: faiss.Index
    poses: Optional[np.ndarray] = None
    local: Optional[Rows] = None  # (N, h, w, c) float16, read on demand
    lease: Optional[Lease] = field(default=None, repr=False)
    shortlist: Optional[ShortlistSearch] = field(default=None, repr=False)  # ivfpq: index + exact re-rank

    @property
    def kind(self) -> str:
        return self.meta["index"]["type"]

    @property
    def metadata(self) -> Dict[str, object]:
        """Entries stored with the map by other tools (e.g. a match threshold)."""
        return self.meta.get("metadata", {})

    def __len__(self) -> int:
        return len(self.names)

    def close(self) -> None:
        """Release this reader's lease on its version (also released when the process ends)."""
        if self.lease is not None:
            self.lease.close()
            self.lease = None

    def tune(self, nprobe: Optional[int] = None, shortlist: Optional[int] = None) -> None:
        """Search depth of a PCA + IVF-PQ map, for this reader only: inverted lists probed per
        query (the map's default: 16, or 32 for maps trained before whitening) and rows re-ranked
        exactly (default 100). Deeper costs CPU time and buys recall (BENCHMARKS.md §5)."""
        if self.kind != "ivfpq":
            raise MapError(f"{self.folder}: a {self.kind} map has no nprobe or shortlist to tune")
        for name, value in (("nprobe", nprobe), ("shortlist", shortlist)):
            if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
                raise MapError(f"{name} must be a positive integer, got {value!r}")
        params = self.meta["index"]["params"] = dict(self.meta["index"]["params"])
        if nprobe is not None:
            params["nprobe"] = int(nprobe)
        if shortlist is not None:
            params["shortlist"] = int(shortlist)
        set_search_params(self.index, params)

    def search(self, queries: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, len(self))
        if self.kind != "ivfpq":
            return self.index.search(q, k)
        # PQ distances are coarse: re-rank a shortlist exactly from the stored descriptors
        depth = min(len(self), max(int(self.meta["index"]["params"]["shortlist"]), k))
        return self.shortlist.search(q, k, depth)


def _check_file(path: Path, entry: dict, verify: str, what: str) -> None:
    fix = (f"restore it, or rebuild the map (python -m runtime map build); python -m runtime map verify "
           f"--map {path.parents[2]} checks every segment")
    check_listed_file(path, entry, what, fix, MapError,
                      hash=verify == "full" or (verify == "quick" and entry["size"] <= QUICK_HASH_MAX))


def segment_files(folder: Path, meta: dict):
    """(path, manifest entry, description) of every file a version lists."""
    for seg in meta["segments"]:
        for name, entry in seg["files"].items():
            yield segment_dir(folder, seg["name"]) / name, entry, f"segment {seg['name']}"
    index = meta["index"]
    for name, entry in index.get("files", {}).items():
        yield training_dir(folder, index["training"]) / name, entry, f"index training {index['training']}"


def read_names(path: Path, count: int) -> List[str]:
    try:
        names = json.loads("[" + ",".join(path.read_text().splitlines()) + "]")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MapError(f"{path}: unreadable names ({exc}); rebuild the map") from exc
    if len(names) != count or not all(isinstance(n, str) for n in names):
        raise MapError(f"{path}: {len(names)} names, the map says {count}; rebuild the map")
    return names


def load_map(folder: Union[str, Path], verify: str = "quick") -> PlaceMap:
    """The current version of the map in ``folder``, with a reader's lease on it."""
    if verify not in VERIFY_LEVELS:
        raise ValueError(f"verify must be one of {VERIFY_LEVELS}")
    folder = Path(folder)
    lease = take_lease(folder)
    try:
        return _load(folder, lease, verify)
    except BaseException:
        lease.close()
        raise


def _load(folder: Path, lease: Lease, verify: str) -> PlaceMap:
    meta = read_manifest(version_path(folder, lease.version))
    for path, entry, what in segment_files(folder, meta):
        _check_file(path, entry, verify, what)
    dtype, d = meta["store_dtype"], meta["dim"]
    segments = meta["segments"]
    counts = [seg["count"] for seg in segments]
    names, poses = [], []
    try:
        for seg in segments:
            where = segment_dir(folder, seg["name"])
            names.extend(read_names(where / "names.jsonl", seg["count"]))
            if "poses.npy" in seg["files"]:
                poses.append(np.load(where / "poses.npy", allow_pickle=False))
        with_local = [seg for seg in segments if seg.get("local_shape")]
        for extra in (poses, with_local):
            if extra and len(extra) != len(segments):
                raise MapError(f"{version_path(folder, lease.version)}: some segments have poses or local "
                               "features and others not; rebuild the map")
        if len({tuple(seg["local_shape"]) for seg in with_local}) > 1:
            raise MapError(f"{version_path(folder, lease.version)}: segments with local features of different "
                           "shapes; rebuild the map")
        descriptors = Rows([segment_dir(folder, seg["name"]) / store_file(dtype) for seg in segments], counts,
                           dtype, (d,))
        local = Rows([segment_dir(folder, seg["name"]) / "local.f16" for seg in segments], counts, "float16",
                     with_local[0]["local_shape"]) if with_local else None
        index = _assemble(folder, meta, descriptors)
        shortlist = ShortlistSearch(index, descriptors.files, d, dtype) if meta["index"]["type"] == "ivfpq" else None
    except (OSError, ValueError, RuntimeError) as exc:  # faiss raises RuntimeError on a bad index
        if isinstance(exc, MapError):
            raise
        raise MapError(f"{folder} ({lease.version}): unreadable map file ({exc}); rebuild the map") from exc
    if index.ntotal != len(names):
        raise MapError(f"{folder} ({lease.version}): {len(names)} names, {index.ntotal} indexed; rebuild the map")
    return PlaceMap(folder, meta, lease.version, descriptors, names, index,
                    np.concatenate(poses) if poses else None, local, lease, shortlist)


def _assemble(folder: Path, meta: dict, descriptors: Rows) -> faiss.Index:
    idx = meta["index"]
    kind = idx["type"]
    if kind in ("flat", "sqfp16"):
        return filled_flat(kind, meta["dim"], (x for _, x in descriptors.chunks()))
    where = training_dir(folder, idx["training"])
    if kind == "hnsw":
        index = faiss.read_index(str(where / "hnsw.faiss"))
        index.hnsw.efSearch = 64
        return index
    trained = read_trained(where / "trained.faiss")
    offsets = descriptors.offsets

    def parts():
        for s, seg in enumerate(meta["segments"]):
            with np.load(where / f"{seg['name']}.npz", allow_pickle=False) as z:
                yield int(offsets[s]), {"lists": z["lists"], "codes": z["codes"]}
    return fill_ivfpq(trained, parts(), idx["params"])


def verify_map(folder: Union[str, Path]) -> Tuple[str, List[str], int]:
    """Hash every file of the current version: (version, problems, bytes hashed)."""
    folder = Path(folder)
    lease = take_lease(folder)
    try:
        meta = read_manifest(version_path(folder, lease.version))
        problems, hashed = [], 0
        for path, entry, what in segment_files(folder, meta):
            try:
                _check_file(path, entry, "full", what)
                hashed += entry["size"]
            except MapError as exc:
                problems.append(str(exc))
        return lease.version, problems, hashed
    finally:
        lease.close()


def map_info(place_map: PlaceMap) -> Dict[str, object]:
    m = place_map.meta
    store = sum(s["files"][store_file(m["store_dtype"])]["size"] for s in m["segments"])
    return {"folder": str(place_map.folder), "version": place_map.version, "count": len(place_map),
            "dim": m["dim"], "index": m["index"]["type"], "index_bytes_estimate": m["index"]["bytes_estimate"],
            "segments": len(m["segments"]), "store_dtype": m["store_dtype"], "store_bytes": store,
            "model": m["bundle"]["model"], "precision": m["bundle"]["precision"], "weights": m["bundle"].get("weights"),
            "poses": place_map.poses is not None, "local_features": place_map.local is not None,
            "metadata": place_map.metadata}
