"""Pinned host and device memory, one stream and async copies, through cuda-python
(``cuda.bindings.runtime``; ``cuda.cudart`` on older JetPack images) or, where cuda-python is
missing, pycuda. Only what the TensorRT backend needs."""
from __future__ import annotations

import ctypes
from typing import Tuple

import numpy as np


def _check(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else (rest or None)


class CudaPythonMemory:
    name = "cuda-python"

    def __init__(self) -> None:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart  # cuda-python < 12.6
        self.rt = cudart
        self.stream = _check(cudart.cudaStreamCreate())
        self._device, self._host = [], []

    @property
    def stream_handle(self) -> int:
        return int(self.stream)

    def alloc(self, nbytes: int) -> Tuple[int, np.ndarray]:
        """(device pointer, pinned host byte buffer) of ``nbytes``."""
        dev = _check(self.rt.cudaMalloc(nbytes))
        host_ptr = _check(self.rt.cudaMallocHost(nbytes))
        self._device.append(dev)
        self._host.append(host_ptr)
        host = np.frombuffer((ctypes.c_byte * nbytes).from_address(int(host_ptr)), dtype=np.uint8)
        return int(dev), host

    def htod(self, dev: int, host: np.ndarray, nbytes: int) -> None:
        _check(self.rt.cudaMemcpyAsync(dev, host.ctypes.data, nbytes,
                                       self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))

    def dtoh(self, host: np.ndarray, dev: int, nbytes: int) -> None:
        _check(self.rt.cudaMemcpyAsync(host.ctypes.data, dev, nbytes,
                                       self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))

    def synchronize(self) -> None:
        _check(self.rt.cudaStreamSynchronize(self.stream))

    def begin_capture(self) -> None:
        _check(self.rt.cudaStreamBeginCapture(self.stream, self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))

    def end_capture(self):
        graph = _check(self.rt.cudaStreamEndCapture(self.stream))
        return _check(self.rt.cudaGraphInstantiate(graph, 0))

    def launch(self, graph_exec) -> None:
        _check(self.rt.cudaGraphLaunch(graph_exec, self.stream))

    def close(self) -> None:
        for p in self._device:
            self.rt.cudaFree(p)
        for p in self._host:
            self.rt.cudaFreeHost(p)
        self._device, self._host = [], []
        self.rt.cudaStreamDestroy(self.stream)


class PyCudaMemory:
    """Fallback for images that ship pycuda but not cuda-python (no CUDA-graph capture)."""

    name = "pycuda"

    def __init__(self) -> None:
        import pycuda.autoinit  # noqa: F401 - creates the context
        import pycuda.driver as cuda
        self.cuda = cuda
        self.stream = cuda.Stream()
        self._keep = []

    @property
    def stream_handle(self) -> int:
        return int(self.stream.handle)

    def alloc(self, nbytes: int) -> Tuple[int, np.ndarray]:
        dev = self.cuda.mem_alloc(nbytes)
        host = self.cuda.pagelocked_empty(nbytes, np.uint8)
        self._keep.append((dev, host))
        return int(dev), host

    def htod(self, dev: int, host: np.ndarray, nbytes: int) -> None:
        self.cuda.memcpy_htod_async(dev, host[:nbytes], self.stream)

    def dtoh(self, host: np.ndarray, dev: int, nbytes: int) -> None:
        self.cuda.memcpy_dtoh_async(host[:nbytes], dev, self.stream)

    def synchronize(self) -> None:
        self.stream.synchronize()

    def begin_capture(self) -> None:
        raise RuntimeError("CUDA-graph capture needs cuda-python")

    def close(self) -> None:
        for dev, _ in self._keep:
            dev.free()
        self._keep = []


def open_memory():
    """cuda-python where it imports, else pycuda."""
    try:
        return CudaPythonMemory()
    except ImportError:
        try:
            return PyCudaMemory()
        except ImportError as exc:
            raise RuntimeError("TensorRT needs cuda-python (pip install cuda-python) or pycuda") from exc
