"""Generalised-mean (GeM) pooling over patch tokens, and the DINOv2 + GeM method.

GeM is also the pooling of SelaVPR and CricaVPR (``learnable=True``: their checkpoints store
``p``). DINOv2 + GeM has no trained head: it loads a DINOv2 backbone checkpoint, official or timm.
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import route_keys
from ..registry import ARCHS, CheckpointFormat, Method, ModelConfig, register_method, register_model
from .dinov2 import DinoV2Backbone
from .vpr_model import VPRModel


class GeM(nn.Module):
    """``(mean_n clamp(x, eps)^p)^(1/p)`` over the token axis.

    ``p`` is a fixed buffer by default (a plain DINOv2 + GeM model has no trained head, so a
    strict checkpoint load must not expect one); ``learnable=True`` makes it a parameter, as in
    SelaVPR/CricaVPR whose checkpoints store ``aggregation.1.p``.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learnable: bool = False) -> None:
        super().__init__()
        self.eps = eps
        p_tensor = torch.full((1,), float(p))
        if learnable:
            self.p = nn.Parameter(p_tensor)
        else:
            self.register_buffer("p", p_tensor, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, C)."""
        return tokens.clamp(min=self.eps).pow(self.p).mean(dim=1).pow(1.0 / self.p)


class GeMHead(nn.Module):
    """DINOv2 + GeM: GeM over the patch tokens, then L2 (the GeM of SALAD's repository)."""

    def __init__(self, p: float = 3.0, learnable: bool = False) -> None:
        super().__init__()
        self.gem = GeM(p=p, learnable=learnable)

    def forward(self, cls: torch.Tensor, patches: torch.Tensor) -> dict:
        return {"descriptor": F.normalize(self.gem(patches), dim=-1)}


# --- the method: plain DINOv2 + GeM -----------------------------------------------------------

def _is_dinov2(keys: frozenset) -> bool:
    return "cls_token" in keys and "blocks.0.attn.qkv.weight" in keys


@register_method
class GeMMethod(Method):
    """DINOv2 patch tokens + GeM (p = 3) + L2: the GeM of SALAD's repository, a strong
    training-free baseline. Loads a DINOv2 backbone checkpoint (there is no trained head)."""

    name = "gem"
    resize = "pil_bilinear"
    layout = "L2(GeM(p=3) over patch tokens)"
    fp32_scopes = ("gem",)
    formats = (
        CheckpointFormat(
            "dinov2", "official DINOv2 `*.pth` (raw state_dict with `mask_token`)",
            lambda keys: _is_dinov2(keys) and "mask_token" in keys,
            lambda sd, cfg: route_keys(sd, cfg, backbone="")),
        CheckpointFormat(
            "timm-dinov2", "timm DINOv2 weights (`.pth` / `.safetensors`: `reg_token`, no `mask_token`)",
            lambda keys: _is_dinov2(keys) and "mask_token" not in keys,
            lambda sd, cfg: route_keys(sd, cfg, backbone="", official=False)),
    )

    def build(self, cfg: ModelConfig) -> VPRModel:
        backbone = DinoV2Backbone(cfg.arch, cfg.image_size, registers=cfg.registers, depth=cfg.depth)
        return VPRModel(backbone, GeMHead())

    def outputs(self, cfg: ModelConfig) -> Dict[str, List[int]]:
        return {"descriptor": [cfg.embed_dim]}


@register_model
def gem_dinov2() -> List[ModelConfig]:
    """DINOv2 patch tokens + GeM (p=3) + L2"""
    return [ModelConfig(name=f"gem-dinov2-{arch}{'-reg' if reg else ''}", method="gem", arch=arch,
                        image_size=(322, 322), registers=reg)
            for arch in ARCHS for reg in (False, True)]
