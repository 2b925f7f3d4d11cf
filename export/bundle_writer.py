"""Writing a bundle, shared by ``python export/build_engine.py`` and ``python -m calibration
quantize``: both stage the bundle beside its output, run the same checks on the graph that ships,
and put the folder in place whole. Torch-free (onnx, ONNX Runtime, numpy).

The checks, each with a threshold that fails the build when missed (the bundle is then not
written and the previous one stays):

* ``onnx.checker`` (full check, by path: also above 2 GB);
* the static TensorRT check for the manifest's target (``export/trt_check.py``): no problem;
* wherever TensorRT-RTX imports: TensorRT's own ONNX parser and ahead-of-time builder on the graph
  with the bundle's batch profile (``export/trt_rtx.py``): it parses and builds;
* parity: cosine of the shipped graph's descriptors (ONNX Runtime, CPU) to a reference on sample
  images, the minimum over the images, at least ``PARITY_MIN_COSINE[precision]``. The reference
  is the PyTorch model (build_engine) or the FP32 source bundle's graph (quantize).

Output folders (``runtime.files``): an existing output that is not a previous bundle, or that
also holds other files, is refused; a previous bundle is swapped out atomically, never leaving
the path missing.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import platform
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import numpy as np
import onnx

from runtime.bundle import (
    CALIBRATION_CACHE,
    Bundle,
    bundle_file_names,
    describe,
    file_entry,
    read_manifest,
    verify_files,
    write_manifest,
)
from runtime.compare import row_cosine
from runtime.errors import UserError
from runtime.files import check_output_dir, replace_dir, staging_dir

from .trt_check import check_graph

# min cosine over the sample images, shipped graph vs reference, with a wide margin under what was
# measured at full depth (BENCHMARKS.md §7): FP32 differs only by kernel rounding (1 - 1e-12);
# FP16 keeps LayerNorm, softmax and Sinkhorn in FP32 islands (>= 0.9999998); INT8 quantizes the
# MatMul/Gemm/Conv inputs only (>= 0.9998 with the official fixture's SALAD weights).
# bf16 (OpenVINO's inference precision on CPU) is FP16-class: the same 0.999.
PARITY_MIN_COSINE = {"fp32": 0.99999, "fp16": 0.999, "bf16": 0.999, "int8": 0.99}
ONNX, ENGINE = "model.onnx", "engine.plan"


class CheckFailed(UserError):
    """A build check missed its threshold; the message gives the measured value."""


def parity(reference: np.ndarray, got: np.ndarray, precision: str, against: str) -> dict:
    """The parity record for the manifest; raises CheckFailed below the precision's threshold."""
    cos = row_cosine(np.asarray(reference, np.float32), np.asarray(got, np.float32))
    threshold = PARITY_MIN_COSINE[precision]
    record = {"against": against, "images": int(len(cos)), "min_cosine": float(cos.min()),
              "mean_cosine": float(cos.mean()), "max_abs": float(np.abs(reference - got).max()),
              "threshold": threshold}
    if not record["min_cosine"] >= threshold:  # NaN fails too
        raise CheckFailed(f"parity check failed: the {precision} graph's descriptors vs {against} on "
                          f"{record['images']} images: min cosine {record['min_cosine']:.6f} < {threshold} "
                          "(the bundle was not written)")
    return record


def run_graph(path: Path, images: np.ndarray, split: Optional[dict] = None) -> np.ndarray:
    """Descriptors of an ONNX graph on ONNX Runtime (CPU); a split SALAD graph is finished by the
    runtime's numpy Sinkhorn, as the runtime does."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    if split:
        from runtime.sinkhorn import salad_aggregate
        token, feats, scores = session.run(["token", "cluster_features", "scores"], {"images": images})
        return salad_aggregate(token, feats, scores, split["dust_bin"], split["iterations"])
    return session.run(["descriptor"], {"images": images})[0]


def graph_target(manifest: dict) -> str:
    """The TensorRT generation a bundle's graph was exported for (bundles that predate the field: trt10)."""
    return manifest.get("export", {}).get("target", "trt10")


def graph_checks(path: Path, manifest: dict) -> Dict[str, dict]:
    """onnx.checker, the static TensorRT check and, wherever TensorRT-RTX imports, TensorRT's own
    parser and ahead-of-time builder on the graph that ships (a TensorRT-RTX bundle's engine build
    is that check already). A CPU bundle gets the CPU graph checks instead (export/cpu_check.py)."""
    if manifest.get("cpu"):
        from .cpu_check import cpu_graph_checks
        return cpu_graph_checks(path, manifest)
    from .trt_rtx import rtx_check

    target = graph_target(manifest)
    onnx.checker.check_model(str(path), full_check=True)
    ops = check_graph(str(path), target)
    checks = {"onnx_checker": {"full_check": True, "passed": True},
              "tensorrt_static_check": {"target": target, "problems": 0, "nodes": int(sum(ops.values())),
                                        "op_types": ops, "passed": True}}
    if manifest["backend"] != "tensorrt-rtx":
        entry = rtx_check(path, manifest["batch"], manifest["precision"], manifest["export"].get("fp32_nodes", []))
        if entry is not None:
            checks["tensorrt_rtx"] = entry
    return checks


def external_data_files(path: Path) -> List[str]:
    """Names of the external-data files a graph refers to (none below 2 GB)."""
    model = onnx.load(str(path), load_external_data=False)
    names = set()
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            names.update(e.value for e in t.external_data if e.key == "location")
    return sorted(names)


class StagedBundle:
    """A bundle being written into ``dir``, a staging folder beside ``output``."""

    def __init__(self, folder: Path, output: Path) -> None:
        self.dir, self.output = folder, output

    @property
    def onnx(self) -> Path:
        return self.dir / ONNX

    def publish(self, manifest: dict) -> Path:
        """Check the graph, hash every file into the manifest, verify the folder as the runtime
        will, and put it at ``output``. Returns ``output``."""
        manifest.setdefault("checks", {}).update(graph_checks(self.onnx, manifest))
        files = {"onnx": file_entry(self.onnx)}
        for i, name in enumerate(external_data_files(self.onnx)):
            files["onnx_data" if i == 0 else f"onnx_data_{i}"] = file_entry(self.dir / name)
        for role, name in (("engine", ENGINE), ("calibration_cache", CALIBRATION_CACHE)):
            if (self.dir / name).exists():
                files[role] = file_entry(self.dir / name)
        stray = sorted({p.name for p in self.dir.iterdir()} - {e["name"] for e in files.values()})
        if stray:
            raise RuntimeError(f"staged bundle holds files no manifest entry lists: {stray}")
        manifest["files"] = files
        mode = _file_mode()
        for entry in files.values():  # writers differ (onnx saves external data 0600): one mode for all
            os.chmod(self.dir / entry["name"], mode)
        if manifest["backend"] == "onnxruntime":
            manifest["onnxruntime"] = {"graph_optimization": "ORT_ENABLE_ALL, applied at session creation (portable)"}
        else:
            manifest.pop("onnxruntime", None)
        manifest["build"] = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                             "host": platform.node(), "platform": platform.platform(),
                             "python": platform.python_version()}
        write_manifest(self.dir, manifest)
        verify_files(self.dir, read_manifest(self.dir))
        replace_dir(self.dir, self.output)
        return self.output


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def stage_bundle(output: Path) -> Iterator[StagedBundle]:
    """Refuse an output that is not a previous bundle (or holds more than one); yield the staged
    bundle; on leaving, remove the staging folder (a failed build's files, or the bundle that
    ``publish`` replaced)."""
    output = check_output_dir(output, "bundle", bundle_file_names)
    with staging_dir(output) as folder:
        yield StagedBundle(folder, output)


def summary_lines(bundle: Bundle) -> List[str]:
    """What the build made and the checks it passed, with the measured values."""
    m = bundle.manifest
    lines = describe(bundle)
    for role, entry in m["files"].items():
        lines.append(f"  {role}: {entry['name']} {entry['size'] / 1e6:.1f} MB sha256 {entry['sha256'][:12]}")
    checks = m.get("checks", {})
    passed = ["manifest and sha256 verified"]
    if "onnx_checker" in checks:
        passed.append("onnx.checker (full)")
    cpu = checks.get("cpu_graph_check")
    if isinstance(cpu, dict):
        passed.append(f"CPU graph check for {cpu['target']} on {cpu['backend']}: every one of {cpu['nodes']} nodes "
                      "has a kernel")
    static = checks.get("tensorrt_static_check")
    if isinstance(static, dict):
        passed.append(f"TensorRT static check for {static['target']}: 0 problems in {static['nodes']} nodes")
    if "tensorrt_rtx" in checks:
        from .trt_rtx import describe_check
        passed.append(describe_check(checks["tensorrt_rtx"]))
    for name, rec in checks.items():
        if name.startswith("parity_") and isinstance(rec, dict):
            passed.append(f"parity vs {rec['against']} on {rec['images']} images: min cosine {rec['min_cosine']:.7f} "
                          f">= {rec['threshold']} (mean {rec['mean_cosine']:.7f}, max |diff| {rec['max_abs']:.1e})")
    lines.append("  checks passed: " + "; ".join(passed))
    calib = m.get("calibration")
    if calib and "integer_ops" in calib:
        lines.append(f"  ONNX Runtime integer kernels: {calib['integer_ops'] or 'none (dequantised FP32 on CPU)'}")
    return lines
