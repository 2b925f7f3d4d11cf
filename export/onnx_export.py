"""PyTorch model -> ONNX: fixed H x W, dynamic batch, then constant folding (Polygraphy), shape
inference and ``onnx.checker``.

Models above protobuf's 2 GB (DINOv2 ViT-g: 1.1 B parameters, 4.5 GB in FP32) keep their weights
in one external-data file beside the graph (``model.onnx.data``); shape inference and the
checker then run on the file (``infer_shapes_path``), never on a serialised copy in memory, and
constant folding reads the weights from disk (``finish_onnx``).

The TorchScript-based exporter at opset 17 is the default: with the position embedding baked in
it exports every registry model, is fast, and never emits the opset-18 ``ReduceLogSumExp``
attribute that breaks dynamo exports at opset 17 (shared/research/env-probe.md §4c).

``target='trt8.5'`` (JetPack 5) decomposes LayerNorm into primitive ops, since TensorRT 8.5
cannot import ``LayerNormalization``; the builder pins those layers to FP32.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import Dict, Iterator, List, Sequence

import onnx
import torch
from google.protobuf.message import EncodeError
from torch import nn

TWO_GB = 2 * 1024 ** 3
EXTERNAL_DATA = "model.onnx.data"
# serialised size above which the weights go to EXTERNAL_DATA (a margin under protobuf's limit);
# tests lower it to exercise the large-model path on a small model
EXTERNAL_DATA_ABOVE = TWO_GB - (64 << 20)


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
                opset: int = 17, example_batch: int = 2, verbose: bool = False) -> Path:
    """Export ``model`` to ``path`` (one file; the weights in an external-data file beside it only
    above 2 GB). ``verbose`` shows the tracer's and Polygraphy's notes. The two steps on their own
    (``trace_to_onnx``, ``finish_onnx``) let a caller free the PyTorch model in between."""
    path = Path(path)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        raw = trace_to_onnx(model, image_size, output_names, Path(tmp), opset, example_batch, verbose)
        finish_onnx(raw, path, verbose)
    return path


def trace_to_onnx(model: nn.Module, image_size: Sequence[int], output_names: List[str], folder: Path,
                  opset: int = 17, example_batch: int = 2, verbose: bool = False) -> Path:
    """The TorchScript exporter's graph in ``folder`` (``raw.onnx``; above 2 GB torch writes the
    weights beside it)."""
    raw = Path(folder) / "raw.onnx"
    wrapped = _TupleOutputs(model, output_names).eval()
    x = torch.zeros(example_batch, 3, *image_size)
    dynamic = {"images": {0: "batch"}, **{n: {0: "batch"} for n in output_names}}
    with torch.inference_mode(), warnings.catch_warnings():
        if not verbose:  # timm's shape asserts are constants at a fixed size: the warning is expected
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(wrapped, (x,), str(raw), dynamo=False, opset_version=opset,
                          input_names=["images"], output_names=output_names, dynamic_axes=dynamic,
                          do_constant_folding=True)
    return raw


def finish_onnx(raw: Path, path: Path, verbose: bool = False) -> Path:
    """Constant folding, shape inference and the checker, from the exporter's graph to ``path``.

    The weights stay on disk while Polygraphy folds: the graph is re-saved with its weights in an
    external file beside ``raw`` and folded without them (read lazily, only where a fold needs a
    value), so memory holds the weights once, at the final save (ViT-g: 4.5 GB, not 3-4 copies)."""
    raw, path = Path(raw), Path(path)
    work = raw.parent
    model = onnx.load(str(raw), load_external_data=True)
    onnx.save(model, str(work / "weights.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.onnx.data", size_threshold=1024)  # also drops the weights from memory
    del model
    graph = onnx.load(str(work / "weights.onnx"), load_external_data=False)
    with _working_dir(work):  # external data resolves relative to the working directory while folding
        graph = fold_constants(graph, verbose)
    onnx.load_external_data_for_model(graph, str(work))
    save_onnx(graph, path)
    del graph
    infer_shapes_file(path)
    check_onnx(path)
    return path


@contextlib.contextmanager
def _working_dir(folder: Path) -> Iterator[None]:
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def fold_constants(model: onnx.ModelProto, verbose: bool = False) -> onnx.ModelProto:
    """Constant folding by Polygraphy (evaluated with ONNX Runtime); its log only with ``verbose``."""
    from polygraphy.backend.onnx import fold_constants as fold
    from polygraphy.logger import G_LOGGER

    G_LOGGER.colors = False  # no hint to install the 'colored' module
    G_LOGGER.module_severity = G_LOGGER.INFO if verbose else G_LOGGER.ERROR
    return fold(model, num_passes=2, fold_shapes=True, error_ok=False)


def infer_shapes_file(path: Path) -> None:
    """Shape inference by path (works above 2 GB: the weights are never serialised in memory)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.shapes.tmp")
    try:
        onnx.shape_inference.infer_shapes_path(str(path), str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_onnx(model: onnx.ModelProto, path: Path) -> List[Path]:
    """One file, or the graph plus one external-data file when the weights exceed protobuf's 2 GB.
    A data file left at ``path`` by an earlier save is removed first (onnx appends to it)."""
    path = Path(path)
    data = path.with_name(EXTERNAL_DATA)
    if data.exists():
        data.unlink()
    if _serialised_size(model) < EXTERNAL_DATA_ABOVE:
        onnx.save(model, str(path))
        return [path]
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=EXTERNAL_DATA, size_threshold=1024)
    return [path, data]


def _serialised_size(model: onnx.ModelProto) -> int:
    """The model's protobuf size; above 2 GB protobuf cannot even compute it (EncodeError)."""
    try:
        return model.ByteSize()
    except EncodeError:
        return TWO_GB


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
