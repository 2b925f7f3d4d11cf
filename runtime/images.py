"""Which images a command reads, and the name each one gets.

Images can be given as a folder (searched recursively), a list file (``.txt`` / ``.lst``, one
path per line, relative to the list file's folder) or a glob (``city/**/*.jpg``). A place's
name is its path relative to the root that was given (the folder, the list file's folder, or
the glob's fixed prefix), in POSIX form: two ``0001.jpg`` in different sub-folders stay two
places. Maps, encode outputs and evaluation all use these names.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Union

from .errors import UserError
from .preprocess import IMAGE_EXTENSIONS

LIST_SUFFIXES = (".txt", ".lst", ".list")
GLOB_CHARS = set("*?[")


class ImageListError(UserError, FileNotFoundError):
    """An image folder, list file or glob that names no usable image."""


@dataclass
class ImageList:
    root: Path
    files: List[Path]
    names: List[str]

    def __len__(self) -> int:
        return len(self.files)


def relative_name(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` (POSIX separators); the path itself when it lies outside."""
    try:
        return Path(os.path.relpath(path, root)).as_posix() if _inside(path, root) else Path(path).as_posix()
    except ValueError:  # another drive (Windows)
        return Path(path).as_posix()


def _inside(path: Path, root: Path) -> bool:
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    return rel != os.pardir and not rel.startswith(os.pardir + os.sep)


def default_names(files: Sequence[Path]) -> List[str]:
    """Names relative to the files' common folder (for one flat folder: the file names)."""
    if not files:
        return []
    root = os.path.commonpath([os.path.abspath(Path(f).parent) for f in files])
    return [relative_name(Path(f), Path(root)) for f in files]


def _is_image(p: Path) -> bool:
    # links are listed even when broken: a missing target is reported, not silently skipped
    return (p.is_file() or p.is_symlink()) and p.suffix.lower() in IMAGE_EXTENSIONS


def find_images(spec: Union[str, Path]) -> ImageList:
    """The images named by a folder or a glob (sorted by name), or by a list file (in its order)."""
    text = str(spec)
    path = Path(text)
    if path.is_dir():
        root = path
        files = [p for p in path.rglob("*") if _is_image(p)]
    elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        return _from_list_file(path)
    elif GLOB_CHARS & set(text):
        parts = Path(text).parts
        fixed = [p for p in parts[:next(i for i, p in enumerate(parts) if GLOB_CHARS & set(p))]]
        root = Path(*fixed) if fixed else Path(".")
        files = [Path(p) for p in glob.glob(text, recursive=True) if _is_image(Path(p))]
    elif path.exists():
        raise ImageListError(f"{path}: not a folder, a list file ({', '.join(LIST_SUFFIXES)}) or a glob")
    else:
        raise ImageListError(f"{path}: no such folder, list file or glob")
    names = [relative_name(f, root) for f in files]
    order = sorted(range(len(files)), key=names.__getitem__)
    if not files:
        raise ImageListError(f"{spec}: no images found (extensions {', '.join(IMAGE_EXTENSIONS)})")
    return ImageList(root, [files[i] for i in order], [names[i] for i in order])


def _from_list_file(path: Path) -> ImageList:
    root = path.parent
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ImageListError(f"{path}: unreadable list file ({exc})") from exc
    files: List[Path] = []
    seen = set()
    for number, line in enumerate(lines, 1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        f = Path(entry) if os.path.isabs(entry) else root / entry
        name = relative_name(f, root)
        if name in seen:
            raise ImageListError(f"{path}:{number}: {entry} is listed twice")
        seen.add(name)
        files.append(f)
    if not files:
        raise ImageListError(f"{path}: the list names no image")
    return ImageList(root, files, [relative_name(f, root) for f in files])

