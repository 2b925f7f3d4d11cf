"""Helpers for the official-output fixtures in tests/fixtures/reference (see its README)."""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "tests" / "fixtures" / "reference"
DATA = ROOT / "data"


def spec(model: str) -> dict:
    return json.loads((REFERENCE / model / "spec.json").read_text())


def fixture(model: str, name: str) -> np.ndarray:
    return np.load(REFERENCE / model / name)


def rebuild_state_dict(model: str) -> dict:
    """The fixture's deterministic weights: value = N(0,1)[crc32(key)] * std + mean, cast last."""
    import torch

    sd = {}
    for e in spec(model)["keys"]:
        rng = np.random.RandomState(zlib.crc32(e["key"].encode()))
        a = rng.standard_normal(tuple(e["shape"])) * e["std"] + e["mean"]
        sd[e["key"]] = torch.from_numpy(np.asarray(a).astype(e["dtype"]))
    return sd


def save_official_checkpoint(model: str, path: Path) -> Path:
    """Write the rebuilt weights in the official container of ``model``."""
    import torch

    sd = rebuild_state_dict(model)
    if model == "salad":
        torch.save(sd, path)
    else:  # SelaVPR / CricaVPR: DataParallel keys inside {'model_state_dict'}
        torch.save({"model_state_dict": {"module." + k: v for k, v in sd.items()}}, path)
    return path


def image_path(relative: str) -> Path:
    """Fixture image paths are relative to shared/data, which the repository ships as data/."""
    return DATA / relative
