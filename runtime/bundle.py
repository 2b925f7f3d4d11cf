"""Engine bundles: ``manifest.json`` + ``model.onnx`` (+ ``engine.plan``), the contract between
``export/build_engine.py`` and this runtime (engines/README.md).

Loading verifies before anything is deserialised: schema, files present, sizes and sha256 of
every file, and for TensorRT engines the TensorRT version and GPU they were built for. Each
refusal says what to rebuild.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Set, Union

from .errors import UserError
from .files import atomic_write, check_listed_file, sha256_file
from .preprocess import Preprocessing

MANIFEST = "manifest.json"
CALIBRATION_CACHE = "calibration.cache"  # TensorRT 8.x implicit INT8 calibration
REPORT = "precision_report.json"  # written into a bundle after its build (python -m calibration report)
FORMAT_VERSION = 1
ENGINE_BACKENDS = ("tensorrt", "tensorrt-rtx")  # engine.plan, run by runtime/backends/tensorrt_backend.py
CPU_BACKENDS = ("onnxruntime", "openvino")  # run the bundle's model.onnx
BACKENDS = CPU_BACKENDS + ENGINE_BACKENDS
PRECISIONS = ("fp32", "fp16", "bf16", "int8")  # bf16: OpenVINO's CPU inference precision (a CPU path)
REQUIRED = ("format_version", "model", "preprocessing", "precision", "backend", "inputs", "outputs",
            "batch", "files", "weights", "build")


class BundleError(UserError, ValueError):
    """A bundle that must not be loaded; the message names the file, the problem and the fix."""


@dataclass
class Bundle:
    path: Path
    manifest: dict

    @property
    def backend(self) -> str:
        return self.manifest["backend"]

    @property
    def precision(self) -> str:
        return self.manifest["precision"]

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.from_dict(self.manifest["preprocessing"])

    @property
    def batch(self) -> Dict[str, int]:
        return self.manifest["batch"]

    @property
    def batch_mode(self) -> str:
        return self.manifest["model"].get("batch_mode", "independent")

    @property
    def outputs(self) -> Dict[str, dict]:
        return self.manifest["outputs"]

    @property
    def descriptor_dim(self) -> int:
        """D of the (N, D) descriptors the runtime returns (split mode: after the numpy Sinkhorn)."""
        m = self.manifest
        return int(m.get("split", {}).get("descriptor_dim") or m["outputs"]["descriptor"]["shape"][-1])

    @property
    def input_name(self) -> str:
        return next(iter(self.manifest["inputs"]))

    def file(self, role: str) -> Path:
        return self.path / self.manifest["files"][role]["name"]

    @property
    def rebuild_hint(self) -> str:
        return f"rebuild it: python export/build_engine.py --from-bundle {self.path} --backend {self.backend}"


def read_manifest(folder: Union[str, Path]) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        what = "a file, not a bundle folder" if folder.exists() else "no such bundle directory"
        raise BundleError(f"{folder}: {what} (build one with python export/build_engine.py)")
    if not path.is_file():
        raise BundleError(f"{path}: missing; {folder} is not a bundle (build one with python export/build_engine.py)")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: malformed JSON ({exc}); rebuild the bundle") from exc
    if not isinstance(manifest, dict):
        raise BundleError(f"{path}: malformed manifest (top level is {type(manifest).__name__}, not an object)")
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise BundleError(f"{path}: malformed manifest, missing {', '.join(missing)}; rebuild the bundle")
    if manifest["format_version"] != FORMAT_VERSION:
        raise BundleError(f"{path}: bundle format {manifest['format_version']!r}, this runtime reads "
                          f"{FORMAT_VERSION}; rebuild the bundle with this version of vpr-edge")
    if manifest["backend"] not in BACKENDS or manifest["precision"] not in PRECISIONS:
        raise BundleError(f"{path}: unknown backend/precision {manifest['backend']!r}/{manifest['precision']!r}")
    try:
        Preprocessing.from_dict(manifest["preprocessing"])
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{path}: malformed preprocessing entry ({exc}); rebuild the bundle") from exc
    problem = _structure_problem(manifest)
    if problem:
        raise BundleError(f"{path}: malformed manifest ({problem}); rebuild the bundle")
    return manifest


def _structure_problem(m: dict) -> Optional[str]:
    for key in ("model", "inputs", "outputs", "batch", "files", "weights"):
        if not isinstance(m[key], dict):
            return f"{key} is not an object"
    if not m["inputs"] or not m["outputs"]:
        return "no inputs or no outputs"
    b = m["batch"]
    if not all(isinstance(b.get(k), int) for k in ("min", "opt", "max")) or not 1 <= b["min"] <= b["opt"] <= b["max"]:
        return f"batch profile {b!r} is not 1 <= min <= opt <= max"
    if "onnx" not in m["files"]:
        return "no onnx file listed"
    for role, e in m["files"].items():
        if not (isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("size"), int)
                and isinstance(e.get("sha256"), str)):
            return f"file entry {role!r} needs name, size and sha256"
        if Path(e["name"]).name != e["name"] or e["name"] in ("", ".", ".."):
            return f"file name {e['name']!r} is not a plain name inside the bundle"
    return None


def verify_files(folder: Path, manifest: dict) -> None:
    """Every listed file exists with its recorded size and sha256 (size first: a truncated
    engine is caught without hashing or deserialising it)."""
    for role, entry in manifest["files"].items():
        check_listed_file(folder / entry["name"], entry, role, "rebuild the bundle", BundleError)


def load_bundle(folder: Union[str, Path], verify: bool = True, check_engine: bool = True) -> Bundle:
    """Read and verify a bundle; for engines also check the installed TensorRT and GPU
    (``check_engine=False``: a build host describing an engine it cannot run)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    bundle = Bundle(folder, manifest)
    if verify:
        verify_files(folder, manifest)
    if check_engine and manifest["backend"] in ENGINE_BACKENDS:
        from .trt_env import check_engine_compatible
        check_engine_compatible(manifest.get("tensorrt", {}), bundle.rebuild_hint, folder, manifest["backend"])
    return bundle


def bundle_file_names(folder: Path) -> Optional[Set[str]]:
    """The names a previous bundle in ``folder`` consists of (manifest, listed files, precision
    report), or None when ``folder`` holds no readable bundle manifest: what a build may replace."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text())
        names = {e["name"] for e in manifest["files"].values()}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if not all(isinstance(n, str) for n in names):
        return None
    return names | {MANIFEST, REPORT}


def write_manifest(folder: Path, manifest: dict) -> None:
    text = json.dumps(manifest, indent=2, sort_keys=False) + "\n"
    atomic_write(Path(folder) / MANIFEST, lambda f: f.write(text.encode()))


def file_entry(path: Path) -> dict:
    return {"name": path.name, "size": path.stat().st_size, "sha256": sha256_file(path)}


def describe(bundle: Bundle) -> List[str]:
    """Human summary lines of a bundle."""
    m = bundle.manifest
    weights = "RANDOM WEIGHTS" if m["weights"].get("random_weights") else f"checkpoint sha256 {m['weights'].get('sha256', '?')[:12]}"
    lines = [f"bundle {bundle.path}: {m['model']['name']} {m['preprocessing']['size'][0]}x{m['preprocessing']['size'][1]}, "
             f"{m['precision']} on {m['backend']}, batch {m['batch']['min']}:{m['batch']['opt']}:{m['batch']['max']}, {weights}"]
    for name, spec in m["outputs"].items():
        lines.append(f"  output {name}: {spec['shape']} {spec.get('dtype', 'float32')}")
    cpu = m.get("cpu")
    if isinstance(cpu, dict):
        lines.append(f"  CPU path: {cpu.get('path')} for {cpu.get('target')} ({cpu.get('arch')}; chosen for "
                     f"{', '.join(cpu.get('requires', [])) or 'no particular features'})")
    return lines
