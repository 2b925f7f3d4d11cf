"""Evaluation datasets with ground truth, in three formats:

* ours (``data/``): ``database/``, ``queries/``, ``ground_truth.json`` with ``positives``
  {query name: [database names]};
* gmberton's VPR-datasets-downloader: ``database/`` and ``queries/`` (also under ``images/test/``)
  with UTM coordinates in the file names (``@utm_east@utm_north@...``), positives within 25 m;
* VPR-Bench: ``ref/`` (or ``database/``) and ``query/`` (or ``queries/``) with
  ``ground_truth_new.npy`` rows ``[query index, [database indices]]``. That file is a pickled
  object array: it is read with an unpickler that only rebuilds numpy arrays, lists and numbers.
"""
from __future__ import annotations

import io
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Set, Union

import numpy as np

from .errors import UserError
from .preprocess import list_images

GMBERTON_RADIUS_M = 25.0


class DatasetError(UserError, ValueError):
    pass


@dataclass
class Dataset:
    root: Path
    format: str
    database: List[Path]
    queries: List[Path]
    positives: List[Set[int]]  # per query, indices into ``database``

    def __post_init__(self) -> None:
        if len(self.positives) != len(self.queries):
            raise DatasetError(f"{self.root}: {len(self.queries)} queries but {len(self.positives)} ground-truth rows")


def _first_dir(root: Path, names: Sequence[str]) -> Optional[Path]:
    for n in names:
        if (root / n).is_dir():
            return root / n
    return None


def _load_ours(root: Path) -> Dataset:
    gt = json.loads((root / "ground_truth.json").read_text())
    db_dir, q_dir = root / "database", root / "queries"
    db_names = gt.get("database") or [p.name for p in list_images(db_dir)]
    q_names = gt.get("queries") or [p.name for p in list_images(q_dir)]
    index = {n: i for i, n in enumerate(db_names)}
    try:
        positives = [{index[p] for p in gt["positives"].get(q, [])} for q in q_names]
    except KeyError as exc:
        raise DatasetError(f"{root / 'ground_truth.json'}: positive {exc} is not a database image") from exc
    return Dataset(root, "ours", [db_dir / n for n in db_names], [q_dir / n for n in q_names], positives)


def utm_from_name(name: str) -> np.ndarray:
    parts = Path(name).name.split("@")
    try:
        return np.array([float(parts[1]), float(parts[2])])
    except (IndexError, ValueError):
        raise DatasetError(f"{name}: not a gmberton file name (@utm_east@utm_north@...)") from None


def _load_gmberton(root: Path) -> Dataset:
    base = root / "images" / "test" if (root / "images" / "test").is_dir() else root
    db, q = list_images(base / "database"), list_images(base / "queries")
    db_xy = np.stack([utm_from_name(p.name) for p in db])
    positives = []
    for p in q:
        d = np.linalg.norm(db_xy - utm_from_name(p.name), axis=1)
        positives.append(set(np.flatnonzero(d <= GMBERTON_RADIUS_M).tolist()))
    return Dataset(root, "gmberton", db, q, positives)


class _SafeUnpickler(pickle.Unpickler):
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("builtins", "list"), ("builtins", "int")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def read_vprbench_ground_truth(path: Path) -> List[List[int]]:
    """``ground_truth_new.npy`` without ``allow_pickle``: only arrays, lists and ints are rebuilt."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise DatasetError(f"{path}: unsupported .npy version {version}")
        shape, _, dtype = read_header(f)
        if dtype.hasobject:
            arr = _SafeUnpickler(io.BytesIO(f.read())).load()
        else:
            arr = np.fromfile(f, dtype=dtype).reshape(shape)
    rows = [[int(r[0]), [int(v) for v in np.atleast_1d(r[1])]] for r in arr]
    return rows


def _load_vprbench(root: Path) -> Dataset:
    db_dir = _first_dir(root, ("ref", "database"))
    q_dir = _first_dir(root, ("query", "queries"))
    if db_dir is None or q_dir is None:
        raise DatasetError(f"{root}: VPR-Bench layout needs ref/ (or database/) and query/ (or queries/)")
    db, q = list_images(db_dir), list_images(q_dir)
    positives: List[Set[int]] = [set() for _ in q]
    for qi, refs in read_vprbench_ground_truth(root / "ground_truth_new.npy"):
        if not 0 <= qi < len(q):
            raise DatasetError(f"{root / 'ground_truth_new.npy'}: query index {qi} out of range")
        positives[qi] = set(refs)
    return Dataset(root, "vprbench", db, q, positives)


def load_dataset(root: Union[str, Path], fmt: str = "auto") -> Dataset:
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such dataset directory")
    if fmt == "auto":
        if (root / "ground_truth.json").is_file():
            fmt = "ours"
        elif (root / "ground_truth_new.npy").is_file():
            fmt = "vprbench"
        else:
            fmt = "gmberton"
    loader = {"ours": _load_ours, "gmberton": _load_gmberton, "vprbench": _load_vprbench}.get(fmt)
    if loader is None:
        raise DatasetError(f"unknown dataset format {fmt!r}; expected ours, gmberton or vprbench")
    return loader(root)
