"""TensorRT engine builder for TensorRT 8.5 (JetPack 5) to 11.x and TensorRT-RTX, written against
each version's documented Python API and decided by feature detection, never by a version string
(shared/research/deploy-tooling.md §1, round2-anchors.md §2):

* ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` present (10.x, 11.x, TensorRT-RTX): the ONNX
  tensor types are the precision; the FP16 graph of export/precision.py is built as is.
* absent (8.5/8.6): ``BuilderFlag.FP16`` plus per-layer FP32 constraints on the island layers
  (``OBEY_PRECISION_CONSTRAINTS``).
* ``EXPLICIT_BATCH`` is set where it exists (required for ONNX on 8.x, gone in 11 and RTX).
* compute-capability targets (``IBuilderConfig.num_compute_capabilities``, TensorRT-RTX): the
  engine is compiled ahead of time without a GPU, portable across the targeted GPUs and
  specialised on the device at its first run; TensorRT-RTX keeps the hardware-compatibility enum
  but reports it unsupported, so that switch is offered only where targets are absent.

Optimisation profile from the bundle's batch range (the input's other axes are read from the
parsed network), a timing cache reused across builds, builder optimisation level, workspace
limit, optional version- and hardware-compatible engines. The TensorRT module is passed in
(``tensorrt`` by default, imported inside the functions; ``tensorrt_rtx`` for TensorRT-RTX).

A parser refusal is raised as one line naming the node, its op and the parser's message; a
profile the builder flags as not self-consistent (an axis-less ``Squeeze`` meeting batch 1, say)
fails the build too, since the engine could not run at that batch.
"""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

from runtime.errors import UserError
from runtime.files import atomic_write
from runtime.trt_env import gpu_info


class TensorRTBuildError(UserError, RuntimeError):
    pass


class ParserRefusal(TensorRTBuildError):
    """The ONNX parser refused the graph: ``errors`` holds (node name, op, message) per error."""

    def __init__(self, onnx_path: Path, library: str, errors: List[Tuple[str, str, str]]) -> None:
        self.errors = errors
        node, op, message = errors[0]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        super().__init__(f"{onnx_path}: the {library} ONNX parser refused node {node or '<unnamed>'} "
                         f"({op or 'graph'}): {_one_line(message)}{more}")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _parser_message(desc: str) -> str:
    """The parser's own words: without its 'Invalid Node - <name>' header (the node is named
    already), source locations, and the CUDA error that a machine without a GPU adds to every
    failure (cudaError 35)."""
    lines = [line for line in str(desc).splitlines()
             if line.strip() and not line.startswith("Invalid Node - ") and "cudaError 35" not in line]
    return _without_locations(" ".join(lines) or desc)


def _without_locations(text: str) -> str:
    """One line, without TensorRT's source locations and shape-machine internals."""
    text = _one_line(text).split(" Condition '")[0]
    return re.sub(r"\s*In \w+ at /[^\s)]+", "", text)


def _module(trt):
    if trt is None:
        import tensorrt as trt
    return trt


def library_name(trt) -> str:
    return "TensorRT-RTX" if trt.__name__.startswith("tensorrt_rtx") else "TensorRT"


def capabilities(trt=None) -> Dict[str, bool]:
    """Which build features the given (default: installed) TensorRT has."""
    trt = _module(trt)
    flags = trt.NetworkDefinitionCreationFlag
    cc_targets = hasattr(trt, "ComputeCapability") and hasattr(trt.IBuilderConfig, "num_compute_capabilities")
    return {
        "strongly_typed": hasattr(flags, "STRONGLY_TYPED"),
        "explicit_batch_flag": hasattr(flags, "EXPLICIT_BATCH"),
        "fp16_flag": hasattr(trt.BuilderFlag, "FP16"),
        "int8_flag": hasattr(trt.BuilderFlag, "INT8"),
        "precision_constraints": hasattr(trt.BuilderFlag, "OBEY_PRECISION_CONSTRAINTS"),
        "version_compatible": hasattr(trt.BuilderFlag, "VERSION_COMPATIBLE"),
        "hardware_compatibility": hasattr(trt, "HardwareCompatibilityLevel") and not cc_targets,
        "compute_capability_targets": cc_targets,
    }


def default_target(trt=None) -> str:
    """The static-check target matching the installed TensorRT's features (8.6 brought
    ``VERSION_COMPATIBLE`` and the ``LayerNormalization`` importer together)."""
    caps = capabilities(trt)
    if not caps["strongly_typed"]:
        return "trt8.6" if caps["version_compatible"] else "trt8.5"
    return "trt10" if caps["fp16_flag"] else "trt11"


def _island_matcher(names: Iterable[str]):
    names = list(names)
    if not names:
        return lambda layer_name: False
    # the ONNX parser names a layer after its node, sometimes with a suffix ("_output", " [..]")
    pattern = re.compile("|".join(re.escape(n) + r"(?:$|[\s\[_:]\D)" for n in names))
    return lambda layer_name: bool(pattern.match(layer_name))


def make_logger(trt, verbose: bool = False):
    """A logger that keeps TensorRT's warnings and errors (everything is printed only with
    ``verbose``): a failure is then reported with TensorRT's own words, in one line."""
    kept = {trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR, trt.ILogger.Severity.WARNING}

    class Log(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: List[Tuple[object, str]] = []

        def log(self, severity, msg: str) -> None:
            if severity in kept:
                self.messages.append((severity, msg))
            if verbose:
                print(f"[{library_name(trt)}] {msg}", flush=True)

        def last(self, *severities) -> Optional[str]:
            found = [m for s, m in self.messages if s in severities]
            return found[-1] if found else None

    return Log()


def parse_onnx(trt, onnx_path: Path, logger, strongly_typed: bool = False):
    """(builder, network, parser) for ``onnx_path``; raises ParserRefusal naming the node."""
    caps = capabilities(trt)
    builder = trt.Builder(logger)
    flags = 0
    if caps["explicit_batch_flag"] and not caps["strongly_typed"]:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = []
        for i in range(parser.num_errors):
            e = parser.get_error(i)
            errors.append((e.node_name(), e.node_operator(), _parser_message(e.desc())))
        if not errors:
            errors = [("", "", logger.last(trt.ILogger.Severity.ERROR) or "no error reported")]
        raise ParserRefusal(Path(onnx_path), f"{library_name(trt)} {trt.__version__}", errors)
    return builder, network, parser


def _profile(builder, network, batch: Dict[str, int]):
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = tuple(tensor.shape)
        if any(d < 0 for d in dims[1:]):
            raise TensorRTBuildError(f"input {tensor.name} has a dynamic axis other than the batch: {dims}")
        profile.set_shape(tensor.name, *((batch[k],) + dims[1:] for k in ("min", "opt", "max")))
    return profile


def build_plan(onnx_path: Path, batch: Dict[str, int], precision: str, fp32_nodes: Iterable[str] = (),
               workspace: Optional[int] = None, timing_cache: Optional[Path] = None,
               opt_level: Optional[int] = None, version_compatible: bool = False,
               hardware_compatible: bool = False, calibrator=None, verbose: bool = False,
               trt=None) -> Tuple[memoryview, dict]:
    """Parse and build ``onnx_path``; returns the serialised engine and the facts the manifest records."""
    trt = _module(trt)
    caps = capabilities(trt)
    library = f"{library_name(trt)} {trt.__version__}"
    logger = make_logger(trt, verbose)
    strongly_typed = caps["strongly_typed"] and precision != "fp32"
    t0 = time.perf_counter()
    builder, network, _parser = parse_onnx(trt, onnx_path, logger, strongly_typed)
    parse_s = time.perf_counter() - t0

    config = builder.create_builder_config()
    if workspace:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace))
    if opt_level is not None and hasattr(config, "builder_optimization_level"):
        config.builder_optimization_level = int(opt_level)
    if version_compatible:
        if not caps["version_compatible"]:
            raise TensorRTBuildError(f"{library} cannot build version-compatible engines (TensorRT needs 8.6 or later)")
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if hardware_compatible:
        if not caps["hardware_compatibility"]:
            why = ("its engines are portable across RTX GPUs already" if caps["compute_capability_targets"]
                   else "needs TensorRT 8.6 or later")
            raise TensorRTBuildError(f"{library} cannot build hardware-compatible engines ({why})")
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS

    pinned = 0
    if precision in ("fp16", "int8") and not strongly_typed:
        if not caps["fp16_flag"]:
            raise TensorRTBuildError(f"FP16 needs a strongly typed network or the FP16 builder flag; {library} has neither")
        config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":  # a Q/DQ graph (explicit), or an FP32 graph with the calibrator (implicit)
            config.set_flag(trt.BuilderFlag.INT8)
            if calibrator is not None:
                if not hasattr(config, "int8_calibrator"):
                    raise TensorRTBuildError(f"{library} has no implicit INT8 calibration (removed in TensorRT 11): "
                                             "build the Q/DQ graph instead (without --trt-calibrator)")
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

    profile = _profile(builder, network, batch)
    config.add_optimization_profile(profile)
    if calibrator is not None and hasattr(config, "set_calibration_profile"):
        config.set_calibration_profile(profile)

    if timing_cache is not None:
        data = Path(timing_cache).read_bytes() if Path(timing_cache).is_file() else b""
        config.set_timing_cache(config.create_timing_cache(data), False)

    t1 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    build_s = time.perf_counter() - t1
    profile_text = f"{batch['min']}:{batch['opt']}:{batch['max']}"
    if plan is None:
        why = logger.last(trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR) or "see the log with -v"
        raise TensorRTBuildError(f"{onnx_path}: {library} could not build an engine for batch {profile_text}: "
                                 f"{_without_locations(why)}")
    inconsistent = [m for s, m in logger.messages if "not self-consistent" in m]
    if inconsistent:  # the builder warns, then writes an engine that fails at that batch
        raise TensorRTBuildError(f"{onnx_path}: {library} cannot run the batch profile {profile_text}: "
                                 f"{_without_locations(inconsistent[0])}")
    if timing_cache is not None:
        cache = config.get_timing_cache()
        atomic_write(Path(timing_cache), lambda f: f.write(memoryview(cache.serialize())))
    facts = {
        "library": trt.__name__, "version": trt.__version__,
        "strongly_typed": strongly_typed or not caps["fp16_flag"], "fp32_layers_pinned": pinned,
        "version_compatible": version_compatible,
        "hardware_compatibility": "ampere_plus" if hardware_compatible else "none",
        "builder_optimization_level": opt_level, "workspace": workspace,
        "int8": ("implicit (IInt8EntropyCalibrator2)" if calibrator is not None else "explicit Q/DQ") if precision == "int8" else None,
        "profile": dict(batch), "capabilities": caps, "layers": network.num_layers,
        "parse_s": round(parse_s, 3), "build_s": round(build_s, 3), "engine_bytes": int(plan.nbytes),
    }
    if caps["compute_capability_targets"]:
        n = config.num_compute_capabilities
        # none set: TensorRT-RTX's default targets (compute capability 8.0, 8.6, 8.9, 12.0 and later)
        facts.update(ahead_of_time=True, gpu=None, compute_capability=None,
                     compute_capabilities=[str(config.get_compute_capability(i).name) for i in range(n)] or "default")
    else:
        gpu = gpu_info() or {}
        facts.update(gpu=gpu.get("name"), compute_capability=gpu.get("compute_capability"))
    return memoryview(plan), facts


def build_engine(onnx_path: Path, engine_path: Path, batch: Dict[str, int], precision: str, **options) -> dict:
    """Build and serialise an engine to ``engine_path`` (options: see ``build_plan``); returns the
    facts the manifest records."""
    plan, facts = build_plan(onnx_path, batch, precision, **options)
    atomic_write(engine_path, lambda f: f.write(plan))
    return facts
