"""The build's API: ``build_bundle(BuildConfig(...)) -> Path`` of the bundle folder.

    from export.build import BuildConfig, build_bundle
    build_bundle(BuildConfig(model="salad-dinov2-vitb14", checkpoint="dino_salad.ckpt",
                             precision="fp16", output=Path("engines/salad-fp16")))

Two sources: a registry model (PyTorch -> ONNX -> precision in the graph; needs torch) or an
exported bundle's graph (``from_bundle``; never imports torch, for the target device). Then a
TensorRT engine where the backend is TensorRT. Every step takes what it needs and returns what it
made; the bundle is written by ``export.bundle_writer`` (staged, checked, swapped into place).
``python export/build_engine.py`` is the command line on this.

To add a backend or a build target: a value in ``BACKENDS`` (runtime.bundle) or ``TARGETS``
(export.trt_check), its availability in ``resolve_backend``, and its step beside ``add_engine``.
CPU targets (``--target cpu``, ``cpu-x86-avx2``, ``cpu-x86-avx512``, ``cpu-arm``) choose their
library and precision together (``export.cpu_target``) and rewrite the FP32 graph for it
(``export.cpu_graph``).
"""
from __future__ import annotations

import dataclasses
import gc
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from runtime.bundle import (
    BACKENDS,
    CALIBRATION_CACHE,
    ENGINE_BACKENDS,
    PRECISIONS,
    BundleError,
    read_manifest,
    verify_files,
)
from runtime.errors import OptionError, PathError
from runtime.preprocess import list_images
from runtime.trt_env import cuda_python_available, gpu_info, tensorrt_version

from .bundle_writer import ENGINE, StagedBundle, graph_target, parity, run_graph, stage_bundle
from .cpu_target import CPU_TARGETS, CpuPath, choose_path, target_cpu
from .registry import ImageSize
from .trt_check import TARGETS, find_problems

FORMAT_VERSION = 1
DEFAULT_OPSET = 17
# TensorRT generations in order: a graph checked for one builds on the same or a later one
GENERATION = {"trt8.5": 0, "trt8.6": 1, "trt10": 2, "trt11": 2}
SAMPLE_DATA = Path(__file__).resolve().parents[1] / "data"


@dataclass(frozen=True)
class BatchProfile:
    """The optimisation profile of the dynamic batch axis: 1 <= min <= opt <= max."""

    min: int = 1
    opt: int = 8
    max: int = 32

    def __post_init__(self) -> None:
        if not all(isinstance(v, int) for v in (self.min, self.opt, self.max)) or \
                not 1 <= self.min <= self.opt <= self.max:
            raise OptionError(f"batch profile {self.min}:{self.opt}:{self.max}: expected 1 <= MIN <= OPT <= MAX")

    @classmethod
    def parse(cls, text: str) -> "BatchProfile":
        """``MIN:OPT:MAX`` or one number for all three."""
        try:
            values = [int(p) for p in text.split(":")]
        except ValueError:
            raise OptionError(f"--batch {text!r}: expected MIN:OPT:MAX, e.g. 1:8:32") from None
        if len(values) == 1:
            values *= 3
        if len(values) != 3:
            raise OptionError(f"--batch {text!r}: expected MIN:OPT:MAX, e.g. 1:8:32")
        return cls(*values)

    def to_dict(self) -> Dict[str, int]:
        return {"min": self.min, "opt": self.opt, "max": self.max}


@dataclass(frozen=True)
class CalibrationConfig:
    """INT8: real place images to calibrate on (sampled over each whole sequence)."""

    images: Tuple[Path, ...] = ()
    count: int = 500
    method: str = "entropy"
    seed: int = 0
    trt_calibrator: bool = False  # TensorRT 8.x implicit calibration instead of the Q/DQ graph


@dataclass(frozen=True)
class TensorRTConfig:
    """TensorRT builder settings (ignored by other backends)."""

    workspace: Optional[int] = None
    timing_cache: Optional[Path] = None
    opt_level: Optional[int] = None
    version_compatible: bool = False
    hardware_compatible: bool = False


@dataclass(frozen=True)
class BuildConfig:
    """What to build. Exactly one source: ``model`` (with ``checkpoint`` or ``random_weights``)
    or ``from_bundle``. ``None`` means the default: precision fp16 from a model, the graph's own
    from a bundle; batch 1:8:32 from a model, the bundle's own from a bundle; target the installed
    TensorRT's, else trt10; output engines/<model>-<precision>, or the source bundle itself. A CPU
    ``target`` (``export.cpu_target.CPU_TARGETS``) chooses backend and precision itself."""

    model: Optional[str] = None
    checkpoint: Optional[str] = None
    random_weights: bool = False
    from_bundle: Optional[Path] = None
    precision: Optional[str] = None
    backend: str = "auto"
    batch: Optional[BatchProfile] = None
    image_size: Optional[ImageSize] = None  # N, (H, W) or 'HxW'
    opset: Optional[int] = None
    target: Optional[str] = None
    split: bool = False
    skip_parity: bool = False
    output: Optional[Path] = None
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    tensorrt: TensorRTConfig = field(default_factory=TensorRTConfig)
    depth: Optional[int] = None  # reduced depth: tests and quick experiments only
    verbose: bool = False

    def validate(self) -> None:
        """Refuse combinations that cannot work, naming the options."""
        if (self.model is None) == (self.from_bundle is None):
            raise OptionError("give exactly one source: --model NAME or --from-bundle DIR")
        if self.backend not in ("auto",) + BACKENDS:
            raise OptionError(f"--backend {self.backend!r}: expected auto or one of {', '.join(BACKENDS)}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise OptionError(f"--precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        if self.target is not None and self.target not in TARGETS + CPU_TARGETS:
            raise OptionError(f"--target {self.target!r}: expected one of {', '.join(TARGETS + CPU_TARGETS)}")
        if not self.cpu_target and (self.backend == "openvino" or self.precision == "bf16"):
            raise OptionError(f"{'--backend openvino' if self.backend == 'openvino' else '--precision bf16'}: a CPU "
                              "path; build it with --target cpu (or cpu-x86-avx2, cpu-x86-avx512, cpu-arm)"
                              + (" --backend openvino" if self.backend == "openvino" else ""))
        if self.cpu_target:
            if self.precision is not None:
                raise OptionError(f"--precision {self.precision} with --target {self.target}: a CPU target chooses the "
                                  "precision with the path it measures fastest for that CPU; leave --precision out")
            if self.backend not in ("auto", "onnxruntime", "openvino"):
                raise OptionError(f"--backend {self.backend} with --target {self.target}: a CPU target runs on "
                                  "onnxruntime or openvino (or auto)")
        if self.model is not None:
            if (self.checkpoint is None) == (not self.random_weights):
                raise OptionError("--model needs --checkpoint PATH|URL or --random-weights")
            if self.precision == "int8" and not self.calibration.images:
                raise OptionError("--precision int8 needs --calibration-images DIR (real place images, e.g. the map's own)")
        else:
            read_manifest(self.from_bundle)  # a missing or broken source is named before anything else
            given = [name for name, value in (("--checkpoint", self.checkpoint), ("--random-weights", self.random_weights),
                                              ("--image-size", self.image_size), ("--opset", self.opset),
                                              ("--target", self.target), ("--split", self.split), ("--depth", self.depth))
                     if value]
            if given:
                raise OptionError(f"{', '.join(given)}: export options, not used with --from-bundle (its graph is "
                                  "already exported); re-export with --model to change them")
        for folder in self.calibration.images:  # before a long export, not after it
            if not list_images(folder):
                raise PathError(f"{folder}: no images found; --calibration-images needs real place images")

    @property
    def cpu_target(self) -> bool:
        return self.target in CPU_TARGETS

    def output_path(self) -> Path:
        if self.output is not None:
            return Path(self.output)
        if self.from_bundle is not None:
            return Path(self.from_bundle)
        return Path("engines") / f"{self.model}-{self.target if self.cpu_target else self.precision or 'fp16'}"


def log(message: str) -> float:
    """A build step on stderr (the build's progress); returns the time, for durations."""
    print(f"[build] {message}", file=sys.stderr, flush=True)
    return time.time()


def resolve_backend(requested: str) -> Tuple[str, str]:
    """(backend, why): auto is TensorRT where it imports, cuda-python too, and a GPU answers;
    tensorrt-rtx builds anywhere TensorRT-RTX imports (ahead of time)."""
    if requested == "onnxruntime":
        return "onnxruntime", "requested"
    if requested == "tensorrt-rtx":
        from .trt_rtx import require_rtx
        return "tensorrt-rtx", (f"TensorRT-RTX {require_rtx().__version__}: an ahead-of-time engine for RTX GPUs, "
                                "no GPU needed here")
    trt_version, gpu = tensorrt_version(), gpu_info()
    if trt_version and gpu:
        return "tensorrt", f"TensorRT {trt_version} and {gpu['name']} found"
    if not trt_version:
        why = "TensorRT does not import"
    elif not cuda_python_available():
        why = "cuda-python is not installed (pip install cuda-python; TensorRT bundles need it)"
    else:
        why = "no usable CUDA GPU"
    if requested == "tensorrt":
        raise OptionError(f"--backend tensorrt: {why} on this machine. Build the bundle with --backend onnxruntime "
                          "here, then run --from-bundle DIR --backend tensorrt on the target device")
    return "onnxruntime", f"{why}: using ONNX Runtime (CPU)"


def installed_target() -> str:
    """The static-check target of the installed TensorRT (feature-detected)."""
    from .trt_builder import default_target
    return default_target()


def trt_strongly_typed() -> bool:
    from .trt_builder import capabilities
    return capabilities()["strongly_typed"]


def build_bundle(config: BuildConfig) -> Path:
    """Build the bundle ``config`` asks for; returns its folder. A failure leaves any previous
    bundle at the output untouched."""
    config.validate()
    with stage_bundle(config.output_path()) as staged:
        cpu_path = None
        if config.cpu_target:
            cpu = target_cpu(config.target)
            cpu_path = choose_path(cpu, config.backend)
            backend = cpu_path.backend
            log(f"CPU path for {config.target} ({cpu.arch}; {cpu.model}): {cpu_path.name} ({cpu_path.why})")
        else:
            backend, why = resolve_backend(config.backend)
            log(f"backend: {backend} ({why})")
        if config.from_bundle is not None:
            manifest, calibration_data = _from_bundle(config, staged, backend)
        else:
            manifest, calibration_data = _from_model(config, staged, backend, cpu_path)
        if backend in ENGINE_BACKENDS:
            add_engine(config, staged, manifest, calibration_data)
        return staged.publish(manifest)


def sample_images(pre, count: int = 2) -> np.ndarray:
    """Parity images: the first queries of each sample dataset, else seeded noise (installed
    packages ship no data)."""
    from runtime.preprocess import list_images, preprocess_file

    folders = sorted(SAMPLE_DATA.glob("*/queries")) if SAMPLE_DATA.is_dir() else []
    files = [f for folder in folders for f in list_images(folder)[:count]]
    if files:
        return np.stack([preprocess_file(f, pre) for f in files])
    return np.random.default_rng(0).standard_normal((2 * count, 3, *pre.size)).astype(np.float32)


def _from_model(config: BuildConfig, staged: StagedBundle, backend: str,
                cpu_path: Optional[CpuPath] = None) -> Tuple[dict, Optional[np.ndarray]]:
    """The torch side: model -> checked ONNX with its precision in ``staged``; (manifest, the
    calibration set where TensorRT 8.x calibrates it implicitly). A CPU path's rewrites replace
    the precision step."""
    import onnx
    import torch

    from .onnx_export import decompose_layernorms, finish_onnx, io_specs, trace_to_onnx
    from .precision import fp32_island_nodes
    from .registry import get_config
    from .trt_check import check_graph
    from .zoo import create_model

    precision = cpu_path.precision if cpu_path else config.precision or "fp16"
    target = config.target or (installed_target() if backend == "tensorrt" else "trt10")
    opset = config.opset or DEFAULT_OPSET
    cfg = get_config(config.model, image_size=config.image_size, depth=config.depth)
    if config.split and cfg.method != "salad":
        raise OptionError(f"--split: only SALAD ends before an optimal transport; {cfg.name} is a {cfg.method} model")
    t = log(f"building {cfg.name} at {cfg.image_size[0]}x{cfg.image_size[1]} "
            f"({'RANDOM WEIGHTS' if config.random_weights else 'checkpoint ' + str(config.checkpoint)})")
    model, cfg, weights = create_model(cfg, checkpoint=config.checkpoint, random_weights=config.random_weights)
    x = sample_images(cfg.preprocessing)
    reference = None
    if not config.skip_parity:  # the fused FP32 model, also for split and reduced-precision graphs
        with torch.inference_mode():
            reference = model(torch.from_numpy(x))["descriptor"].float().numpy()
    decomposed = decompose_layernorms(model) if target == "trt8.5" else 0
    outputs, split = list(cfg.outputs()), None
    if config.split:
        from .models.salad import SaladSplit
        model = SaladSplit(model)
        split = model.split_info()
        outputs = ["token", "cluster_features", "scores"]
    log(f"exporting ONNX (opset {opset}, dynamic batch){f', {decomposed} LayerNorms decomposed' if decomposed else ''}")
    work = staged.dir / "export-work"
    work.mkdir()
    raw = trace_to_onnx(model, cfg.image_size, outputs, work, opset=opset, verbose=config.verbose)
    del model  # the PyTorch weights are not needed any more (ViT-g: 4.5 GB)
    gc.collect()
    finish_onnx(raw, staged.onnx, verbose=config.verbose)
    shutil.rmtree(work)
    structure = onnx.load(str(staged.onnx), load_external_data=False)
    islands = fp32_island_nodes(structure)
    if cpu_path is None:
        ops = check_graph(structure, target)
        log(f"static TensorRT check passed for {target}: {sum(ops.values())} nodes, {len(ops)} op types")
    del structure

    if cpu_path is None:
        graph_precision, calibration, calibration_data = _set_precision(config, staged, backend, precision,
                                                                        cfg.preprocessing, islands)
    else:
        graph_precision, calibration_data = precision, None
        calibration = _cpu_rewrites(cpu_path, staged, cfg, islands, config.calibration)
    checks = {}
    if reference is not None:
        if backend == "openvino":
            from .cpu_check import run_openvino_graph
            got = run_openvino_graph(staged.onnx, x, split, _parity_settings(cpu_path))
        else:
            got = run_graph(staged.onnx, x, split)
        checks["parity_vs_pytorch"] = parity(reference, got, graph_precision,
                                             "PyTorch (FP32)" + (f", {cpu_path.name} here" if cpu_path else ""))
        log(f"{'ONNX Runtime' if backend != 'openvino' else 'OpenVINO'} ({graph_precision} graph) vs PyTorch on {len(x)} sample images: min cosine "
            f"{checks['parity_vs_pytorch']['min_cosine']:.7f} (threshold {checks['parity_vs_pytorch']['threshold']})")
    specs = io_specs(staged.onnx)
    manifest = {
        "format_version": FORMAT_VERSION,
        "model": cfg.to_dict(),
        "preprocessing": cfg.preprocessing.to_dict(),
        "precision": precision,
        "backend": backend,
        "inputs": specs["inputs"],
        "outputs": specs["outputs"],
        "batch": (config.batch or BatchProfile()).to_dict(),
        "files": {},
        "weights": {k: v for k, v in weights.items() if k != "path"},
        "export": {"exporter": f"torch.onnx TorchScript exporter (torch {torch.__version__})", "opset": opset,
                   "target": target, "decomposed_layernorm": bool(decomposed), "fp32_nodes": islands},
        "checks": checks,
    }
    if split:
        manifest["split"] = split
    if calibration:
        manifest["calibration"] = calibration
    if cpu_path:
        manifest["cpu"] = cpu_path.manifest_entry(target, target_cpu(target).arch, target_cpu("cpu"))
    log(f"exported in {time.time() - t:.1f} s")
    return manifest, calibration_data


def _cpu_rewrites(path: CpuPath, staged: StagedBundle, cfg, islands: Sequence[str],
                  calibration: CalibrationConfig) -> Optional[dict]:
    """The CPU path's graph rewrites on the staged FP32 graph (``export.cpu_graph``); returns the
    manifest's ``calibration`` entry for a quantized graph."""
    if not path.rewrites:
        return None
    import onnx

    from .cpu_graph import fuse_attention, quantize_dynamic_u8s8
    from .onnx_export import save_onnx

    facts = None
    source = staged.dir / "fp32-source"  # the FP32 graph (and its external data) moved aside
    source.mkdir()
    for f in list(staged.dir.iterdir()):
        if f != source:
            f.rename(source / f.name)
    model = onnx.load(str(source / staged.onnx.name))
    if "fuse_attention" in path.rewrites:
        fused = fuse_attention(model, cfg.num_heads)
        log(f"attention: {fused} blocks fused into MultiHeadAttention")
    if "quantize_dynamic" in path.rewrites:
        if calibration.images:
            log("dynamic INT8 ranges its activations per inference: --calibration-images are not needed here")
        fused_path = source / "fused.onnx"
        save_onnx(model, fused_path)
        del model
        facts = quantize_dynamic_u8s8(fused_path, staged.onnx, exclude=islands)
        log(f"dynamic INT8 (U8S8, per-channel weights): {facts['quantized_nodes']} MatMuls quantized")
    else:
        save_onnx(model, staged.onnx)
    shutil.rmtree(source)
    return facts


def _parity_settings(path: Optional[CpuPath]) -> Optional[dict]:
    """The settings the build machine runs the shipped graph with for the parity check: the
    path's own where this CPU has what it needs, its fallback's otherwise."""
    if path is None:
        return None
    from runtime.cpu_features import check_cpu_path
    return check_cpu_path({"cpu": path.manifest_entry("cpu", target_cpu("cpu").arch, target_cpu("cpu"))},
                          where="parity check").settings


def _set_precision(config: BuildConfig, staged: StagedBundle, backend: str, precision: str, pre,
                   islands: Sequence[str]) -> Tuple[str, Optional[dict], Optional[np.ndarray]]:
    """Put ``precision`` into the staged FP32 graph. Returns the graph's own precision (TensorRT 8.x
    keeps an FP32 graph and sets precision by builder flags), the manifest's ``calibration`` and,
    for implicit INT8 calibration, the calibration set."""
    weak_trt = backend == "tensorrt" and not trt_strongly_typed()
    if precision == "fp16":
        if weak_trt:
            return "fp32", None, None
        import onnx

        from .onnx_export import save_onnx
        from .precision import to_fp16
        log(f"FP16 graph with {len(islands)} FP32 island nodes (LayerNorm, softmax, Sinkhorn, L2 norms)")
        save_onnx(to_fp16(onnx.load(str(staged.onnx))), staged.onnx)
        return "fp16", None, None
    if precision == "int8":
        implicit = weak_trt and config.calibration.trt_calibrator
        facts, data = _int8(config.calibration, pre, staged, islands, implicit, config.verbose)
        return ("fp32" if implicit else "int8"), facts, data
    return "fp32", None, None


def _int8(c: CalibrationConfig, pre, staged: StagedBundle, islands: Sequence[str], implicit: bool,
          verbose: bool = False) -> Tuple[dict, Optional[np.ndarray]]:
    """INT8: the calibration set from real images, then the Q/DQ graph in place of the FP32 one;
    for TensorRT 8.x's implicit calibrator, the FP32 graph stays and the set goes to the builder."""
    from calibration.dataset import calibration_set
    from calibration.int8 import implicit_facts, quantize_graph

    t = log(f"calibration set: {c.count} images from {', '.join(map(str, c.images))}")
    data = calibration_set(c.images, pre, c.count, c.seed)
    if implicit:
        return implicit_facts(len(data)), data
    log(f"{len(data)} images ready in {time.time() - t:.1f} s; calibrating ({c.method}) and writing the Q/DQ graph")
    source = staged.dir / "fp32-source"  # the FP32 graph (and its external data) moved aside
    source.mkdir()
    for f in list(staged.dir.iterdir()):
        if f != source:
            f.rename(source / f.name)
    facts = quantize_graph(source / staged.onnx.name, staged.onnx, data, c.method, exclude=islands, verbose=verbose)
    shutil.rmtree(source)
    log(f"Q/DQ graph: {facts['quantize_nodes']} QuantizeLinear; ONNX Runtime integer kernels: {facts['integer_ops']}")
    return facts, None


def _from_bundle(config: BuildConfig, staged: StagedBundle, backend: str) -> Tuple[dict, Optional[np.ndarray]]:
    """The source bundle's graph, verified and copied (its old engine is not needed); for
    TensorRT 8.x implicit INT8, the calibration set too."""
    folder = Path(config.from_bundle)
    src = read_manifest(folder)
    if src.get("cpu"):
        raise OptionError(f"--from-bundle {folder}: a {src['cpu']['target']} bundle ({src['cpu']['path']}) is final; "
                          "export the model again with --model for another target or backend")
    graph_files = {k: v for k, v in src["files"].items() if k != "engine"}
    verify_files(folder, {**src, "files": graph_files})
    if backend == "tensorrt":
        check_target(src, folder, installed_target())
    for entry in graph_files.values():
        shutil.copy2(folder / entry["name"], staged.dir / entry["name"])
    manifest = {k: v for k, v in src.items() if k not in ("tensorrt", "build", "files")}
    manifest.update(backend=backend)
    if config.batch is not None:
        manifest["batch"] = config.batch.to_dict()
    calibration = src.get("calibration", {})
    implicit = calibration.get("mode") == "implicit"
    if config.precision not in (None, src["precision"]):
        if not (config.precision == "int8" and config.calibration.trt_calibrator and src["precision"] == "fp32"):
            raise OptionError(f"--precision {config.precision}: {folder} holds a {src['precision']} graph and "
                              "--from-bundle keeps it (only --precision int8 --trt-calibrator calibrates an FP32 "
                              f"graph, on TensorRT 8.x). Re-export it: {reexport_command(src, folder, precision=config.precision)}")
        implicit = True
    if config.calibration.trt_calibrator and not implicit:
        raise OptionError(f"--trt-calibrator: {folder} holds a {src['precision']} graph; implicit calibration takes "
                          "an FP32 graph (add --precision int8)")
    if not implicit:
        return manifest, None
    if backend != "tensorrt" or trt_strongly_typed():
        raise OptionError("--trt-calibrator: implicit INT8 calibration is TensorRT 8.5/8.6's (--backend tensorrt); "
                          f"later TensorRT builds the Q/DQ graph of python -m calibration quantize --bundle {folder}")
    c = config.calibration
    data = None
    if c.images:
        from calibration.dataset import calibration_set
        from runtime.preprocess import Preprocessing
        log(f"calibration set: {c.count} images from {', '.join(map(str, c.images))}")
        data = calibration_set(c.images, Preprocessing.from_dict(src["preprocessing"]), c.count, c.seed)
    elif not (staged.dir / CALIBRATION_CACHE).is_file():
        raise OptionError(f"{folder}: implicit INT8 calibration needs --calibration-images DIR "
                          "(the bundle holds no calibration cache)")
    from calibration.int8 import implicit_facts
    manifest["precision"] = "int8"
    manifest["calibration"] = implicit_facts(len(data) if data is not None else calibration.get("images", 0))
    return manifest, data


def check_target(src: dict, folder: Path, installed: str) -> None:
    """Refuse a graph exported for a newer TensorRT than the installed one, or one the installed
    TensorRT's ONNX parser cannot take, with the command that re-exports it."""
    exported_for = graph_target(src)
    problems = find_problems(folder / src["files"]["onnx"]["name"], installed)
    if GENERATION.get(exported_for, 2) <= GENERATION[installed] and not problems:
        return
    why = f"; {problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "") if problems else ""
    raise BundleError(f"{folder}: its graph was exported for {exported_for}, the installed TensorRT "
                      f"{tensorrt_version()} needs {installed}{why}. Re-export it where torch is: "
                      f"{reexport_command(src, folder, target=installed)}; then run --from-bundle on it here")


def reexport_command(src: dict, folder: Path, target: Optional[str] = None, precision: Optional[str] = None) -> str:
    """The build_engine command that exports ``src``'s model again (for another target or precision)."""
    m, w = src["model"], src.get("weights", {})
    precision = precision or src["precision"]
    target = target or graph_target(src)
    weights = "--random-weights" if w.get("random_weights") else f"--checkpoint {w.get('source', 'CHECKPOINT')}"
    pre = src["preprocessing"]
    size = pre.get("first_resize") or pre["size"]  # MegaLoc: the size asked for, before its rounding
    parts = ["python export/build_engine.py", f"--model {m['name']}", weights, f"--precision {precision}",
             "--image-size " + (f"{size[0]}" if size[0] == size[1] else f"{size[0]}x{size[1]}"), f"--depth {m['depth']}" if m.get("depth") else "",
             "--split" if src.get("split") else "",
             "--calibration-images DIR" if precision == "int8" else "",
             f"--batch {src['batch']['min']}:{src['batch']['opt']}:{src['batch']['max']}",
             f"--target {target}", "--backend onnxruntime", f"--output {folder}-{target}"]
    return " ".join(p for p in parts if p)


def add_engine(config: BuildConfig, staged: StagedBundle, manifest: dict,
               calibration_data: Optional[np.ndarray]) -> None:
    """The TensorRT (or TensorRT-RTX) engine of the staged graph (TensorRT 8.x implicit INT8: fed
    the calibration set)."""
    from calibration.trt_calibrator import CalibrationFeed

    feed = None
    if manifest.get("calibration", {}).get("mode") == "implicit":
        feed = CalibrationFeed(calibration_data, staged.dir / CALIBRATION_CACHE)
    b, backend = manifest["batch"], manifest["backend"]
    t = log(f"building {backend} {tensorrt_version(backend)} engine ({manifest['precision']}, "
            f"batch {b['min']}:{b['opt']}:{b['max']})")
    manifest["tensorrt"] = build_trt_engine(staged.onnx, staged.dir / ENGINE, manifest, config.tensorrt, feed)
    if backend == "tensorrt-rtx":  # building the engine was TensorRT-RTX's parse + AOT build check
        from .trt_rtx import check_entry
        manifest.setdefault("checks", {})["tensorrt_rtx"] = check_entry(manifest["tensorrt"])
    log(f"engine built in {time.time() - t:.1f} s")


def build_trt_engine(onnx_path: Path, engine_path: Path, manifest: dict, settings: TensorRTConfig, feed=None) -> dict:
    """Serialise the engine with export/trt_builder.py; returns its facts for the manifest."""
    from runtime.trt_env import tensorrt_module

    from .trt_builder import build_engine

    calibrator = None
    if feed is not None:
        from calibration.trt_calibrator import make_entropy_calibrator
        calibrator = make_entropy_calibrator(feed)
    return build_engine(onnx_path, engine_path, manifest["batch"], manifest["precision"],
                        fp32_nodes=manifest["export"].get("fp32_nodes", []), calibrator=calibrator,
                        trt=tensorrt_module(manifest["backend"]), **dataclasses.asdict(settings))
