"""Which CPU path a ``--target cpu...`` build takes: library, precision and graph rewrites,
chosen from the CPU's features among the paths measured on such CPUs (BENCHMARKS.md §12).

Targets: ``cpu`` is the build machine itself (its ``/proc/cpuinfo``); ``cpu-x86-avx2``,
``cpu-x86-avx512`` and ``cpu-arm`` build for another machine and assume only that target's
baseline features. The manifest's ``cpu`` entry records the path, the features it was chosen for
(checked again when the bundle is loaded: ``runtime.cpu_features.check_cpu_path``) and what runs
where they are missing.

The paths, fastest first where their features are present:

* ``onnxruntime-int8-dynamic``: ONNX Runtime, attention fused into MultiHeadAttention (FP32),
  every constant-weight MatMul dynamically quantized U8S8 (per-channel INT8 weights, UINT8
  activations ranged per inference). The fastest path measured on the AVX-512 VNNI + bf16 machine
  (BENCHMARKS.md §12); MLAS picks its integer kernel at run time (AMX, AVX-512 VNNI, AVX-VNNI,
  AVX-512BW, AVX2; ARM dot-product / i8mm, NEON), so one graph runs everywhere.
* ``openvino-bf16``: OpenVINO with the bf16 inference precision on the FP32 graph, where the CPU
  has bf16 arithmetic; only when ``--backend openvino`` asks for it (slower than the INT8 path on
  the machine measured).
* ``openvino-fp32`` / ``onnxruntime-fp32``: the FP32 graph, where nothing faster applies.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from runtime.bundle import CPU_BACKENDS
from runtime.cpu_features import CpuInfo, this_cpu
from runtime.errors import OptionError

CPU_TARGETS = ("cpu", "cpu-x86-avx2", "cpu-x86-avx512", "cpu-arm")
# the baseline each named target assumes: (architecture, features)
TARGET_BASELINE: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    "cpu-x86-avx2": ("x86_64", ("avx2", "fma")),
    "cpu-x86-avx512": ("x86_64", ("avx512f", "avx512bw", "avx512vl", "avx512dq")),
    "cpu-arm": ("aarch64", ("asimd",)),
}
# features whose presence made a path faster where measured, in the order MLAS prefers them
INT8_DOT = ("amx_int8", "avx512_vnni", "avx_vnni", "avx512bw", "avx2", "i8mm", "asimddp", "asimd")
BF16 = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class CpuPath:
    """A way to run the model on a CPU, and the manifest entry that records it."""

    name: str
    backend: str
    precision: str
    requires: Tuple[str, ...]
    rewrites: Tuple[str, ...] = ()  # export.cpu_graph steps: "fuse_attention", "quantize_dynamic"
    settings: Dict[str, str] = field(default_factory=dict)
    fallback: Dict[str, object] = field(default_factory=dict)
    why: str = ""

    def manifest_entry(self, target: str, arch: str, built_on: CpuInfo) -> dict:
        return {"target": target, "path": self.name, "arch": arch, "requires": list(self.requires),
                "settings": dict(self.settings), "fallback": dict(self.fallback), "why": self.why,
                "built_on": {"model": built_on.model, "arch": built_on.arch,
                             "features": sorted(f for f in built_on.flags if f in INT8_DOT + BF16 + ("fma", "avx512f"))}}


def target_cpu(target: str, here: Optional[CpuInfo] = None) -> CpuInfo:
    """The CPU a target describes: this machine for ``cpu``, a named target's baseline otherwise."""
    if target == "cpu":
        return here or this_cpu()
    if target not in TARGET_BASELINE:
        raise OptionError(f"--target {target!r}: expected one of {', '.join(CPU_TARGETS)}")
    arch, features = TARGET_BASELINE[target]
    return CpuInfo(arch=arch, flags=frozenset(features), model=f"any {target[4:]} CPU")


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def choose_path(cpu: CpuInfo, backend: str = "auto", openvino: Optional[bool] = None) -> CpuPath:
    """The fastest faithful path for ``cpu`` among those measured; ``backend`` restricts the
    library (``openvino`` needs the package installed)."""
    if backend not in ("auto",) + CPU_BACKENDS:
        raise OptionError(f"--backend {backend}: a CPU target runs on {' or '.join(CPU_BACKENDS)} (or auto)")
    if backend == "openvino":
        if not (openvino_available() if openvino is None else openvino):
            raise OptionError("--backend openvino: the openvino package is not installed (pip install openvino, "
                              "or pip install -e '.[openvino]')")
        return _openvino_path(cpu)
    if cpu.arch not in ("x86_64", "aarch64"):
        return CpuPath("onnxruntime-fp32", "onnxruntime", "fp32", (), why=f"{cpu.arch}: no measured INT8 path")
    dot = [f for f in INT8_DOT if f in cpu.flags]
    baseline = TARGET_BASELINE["cpu-x86-avx2" if cpu.arch == "x86_64" else "cpu-arm"][1]
    requires = tuple(dict.fromkeys((dot[:1] if dot else []) + [f for f in baseline if f in cpu.flags]))
    return CpuPath(
        "onnxruntime-int8-dynamic", "onnxruntime", "int8", requires, ("fuse_attention", "quantize_dynamic"),
        fallback={"note": "the same INT8 graph on the integer kernels this CPU has (slower, same results)"},
        why=f"INT8 U8S8 GEMMs on {dot[0] if dot else 'the portable kernels'}: the fastest path measured on an "
            "AVX-512 VNNI + bf16 CPU, ahead of OpenVINO bf16 and PyTorch bf16 autocast; INT8 was also the fastest on "
            "AVX2 (BENCHMARKS.md §6, §12)")


def _openvino_path(cpu: CpuInfo) -> CpuPath:
    bf16 = [f for f in BF16 if f in cpu.flags]
    if bf16:
        return CpuPath("openvino-bf16", "openvino", "bf16", (bf16[0],), settings={"inference_precision": "bf16"},
                       fallback={"settings": {"inference_precision": "f32"},
                                 "note": "OpenVINO in FP32 (this CPU has no bf16 arithmetic)"},
                       why=f"bf16 arithmetic ({bf16[0]}): OpenVINO's bf16 inference precision on the FP32 graph")
    return CpuPath("openvino-fp32", "openvino", "fp32", (), settings={"inference_precision": "f32"},
                   why="no bf16 arithmetic on this CPU: OpenVINO in FP32")

