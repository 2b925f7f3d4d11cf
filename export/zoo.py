"""Build registry models as PyTorch modules, from an official checkpoint or random weights."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional, Tuple, Union

import torch

from .checkpoints import DEFAULT_CACHE, load_checkpoint
from .models.vpr_model import VPRModel
from .registry import ImageSize, ModelConfig, get_config


def build_module(cfg: ModelConfig) -> VPRModel:
    """The architecture of ``cfg`` with freshly initialised weights, in eval mode."""
    return cfg.spec.build(cfg).eval()


def create_model(model: Union[str, ModelConfig], checkpoint: Optional[str] = None,
                 random_weights: bool = False, seed: int = 0, image_size: Optional[ImageSize] = None,
                 depth: Optional[int] = None, cache_dir: Path = DEFAULT_CACHE) -> Tuple[VPRModel, ModelConfig, dict]:
    """Build a model and load its weights. Returns (model, config, weights info for manifests).

    Exactly one of ``checkpoint`` and ``random_weights`` must be given: a model with random
    weights is only good for tests and benchmarks, and is labelled as such.
    """
    cfg = model if isinstance(model, ModelConfig) else get_config(model, image_size=image_size, depth=depth)
    if (checkpoint is None) == (not random_weights):
        raise ValueError("give exactly one of a checkpoint and random_weights=True")
    torch.manual_seed(seed)
    net = build_module(cfg)
    if checkpoint is not None:
        info = load_checkpoint(net, cfg, checkpoint, cache_dir)
    else:
        # timm initialises LayerScale at 1e-5, which makes every block almost a no-op; trained
        # DINOv2 gammas are of order 0.1, so random-weight models (tests, benchmarks) use that
        with torch.no_grad():
            for name, p in net.named_parameters():
                if name.endswith((".ls1.gamma", ".ls2.gamma")):
                    p.fill_(0.1)
        info = {"random_weights": True, "seed": seed, "layer_scale": 0.1, "tensors_sha256": tensors_sha256(net)}
    return net.eval(), cfg, info


def tensors_sha256(net: torch.nn.Module) -> str:
    """sha256 over the state dict (names, shapes, float32 values, in order): identifies random
    weights the way a checkpoint's sha256 identifies trained ones (a map records it)."""
    h = hashlib.sha256()
    for name, t in net.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:".encode())
        h.update(t.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return h.hexdigest()
