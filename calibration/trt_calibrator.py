"""Implicit INT8 calibration for TensorRT 8.5/8.6 (JetPack 5, 6.0): an ``IInt8EntropyCalibrator2``
fed by the same calibration set as the Q/DQ path, its cache stored in the bundle and reused.

Only for builders that still have ``BuilderFlag.INT8`` and ``int8_calibrator`` (deprecated in
10.1, removed in 11.0: shared/research/deploy-tooling.md §1.4). ``CalibrationFeed`` (numpy only)
holds the images and the cache; the TensorRT class around it is defined when asked for, so this
module imports anywhere.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from runtime.bundle import CALIBRATION_CACHE
from runtime.errors import OptionError
from runtime.files import atomic_write

CACHE_NAME = CALIBRATION_CACHE


def _batch_size(n: int, limit: int = 8) -> int:
    """The largest batch up to ``limit`` that divides ``n``: every image is used."""
    return max(d for d in range(1, min(limit, n) + 1) if n % d == 0)


class CalibrationFeed:
    """The calibration set in fixed batches, and the calibration cache file. Without images, the
    cache must exist (TensorRT then reads it and asks for no batch)."""

    def __init__(self, data: Optional[np.ndarray], cache_path: Path, batch_size: int = 8) -> None:
        self.data = np.zeros((0,), np.float32) if data is None else data
        self.cache_path = Path(cache_path)
        if len(self.data) == 0 and not self.cache_path.is_file():
            raise OptionError("implicit INT8 calibration needs calibration images (--calibration-images DIR) "
                              "or the calibration cache of an earlier build")
        self.batch = _batch_size(len(self.data), batch_size) if len(self.data) else 1
        self.pos = 0

    @property
    def shape(self) -> tuple:
        return (self.batch,) + tuple(self.data.shape[1:])

    def next_batch(self) -> Optional[np.ndarray]:
        """The next batch (contiguous float32), or None when every image was given."""
        if self.pos + self.batch > len(self.data):
            return None
        chunk = np.ascontiguousarray(self.data[self.pos:self.pos + self.batch], dtype=np.float32)
        self.pos += self.batch
        return chunk

    def read_cache(self) -> Optional[bytes]:
        return self.cache_path.read_bytes() if self.cache_path.is_file() else None

    def write_cache(self, cache: bytes) -> None:
        atomic_write(self.cache_path, lambda f: f.write(bytes(cache)))


def make_entropy_calibrator(feed: CalibrationFeed):
    """TensorRT's ``IInt8EntropyCalibrator2`` over ``feed`` (needs TensorRT and a GPU)."""
    import tensorrt as trt

    from runtime.backends.cuda_memory import open_memory

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.feed = feed
            self.mem = open_memory()
            self.nbytes = int(np.prod(feed.shape)) * 4
            self.dev, self.host = self.mem.alloc(self.nbytes)

        def get_batch_size(self) -> int:
            return self.feed.batch

        def get_batch(self, names):  # noqa: ARG002 - one input
            chunk = self.feed.next_batch()
            if chunk is None:
                return None
            self.host[:self.nbytes] = chunk.view(np.uint8).reshape(-1)
            self.mem.htod(self.dev, self.host, self.nbytes)
            self.mem.synchronize()
            return [self.dev]

        def read_calibration_cache(self):
            return self.feed.read_cache()

        def write_calibration_cache(self, cache) -> None:
            self.feed.write_cache(cache)

    return EntropyCalibrator()
