"""Static TensorRT-compatibility check of an ONNX graph, run on every export (no TensorRT needed).

Refuses, naming the node, what the TensorRT ONNX parser of the target cannot build with a dynamic
batch, or builds wrongly:

* an op outside onnx-tensorrt's supported list (``docs/operators.md``; ``LayerNormalization`` only
  from TensorRT 8.6: JetPack 5's 8.5 needs the decomposed form);
* ``Squeeze`` without axes ("Cannot infer squeeze dimensions from a dynamic shape",
  NVIDIA/TensorRT#3420);
* ``ReduceLogSumExp``: lowered without the max shift, it overflows (NVIDIA/TensorRT#4772);
* an antialiased ``Resize`` (not supported by TensorRT's resize layer);
* ops whose output shape depends on the data (NonZero, Unique, ...);
* Q/DQ on anything but INT8 or FP8 (E4M3) tensors, e.g. the INT32 bias ``DequantizeLinear`` of
  ONNX Runtime's default quantizer ("input has type Int32 but must have type FP8, FP4, Int4, Int8,
  or UInt8", onnx/onnx-tensorrt#850), and non-zero zero points (TensorRT quantizes symmetrically).

It is the fast first line; export/trt_rtx.py then runs TensorRT's own parser and builder.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Union

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from runtime.errors import UserError

TARGETS = ("trt8.5", "trt8.6", "trt10", "trt11")

# Operators marked supported in onnx-tensorrt docs/operators.md (8.x tables; still supported later).
SUPPORTED = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil
Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace
DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather
GatherElements GatherND Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GRU
HardSigmoid Identity If ImageScaler InstanceNormalization IsNaN LeakyRelu Less LessOrEqual Log
LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean Min Mul Neg Not Or Pad
ParametricSoftplus Pow PRelu QuantizeLinear RandomUniform RandomUniformLike Range ReduceL1 ReduceL2
ReduceLogSum ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize
RNN Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Sigmoid Sign Sin Sinh Size
Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu
Tile TopK Transpose Unsqueeze Upsample Where Xor
""".split())
ADDED = {"trt8.6": {"LayerNormalization", "GroupNormalization"}}
ADDED["trt10"] = ADDED["trt8.6"] | {"Reciprocal", "Mod", "Gelu"}
ADDED["trt11"] = ADDED["trt10"]
DATA_DEPENDENT = {"NonZero", "Unique", "NonMaxSuppression", "Compress"}
QDQ_TYPES = {TensorProto.INT8: "INT8", TensorProto.FLOAT8E4M3FN: "FP8 E4M3"}
MISCOMPILED = {"ReduceLogSumExp": "TensorRT lowers it without the max shift and overflows (NVIDIA/TensorRT#4772); "
                                  "write a max-shifted log-sum-exp"}


class TensorRTCompatibilityError(UserError, ValueError):
    pass


def supported_ops(target: str) -> frozenset:
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; expected one of {TARGETS}")
    return SUPPORTED | ADDED.get(target, set())


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


class _QuantTypes:
    """The element type of the tensors Q/DQ nodes read and write, from initializers, the
    producing QuantizeLinear's zero point (UINT8 without one, as ONNX defines) and shape inference."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.inits = {i.name: i for g in _graphs(model) for i in g.initializer}
        self.value_types = {v.name: v.type.tensor_type.elem_type for g in _graphs(model)
                            for v in list(g.value_info) + list(g.input) + list(g.output)}
        self.quantize_output = {n.output[0]: n for g in _graphs(model) for n in g.node if n.op_type == "QuantizeLinear"}

    def quantized_type(self, node: onnx.NodeProto) -> int:
        """The integer/FP8 type of the node's quantized side (0 when unknown)."""
        if node.op_type == "QuantizeLinear":
            if len(node.input) > 2 and node.input[2]:
                return self._type(node.input[2])
            return _attr(node, "output_dtype", 0) or TensorProto.UINT8
        x = node.input[0]
        if x in self.quantize_output:
            return self.quantized_type(self.quantize_output[x])
        return self._type(x)

    def _type(self, name: str) -> int:
        if name in self.inits:
            return self.inits[name].data_type
        return self.value_types.get(name, 0)

    def nonzero_zero_point(self, node: onnx.NodeProto) -> bool:
        zp = node.input[2] if len(node.input) > 2 else ""
        if zp not in self.inits or self.inits[zp].data_type not in QDQ_TYPES:
            return False
        return bool(np.any(numpy_helper.to_array(self.inits[zp]).astype(np.float32) != 0))


def _graphs(model: onnx.ModelProto) -> List[onnx.GraphProto]:
    out, todo = [], [model.graph]
    while todo:
        g = todo.pop()
        out.append(g)
        todo.extend(a.g for n in g.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH)
    return out


def _qdq_problem(node: onnx.NodeProto, types: _QuantTypes) -> str:
    t = types.quantized_type(node)
    side = "input" if node.op_type == "DequantizeLinear" else "output"
    if t and t not in QDQ_TYPES:
        hint = " (an INT32 bias: quantize with QuantizeBias off, onnx/onnx-tensorrt#850)" if t == TensorProto.INT32 else ""
        return f"{side} is {TensorProto.DataType.Name(t)}; TensorRT takes Q/DQ on INT8 or FP8 tensors only{hint}"
    if types.nonzero_zero_point(node):
        return "non-zero zero point; TensorRT quantizes symmetrically (zero point 0)"
    return ""


def _node_problem(node: onnx.NodeProto, ops: frozenset, target: str, types: _QuantTypes) -> str:
    if node.domain not in ("", "ai.onnx"):
        return f"custom domain {node.domain!r} needs a TensorRT plugin"
    if node.op_type in MISCOMPILED:
        return MISCOMPILED[node.op_type]
    if node.op_type in DATA_DEPENDENT:
        return "output shape depends on the data"
    if node.op_type not in ops:
        hint = " (decomposed LayerNorm is used for trt8.5: export with --target trt8.5)" if node.op_type == "LayerNormalization" else ""
        return f"not supported by the TensorRT ONNX parser for {target}{hint}"
    if node.op_type == "Squeeze" and len(node.input) < 2 and _attr(node, "axes") is None:
        return "Squeeze without axes cannot be built with a dynamic batch (NVIDIA/TensorRT#3420)"
    if node.op_type == "Resize" and _attr(node, "antialias", 0):
        return "antialiased Resize is not supported by TensorRT"
    if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
        return _qdq_problem(node, types)
    return ""


def find_problems(model: Union[onnx.ModelProto, str, Path], target: str = "trt10") -> List[str]:
    """One line per offending node: '<op> node <name>: <why>'."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    ops = supported_ops(target)
    types = _QuantTypes(model)
    problems = []
    for graph in _graphs(model):
        for node in graph.node:
            why = _node_problem(node, ops, target, types)
            if why:
                problems.append(f"{node.op_type} node {node.name or '<unnamed>'}: {why}")
    return problems


def check_graph(model: Union[onnx.ModelProto, str, Path], target: str = "trt10") -> Dict[str, int]:
    """Raise TensorRTCompatibilityError listing every problem; return the op histogram if clean."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    problems = find_problems(model, target)
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... {len(problems) - 20} more" if len(problems) > 20 else ""
        raise TensorRTCompatibilityError(f"graph is not TensorRT-buildable for {target}:\n  {shown}{more}")
    hist: Dict[str, int] = {}
    for node in model.graph.node:
        hist[node.op_type] = hist.get(node.op_type, 0) + 1
    return hist
