"""Implicit INT8 calibration for TensorRT 8.5/8.6 (JetPack 5, 6.0): an ``IInt8EntropyCalibrator2``
fed by the same calibration set as the Q/DQ path, its cache stored in the bundle and reused.

Only for builders that still have ``BuilderFlag.INT8`` and ``int8_calibrator`` (deprecated in
10.1, removed in 11.0: shared/research/deploy-tooling.md §1.4). Needs TensorRT and a GPU; the
class is defined when it is asked for, so this module imports anywhere.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.files import atomic_write

CACHE_NAME = "calibration.cache"


def make_entropy_calibrator(data: np.ndarray, cache_path: Path, batch_size: int = 8):
    import tensorrt as trt

    from runtime.backends.cuda_memory import open_memory

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.data, self.cache_path = data, Path(cache_path)
            self.batch = min(batch_size, len(data))
            self.mem = open_memory()
            self.nbytes = int(np.prod((self.batch,) + data.shape[1:])) * 4
            self.dev, self.host = self.mem.alloc(self.nbytes)
            self.pos = 0

        def get_batch_size(self) -> int:
            return self.batch

        def get_batch(self, names):  # noqa: ARG002 - one input
            if self.pos + self.batch > len(self.data):
                return None
            chunk = np.ascontiguousarray(self.data[self.pos:self.pos + self.batch], dtype=np.float32)
            self.host[:self.nbytes] = chunk.view(np.uint8).reshape(-1)
            self.mem.htod(self.dev, self.host, self.nbytes)
            self.mem.synchronize()
            self.pos += self.batch
            return [self.dev]

        def read_calibration_cache(self):
            return self.cache_path.read_bytes() if self.cache_path.is_file() else None

        def write_calibration_cache(self, cache) -> None:
            atomic_write(self.cache_path, lambda f: f.write(bytes(cache)))

    return EntropyCalibrator()
