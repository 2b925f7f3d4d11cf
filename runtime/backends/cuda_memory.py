"""Pinned host and device memory, one stream and async copies, through cuda-python
(``cuda.bindings.runtime``; ``cuda.cudart`` on older JetPack images): what NVIDIA's own TensorRT
samples use since they dropped pycuda. Required for TensorRT bundles (the ``trt`` extra); only
what the TensorRT backend needs."""
from __future__ import annotations

import ctypes
from typing import Tuple

import numpy as np

from ..errors import UserError


def _check(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else (rest or None)


class CudaPythonMemory:
    name = "cuda-python"

    def __init__(self) -> None:
        from ..trt_env import cuda_runtime

        cudart = cuda_runtime()
        if cudart is None:
            raise UserError("TensorRT bundles need cuda-python: pip install cuda-python (or the trt extra: "
                            "pip install 'vpr-edge[trt]')")
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


def open_memory() -> CudaPythonMemory:
    return CudaPythonMemory()
