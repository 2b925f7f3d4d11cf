"""TensorRT engine builder for TensorRT 8.5 (JetPack 5) to 11.x, written against each version's
documented Python API and decided by feature detection, never by a version string
(shared/research/deploy-tooling.md §1):

* ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` present (10.x, 11.x): the ONNX tensor types
  are the precision; the FP16 graph of export/precision.py is built as is.
* absent (8.5/8.6): ``BuilderFlag.FP16`` plus per-layer FP32 constraints on the island layers
  (``OBEY_PRECISION_CONSTRAINTS``).
* ``EXPLICIT_BATCH`` is set where it exists (required for ONNX on 8.x, gone in 11).

Optimisation profile from the bundle's batch range, a timing cache reused across builds, builder
optimisation level, workspace limit, optional version- and hardware-compatible engines. Imported
only where TensorRT is installed (``tensorrt`` is imported inside the functions).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Iterable, Optional

from runtime.errors import UserError
from runtime.files import atomic_write
from runtime.trt_env import gpu_info


class TensorRTBuildError(UserError, RuntimeError):
    pass


def capabilities(trt=None) -> Dict[str, bool]:
    """Which build features the installed TensorRT has."""
    if trt is None:
        import tensorrt as trt
    flags = trt.NetworkDefinitionCreationFlag
    return {
        "strongly_typed": hasattr(flags, "STRONGLY_TYPED"),
        "explicit_batch_flag": hasattr(flags, "EXPLICIT_BATCH"),
        "fp16_flag": hasattr(trt.BuilderFlag, "FP16"),
        "int8_flag": hasattr(trt.BuilderFlag, "INT8"),
        "precision_constraints": hasattr(trt.BuilderFlag, "OBEY_PRECISION_CONSTRAINTS"),
        "version_compatible": hasattr(trt.BuilderFlag, "VERSION_COMPATIBLE"),
        "hardware_compatibility": hasattr(trt, "HardwareCompatibilityLevel"),
    }


def default_target(trt=None) -> str:
    """The static-check target matching the installed TensorRT's features."""
    caps = capabilities(trt)
    if not caps["strongly_typed"]:
        import tensorrt as trt_mod
        return "trt8.5" if tuple(int(v) for v in trt_mod.__version__.split(".")[:2]) < (8, 6) else "trt8.6"
    return "trt10" if caps["fp16_flag"] else "trt11"


def _island_matcher(names: Iterable[str]):
    names = list(names)
    if not names:
        return lambda layer_name: False
    # the ONNX parser names a layer after its node, sometimes with a suffix ("_output", " [..]")
    pattern = re.compile("|".join(re.escape(n) + r"(?:$|[\s\[_:]\D)" for n in names))
    return lambda layer_name: bool(pattern.match(layer_name))


def build_engine(onnx_path: Path, engine_path: Path, input_name: str, image_size, batch: Dict[str, int],
                 precision: str, fp32_nodes: Iterable[str] = (), workspace: Optional[int] = None,
                 timing_cache: Optional[Path] = None, opt_level: Optional[int] = None,
                 version_compatible: bool = False, hardware_compatible: bool = False,
                 calibrator=None, verbose: bool = False) -> dict:
    """Build and serialise an engine; returns the facts the manifest records."""
    import tensorrt as trt

    caps = capabilities(trt)
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    strongly_typed = caps["strongly_typed"] and precision != "fp32"
    if caps["explicit_batch_flag"] and not caps["strongly_typed"]:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n  ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTBuildError(f"{onnx_path}: the TensorRT ONNX parser failed:\n  {errors}")

    config = builder.create_builder_config()
    if workspace:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace))
    if opt_level is not None and hasattr(config, "builder_optimization_level"):
        config.builder_optimization_level = int(opt_level)
    if version_compatible:
        if not caps["version_compatible"]:
            raise TensorRTBuildError("this TensorRT cannot build version-compatible engines (needs 8.6 or later)")
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if hardware_compatible:
        if not caps["hardware_compatibility"]:
            raise TensorRTBuildError("this TensorRT cannot build hardware-compatible engines (needs 8.6 or later)")
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS

    pinned = 0
    if precision in ("fp16", "int8") and not strongly_typed:
        if not caps["fp16_flag"]:
            raise TensorRTBuildError("FP16 needs a strongly typed network or the FP16 builder flag; this TensorRT has neither")
        config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":  # a Q/DQ graph (explicit), or an FP32 graph with the calibrator (implicit)
            config.set_flag(trt.BuilderFlag.INT8)
            if calibrator is not None:
                config.int8_calibrator = calibrator
        if caps["precision_constraints"]:
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        is_island = _island_matcher(fp32_nodes)
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if is_island(layer.name):
                layer.precision = trt.float32
                for j in range(layer.num_outputs):
                    if layer.get_output(j).dtype in (trt.float32, trt.float16):
                        layer.set_output_type(j, trt.float32)
                pinned += 1

    h, w = image_size
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, (batch["min"], 3, h, w), (batch["opt"], 3, h, w), (batch["max"], 3, h, w))
    config.add_optimization_profile(profile)
    if calibrator is not None and hasattr(config, "set_calibration_profile"):
        config.set_calibration_profile(profile)

    if timing_cache is not None:
        data = Path(timing_cache).read_bytes() if Path(timing_cache).is_file() else b""
        config.set_timing_cache(config.create_timing_cache(data), False)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise TensorRTBuildError(f"{onnx_path}: TensorRT could not build an engine (see the log above)")
    atomic_write(engine_path, lambda f: f.write(memoryview(plan)))
    if timing_cache is not None:
        cache = config.get_timing_cache()
        atomic_write(Path(timing_cache), lambda f: f.write(memoryview(cache.serialize())))
    gpu = gpu_info() or {}
    return {
        "version": trt.__version__, "gpu": gpu.get("name"), "compute_capability": gpu.get("compute_capability"),
        "strongly_typed": strongly_typed, "fp32_layers_pinned": pinned,
        "version_compatible": version_compatible,
        "hardware_compatibility": "ampere_plus" if hardware_compatible else "none",
        "builder_optimization_level": opt_level, "workspace": workspace,
        "int8": ("implicit (IInt8EntropyCalibrator2)" if calibrator is not None else "explicit Q/DQ") if precision == "int8" else None,
        "profile": dict(batch), "capabilities": caps,
    }
