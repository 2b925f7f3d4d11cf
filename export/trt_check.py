"""Static TensorRT-compatibility check of an ONNX graph, run on every export (no TensorRT needed).

Refuses, naming the node, what the TensorRT ONNX parser of the target cannot build with a dynamic
batch, or builds wrongly:

* an op outside onnx-tensorrt's supported list (``docs/operators.md``; ``LayerNormalization`` only
  from TensorRT 8.6: JetPack 5's 8.5 needs the decomposed form);
* ``Squeeze`` without axes ("Cannot infer squeeze dimensions from a dynamic shape",
  NVIDIA/TensorRT#3420);
* ``ReduceLogSumExp``: lowered without the max shift, it overflows (NVIDIA/TensorRT#4772);
* an antialiased ``Resize`` (not supported by TensorRT's resize layer);
* ops whose output shape depends on the data (NonZero, Unique, ...).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Union

import onnx

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


def find_problems(model: Union[onnx.ModelProto, str, Path], target: str = "trt10") -> List[str]:
    """One line per offending node: '<op> node <name>: <why>'."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    ops = supported_ops(target)
    problems = []
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            where = f"{node.op_type} node {node.name or '<unnamed>'}"
            for a in node.attribute:  # If/Loop/Scan bodies
                if a.type == onnx.AttributeProto.GRAPH:
                    graphs.append(a.g)
            if node.domain not in ("", "ai.onnx"):
                problems.append(f"{where}: custom domain {node.domain!r} needs a TensorRT plugin")
            elif node.op_type in MISCOMPILED:
                problems.append(f"{where}: {MISCOMPILED[node.op_type]}")
            elif node.op_type in DATA_DEPENDENT:
                problems.append(f"{where}: output shape depends on the data")
            elif node.op_type not in ops:
                hint = " (decomposed LayerNorm is used for trt8.5: export with --target trt8.5)" if node.op_type == "LayerNormalization" else ""
                problems.append(f"{where}: not supported by the TensorRT ONNX parser for {target}{hint}")
            elif node.op_type == "Squeeze" and len(node.input) < 2 and _attr(node, "axes") is None:
                problems.append(f"{where}: Squeeze without axes cannot be built with a dynamic batch (NVIDIA/TensorRT#3420)")
            elif node.op_type == "Resize" and _attr(node, "antialias", 0):
                problems.append(f"{where}: antialiased Resize is not supported by TensorRT")
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
