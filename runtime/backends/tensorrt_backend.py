"""TensorRT backend: name-based I/O (``set_input_shape``, ``set_tensor_address``,
``execute_async_v3``), the same from TensorRT 8.5 to 11.x and in TensorRT-RTX
(shared/research/deploy-tooling.md §1.10): the bundle's backend picks the module, ``tensorrt`` or
``tensorrt_rtx``.

TensorRT-RTX compiles the engine's kernels for the GPU at the first run; where the engine offers
a runtime configuration with a runtime cache (feature-detected), the compiled kernels are kept
in ``~/.cache/vpr-edge/tensorrt-rtx/`` (``$VPR_EDGE_CACHE``), one file per engine, so later runs
start without compiling.

Buffers are planned once for the profile's maximum batch (``plan_buffers``) and reused, pinned on
the host; one non-default stream with asynchronous copies (``cuda_memory``: cuda-python). With ``cuda_graph=True`` each batch size's enqueue is captured once into a CUDA graph
and replayed (after a first uncaptured run, as trtexec does); the copies stay outside the graph.
"""
from __future__ import annotations

import sys
import time
from typing import Dict, List, Tuple

import numpy as np

from ..bundle import Bundle, BundleError
from ..files import atomic_write
from ..trt_env import RUNTIME_CACHE_DIR, tensorrt_module
from . import Backend


def plan_buffers(io: List[Tuple[str, bool, Tuple[int, ...], np.dtype]], max_batch: int) -> Dict[str, int]:
    """Bytes to allocate per tensor for ``max_batch`` (axis 0 may be -1: the dynamic batch)."""
    sizes = {}
    for name, _is_input, shape, dtype in io:
        dims = [max_batch if (i == 0 and d < 0) else d for i, d in enumerate(shape)]
        if any(d < 0 for d in dims):
            raise BundleError(f"tensor {name} has a dynamic axis other than the batch: {shape}")
        sizes[name] = int(np.prod(dims)) * np.dtype(dtype).itemsize
    return sizes


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, bundle: Bundle, cuda_graph: bool = False) -> None:
        from .cuda_memory import open_memory

        trt = self.trt = tensorrt_module(bundle.backend)
        if trt is None:
            raise BundleError(f"{bundle.path}: {bundle.backend} does not import here; {bundle.rebuild_hint}")
        self.logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self.logger)
        if bundle.manifest.get("tensorrt", {}).get("version_compatible"):
            runtime.engine_host_code_allowed = True
        plan = bundle.file("engine").read_bytes()
        if hasattr(runtime, "get_engine_validity"):  # TensorRT-RTX says why an engine cannot run here
            validity, diagnostics = runtime.get_engine_validity(plan)
            if validity == trt.EngineValidity.INVALID:
                why = [name.lower().replace("_", " ") for name, flag in trt.EngineInvalidityDiagnostics.__members__.items()
                       if int(diagnostics) & int(flag)]
                raise BundleError(f"{bundle.file('engine')}: {bundle.backend} cannot run this engine on this machine "
                                  f"({', '.join(why) or 'no reason given'}); {bundle.rebuild_hint}")
        self.engine = runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise BundleError(f"{bundle.file('engine')}: {bundle.backend} could not deserialise the engine; {bundle.rebuild_hint}")
        self.cache_file, self.runtime_cache = None, None
        config = self.engine.create_runtime_config() if hasattr(self.engine, "create_runtime_config") else None
        if hasattr(config, "create_runtime_cache"):  # TensorRT-RTX: keep the kernels compiled at the first run
            self.runtime_cache = config.create_runtime_cache()
            self.cache_file = RUNTIME_CACHE_DIR / f"{bundle.manifest['files']['engine']['sha256'][:16]}.cache"
            if self.cache_file.is_file():
                self.runtime_cache.deserialize(self.cache_file.read_bytes())  # False (ignored) on another GPU or driver
            config.set_runtime_cache(self.runtime_cache)
            self.context = self.engine.create_execution_context(config)
        else:
            self.context = self.engine.create_execution_context()
        self.min_batch, self.max_batch = int(bundle.batch["min"]), int(bundle.batch["max"])
        io = []
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            io.append((name, is_input, tuple(self.engine.get_tensor_shape(name)),
                       np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))))
        self.inputs = [t for t in io if t[1]]
        self.outputs = [t for t in io if not t[1]]
        self.mem = open_memory()
        self.buffers = {}
        for name, size in plan_buffers(io, self.max_batch).items():
            self.buffers[name] = self.mem.alloc(size)
            self.context.set_tensor_address(name, self.buffers[name][0])
        self.cuda_graph = cuda_graph
        self.graphs: Dict[int, object] = {}
        self.profiler = None
        self.last_timings: Dict[str, float] = {}

    def enable_profiling(self) -> None:
        """Time h2d / inference / d2h separately (a synchronisation after each) and collect
        TensorRT's per-layer times through an IProfiler. Not for production: it costs latency."""
        trt = self.trt

        class LayerProfiler(trt.IProfiler):
            def __init__(self) -> None:
                trt.IProfiler.__init__(self)
                self.total: Dict[str, float] = {}
                self.calls: Dict[str, int] = {}

            def report_layer_time(self, layer_name: str, ms: float) -> None:
                self.total[layer_name] = self.total.get(layer_name, 0.0) + ms
                self.calls[layer_name] = self.calls.get(layer_name, 0) + 1

        self.cuda_graph = False  # a profiled context cannot be captured
        self.profiler = LayerProfiler()
        self.context.profiler = self.profiler

    def layer_times(self) -> Dict[str, float]:
        if self.profiler is None:
            return {}
        return {k: v / self.profiler.calls[k] for k, v in self.profiler.total.items()}

    def device_memory_bytes(self) -> int:
        size = getattr(self.engine, "device_memory_size_v2", None)  # TensorRT 10+
        return int(size if size is not None else getattr(self.engine, "device_memory_size", 0))

    def _enqueue(self, batch: int) -> None:
        if not self.cuda_graph:
            if not self.context.execute_async_v3(self.mem.stream_handle):
                raise RuntimeError("TensorRT execute_async_v3 failed")
            return
        if batch not in self.graphs:
            self.context.execute_async_v3(self.mem.stream_handle)  # lazy initialisation outside capture
            self.mem.synchronize()
            self.mem.begin_capture()
            self.context.execute_async_v3(self.mem.stream_handle)
            self.graphs[batch] = self.mem.end_capture()
        self.mem.launch(self.graphs[batch])

    def run(self, images: np.ndarray) -> Dict[str, np.ndarray]:
        b = images.shape[0]
        if not self.min_batch <= b <= self.max_batch:
            raise ValueError(f"batch {b} outside the engine's profile {self.min_batch}..{self.max_batch}")
        name, _, _, dtype = self.inputs[0]
        self.context.set_input_shape(name, tuple(images.shape))
        dev, host = self.buffers[name]
        data = np.ascontiguousarray(images, dtype=dtype)
        host[:data.nbytes] = data.view(np.uint8).reshape(-1)
        t0 = time.perf_counter()
        self.mem.htod(dev, host, data.nbytes)
        if self.profiler is not None:
            self.mem.synchronize()
        t1 = time.perf_counter()
        self._enqueue(b)
        if self.profiler is not None:
            self.mem.synchronize()
        t2 = time.perf_counter()
        shapes = {}
        for oname, _, _, odtype in self.outputs:
            shape = tuple(self.context.get_tensor_shape(oname))
            nbytes = int(np.prod(shape)) * np.dtype(odtype).itemsize
            odev, ohost = self.buffers[oname]
            self.mem.dtoh(ohost, odev, nbytes)
            shapes[oname] = (shape, odtype, nbytes)
        self.mem.synchronize()
        if self.profiler is not None:
            t3 = time.perf_counter()
            self.last_timings = {"h2d": (t1 - t0) * 1000, "inference": (t2 - t1) * 1000, "d2h": (t3 - t2) * 1000}
        return {n: self.buffers[n][1][:nb].view(dt).reshape(sh).astype(np.float32)
                for n, (sh, dt, nb) in shapes.items()}

    def close(self) -> None:
        if self.runtime_cache is not None:
            try:
                data = memoryview(self.runtime_cache.serialize())
                atomic_write(self.cache_file, lambda f: f.write(data))
            except OSError as exc:  # a read-only home: the next run compiles again
                print(f"warning: TensorRT-RTX runtime cache not saved to {self.cache_file}: {exc}", file=sys.stderr)
        self.mem.close()
