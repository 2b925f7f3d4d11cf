"""TensorRT backend: name-based I/O (``set_input_shape``, ``set_tensor_address``,
``execute_async_v3``), the same from TensorRT 8.5 to 11.x (shared/research/deploy-tooling.md §1.10).

Memory through cuda-python (``cuda.bindings.runtime``; the older ``cuda.cudart`` layout on JetPack
images): pinned host and device buffers sized once for the profile's maximum batch and reused, one
non-default CUDA stream, asynchronous copies. Tested where TensorRT and a GPU exist.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np

from ..bundle import Bundle, BundleError
from . import Backend


def _cudart():
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        from cuda import cudart  # cuda-python < 12.6
    return cudart


def _check(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else rest


def plan_buffers(io: List[Tuple[str, bool, Tuple[int, ...], np.dtype]], max_batch: int) -> Dict[str, int]:
    """Bytes to allocate per tensor for ``max_batch`` (batch axis 0 may be -1 = dynamic)."""
    sizes = {}
    for name, _is_input, shape, dtype in io:
        dims = [max_batch if (i == 0 and d < 0) else d for i, d in enumerate(shape)]
        if any(d < 0 for d in dims):
            raise BundleError(f"tensor {name} has a dynamic axis other than the batch: {shape}")
        sizes[name] = int(np.prod(dims)) * np.dtype(dtype).itemsize
    return sizes


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, bundle: Bundle) -> None:
        import tensorrt as trt

        self.trt, self.cudart = trt, _cudart()
        self.logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self.logger)
        if bundle.manifest.get("tensorrt", {}).get("version_compatible"):
            runtime.engine_host_code_allowed = True
        self.engine = runtime.deserialize_cuda_engine(bundle.file("engine").read_bytes())
        if self.engine is None:
            raise BundleError(f"{bundle.file('engine')}: TensorRT could not deserialise the engine; {bundle.rebuild_hint}")
        self.context = self.engine.create_execution_context()
        self.max_batch = int(bundle.batch["max"])
        self.min_batch = int(bundle.batch["min"])
        io = []
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            shape = tuple(self.engine.get_tensor_shape(name))
            io.append((name, is_input, shape, np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))))
        self.io = io
        self.inputs = [t for t in io if t[1]]
        self.outputs = [t for t in io if not t[1]]
        self.stream = _check(self.cudart.cudaStreamCreate())
        self.device, self.host = {}, {}
        for name, size in plan_buffers(io, self.max_batch).items():
            self.device[name] = _check(self.cudart.cudaMalloc(size))
            self.host[name] = _check(self.cudart.cudaMallocHost(size))
            self.context.set_tensor_address(name, int(self.device[name]))

    def _host_view(self, name: str, shape, dtype) -> np.ndarray:
        import ctypes
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        buf = (ctypes.c_byte * n).from_address(int(self.host[name]))
        return np.frombuffer(buf, dtype=dtype).reshape(shape)

    def run(self, images: np.ndarray) -> Dict[str, np.ndarray]:
        b = images.shape[0]
        if not self.min_batch <= b <= self.max_batch:
            raise ValueError(f"batch {b} outside the engine's profile {self.min_batch}..{self.max_batch}")
        cudart = self.cudart
        kind_h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        kind_d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        name, _, _, dtype = self.inputs[0]
        self.context.set_input_shape(name, tuple(images.shape))
        host_in = self._host_view(name, images.shape, dtype)
        host_in[...] = images
        _check(cudart.cudaMemcpyAsync(self.device[name], self.host[name], host_in.nbytes, kind_h2d, self.stream))
        if not self.context.execute_async_v3(int(self.stream)):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        results = {}
        for oname, _, _, odtype in self.outputs:
            shape = tuple(self.context.get_tensor_shape(oname))
            view = self._host_view(oname, shape, odtype)
            _check(cudart.cudaMemcpyAsync(self.host[oname], self.device[oname], view.nbytes, kind_d2h, self.stream))
            results[oname] = view
        _check(cudart.cudaStreamSynchronize(self.stream))
        return {k: np.array(v, dtype=np.float32) for k, v in results.items()}

    def close(self) -> None:
        for ptr in self.device.values():
            self.cudart.cudaFree(ptr)
        for ptr in self.host.values():
            self.cudart.cudaFreeHost(ptr)
        self.device, self.host = {}, {}
        self.cudart.cudaStreamDestroy(self.stream)
