"""File helpers shared by every writer: hashes, atomic writes that never leave half a file, and
output folders that are replaced whole (``check_output_dir``, ``staging_dir``, ``replace_dir``)."""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Optional, Set, Union

import numpy as np

from .errors import PathError

PathLike = Union[str, Path]


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def check_listed_file(path: Path, entry: dict, what: str, fix: str, error: Callable[[str], Exception],
                      hash: bool = True) -> None:
    """A file a manifest lists (``entry``: size, sha256) is there, whole and, with ``hash``,
    unchanged. Size first: a truncated file is caught without reading it."""
    if not path.is_file():
        raise error(f"{path}: missing ({what}); {fix}")
    size = path.stat().st_size
    if size != entry["size"]:
        raise error(f"{path}: {size} bytes, the manifest says {entry['size']} ({what} truncated or replaced); {fix}")
    if hash and sha256_file(path) != entry["sha256"]:
        raise error(f"{path}: {what} is corrupted (sha256 differs from the manifest); {fix}")


def atomic_write(path: PathLike, write: Callable) -> None:
    """Call ``write(fileobj)`` on a temporary file beside ``path``, fsync, then rename over it."""
    path = Path(path)
    tmp = temp_beside(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
        publish(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise


def temp_beside(path: PathLike) -> Path:
    """A new empty temporary file in ``path``'s folder (created if needed), for ``publish``; a
    path that cannot be written raises ``PathError`` saying why."""
    path = Path(path)
    if path.is_dir():
        raise PathError(f"{path}: is a folder; give a file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except (FileExistsError, NotADirectoryError):
        raise PathError(f"{path}: cannot create its folder {path.parent}: a file is in the way") from None
    except PermissionError:
        raise PathError(f"{path}: no permission to write in {path.parent}") from None
    os.close(fd)
    return Path(tmp)


def publish(tmp: PathLike, path: PathLike) -> None:
    """Put the complete file ``tmp`` (from ``temp_beside``) at ``path`` in one rename, its data
    and the rename on disk first: ``path`` is the old file or the new one, never half of one."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    _fsync_dir(Path(path).parent)


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


def check_output_dir(path: PathLike, kind: str, own_files: Callable[[Path], Optional[Set[str]]]) -> Path:
    """Refuse an output folder that a build must not replace; return the path to write to.

    ``own_files(folder)`` tells whether ``folder`` is a previous output of this ``kind`` (the
    names it consists of) or not (None). An existing path that is not such an output, or that
    also holds anything else, is refused: replacing it would delete what it holds. A symbolic
    link is followed, so the link stays and its target folder is replaced."""
    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    if not path.exists():
        return path
    if not path.is_dir():
        raise PathError(f"{path}: exists and is a file, not a {kind} folder; choose another output path")
    own = own_files(path)
    if own is None:
        raise PathError(f"{path}: exists and is not a {kind}; it was left untouched. Choose another output path "
                        f"(or remove it yourself)")
    foreign = sorted(p.name for p in path.iterdir() if p.name not in own)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise PathError(f"{path}: a previous {kind}, but it also holds {shown}; replacing it would delete "
                        f"them. Move them out or choose another output path")
    return path


@contextlib.contextmanager
def staging_dir(target: PathLike) -> Iterator[Path]:
    """A fresh folder beside ``target`` (same file system) to write a new output into.

    Publish it with ``replace_dir(staging, target)`` inside the ``with`` block. On leaving the
    block the staging path is removed, whatever it then holds: a failed half output, or the
    previous output that ``replace_dir`` swapped out. Leftovers of killed processes are removed
    the next time."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise PathError(f"{target}: cannot create its folder {target.parent}: a file is in the way") from None
    _remove_dead_stagings(target)
    staging = target.parent / f".{target.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()  # the umask's mode, as the published folder should have
    try:
        yield staging
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _remove_dead_stagings(target: Path) -> None:
    for old in target.parent.glob(f".{target.name}.partial-*"):
        pid = old.name[len(f".{target.name}.partial-"):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange_paths(a: PathLike, b: PathLike) -> bool:
    """Swap two existing paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``, glibc >= 2.28,
    on ext4, xfs, btrfs, tmpfs and others). False where the system or file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(str(a)), _AT_FDCWD, os.fsencode(str(b)), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(a))


def replace_dir(staging: PathLike, target: PathLike) -> None:
    """Put the fully written folder ``staging`` at ``target``.

    A new ``target`` is a plain rename. An existing one is swapped with ``staging`` in one atomic
    step (``exchange_paths``): ``target`` always names a complete folder, the old one until the
    swap and the new one after it, never a mix and never nothing; the old folder ends up at
    ``staging``, which ``staging_dir`` removes. Only where the exchange is unsupported (not Linux,
    or a file system without it) is the old folder renamed to ``staging`` first, leaving
    ``target`` absent between two renames. Files are fsynced first, so a crash cannot publish a
    folder whose data is still in flight.
    """
    staging, target = Path(staging), Path(target)
    for f in staging.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(staging)
    if not target.exists():
        os.rename(staging, target)
    elif not exchange_paths(staging, target):
        aside = staging.with_name(staging.name + ".old")
        os.rename(target, aside)
        os.rename(staging, target)
        os.rename(aside, staging)
    _fsync_dir(target.parent)


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
