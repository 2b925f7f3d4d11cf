"""The INT8 step both paths share (``export/build_engine.py --precision int8`` and ``python -m
calibration quantize``): an FP32 graph and a calibration set -> the Q/DQ graph, with the facts
the manifest records. The shipped graph's checks follow in ``export.bundle_writer``."""
from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from .quantize import integer_ops, quantize_onnx


def quantize_graph(fp32_path: Path, out_path: Path, data: np.ndarray, method: str = "entropy",
                   exclude: Sequence[str] = (), verbose: bool = False) -> dict:
    """Write the Q/DQ graph of ``fp32_path`` to ``out_path``; returns the manifest's ``calibration``.
    ONNX Runtime's quantizer prints its steps on stdout: only with ``verbose``."""
    with contextlib.redirect_stdout(sys.stdout if verbose else io.StringIO()):
        facts = quantize_onnx(fp32_path, out_path, data, method, exclude=exclude)
    facts["mode"] = "explicit Q/DQ"
    facts["integer_ops"] = integer_ops(out_path)
    if not facts["integer_ops"]:
        print("warning: ONNX Runtime runs no integer kernel for this graph (dequantised FP32 everywhere)",
              file=sys.stderr)
    return facts


def implicit_facts(images: int) -> dict:
    """The manifest's ``calibration`` for TensorRT 8.x implicit calibration (FP32 graph + calibrator)."""
    return {"mode": "implicit", "images": int(images), "method": "entropy (IInt8EntropyCalibrator2)"}
