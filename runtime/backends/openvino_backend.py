"""OpenVINO backend: a CPU bundle's ``model.onnx`` on OpenVINO's CPU plugin (optional: ``pip
install openvino``, the ``openvino`` extra). Chosen by the manifest (``backend: openvino``, built
by ``export/build_engine.py --target cpu --backend openvino``).

The bundle ships the FP32 ONNX graph; the precision is OpenVINO's run-time inference precision
(``bf16`` where the CPU has bf16 arithmetic), set from the manifest's CPU path and its fallback
(``runtime.cpu_features.check_cpu_path``). Nothing compiled for one CPU is stored.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import numpy as np

from ..bundle import Bundle, BundleError
from ..cpu_features import check_cpu_path
from . import Backend

PRECISION_HINTS = {"f32", "bf16", "f16"}


def _openvino():
    try:
        import openvino
    except ImportError:
        raise BundleError("this bundle runs on OpenVINO, which is not installed: pip install openvino "
                          "(or pip install -e '.[openvino]'), or rebuild it with --target cpu --backend onnxruntime") \
            from None
    return openvino


def compile_graph(path: Path, threads: Optional[int] = None, settings: Optional[dict] = None):
    """The compiled model of an ONNX file on the CPU plugin, latency mode, with a CPU path's
    ``settings`` (``inference_precision``)."""
    ov = _openvino()
    precision = (settings or {}).get("inference_precision", "f32")
    if precision not in PRECISION_HINTS:
        raise BundleError(f"{path}: unknown OpenVINO inference precision {precision!r} in the manifest; rebuild the bundle")
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return ov.Core().compile_model(str(path), "CPU", config)


class OpenVINOBackend(Backend):
    name = "openvino"

    def __init__(self, bundle: Bundle, threads: Optional[int] = None) -> None:
        self.check = check_cpu_path(bundle.manifest, where=str(bundle.path))
        self.compiled = compile_graph(bundle.file("onnx"), threads, self.check.settings)
        self.request = self.compiled.create_infer_request()
        self.output_names = [o.any_name for o in self.compiled.outputs]
        self.max_batch = int(bundle.batch["max"])
        self.providers = [f"OpenVINO CPU ({self.compiled.get_property('INFERENCE_PRECISION_HINT')})"]

    def run(self, images: np.ndarray) -> Dict[str, np.ndarray]:
        result = self.request.infer({0: np.ascontiguousarray(images, dtype=np.float32)})
        return {n: np.array(result[out], dtype=np.float32) for n, out in zip(self.output_names, self.compiled.outputs)}
