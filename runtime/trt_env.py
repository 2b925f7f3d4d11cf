"""What TensorRT and which GPU this machine has, probed without ever constructing a TensorRT
runtime on a machine with no usable GPU (shared/research/env-probe.md §2: that segfaults).
The GPU is probed with cuda-python (``cuda.bindings.runtime``).

Two TensorRT libraries run engines through the same name-based API: TensorRT (``tensorrt``:
JetPack, data-centre and desktop GPUs; bundle backend ``tensorrt``) and TensorRT for RTX
(``tensorrt_rtx``: RTX desktop GPUs, engines compiled ahead of time anywhere and specialised on
the GPU at the first run; bundle backend ``tensorrt-rtx``).
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Optional

MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
LIBRARIES = {"tensorrt": "TensorRT", "tensorrt-rtx": "TensorRT-RTX"}
RTX_PACKAGE = "tensorrt-rtx-cu13"
RTX_DEFAULT_MIN_CC = (8, 0)  # TensorRT-RTX's default AOT targets: compute capability 8.0, 8.6, 8.9, 12.0 and later
RUNTIME_CACHE_DIR = Path(os.environ.get("VPR_EDGE_CACHE", Path.home() / ".cache" / "vpr-edge")) / "tensorrt-rtx"


def tensorrt_module(backend: str = "tensorrt"):
    """The TensorRT module a bundle backend runs on, or None where it does not import."""
    try:
        return importlib.import_module(MODULES[backend])
    except Exception:  # noqa: BLE001 - absent, or present but broken: either way not usable
        return None


def tensorrt_version(backend: str = "tensorrt") -> Optional[str]:
    trt = tensorrt_module(backend)
    return getattr(trt, "__version__", None) if trt is not None else None


def cuda_runtime():
    """cuda-python's runtime module (``cuda.bindings.runtime``; ``cuda.cudart`` before 12.6), or None."""
    try:
        from cuda.bindings import runtime as cudart
    except Exception:  # noqa: BLE001
        try:
            from cuda import cudart  # cuda-python < 12.6 layout (JetPack 5/6 images)
        except Exception:  # noqa: BLE001
            return None
    return cudart


def cuda_python_available() -> bool:
    return cuda_runtime() is not None


def gpu_info(device: int = 0) -> Optional[dict]:
    """{'name', 'compute_capability'} of a usable CUDA device, else None."""
    cudart = cuda_runtime()
    if cudart is None:
        return None
    try:
        err, count = cudart.cudaGetDeviceCount()
        if int(err) != 0 or not count:
            return None
        err, prop = cudart.cudaGetDeviceProperties(device)
        if int(err) != 0:
            return None
    except Exception:  # noqa: BLE001
        return None
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return {"name": name.strip("\x00 "), "compute_capability": f"{prop.major}.{prop.minor}"}


def tensorrt_usable(backend: str = "tensorrt") -> bool:
    return tensorrt_version(backend) is not None and gpu_info() is not None


def _cc(text: str) -> tuple:
    """'8.6' or TensorRT-RTX's 'SM86' -> (8, 6)."""
    text = text[2:] if text.upper().startswith("SM") else text.replace(".", "")
    return int(text[:-1]), int(text[-1])


def check_engine_compatible(recorded: dict, rebuild_hint: str, folder: Path, backend: str = "tensorrt") -> None:
    """Refuse an engine built for another TensorRT or GPU (unless built version-compatible), or
    one that this machine cannot run at all; one line that says what is needed."""
    from .bundle import BundleError

    onnx_instead = f"python export/build_engine.py --from-bundle {folder} --backend onnxruntime"
    lib, have = LIBRARIES[backend], tensorrt_version(backend)
    if have is None:
        install = f"pip install {RTX_PACKAGE}" if backend == "tensorrt-rtx" else f"TensorRT {recorded.get('version')}"
        raise BundleError(f"{folder}: a {lib} engine, but {lib} does not import here; install it ({install}) or run "
                          f"the bundle's model.onnx on ONNX Runtime ({onnx_instead})")
    want = recorded.get("version")
    if want != have and not recorded.get("version_compatible"):
        raise BundleError(f"{folder}: engine built with {lib} {want}, this machine has {have}; {rebuild_hint}")
    gpu = gpu_info()
    if backend == "tensorrt-rtx":
        _check_rtx_gpu(recorded, gpu, folder, onnx_instead)
        return
    if gpu is None:
        raise BundleError(f"{folder}: a TensorRT engine, but no usable CUDA GPU was found")
    want_cc = recorded.get("compute_capability")
    if want_cc and want_cc != gpu["compute_capability"] and recorded.get("hardware_compatibility", "none") == "none":
        raise BundleError(f"{folder}: engine built for {recorded.get('gpu')} (compute capability {want_cc}), this GPU "
                          f"is {gpu['name']} ({gpu['compute_capability']}); {rebuild_hint}")


def _check_rtx_gpu(recorded: dict, gpu: Optional[dict], folder: Path, onnx_instead: str) -> None:
    from .bundle import BundleError

    targets = recorded.get("compute_capabilities", "default")
    if targets == "default":
        need = f"compute capability {RTX_DEFAULT_MIN_CC[0]}.{RTX_DEFAULT_MIN_CC[1]} or newer (RTX 30, 40, 50 series)"
        fits = lambda cc: cc >= RTX_DEFAULT_MIN_CC  # noqa: E731
    else:
        need = "compute capability " + " or ".join("%d.%d" % _cc(t) for t in targets)
        fits = lambda cc: cc in {_cc(t) for t in targets}  # noqa: E731
    if gpu is None:
        raise BundleError(f"{folder}: this TensorRT-RTX engine needs an NVIDIA GPU of {need} with its driver and "
                          f"cuda-python, and none is usable here; run the bundle's model.onnx on ONNX Runtime "
                          f"instead ({onnx_instead})")
    if not fits(_cc(gpu["compute_capability"])):
        raise BundleError(f"{folder}: this TensorRT-RTX engine was built for {need}, this GPU is {gpu['name']} "
                          f"({gpu['compute_capability']}); rebuild it for this GPU or run the bundle's model.onnx on "
                          f"ONNX Runtime ({onnx_instead})")
