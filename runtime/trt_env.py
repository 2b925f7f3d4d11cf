"""What TensorRT and which GPU this machine has, probed without ever constructing a TensorRT
runtime on a machine with no usable GPU (shared/research/env-probe.md §2: that segfaults).
The GPU is probed with cuda-python (``cuda.bindings.runtime``), which the TensorRT backend needs
for its memory and streams too (the ``trt`` extra): without it no GPU is found."""
from __future__ import annotations

from pathlib import Path
from typing import Optional


def tensorrt_version() -> Optional[str]:
    try:
        import tensorrt as trt  # noqa: F401
    except Exception:  # noqa: BLE001 - absent, or present but broken: either way not usable
        return None
    return getattr(trt, "__version__", None)


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


def tensorrt_usable() -> bool:
    return tensorrt_version() is not None and gpu_info() is not None


def check_engine_compatible(recorded: dict, rebuild_hint: str, folder: Path) -> None:
    """Refuse an engine built for another TensorRT or GPU (unless built version-compatible)."""
    from .bundle import BundleError

    have = tensorrt_version()
    if have is None:
        raise BundleError(f"{folder}: a TensorRT engine, but TensorRT does not import here; run the bundle's "
                          "model.onnx on ONNX Runtime instead (python export/build_engine.py --from-bundle "
                          f"{folder} --backend onnxruntime) or install TensorRT {recorded.get('version')}")
    want = recorded.get("version")
    if want != have and not recorded.get("version_compatible"):
        raise BundleError(f"{folder}: engine built with TensorRT {want}, this machine has {have}; {rebuild_hint}")
    gpu = gpu_info()
    if gpu is None:
        raise BundleError(f"{folder}: a TensorRT engine, but no usable CUDA GPU was found")
    want_cc = recorded.get("compute_capability")
    if want_cc and want_cc != gpu["compute_capability"] and recorded.get("hardware_compatibility", "none") == "none":
        raise BundleError(f"{folder}: engine built for {recorded.get('gpu')} (compute capability {want_cc}), this GPU "
                          f"is {gpu['name']} ({gpu['compute_capability']}); {rebuild_hint}")
