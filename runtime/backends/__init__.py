"""Inference backends behind one small interface: ``run(images NCHW float32) -> {output: array}``."""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from ..bundle import ENGINE_BACKENDS, Bundle
from ..errors import OptionError


class Backend:
    """What every backend offers. ``max_batch`` is the largest batch one call accepts."""

    name = "base"
    max_batch: int = 1

    def run(self, images: np.ndarray) -> Dict[str, np.ndarray]:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        pass


def open_backend(bundle: Bundle, threads: Optional[int] = None, device: str = "cpu",
                 cuda_graph: bool = False) -> Backend:
    """The backend a bundle was built for (its manifest's ``backend``)."""
    if bundle.backend in ENGINE_BACKENDS:
        from .tensorrt_backend import TensorRTBackend
        return TensorRTBackend(bundle, cuda_graph=cuda_graph)
    if bundle.backend == "openvino":
        if device != "cpu":
            raise OptionError(f"--device {device}: {bundle.path} is an OpenVINO CPU bundle")
        from .openvino_backend import OpenVINOBackend
        return OpenVINOBackend(bundle, threads=threads)
    from .ort_backend import OnnxRuntimeBackend
    return OnnxRuntimeBackend(bundle, threads=threads, device=device)
