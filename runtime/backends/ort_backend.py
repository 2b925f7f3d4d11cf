"""ONNX Runtime backend: the bundle's ``model.onnx`` on CPU (or CUDA where present).

Graph optimisations are applied when the session is created (ORT_ENABLE_ALL), not saved into
the bundle: an optimised graph saved on one CPU may use kernels another CPU lacks. Spin-waiting
is off: with several sessions (or torch) on two cores it doubled latency
(shared/research/env-probe.md §4).
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import onnxruntime as ort

from ..bundle import Bundle
from ..cpu_features import check_cpu_path
from ..errors import OptionError
from . import Backend


def session_options(threads: Optional[int] = None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, bundle: Bundle, threads: Optional[int] = None, device: str = "cpu") -> None:
        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            available = ort.get_available_providers()
            if "CUDAExecutionProvider" not in available:
                raise OptionError(f"--device cuda: this ONNX Runtime has no CUDA execution provider (it has "
                                  f"{', '.join(available)}); install onnxruntime-gpu, or use --device cpu")
            providers.insert(0, "CUDAExecutionProvider")
        self.check = check_cpu_path(bundle.manifest, where=str(bundle.path))  # a CPU path: warn where it does not fit
        self.session = ort.InferenceSession(str(bundle.file("onnx")), sess_options=session_options(threads),
                                            providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.max_batch = int(bundle.batch["max"])
        self.providers = self.session.get_providers()

    def close(self) -> None:
        self.session = None  # the session and its memory go with this last reference

    def run(self, images: np.ndarray) -> Dict[str, np.ndarray]:
        outs = self.session.run(self.output_names, {self.input_name: np.ascontiguousarray(images, dtype=np.float32)})
        return {n: np.asarray(o, dtype=np.float32) for n, o in zip(self.output_names, outs)}
