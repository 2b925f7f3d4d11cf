"""TensorRT-RTX: a real TensorRT ONNX parser and builder that runs without a GPU.

TensorRT for RTX (PyPI ``tensorrt-rtx-cu13``, module ``tensorrt_rtx``) compiles an engine ahead of
time on any x86-64 machine, CPU-only included; the engine is portable across RTX GPUs (compute
capability 8.0 and later by default) and specialised on the device at its first run. Its parser
is the onnx-tensorrt code that TensorRT itself uses (shared/research/round2-anchors.md §2), so a
graph it parses and builds is strong evidence for TensorRT 10.x; JetPack's 8.5 keeps the static
check (export/trt_check.py) as well.

Two uses: the check every build runs where ``tensorrt_rtx`` imports (parse + ahead-of-time build
with the bundle's batch profile, the engine discarded), and ``--backend tensorrt-rtx`` engines.
Deserialising an engine needs a GPU (CUDA error 35 without one): that is the runtime's business.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, Optional

from runtime.errors import UserError
from runtime.trt_env import RTX_PACKAGE

INSTALL_HINT = (f"pip install {RTX_PACKAGE} (tensorrt-rtx-cu12 for a CUDA 12 driver; x86-64 Linux or Windows, "
                "Python >= 3.10)")


class TensorRTRTXMissing(UserError, RuntimeError):
    pass


def rtx_module():
    """The ``tensorrt_rtx`` module, or None where it does not import."""
    try:
        import tensorrt_rtx
    except Exception:  # noqa: BLE001 - absent, or present but broken: either way not usable
        return None
    return tensorrt_rtx


def rtx_available() -> bool:
    return rtx_module() is not None


def require_rtx():
    trt = rtx_module()
    if trt is None:
        raise TensorRTRTXMissing(f"--backend tensorrt-rtx: TensorRT-RTX does not import here; {INSTALL_HINT}")
    return trt


def parse_and_build(onnx_path: Path, batch: Dict[str, int], precision: str = "fp32",
                    fp32_nodes: Iterable[str] = (), engine_path: Optional[Path] = None, **options) -> dict:
    """Parse ``onnx_path`` with the TensorRT-RTX parser and build it ahead of time for the batch
    profile; write the engine to ``engine_path`` if given. Returns the build facts (version,
    parse and build seconds, engine bytes, layers); raises ParserRefusal / TensorRTBuildError,
    one line each, naming the node or the builder's message."""
    from export.trt_builder import build_engine, build_plan

    trt = require_rtx()
    if engine_path is not None:
        return build_engine(onnx_path, engine_path, batch, precision, fp32_nodes=fp32_nodes, trt=trt, **options)
    return build_plan(onnx_path, batch, precision, fp32_nodes=fp32_nodes, trt=trt, **options)[1]


def check_entry(facts: dict) -> dict:
    """What the manifest's ``checks`` records of a TensorRT-RTX build."""
    return {"version": facts["version"], "profile": facts["profile"], "layers": facts["layers"],
            "parse_s": facts["parse_s"], "build_s": facts["build_s"], "engine_bytes": facts["engine_bytes"]}


def rtx_check(onnx_path: Path, batch: Dict[str, int], precision: str, fp32_nodes: Iterable[str] = ()) -> Optional[dict]:
    """The build check: None where TensorRT-RTX does not import, else its ``check_entry``."""
    if not rtx_available():
        return None
    return check_entry(parse_and_build(onnx_path, batch, precision, fp32_nodes))


def describe_check(entry: dict) -> str:
    b = entry["profile"]
    return (f"TensorRT-RTX {entry['version']} parse + AOT build (batch {b['min']}:{b['opt']}:{b['max']}, "
            f"{entry['engine_bytes'] / 1e6:.1f} MB engine in {entry['build_s']:.1f} s)")
