"""Precision in the graph: an FP16 ONNX with FP32 islands.

TensorRT 11 builds only strongly typed networks (the FP16/INT8 builder flags are gone), so the
tensor types of the ONNX decide the precision (shared/research/deploy-tooling.md §1.3). We convert
weights and activations to FP16 and keep in FP32, behind Casts:

* LayerNormalization and its decomposed form (FP16 LayerNorm overflows in large ViTs,
  NVIDIA/TensorRT#2564), attention softmax;
* every L2 normalisation chain (ReduceL2 -> Clip -> Expand -> Div);
* the modules each method declares (``Method.fp32_scopes`` in its ``export/models/`` file): the
  whole Sinkhorn of SALAD and MegaLoc (FP16 ``exp`` overflows above 11; SALAD's scores do reach
  that), the GeM power means, BoQ's LayerNorms when decomposed.

Inputs and outputs stay FP32. The same island list pins layers to FP32 on TensorRT 8.5/8.6,
where precision still comes from builder flags.
"""
from __future__ import annotations

import copy
import re
from typing import List, Optional, Sequence, Set

import numpy as np
import onnx
from onnx import helper, numpy_helper

ISLAND_OPS = {"LayerNormalization", "Softmax", "ReduceL2", "Pow"}
L2_CHAIN = ("Clip", "Expand", "Div")


def _scope_pattern(scopes: Optional[Sequence[str]]) -> "re.Pattern":
    if scopes is None:  # every registered method's: a scope names one module, so they do not collide
        from .registry import fp32_scopes
        scopes = fp32_scopes()
    return re.compile(r"/(" + "|".join(scopes) + r")/")


def fp32_island_nodes(model: onnx.ModelProto, scopes: Optional[Sequence[str]] = None) -> List[str]:
    """Names of the nodes that must compute in FP32: the island ops, L2 chains, and nodes under
    one of ``scopes`` (module names; default: those of every registered method)."""
    pattern = _scope_pattern(scopes)
    consumers = {}
    for node in model.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    keep: Set[str] = set()
    for node in model.graph.node:
        if node.op_type in ISLAND_OPS or pattern.search(node.name or ""):
            keep.add(node.name)
        if node.op_type == "ReduceL2":  # follow F.normalize: norm -> clamp -> expand -> divide
            frontier = list(node.output)
            while frontier:
                for c in consumers.get(frontier.pop(), []):
                    if c.op_type in L2_CHAIN and c.name not in keep:
                        keep.add(c.name)
                        frontier.extend(c.output)
    return sorted(keep)


def _float_tensors(model: onnx.ModelProto) -> Set[str]:
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    out = {v.name for v in list(g.value_info) + list(g.input) + list(g.output)
           if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    out |= {i.name for i in g.initializer if i.data_type == onnx.TensorProto.FLOAT}
    return out


def _retype_attributes(node: onnx.NodeProto) -> None:
    """Float constants/casts of an FP16 node produce FP16."""
    for a in node.attribute:
        if node.op_type == "Cast" and a.name == "to" and a.i == onnx.TensorProto.FLOAT:
            a.i = onnx.TensorProto.FLOAT16
        elif a.type == onnx.AttributeProto.TENSOR and a.t.data_type == onnx.TensorProto.FLOAT:
            arr = numpy_helper.to_array(a.t).astype(np.float16)
            a.t.CopyFrom(numpy_helper.from_array(arr, a.t.name))


def to_fp16(model: onnx.ModelProto, scopes: Optional[Sequence[str]] = None) -> onnx.ModelProto:
    """FP16 graph with FP32 islands (``fp32_island_nodes``) and FP32 I/O: weights of FP16 nodes are
    stored in FP16, and a Cast is inserted on every float edge that crosses between the two
    precisions."""
    model = copy.deepcopy(model)
    g = model.graph
    for i, node in enumerate(g.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    floats = _float_tensors(model)
    fp32_nodes = set(fp32_island_nodes(model, scopes))
    half = {n.name: n.name not in fp32_nodes for n in g.node}
    consumers: dict = {}
    for n in g.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    # initializers used only by FP16 nodes are stored in FP16
    precision = {}  # float tensor -> True when it is FP16
    for init in g.initializer:
        if init.data_type == onnx.TensorProto.FLOAT:
            users = consumers.get(init.name, [])
            to_half = bool(users) and all(half[u.name] for u in users)
            if to_half:
                arr = numpy_helper.to_array(init).astype(np.float16)
                init.CopyFrom(numpy_helper.from_array(arr, init.name))
            precision[init.name] = to_half
    for v in g.input:
        precision[v.name] = False
    for n in g.node:
        for t in n.output:
            if t in floats:
                precision[t] = half[n.name]
        if half[n.name]:
            _retype_attributes(n)
    # graph outputs stay FP32: an FP16 producer writes to a renamed tensor, a Cast restores the name
    casts = []
    for out in g.output:
        if precision.get(out.name):
            inner = out.name + "__fp16"
            for n in g.node:
                n.output[:] = [inner if t == out.name else t for t in n.output]
                n.input[:] = [inner if t == out.name else t for t in n.input]
            precision[inner] = True
            casts.append(helper.make_node("Cast", [inner], [out.name], to=onnx.TensorProto.FLOAT, name=f"Cast_out_{out.name}"))
    made = {}
    new_nodes = []
    for n in g.node:
        for k, t in enumerate(n.input):
            if t in precision and precision[t] != half[n.name]:
                key = (t, half[n.name])
                if key not in made:
                    made[key] = f"{t}__to{'16' if half[n.name] else '32'}"
                    to = onnx.TensorProto.FLOAT16 if half[n.name] else onnx.TensorProto.FLOAT
                    new_nodes.append(helper.make_node("Cast", [t], [made[key]], to=to, name=f"Cast_{made[key]}"))
                n.input[k] = made[key]
        new_nodes.append(n)
    del g.node[:]
    g.node.extend(new_nodes + casts)
    del g.value_info[:]
    model = onnx.shape_inference.infer_shapes(model)
    return _toposort(model)


def _toposort(model: onnx.ModelProto) -> onnx.ModelProto:
    g = model.graph
    ready = {i.name for i in g.initializer} | {i.name for i in g.input} | {""}
    pending, ordered = list(g.node), []
    while pending:
        rest = []
        for n in pending:
            if all(t in ready for t in n.input):
                ordered.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise ValueError(f"graph has a cycle or a dangling input near node {rest[0].name}")
        pending = rest
    del g.node[:]
    g.node.extend(ordered)
    return model
