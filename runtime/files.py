"""File helpers shared by every writer: hashes, and atomic writes that never leave half a file."""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, List, Union

import numpy as np

PathLike = Union[str, Path]


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write(path: PathLike, write: Callable) -> None:
    """Call ``write(fileobj)`` on a temporary file beside ``path``, fsync, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_dir(staging: Path, target: Path) -> None:
    """Move a fully written ``staging`` folder to ``target``, replacing an older one.

    The old folder is renamed aside first and removed only after the new one is in place, so a
    crash leaves either the old or the new folder under ``target`` (plus, at worst, a leftover
    ``.old`` folder), never a mix.
    """
    staging, target = Path(staging), Path(target)
    for f in staging.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(staging, target)
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_descriptors(output: Path, names: Iterable[str], outputs: dict) -> List[Path]:
    """``X.npy`` + ``X.txt`` (names); local features, if any, to ``X.local.npy``."""
    output = Path(output)
    if output.suffix != ".npy":
        output = output.with_suffix(".npy")
    written = [output, output.with_suffix(".txt")]
    atomic_write(output, lambda f: np.save(f, outputs["descriptor"]))
    atomic_write(written[1], lambda f: f.write("".join(f"{n}\n" for n in names).encode()))
    if "local_features" in outputs:
        local = output.with_suffix(".local.npy")
        atomic_write(local, lambda f: np.save(f, outputs["local_features"]))
        written.append(local)
    return written
