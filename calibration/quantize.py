"""Explicit INT8 quantization: a Q/DQ ONNX graph calibrated on real images with ONNX Runtime.

Why ONNX Runtime's quantizer rather than NVIDIA ModelOpt: ModelOpt pins ``onnx~=1.21`` and
``onnxruntime-gpu`` (and pulls torch and cupy), which conflicts with this environment
(shared/research/env-probe.md §3), while ONNX Runtime is already the runtime's dependency, runs on
CPU anywhere (the device included), and offers the calibration methods asked for (entropy,
minmax, percentile). We ask it for what TensorRT builds: symmetric INT8 for weights
(per channel) and activations, zero points 0, QDQ format.

Kept in FP32 (not quantized): LayerNorm, softmax, the whole aggregation head (Sinkhorn), the L2
normalisations and GeM (``export.precision.fp32_island_nodes`` finds them). Only the inputs of
MatMul / Gemm / Conv are quantized (the attention products included); their outputs are not
re-quantized, so softmax and LayerNorm see float inputs. On CPU, ONNX Runtime then runs integer
kernels (MatMulIntegerToFloat, QLinearMatMul, ...): ``integer_ops`` checks the optimised graph.
(Re-quantizing the outputs as well made ONNX Runtime fuse the softmax into an int8
QLinearSoftmax, and was slower: 29 vs 25 ms per image for a 2-block ViT-S at 322.)
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

METHODS = {"entropy": CalibrationMethod.Entropy, "minmax": CalibrationMethod.MinMax,
           "percentile": CalibrationMethod.Percentile}
QUANTIZED_OPS = ["MatMul", "Gemm", "Conv"]
INTEGER_OPS = ("QLinearMatMul", "QLinearConv", "MatMulInteger", "ConvInteger", "QGemm", "MatMulIntegerToFloat",
               "DynamicQuantizeMatMul", "QAttention")


class _Reader(CalibrationDataReader):
    """Feeds the calibration set one image at a time, in strides (ONNX Runtime's
    ``CalibStridedMinMax``): histograms are updated per stride, so memory does not grow with
    the number of images."""

    def __init__(self, data: np.ndarray, input_name: str) -> None:
        self.data, self.name = data, input_name
        self.start, self.end = 0, len(data)
        self.pos = 0

    def __len__(self) -> int:
        return len(self.data)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.start, self.end, self.pos = start_index, end_index, start_index

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        if self.pos >= self.end:
            return None
        x = np.ascontiguousarray(self.data[self.pos:self.pos + 1], dtype=np.float32)
        self.pos += 1
        return {self.name: x}


def _stride(n: int, limit: int = 8) -> int:
    return max(d for d in range(1, min(limit, n) + 1) if n % d == 0)


def quantize_onnx(fp32_path: Path, out_path: Path, calibration: np.ndarray, method: str = "entropy",
                  exclude: Sequence[str] = (), percentile: float = 99.999) -> dict:
    """Write the Q/DQ graph of ``fp32_path`` to ``out_path``; returns facts for the manifest."""
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; expected one of {sorted(METHODS)}")
    input_name = onnx.load(str(fp32_path), load_external_data=False).graph.input[0].name
    quantize_static(
        str(fp32_path), str(out_path), _Reader(calibration, input_name), quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
        op_types_to_quantize=QUANTIZED_OPS, nodes_to_exclude=list(exclude), calibrate_method=METHODS[method],
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                       "CalibStridedMinMax": _stride(len(calibration)), "CalibPercentile": percentile,
                       "CalibTensorRangeSymmetric": True,
                       "OpTypesToExcludeOutputQuantization": QUANTIZED_OPS})
    graph = onnx.load(str(out_path), load_external_data=False)
    q = sum(1 for n in graph.graph.node if n.op_type == "QuantizeLinear")
    return {"method": method, "images": int(len(calibration)), "quantizer": f"onnxruntime {ort.__version__}",
            "format": "QDQ, symmetric int8, per-channel weights", "quantize_nodes": q,
            "fp32_nodes": len(exclude), "quantized_op_types": QUANTIZED_OPS}


def integer_ops(onnx_path: Path) -> Dict[str, int]:
    """The integer kernels ONNX Runtime (CPU) runs for a Q/DQ graph, from its optimised graph."""
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        graph = onnx.load(so.optimized_model_filepath, load_external_data=False)
    counts: Dict[str, int] = {}
    for n in graph.graph.node:
        if n.op_type in INTEGER_OPS or n.op_type.startswith("QLinear"):
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts
