"""vpr-edge runtime: torch-free place recognition on a robot.

The public API::

    from runtime import Encoder, Localizer

    with Encoder.from_bundle("engines/salad") as encoder:
        descriptors = encoder.encode([frame_rgb, "image.jpg"])  # float32 (2, D)
    with Localizer.open("engines/salad", "maps/campus", consistency=3) as localizer:
        match = localizer.localize(frame_bgr, bgr=True)  # Match: place, score, pose, accepted, ...

Only numpy, Pillow, onnxruntime, faiss and (guarded) TensorRT/CUDA Python are imported by this
package; ``tests/test_runtime_no_torch.py`` proves it. ``import runtime`` itself imports none of
them: each name below is imported on first use.
"""
from __future__ import annotations

from typing import Any

_PUBLIC = {
    "Encoder": "runtime.encoder",
    "Localizer": "runtime.localizer",
    "Match": "runtime.pipeline",
    "UserError": "runtime.errors",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'runtime' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(_PUBLIC))
