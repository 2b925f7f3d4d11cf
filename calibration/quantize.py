"""Explicit INT8 quantization: a Q/DQ ONNX graph calibrated on real images with ONNX Runtime,
laid out the way TensorRT builds it.

Why ONNX Runtime's quantizer rather than NVIDIA ModelOpt: ModelOpt pins ``onnx~=1.21`` and
``onnxruntime-gpu`` (and pulls torch and cupy), which conflicts with this environment
(shared/research/env-probe.md §3), while ONNX Runtime is already the runtime's dependency, runs on
CPU anywhere (the device included), and offers the calibration methods asked for (entropy,
minmax, percentile). We ask it for ModelOpt's INT8 layout (``modelopt/onnx/quantization``:
``ort_utils.configure_ort``, ``int8.py``), which is what TensorRT's parser accepts and fuses:

* Q/DQ on INT8 tensors only: symmetric INT8 activations (zero point 0, one scale per tensor) and
  per-output-channel symmetric INT8 weights (stored INT8, behind a DequantizeLinear);
* biases stay FP32 (``QuantizeBias: False``): an INT32 bias DequantizeLinear is refused by the
  TensorRT parser ("input has type Int32 but must have type FP8, FP4, Int4, Int8, or UInt8",
  onnx/onnx-tensorrt#850), and TensorRT fuses the FP32 bias into the GEMM/convolution anyway;
* only the inputs of the backbone's MatMul / Gemm / Conv are quantized (patch embedding, QKV,
  attention products, projection, MLP, adapters), never their outputs: TensorRT fuses a Q into
  the op that produces its input (LayerNorm, GELU, softmax) and the DQ into the GEMM;
* the attention products (both inputs activations) only while the sequence is at most 512
  tokens, ModelOpt's rule for INT8 fused attention: 224² (257 tokens) quantizes them, 322² (530
  tokens) leaves them FP32.

Kept FP32: LayerNorm, softmax, L2 normalisations, GeM (``export.precision.fp32_island_nodes``)
and the heads. The heads are small (about 1 % of a ViT-B's multiply-adds) and sensitive:
CricaVPR's cross-image encoder reads the class token beside 13 GeM vectors of L2-normalised
patch tokens, about 30 times smaller, and one per-tensor INT8 scale set by the class token
leaves them a handful of levels (min cosine to FP32 0.93 with the encoder quantized, 0.99996
without it, depth-1 random weights on the sample images).

ONNX Runtime runs the same graph on CPU with integer kernels (MatMulIntegerToFloat, ...):
``integer_ops`` checks the optimised graph. So one graph serves both backends, and the precision
report measures the graph TensorRT builds.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

METHODS = {"entropy": CalibrationMethod.Entropy, "minmax": CalibrationMethod.MinMax,
           "percentile": CalibrationMethod.Percentile}
QUANTIZED_OPS = ["MatMul", "Gemm", "Conv"]
QUANTIZED_SCOPE = "/backbone/"
MAX_MHA_SEQUENCE = 512  # ModelOpt's INT8 limit for Q/DQ on the attention products
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


def _shapes(model: onnx.ModelProto) -> Dict[str, list]:
    g = onnx.shape_inference.infer_shapes(model).graph
    return {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
            for v in list(g.value_info) + list(g.input) + list(g.output)}


def nodes_to_quantize(model: onnx.ModelProto, exclude: Sequence[str] = ()) -> Dict[str, List[str]]:
    """{'quantize': names, 'attention_fp32': names}: the backbone's MatMul/Gemm/Conv nodes whose
    inputs get Q/DQ, and the attention products left FP32 because the sequence is too long."""
    excluded = set(exclude)
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    shapes = _shapes(model)
    chosen, attention_fp32 = [], []
    for node in model.graph.node:
        if node.op_type not in QUANTIZED_OPS or QUANTIZED_SCOPE not in node.name or node.name in excluded:
            continue
        if node.op_type == "MatMul" and not any(i in constants for i in node.input):
            seq = (shapes.get(node.input[0]) or [None, None])[-2]
            if not isinstance(seq, int) or seq > MAX_MHA_SEQUENCE:
                attention_fp32.append(node.name)
                continue
        chosen.append(node.name)
    return {"quantize": chosen, "attention_fp32": attention_fp32}


def quantize_onnx(fp32_path: Path, out_path: Path, calibration: np.ndarray, method: str = "entropy",
                  exclude: Sequence[str] = (), percentile: float = 99.999) -> dict:
    """Write the Q/DQ graph of ``fp32_path`` to ``out_path``; returns facts for the manifest."""
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; expected one of {sorted(METHODS)}")
    model = onnx.load(str(fp32_path), load_external_data=False)
    input_name = model.graph.input[0].name
    placement = nodes_to_quantize(model, exclude)
    del model
    if not placement["quantize"]:
        raise ValueError(f"{fp32_path}: no backbone MatMul/Gemm/Conv node to quantize "
                         f"(node names must contain {QUANTIZED_SCOPE!r})")
    quantize_static(
        str(fp32_path), str(out_path), _Reader(calibration, input_name), quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
        op_types_to_quantize=QUANTIZED_OPS, nodes_to_quantize=placement["quantize"],
        calibrate_method=METHODS[method],
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                       "CalibStridedMinMax": _stride(len(calibration)), "CalibPercentile": percentile,
                       "CalibTensorRangeSymmetric": True,
                       "OpTypesToExcludeOutputQuantization": QUANTIZED_OPS})
    graph = onnx.load(str(out_path), load_external_data=False)
    q = sum(1 for n in graph.graph.node if n.op_type == "QuantizeLinear")
    return {"method": method, "images": int(len(calibration)), "quantizer": f"onnxruntime {ort.__version__}",
            "format": "QDQ, symmetric int8 activations, per-channel int8 weights, FP32 biases",
            "placement": f"inputs of the backbone's {'/'.join(QUANTIZED_OPS)} (ModelOpt's layout); heads FP32",
            "quantize_nodes": q, "quantized_nodes": len(placement["quantize"]),
            "attention_fp32": len(placement["attention_fp32"]),
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
