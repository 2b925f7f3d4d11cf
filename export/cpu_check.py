"""The graph checks of a CPU bundle (``--target cpu...``), in place of the TensorRT checks: the
graph is valid ONNX and every node has a kernel in the library that runs it.

* ``onnx.checker`` (full check; ONNX Runtime's ``com.microsoft`` ops are outside the ONNX schema
  registry and are checked by the next step);
* ONNX Runtime: each node's (domain, op, opset) is in the CPU execution provider's kernel
  registry; OpenVINO: ``query_model`` on the CPU plugin supports every operation;
* the graph loads into that library's CPU session (ONNX Runtime with optimisations off: the
  portable graph, before any CPU-specific fusion).

A failure raises ``CheckFailed`` naming the nodes, and the bundle is not written.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import onnx

from .bundle_writer import CheckFailed


def _ort_missing_kernels(model: onnx.ModelProto) -> List[str]:
    import onnxruntime.capi.onnxruntime_pybind11_state as ort_state

    kernels: Dict[tuple, List[tuple]] = {}
    for k in ort_state.get_all_opkernel_def():
        if k.provider == "CPUExecutionProvider":
            kernels.setdefault((k.domain or "ai.onnx", k.op_name), []).append(k.version_range)
    opsets = {(o.domain or "ai.onnx"): o.version for o in model.opset_import}
    missing = []
    for n in model.graph.node:
        domain = n.domain or "ai.onnx"
        version = opsets.get(domain, 1)
        if not any(lo <= version <= hi for lo, hi in kernels.get((domain, n.op_type), [])):
            missing.append(f"{n.name or n.op_type} ({domain}::{n.op_type}, opset {version})")
    return missing


def _ort_loads(path: Path) -> None:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _openvino_unsupported(path: Path) -> List[str]:
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path))
    supported = core.query_model(model, "CPU")
    return [f"{op.get_friendly_name()} ({op.get_type_name()})" for op in model.get_ops()
            if op.get_friendly_name() not in supported]


def cpu_graph_checks(path: Path, manifest: dict) -> Dict[str, dict]:
    """The checks' records for the manifest; raises CheckFailed on the first failing check."""
    cpu, backend = manifest["cpu"], manifest["backend"]
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path), load_external_data=False)
    ops = Counter(f"{n.domain + '::' if n.domain else ''}{n.op_type}" for n in model.graph.node)
    if backend == "onnxruntime":
        missing = _ort_missing_kernels(model)
        if missing:
            raise CheckFailed(f"{path}: {len(missing)} nodes have no ONNX Runtime CPU kernel, e.g. "
                              f"{', '.join(missing[:3])} (the bundle was not written)")
        _ort_loads(path)
    elif backend == "openvino":
        unsupported = _openvino_unsupported(path)
        if unsupported:
            raise CheckFailed(f"{path}: OpenVINO's CPU plugin does not support {len(unsupported)} operations, e.g. "
                              f"{', '.join(unsupported[:3])} (the bundle was not written)")
    else:
        raise CheckFailed(f"{path}: a CPU bundle on backend {backend!r}; expected onnxruntime or openvino")
    return {"onnx_checker": {"full_check": True, "passed": True},
            "cpu_graph_check": {"target": cpu["target"], "arch": cpu["arch"], "backend": backend,
                                "nodes": int(sum(ops.values())), "op_types": dict(sorted(ops.items())),
                                "passed": True}}


def run_openvino_graph(path: Path, images: np.ndarray, split: Optional[dict] = None,
                       settings: Optional[dict] = None) -> np.ndarray:
    """Descriptors of an ONNX graph on OpenVINO's CPU plugin with a CPU path's ``settings`` (the
    OpenVINO twin of ``bundle_writer.run_graph``, for the build's parity check)."""
    from runtime.backends.openvino_backend import compile_graph

    names = ["token", "cluster_features", "scores"] if split else ["descriptor"]
    compiled = compile_graph(path, settings=settings)
    result = compiled.create_infer_request().infer({0: images})
    outs = [np.array(result[compiled.output(n)]) for n in names]
    if split:
        from runtime.sinkhorn import salad_aggregate
        return salad_aggregate(*outs, split["dust_bin"], split["iterations"])
    return outs[0]
