"""Graph rewrites for the CPU paths (``--target cpu...``), applied to the exported FP32 graph.

* ``fuse_attention``: each ViT attention, as the TorchScript exporter writes it (qkv -> Reshape
  -> Transpose -> Split -> Squeeze x3 -> scaled Q K^T -> Softmax -> x V -> Transpose ->
  Reshape), becomes one ONNX Runtime ``com.microsoft.MultiHeadAttention`` fed by a Split of the
  qkv projection. ONNX Runtime's own transformer optimizer finds no attention pattern in this
  graph (BENCHMARKS.md §6); without it, the batched per-head MatMuls and their Transposes took
  about a third of an INT8 ViT-B's time at 530 tokens although they are a tenth of its
  multiply-adds (BENCHMARKS.md §12). The fused kernel computes the same softmax attention
  (default scale 1/sqrt(head size), the one timm uses) in FP32.
* ``quantize_dynamic_u8s8``: ONNX Runtime dynamic quantization of the backbone's MatMuls with a
  constant weight: per-output-channel symmetric INT8 weights, activations quantized to UINT8 per tensor at
  run time (no calibration set). U8S8 is the x86 integer GEMM's native form (VNNI ``vpdpbusd``
  multiplies unsigned by signed bytes); ARM's MLAS kernels take it too. Everything else stays
  FP32: LayerNorm, softmax, GELU, the attention products, the patch embedding and the head.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import onnx
from onnx import helper

MS_DOMAIN = "com.microsoft"


def _index(graph: onnx.GraphProto):
    producer = {o: n for n in graph.node for o in n.output}
    consumers: Dict[str, List[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return producer, consumers


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _from(producer, tensor: str, *ops: str) -> Optional[onnx.NodeProto]:
    """The node producing ``tensor`` if it is one of ``ops``."""
    n = producer.get(tensor)
    return n if n is not None and n.op_type in ops else None


def _through_scale(producer, tensor: str, constants) -> Optional[str]:
    """``tensor`` with an optional Mul by a scalar constant peeled off (the exporter scales Q and
    K^T by sqrt(scale) each)."""
    mul = _from(producer, tensor, "Mul")
    if mul is None:
        return tensor
    return mul.input[0] if mul.input[1] in constants else None


def _constant_tensors(graph: onnx.GraphProto, producer) -> set:
    """Tensors whose value does not depend on the graph input (initializers, Constants and
    arithmetic on them: the exporter computes the attention scale with Sqrt/Div on constants)."""
    const = {i.name for i in graph.initializer}
    changed = True
    while changed:
        changed = False
        for n in graph.node:
            if n.output[0] not in const and all(i in const or i == "" for i in n.input) and \
                    n.op_type not in ("Shape",):
                const.update(n.output)
                changed = True
    return const


def fuse_attention(model: onnx.ModelProto, num_heads: int, scope: str = "/backbone/") -> int:
    """Replace each matching attention under ``scope`` by MultiHeadAttention, in place; returns
    how many were fused. Nodes left without consumers are removed."""
    g = model.graph
    producer, consumers = _index(g)
    constants = _constant_tensors(g, producer)
    fused = 0
    new_nodes: Dict[str, List[onnx.NodeProto]] = {}  # inserted before the node named by the key
    for sm in [n for n in g.node if n.op_type == "Softmax" and scope in n.name]:
        if _attr(sm, "axis", -1) not in (-1, 3):
            continue
        qk = _from(producer, sm.input[0], "MatMul")
        av = consumers.get(sm.output[0], [])
        if qk is None or len(av) != 1 or av[0].op_type != "MatMul" or av[0].input[0] != sm.output[0]:
            continue
        av = av[0]
        q = _through_scale(producer, qk.input[0], constants)
        kt = _through_scale(producer, qk.input[1], constants)
        kt_node = _from(producer, kt, "Transpose") if kt else None
        if q is None or kt_node is None or list(_attr(kt_node, "perm", [])) != [0, 1, 3, 2]:
            continue
        squeezes = [_from(producer, t, "Squeeze") for t in (q, kt_node.input[0], av.input[1])]
        if not all(squeezes):
            continue
        splits = {producer.get(s.input[0]).name if producer.get(s.input[0]) else None for s in squeezes}
        split = _from(producer, squeezes[0].input[0], "Split")
        if split is None or len(splits) != 1 or list(split.output) != [s.input[0] for s in squeezes]:
            continue
        perm = _from(producer, split.input[0], "Transpose")
        reshape = _from(producer, perm.input[0], "Reshape") if perm is not None else None
        if reshape is None or list(_attr(perm, "perm", [])) != [2, 0, 3, 1, 4]:
            continue
        out_t = consumers.get(av.output[0], [])
        if len(out_t) != 1 or out_t[0].op_type != "Transpose" or list(_attr(out_t[0], "perm", [])) != [0, 2, 1, 3]:
            continue
        out_r = consumers.get(out_t[0].output[0], [])
        if len(out_r) != 1 or out_r[0].op_type != "Reshape":
            continue
        qkv, base = reshape.input[0], sm.name.rsplit("/", 1)[0]
        parts = [f"{base}/fused_{p}" for p in ("q", "k", "v")]
        new_nodes.setdefault(out_r[0].name, []).extend([
            helper.make_node("Split", [qkv], parts, name=f"{base}/fused_split", axis=2, num_outputs=3)
            if model.opset_import[0].version >= 18 else
            helper.make_node("Split", [qkv], parts, name=f"{base}/fused_split", axis=2),
            helper.make_node("MultiHeadAttention", parts, [out_r[0].output[0]], name=f"{base}/MultiHeadAttention",
                             domain=MS_DOMAIN, num_heads=num_heads),
        ])
        out_r[0].output[0] = f"{out_r[0].output[0]}__unfused"
        fused += 1
    if not fused:
        return 0
    nodes = []
    for n in g.node:
        nodes.extend(new_nodes.get(n.name, []))
        nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    _remove_dead(model)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return fused


def _remove_dead(model: onnx.ModelProto) -> None:
    g = model.graph
    live = {o.name for o in g.output}
    keep = []
    for n in reversed(list(g.node)):
        if any(o in live for o in n.output):
            keep.append(n)
            live.update(n.input)
    del g.node[:]
    g.node.extend(reversed(keep))
    unused = [i for i in g.initializer if i.name not in live]
    for i in unused:
        g.initializer.remove(i)


def quantize_dynamic_u8s8(src: Path, dst: Path, exclude: Sequence[str] = (), scope: str = "/backbone/") -> dict:
    """Dynamic INT8 of the constant-weight MatMuls under ``scope`` (the backbone: the heads are
    about 1 % of the multiply-adds and the most sensitive, calibration/quantize.py) into ``dst``;
    returns the facts for the manifest (which ops were quantized, how many)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src), load_external_data=False)
    weights = {i.name for i in model.graph.initializer}
    chosen = [n.name for n in model.graph.node if n.op_type == "MatMul" and scope in n.name
              and n.input[1] in weights and n.name not in set(exclude)]
    del model
    quantize_dynamic(str(src), str(dst), per_channel=True, weight_type=QuantType.QInt8,
                     op_types_to_quantize=["MatMul"], nodes_to_quantize=chosen,
                     extra_options={"MatMulConstBOnly": True})
    ops = Counter(n.op_type for n in onnx.load(str(dst), load_external_data=False).graph.node)
    return {"mode": "dynamic", "activations": "uint8, per tensor, range measured per inference",
            "weights": "int8, symmetric, per output channel", "quantized_ops": "MatMul with a constant weight",
            "quantized_nodes": int(ops.get("MatMulInteger", 0) + ops.get("DynamicQuantizeMatMul", 0)),
            "fp32_nodes": "LayerNorm, softmax, GELU, attention products, patch embedding, the head (L2 norms, GeM, "
                           "Sinkhorn)"}

