"""What a map must share with the bundle that queries it.

A map's descriptors are only comparable with a query's when both come from the same model, at the
same dimension and preprocessing, in the same batch mode, and from the same weights. The weights
are identified by the checkpoint's sha256 recorded in the bundle's manifest; a random-weights
build (tests, benchmarks) by the sha256 of its tensors as exported (older bundles: the seed and
the model configuration).

Precisions of the same weights may share a map: FP32 and FP16 bundles agree to cosine 1.00000 and
top-1 1.000 (BENCHMARKS.md §3), so a map built with either serves both. INT8 agrees to cosine
0.9998 but top-1 only 0.991: it is accepted with a warning that says so; a map built with the
INT8 bundle itself gives its best recall.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import List

from .layout import MapError

MUST_MATCH = ("model", "dim", "preprocessing", "batch_mode", "weights")


def weights_identity(manifest: dict) -> str:
    """A string that differs whenever the weights do."""
    w = manifest.get("weights") or {}
    if w.get("sha256"):
        return f"checkpoint sha256:{w['sha256']}"
    if w.get("random_weights"):
        if w.get("tensors_sha256"):
            return f"random weights sha256:{w['tensors_sha256']}"
        config = hashlib.sha256(json.dumps(manifest.get("model"), sort_keys=True).encode()).hexdigest()
        return f"random weights seed {w.get('seed')} config:{config[:16]}"
    return "unknown weights"


def bundle_identity(bundle) -> dict:
    m = bundle.manifest
    desc = m.get("split", {}).get("descriptor_dim") or m["outputs"]["descriptor"]["shape"][-1]
    return {"model": m["model"]["name"], "dim": int(desc), "preprocessing": m["preprocessing"],
            "batch_mode": m["model"].get("batch_mode", "independent"), "weights": weights_identity(m),
            "precision": m["precision"], "onnx_sha256": m["files"]["onnx"]["sha256"]}


def _short(value) -> str:
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_compatible(map_identity: dict, bundle_id: dict, where: Path) -> List[str]:
    """Refuse a map from other weights or another model; return warnings (precision)."""
    for key in MUST_MATCH:
        if map_identity.get(key) != bundle_id.get(key):
            raise MapError(f"{where}: map built with other {'weights' if key == 'weights' else 'bundle settings'} "
                           f"({key}: map {_short(map_identity.get(key))!r}, bundle {_short(bundle_id.get(key))!r}); "
                           "rebuild the map with this bundle (python -m runtime map build --bundle ...)")
    warnings = []
    precisions = {map_identity.get("precision"), bundle_id.get("precision")}
    if "int8" in precisions and len(precisions) == 2:
        warnings.append(f"{where}: map built at {map_identity.get('precision')}, this bundle runs "
                        f"{bundle_id.get('precision')}: same weights, but INT8 and float descriptors agree on the "
                        "top-1 place for 99.1% of queries (BENCHMARKS.md §3); a map built with this bundle is exact")
    return warnings
