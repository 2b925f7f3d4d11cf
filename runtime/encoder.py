"""Batched encoding of image files with a bundle: decoding in a small thread pool, overlapped
with inference on the previous batch; per-stage timings; files that cannot be decoded are
reported (file and problem) and skipped, the rest go on. ``Encoder.stream`` yields batches as
they are produced, so a map build holds a few batches at a time, never the whole set.
"""
from __future__ import annotations

import sys
import time
from collections import deque
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, TypeVar

import numpy as np

from .backends import Backend, open_backend
from .bundle import Bundle
from .images import default_names
from .preprocess import ImageDecodeError, Preprocessing, load_rgb, preprocess_image
from .sinkhorn import salad_aggregate
from .timing import StageTimer


@dataclass
class Decoded:
    path: Path
    image: Optional[np.ndarray]
    error: Optional[str]
    decode_ms: float = 0.0
    preprocess_ms: float = 0.0


def decode(path: Path, pre: Preprocessing) -> Decoded:
    """Decode + preprocess one file; never raises for a bad file."""
    t0 = time.perf_counter()
    try:
        img = load_rgb(path)
        t1 = time.perf_counter()
        arr = preprocess_image(img, pre)
    except ImageDecodeError as exc:
        return Decoded(Path(path), None, str(exc))
    except Exception as exc:  # noqa: BLE001 - any failure of one file is reported, not fatal
        return Decoded(Path(path), None, f"{type(exc).__name__}: {exc}")
    t2 = time.perf_counter()
    return Decoded(Path(path), arr, None, (t1 - t0) * 1000, (t2 - t1) * 1000)


T = TypeVar("T")
I = TypeVar("I")


def prefetch(pool: Executor, fn: Callable[[I], T], items: Iterable[I], depth: int) -> Iterator[T]:
    """``map(fn, items)`` in order, with at most ``depth`` results computed ahead: memory stays
    bounded however many items there are (``Executor.map`` would submit them all at once)."""
    queue: deque = deque()
    for item in items:
        queue.append(pool.submit(fn, item))
        if len(queue) >= depth:
            yield queue.popleft().result()
    while queue:
        yield queue.popleft().result()


@dataclass
class EncodeResult:
    outputs: Dict[str, np.ndarray]
    names: List[str]
    failures: List[Tuple[str, str]] = field(default_factory=list)


class Encoder:
    """Runs a bundle over images. ``infer`` takes a preprocessed batch; ``encode_files`` a list."""

    def __init__(self, bundle: Bundle, backend: Optional[Backend] = None, batch_size: Optional[int] = None,
                 threads: Optional[int] = None, decode_workers: int = 2, timer: Optional[StageTimer] = None) -> None:
        self.bundle = bundle
        self.backend = backend or open_backend(bundle, threads=threads)
        self.batch_size = max(1, min(batch_size or int(bundle.batch["opt"]), self.backend.max_batch))
        self.pre = bundle.preprocessing
        self.split = bundle.manifest.get("split")
        self.decode_workers = decode_workers
        self.timer = timer or StageTimer()

    @property
    def output_names(self) -> List[str]:
        names = ["descriptor"]
        if "local_features" in self.bundle.outputs:
            names.append("local_features")
        return names

    def infer(self, images: np.ndarray, times: Optional[Dict[str, float]] = None) -> Dict[str, np.ndarray]:
        """A preprocessed batch (B, 3, H, W) -> {'descriptor', ...}. ``times`` receives the batch's
        milliseconds per stage (inference, and aggregation in split mode)."""
        t0 = time.perf_counter()
        out = self.backend.run(images)
        ms = {"inference": (time.perf_counter() - t0) * 1000}
        if self.split:
            t1 = time.perf_counter()
            out = {"descriptor": salad_aggregate(out["token"], out["cluster_features"], out["scores"],
                                                 self.split["dust_bin"], self.split["iterations"])}
            ms["aggregation"] = (time.perf_counter() - t1) * 1000
        for stage, value in ms.items():
            self.timer.add(stage, value, len(images))
        if times is not None:
            times.update(ms)
        return out

    def stream(self, files: Sequence[Path], names: Optional[Sequence[str]] = None,
               keep: Iterable[str] = ("descriptor",), progress: bool = False,
               failures: Optional[List[Tuple[str, str]]] = None) -> Iterator[Tuple[List[str], Dict[str, np.ndarray]]]:
        """Encoded batches, in file order, as they are produced: memory stays that of a few
        batches however many files there are. A file that cannot be decoded is reported on
        stderr, appended to ``failures`` (path, problem) and skipped. ``names`` default to the
        paths relative to the files' common folder."""
        keep = list(keep)
        names = list(names) if names is not None else default_names(files)
        if len(names) != len(files):
            raise ValueError(f"{len(names)} names for {len(files)} files")
        bar = _progress(len(files), progress)
        with ThreadPoolExecutor(max_workers=self.decode_workers) as pool:
            pending = prefetch(pool, lambda i: (i, decode(files[i], self.pre)), range(len(files)),
                               depth=2 * self.batch_size)
            batch: List[Tuple[int, Decoded]] = []
            for i, item in pending:
                if item.error is not None:
                    if failures is not None:
                        failures.append((str(item.path), item.error))
                    print(f"error: {item.path}: {item.error}", file=sys.stderr)
                    bar(1)
                    continue
                batch.append((i, item))
                if len(batch) == self.batch_size:
                    yield self._run(batch, names, keep)
                    bar(len(batch))
                    batch = []
            if batch:
                yield self._run(batch, names, keep)
                bar(len(batch))
        bar(0, close=True)

    def encode_files(self, files: Sequence[Path], progress: bool = False, keep: Iterable[str] = ("descriptor",),
                     names: Optional[Sequence[str]] = None) -> EncodeResult:
        """Every file's outputs in memory (for small sets; ``stream`` for large ones)."""
        keep = list(keep)
        parts: Dict[str, List[np.ndarray]] = {k: [] for k in keep}
        done: List[str] = []
        failures: List[Tuple[str, str]] = []
        for batch_names, out in self.stream(files, names, keep, progress, failures):
            done.extend(batch_names)
            for k in keep:
                parts[k].append(out[k])
        outputs = {k: (np.concatenate(v) if v else np.zeros((0,), np.float32)) for k, v in parts.items()}
        return EncodeResult(outputs, done, failures)

    def _run(self, batch: List[Tuple[int, Decoded]], names: Sequence[str],
             keep: List[str]) -> Tuple[List[str], Dict[str, np.ndarray]]:
        for _, d in batch:
            self.timer.add("decode", d.decode_ms)
            self.timer.add("preprocess", d.preprocess_ms)
        out = self.infer(np.stack([d.image for _, d in batch]))
        return [names[i] for i, _ in batch], {k: out[k] for k in keep}


def _progress(total: int, enabled: bool):
    if not enabled:
        return lambda n, close=False: None
    from tqdm import tqdm
    bar = tqdm(total=total, unit="img", file=sys.stderr)

    def update(n: int, close: bool = False) -> None:
        bar.update(n)
        if close:
            bar.close()
    return update
