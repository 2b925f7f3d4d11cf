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


def save_official_checkpoint(model: str, path: Path, legacy: bool = False) -> Path:
    """Write the rebuilt weights in the official container of ``model``. MegaLoc: the Hugging Face
    safetensors file, or with ``legacy`` the GitHub v1.0 ``megaloc.torch`` layout (keys
    ``backbone.model.*`` plus the unused ``mask_token``, drawn by the same weight rule)."""
    import torch

    sd = rebuild_state_dict(model)
    if model == "megaloc" and not legacy:
        from safetensors.torch import save_file
        save_file(sd, str(path))
    elif model == "megaloc":
        sd = {k.replace("backbone.", "backbone.model.", 1): v for k, v in sd.items()}
        rng = np.random.RandomState(zlib.crc32(b"backbone.model.mask_token"))
        sd["backbone.model.mask_token"] = torch.from_numpy((rng.standard_normal((1, 768)) * 0.02).astype("float32"))
        torch.save(sd, path)
    elif model in ("salad", "boq"):  # raw state_dict
        torch.save(sd, path)
    else:  # SelaVPR / CricaVPR: DataParallel keys inside {'model_state_dict'}
        torch.save({"model_state_dict": {"module." + k: v for k, v in sd.items()}}, path)
    return path


def image_path(relative: str) -> Path:
    """Fixture image paths are relative to shared/data, which the repository ships as data/."""
    return DATA / relative
