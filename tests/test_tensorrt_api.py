"""Every TensorRT call of the builder (export/trt_builder.py) and of the runtime's backend
(runtime/backends/tensorrt_backend.py) exists in the real bindings installed here.

Two bindings install from PyPI without a GPU: ``tensorrt_rtx`` (TensorRT-RTX: builder and
runtime; the builder is also exercised for real by tests/test_tensorrt_rtx.py) and
``tensorrt_lean`` (TensorRT 11's runtime API only). Nothing here deserialises an engine (that
needs a GPU), so the runtime calls are checked by introspection: each attribute the source reads
on a TensorRT object must exist on that object's class in the binding. An attribute the source
only reaches behind a feature probe (``hasattr(x, "name")``) may be missing; a probe must name an
attribute that exists in some TensorRT (here, or in the documented 8.x/10.x API below), so that a
misspelt probe cannot silently switch a feature off.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILDER = ROOT / "export" / "trt_builder.py"
BACKEND = ROOT / "runtime" / "backends" / "tensorrt_backend.py"
# the variable names of each source and the TensorRT class they hold
BUILDER_VARS = {"trt": None, "builder": "Builder", "network": "INetworkDefinition", "parser": "OnnxParser",
                "config": "IBuilderConfig", "profile": "IOptimizationProfile", "layer": "ILayer", "tensor": "ITensor",
                "cache": "ITimingCache", "e": "ParserError", "plan": "IHostMemory"}
BACKEND_VARS = {"trt": None, "runtime": "Runtime", "self.engine": "ICudaEngine", "self.context": "IExecutionContext",
                "config": "IRuntimeConfig", "self.runtime_cache": "IRuntimeCache"}
# Probed names that belong to TensorRT 8.x/10.x only (shared/research/deploy-tooling.md §1.2-1.4, 1.9:
# weak typing and implicit calibration, removed in 11; ``device_memory_size`` became ``_v2`` in 10)
OTHER_VERSIONS = {"EXPLICIT_BATCH", "FP16", "INT8", "OBEY_PRECISION_CONSTRAINTS", "int8_calibrator",
                  "set_calibration_profile", "device_memory_size"}
# reached only when the network is weakly typed (8.5/8.6, or 10.x for FP32 graphs): a binding
# without the FP16 builder flag (11.x, TensorRT-RTX) never gets there
WEAK_TYPING_ONLY = {"precision", "set_output_type"}
# a probed feature and what comes with it (TensorRT 11 has IRuntimeConfig, but no runtime cache)
FEATURES = {"create_runtime_cache": {"IRuntimeCache", "set_runtime_cache"},
            "get_engine_validity": {"EngineValidity", "EngineInvalidityDiagnostics"}}


def _chain(node):
    """'a.b.c' for an attribute/name chain, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id] + parts[::-1])


def calls(source: Path, variables: dict):
    """({(variable, attribute path)} the source reads on TensorRT objects, {names it probes})."""
    tree = ast.parse(source.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    used, probed = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("hasattr", "getattr") \
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
            probed.add(node.args[1].value)
        if isinstance(node, ast.Attribute) and not isinstance(parents.get(node), ast.Attribute):
            chain = _chain(node)
            for var in sorted(variables, key=len, reverse=True):  # self.engine before self
                if chain and chain.startswith(var + "."):
                    used.add((var, chain[len(var) + 1:]))
                    break
    assert used, f"no TensorRT calls found in {source.name}: the test's variable table is stale"
    return used, probed


def missing(trt, source: Path, variables: dict) -> list:
    used, probed = calls(source, variables)
    optional = probed.union(*(FEATURES[p] for p in probed if p in FEATURES))
    weak = hasattr(trt, "BuilderFlag") and hasattr(trt.BuilderFlag, "FP16")
    out = []
    for var, path in sorted(used):
        cls = variables[var]
        if cls is not None and not hasattr(trt, cls):
            if cls not in optional:
                out.append(f"{var} ({cls})")
            continue
        obj = trt if cls is None else getattr(trt, cls)
        for attr in path.split("."):
            if not hasattr(obj, attr):
                if not (attr in optional or (attr in WEAK_TYPING_ONLY and not weak)):
                    out.append(f"{var}.{path}")
                break
            obj = getattr(obj, attr)
    return out


BINDINGS = [pytest.param("tensorrt_rtx", [BUILDER, BACKEND], id="tensorrt_rtx"),
            pytest.param("tensorrt_lean", [BACKEND], id="tensorrt_lean")]


@pytest.mark.parametrize("module,sources", BINDINGS)
def test_every_tensorrt_call_exists_in_the_bindings(module, sources):
    trt = pytest.importorskip(module, reason=f"{module} is not installed (dev extra, x86-64)")
    for source in sources:
        variables = BUILDER_VARS if source == BUILDER else BACKEND_VARS
        absent = missing(trt, source, variables)
        assert not absent, f"{source.name}: not in {module} {trt.__version__}: {absent}"


def test_feature_probes_name_real_attributes():
    """A probe names something that exists in an installed binding or in TensorRT 8.x/10.x."""
    bindings = [pytest.importorskip(m, reason=f"{m} is not installed") for m in ("tensorrt_rtx", "tensorrt_lean")]
    for source in (BUILDER, BACKEND):
        _, probed = calls(source, BUILDER_VARS if source == BUILDER else BACKEND_VARS)
        known = set(OTHER_VERSIONS)
        for trt in bindings:
            known |= set(dir(trt))
            for name in dir(trt):
                known |= set(dir(getattr(trt, name)))
        assert probed <= known, f"{source.name} probes unknown names: {sorted(probed - known)}"


def test_differences_are_feature_detected():
    """TensorRT-RTX and TensorRT differ in features, told apart without a version string."""
    rtx = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is not installed")
    from export.trt_builder import capabilities, default_target

    caps = capabilities(rtx)
    assert caps["strongly_typed"] and caps["compute_capability_targets"]
    assert not (caps["fp16_flag"] or caps["int8_flag"] or caps["explicit_batch_flag"])
    assert not caps["hardware_compatibility"]  # the enum exists, but TensorRT-RTX reports it unsupported
    assert default_target(rtx) == "trt11"
    for source in (BUILDER, BACKEND, ROOT / "runtime" / "trt_env.py", ROOT / "export" / "trt_rtx.py"):
        text = source.read_text()
        assert "__version__ <" not in text and "__version__.split" not in text, source.name
