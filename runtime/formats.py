"""Descriptor files for other tools: hloc's global-feature HDF5 layout.

``python -m runtime encode --format npy`` (the default) writes ``X.npy`` + ``X.txt``
(``runtime/files.py``); ``--format hloc`` writes what hloc's ``extract_features`` writes for a
global descriptor, so its ``pairs_from_retrieval`` (and everything reading hloc feature files)
takes our descriptors as they are: one HDF5 group per image, named by the image's path relative
to the image root (``north/0001.jpg``: nested groups ``north`` / ``0001.jpg``), holding the dataset
``global_descriptor`` of shape (D,). hloc finds the names by visiting every dataset and taking its
parent group's path (shared/research/round2-anchors.md §4). We store float32; hloc's own extractor
stores float16 by default (``as_half``) and reads either as float.

The file is written under a temporary name beside the output and renamed over it when complete:
an interrupted run leaves no half-written file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import numpy as np

from .errors import UserError
from .files import publish, temp_beside

FORMATS = ("npy", "hloc")
DATASET = "global_descriptor"


class FormatError(UserError, ValueError):
    """A descriptor file that cannot be written in the requested format; the message says why."""


def _h5py():
    try:
        import h5py
    except ImportError:
        raise FormatError("--format hloc writes HDF5 and needs h5py: pip install 'vpr-edge[hloc]' "
                          "(or pip install h5py)") from None
    return h5py


def hloc_name_problem(name: str) -> Union[str, None]:
    """Why ``name`` cannot be an hloc group name (None when it can): hloc names are relative
    POSIX paths, so the group path read back equals the image's name."""
    parts = name.split("/")
    if name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        return "not a path under the image root (hloc names each image by its path relative to the root)"
    return None


class HlocWriter:
    """Appends (names, descriptors) batches to an hloc global-feature file; ``commit`` puts it in
    place. Leaving the ``with`` block without ``commit`` discards it."""

    def __init__(self, path: Union[str, Path]) -> None:
        h5py = _h5py()
        self.path = Path(path)
        self.tmp = temp_beside(self.path)
        self.file = h5py.File(self.tmp, "w", libver="latest")  # compact groups, as hloc writes them
        self.count = 0

    def append(self, names: Sequence[str], descriptors: np.ndarray) -> None:
        """One batch: ``descriptors`` float32 (len(names), D), row i for ``names[i]``."""
        if len(names) != len(descriptors):
            raise ValueError(f"{len(names)} names for {len(descriptors)} descriptors")  # a caller's bug
        for name, row in zip(names, np.asarray(descriptors, dtype=np.float32)):
            problem = hloc_name_problem(name)
            if problem:
                raise FormatError(f"{name}: {problem}")
            self.file.create_group(name).create_dataset(DATASET, data=row)
        self.count += len(names)

    def commit(self) -> None:
        self.file.close()
        publish(self.tmp, self.path)

    def discard(self) -> None:
        if self.file:
            self.file.close()
        if self.tmp.exists():
            self.tmp.unlink()

    def __enter__(self) -> "HlocWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.discard()  # after commit: nothing left to discard


def save_hloc(path: Union[str, Path], names: Sequence[str], descriptors: np.ndarray) -> Path:
    """Write one hloc global-feature file at once (``HlocWriter`` streams batches)."""
    with HlocWriter(path) as writer:
        writer.append(names, descriptors)
        writer.commit()
    return Path(path)
