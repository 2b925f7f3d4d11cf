"""PyTorch model -> ONNX: fixed H x W, dynamic batch, then constant folding (Polygraphy), shape
inference and ``onnx.checker``.

The TorchScript-based exporter at opset 17 is the default: with the position embedding baked in
it exports every registry model, is fast, and never emits the opset-18 ``ReduceLogSumExp``
attribute that breaks dynamo exports at opset 17 (shared/research/env-probe.md §4c).

``target='trt8.5'`` (JetPack 5) decomposes LayerNorm into primitive ops, since TensorRT 8.5
cannot import ``LayerNormalization``; the builder pins those layers to FP32.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Dict, List, Sequence

import onnx
import torch
from torch import nn

TWO_GB = 2 * 1024 ** 3
EXTERNAL_DATA = "model.onnx.data"


class DecomposedLayerNorm(nn.Module):
    """LayerNorm as mean / variance / rsqrt, for parsers without ``LayerNormalization``."""

    def __init__(self, ln: nn.LayerNorm) -> None:
        super().__init__()
        self.eps = ln.eps
        self.weight, self.bias = ln.weight, ln.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=-1, keepdim=True)
        centered = x - mean
        var = (centered * centered).mean(dim=-1, keepdim=True)
        return centered * torch.rsqrt(var + self.eps) * self.weight + self.bias


def decompose_layernorms(model: nn.Module) -> int:
    """Replace every nn.LayerNorm in place; returns how many."""
    count = 0
    for name, child in list(model.named_children()):
        if isinstance(child, nn.LayerNorm):
            setattr(model, name, DecomposedLayerNorm(child))
            count += 1
        else:
            count += decompose_layernorms(child)
    return count


class _TupleOutputs(nn.Module):
    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.model, self.names = model, list(names)

    def forward(self, images: torch.Tensor):
        out = self.model(images)
        return tuple(out[n] for n in self.names)


def export_onnx(model: nn.Module, image_size: Sequence[int], output_names: List[str], path: Path,
                opset: int = 17, example_batch: int = 2) -> Path:
    """Export ``model`` to ``path`` (single file; external data beside it only above 2 GB)."""
    path = Path(path)
    wrapped = _TupleOutputs(model, output_names).eval()
    x = torch.zeros(example_batch, 3, *image_size)
    dynamic = {"images": {0: "batch"}, **{n: {0: "batch"} for n in output_names}}
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        raw = Path(tmp) / "raw.onnx"
        with torch.inference_mode():
            torch.onnx.export(wrapped, (x,), str(raw), dynamo=False, opset_version=opset,
                              input_names=["images"], output_names=output_names, dynamic_axes=dynamic,
                              do_constant_folding=True)
        graph = onnx.load(str(raw), load_external_data=True)
        graph = postprocess(graph)
        save_onnx(graph, path)
    check_onnx(path)
    return path


def postprocess(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant folding (Polygraphy, evaluated with ONNX Runtime) and shape inference."""
    from polygraphy.backend.onnx import fold_constants

    model = fold_constants(model, num_passes=2, fold_shapes=True, error_ok=False)
    return onnx.shape_inference.infer_shapes(model)


def save_onnx(model: onnx.ModelProto, path: Path) -> List[Path]:
    """One file, or the graph plus one external-data file when the weights exceed protobuf's 2 GB."""
    path = Path(path)
    if model.ByteSize() < TWO_GB - (64 << 20):
        onnx.save(model, str(path))
        return [path]
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=EXTERNAL_DATA, size_threshold=1024)
    return [path, path.with_name(EXTERNAL_DATA)]


def check_onnx(path: Path) -> None:
    onnx.checker.check_model(str(path), full_check=True)


def io_specs(path: Path) -> Dict[str, Dict[str, dict]]:
    """{'inputs': {name: {shape, dtype}}, 'outputs': {...}} with 'batch' for the dynamic axis."""
    model = onnx.load(str(path), load_external_data=False)

    def spec(values) -> Dict[str, dict]:
        out = {}
        for v in values:
            t = v.type.tensor_type
            shape = [d.dim_param or d.dim_value for d in t.shape.dim]
            out[v.name] = {"shape": shape, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name}
        return out

    return {"inputs": spec(model.graph.input), "outputs": spec(model.graph.output)}
