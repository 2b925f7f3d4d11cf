"""The on-disk layout of a map folder and its version manifests.

::

    MAP/CURRENT                  name of the live version ("v000003"), replaced atomically
    MAP/LOCK                     the writer's lock (fcntl.flock) and its PID
    MAP/versions/v000003.json    a version: bundle identity, store dtype, the segments it lists
                                 (each file with size and sha256), the index and its files
    MAP/segments/s000001/        descriptors.<f16|f32> (raw rows, shape in the manifest),
                                 names.jsonl, poses.npy (optional), local.f16 (SelaVPR, optional)
    MAP/index/t000001/           one training of the index: trained.faiss (PCA + coarse
                                 quantizer + PQ codebooks) and one part per segment (s000001.npz:
                                 its inverted-list numbers and PQ codes); hnsw: hnsw.faiss

Segments and index trainings are shared by the versions that list them: adding images writes a
new segment and a new small version manifest, never a copy of the map. Names of folders being
written start with a dot; whatever a killed writer left is removed by the next writer.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

from ..errors import UserError
from ..files import atomic_write

FORMAT_VERSION = 2
VERSION_RE = re.compile(r"v(\d{6})")
SEGMENT_RE = re.compile(r"s(\d{6})")
TRAINING_RE = re.compile(r"t(\d{6})")
STORE_DTYPES = {"float16": "f16", "float32": "f32"}


class MapError(UserError, ValueError):
    """A map that cannot be used or written; the message names the file and what to do."""


def versions_dir(folder: Path) -> Path:
    return folder / "versions"


def version_path(folder: Path, version: str) -> Path:
    return versions_dir(folder) / f"{version}.json"


def segment_dir(folder: Path, segment: str) -> Path:
    return folder / "segments" / segment


def training_dir(folder: Path, training: str) -> Path:
    return folder / "index" / training


def store_file(dtype: str, what: str = "descriptors") -> str:
    return f"{what}.{STORE_DTYPES[dtype]}"


def numbered(folder: Path, pattern: re.Pattern) -> list:
    """Names in ``folder`` matching ``pattern`` (v/s/t + 6 digits), sorted."""
    if not folder.is_dir():
        return []
    return sorted(p.stem if p.suffix == ".json" else p.name for p in folder.iterdir()
                  if pattern.fullmatch(p.stem if p.suffix == ".json" else p.name))


def next_name(prefix: str, existing: list) -> str:
    last = max((int(n[1:]) for n in existing), default=0)
    return f"{prefix}{last + 1:06d}"


def is_map(folder: Path) -> bool:
    return (folder / "CURRENT").is_file()


def current_version(folder: Path) -> str:
    current = folder / "CURRENT"
    if not current.is_file():
        raise MapError(f"{folder}: not a map (no CURRENT file); build one with python -m runtime map build")
    name = current.read_text(errors="replace").strip()
    if (folder / name / "map.json").is_file():
        raise MapError(f"{folder}: a map of format 1 (one folder per version); this runtime reads format "
                       f"{FORMAT_VERSION}: rebuild it with python -m runtime map build --output NEW_FOLDER")
    if not VERSION_RE.fullmatch(name):
        raise MapError(f"{current}: names {name!r}, not a version (v + 6 digits); rebuild the map")
    return name


def write_current(folder: Path, version: str) -> None:
    atomic_write(folder / "CURRENT", lambda f: f.write(f"{version}\n".encode()))


def read_manifest(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise MapError(f"{path}: missing (the version CURRENT names is gone); rebuild the map") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MapError(f"{path}: unreadable map metadata ({exc}); rebuild the map") from exc
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        got = meta.get("format_version") if isinstance(meta, dict) else None
        raise MapError(f"{path}: map format {got!r}, this runtime reads {FORMAT_VERSION}; rebuild the map")
    problem = manifest_problem(meta)
    if problem:
        raise MapError(f"{path}: malformed map metadata ({problem}); rebuild the map")
    return meta


def _file_entries_ok(files) -> Optional[str]:
    if not isinstance(files, dict):
        return "a file list is not an object"
    for name, e in files.items():
        if Path(name).name != name or name in ("", ".", "..") or not (
                isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)):
            return f"bad file entry {name!r}"
    return None


def manifest_problem(meta: dict) -> Optional[str]:
    """What is wrong with a version manifest's structure, or None."""
    if not isinstance(meta.get("bundle"), dict) or not isinstance(meta.get("dim"), int) or meta["dim"] < 1:
        return "bundle identity or dimension missing"
    if meta.get("store_dtype") not in STORE_DTYPES:
        return f"store dtype {meta.get('store_dtype')!r} is not one of {sorted(STORE_DTYPES)}"
    segments = meta.get("segments")
    if not isinstance(segments, list) or not segments:
        return "no segment list"
    for s in segments:
        if not isinstance(s, dict) or not isinstance(s.get("name"), str) or not SEGMENT_RE.fullmatch(s["name"]) \
                or not isinstance(s.get("count"), int) or s["count"] < 1:
            return f"bad segment entry {s!r:.80}"
        problem = _file_entries_ok(s.get("files"))
        if problem:
            return problem
        if not {store_file(meta["store_dtype"]), "names.jsonl"} <= set(s["files"]):
            return f"segment {s['name']} lacks its descriptors or names"
        if s.get("local_shape") is not None and not (isinstance(s["local_shape"], list)
                                                     and all(isinstance(v, int) and v > 0 for v in s["local_shape"])):
            return f"segment {s['name']}: bad local feature shape"
    index = meta.get("index")
    if not isinstance(index, dict) or not isinstance(index.get("type"), str):
        return "index description missing"
    if index.get("training") is not None and not (isinstance(index["training"], str)
                                                  and TRAINING_RE.fullmatch(index["training"])):
        return "bad index training name"
    problem = _file_entries_ok(index.get("files", {}))
    if problem:
        return problem
    if not isinstance(meta.get("metadata", {}), dict):
        return "metadata is not an object"
    return None
