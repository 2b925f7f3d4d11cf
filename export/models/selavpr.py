"""SelaVPR (Lu et al., ICLR 2024): adapters in a frozen DINOv2, GeM global descriptor and a
dense local head for mutual-nearest-neighbour re-ranking.

Per block (official ``backbone/dinov2/block.py``, MIT):
``x += ls1(adapter1(attn(norm1(x))))`` with a serial bottleneck adapter that keeps a skip, and
``x += ls2(mlp(norm2(x)) + s * adapter2(norm2(x)))`` with a parallel one without skip, s = 0.2.
The bottleneck is D -> D/2 -> D with ReLU.
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import route_keys
from ..registry import CheckpointFormat, Method, ModelConfig, register_method, register_model
from .dinov2 import DinoV2Backbone
from .gem import GeM
from .vpr_model import VPRModel


class BottleneckAdapter(nn.Module):
    """``fc2(relu(fc1(x)))``, plus ``x`` when ``skip``."""

    def __init__(self, dim: int, hidden: int, skip: bool) -> None:
        super().__init__()
        self.skip = skip
        self.D_fc1 = nn.Linear(dim, hidden)
        self.D_fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.D_fc2(F.relu(self.D_fc1(x)))
        return x + y if self.skip else y


class SelaBlock(nn.Module):
    """A DINOv2 block with SelaVPR's serial and parallel adapters (reuses the block's modules)."""

    def __init__(self, block: nn.Module, adapter_ratio: float = 0.5, parallel_scale: float = 0.2) -> None:
        super().__init__()
        dim = block.norm1.normalized_shape[0]
        hidden = int(dim * adapter_ratio)
        self.norm1, self.attn, self.ls1 = block.norm1, block.attn, block.ls1
        self.norm2, self.mlp, self.ls2 = block.norm2, block.mlp, block.ls2
        self.adapter1 = BottleneckAdapter(dim, hidden, skip=True)
        self.adapter2 = BottleneckAdapter(dim, hidden, skip=False)
        self.parallel_scale = parallel_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.adapter1(self.attn(self.norm1(x))))
        h = self.norm2(x)
        return x + self.ls2(self.mlp(h) + self.parallel_scale * self.adapter2(h))


class LocalAdapt(nn.Module):
    """Two stride-2 transposed convolutions: a g x g patch map -> (4g - 3)^2 local features."""

    def __init__(self, dim: int = 1024, hidden: int = 256, out_dim: int = 128) -> None:
        super().__init__()
        self.upconv1 = nn.ConvTranspose2d(dim, hidden, kernel_size=3, stride=2, padding=1)
        self.upconv2 = nn.ConvTranspose2d(hidden, out_dim, kernel_size=3, stride=2, padding=1)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.upconv2(F.relu(self.upconv1(fmap)))


class SelaVPRHead(nn.Module):
    """Global: per-location channel L2 -> GeM -> L2. Local: LocalAdapt -> per-location L2,
    returned channels-last (B, 61, 61, 128) as the official code stores it."""

    def __init__(self, dim: int = 1024, grid: tuple = (16, 16), local_dim: int = 128) -> None:
        super().__init__()
        self.grid = grid
        self.gem = GeM(p=3.0, learnable=True)
        self.local = LocalAdapt(dim, 256, local_dim)

    def forward(self, cls: torch.Tensor, patches: torch.Tensor) -> dict:
        gh, gw = self.grid
        descriptor = F.normalize(self.gem(F.normalize(patches, dim=-1)), dim=-1)
        fmap = patches.reshape(-1, gh, gw, patches.shape[-1]).permute(0, 3, 1, 2)
        local = F.normalize(self.local(fmap).permute(0, 2, 3, 1), dim=-1)
        return {"descriptor": descriptor, "local_features": local}


# --- the method ---------------------------------------------------------------------------------

@register_method
class SelaVPRMethod(Method):
    name = "selavpr"
    resize = "tensor_bilinear"  # datasets_ws.base_transform: normalise, then resize (no antialias)
    layout = "descriptor: L2(GeM(p) of channel-L2 patch tokens); local_features: (H', W', 128) per-location L2"
    fp32_scopes = ("gem",)
    fixed_sizes = ((224, 224),)
    fixed_size_reason = "its official head hard-codes a 16x16 patch grid"
    formats = (CheckpointFormat(
        "selavpr", "SelaVPR `*.pth`: `{'model_state_dict'}`, `module.` prefix, `backbone.*` with `adapter1`, "
                   "`LocalAdapt.*`",
        lambda keys: any(".adapter1.D_fc1." in k for k in keys) and any(k.startswith("LocalAdapt.") for k in keys),
        lambda sd, cfg: route_keys(sd, cfg, backbone="backbone.",
                                   head=[("aggregation.1.p", "gem.p"), ("LocalAdapt.", "local.")])),)

    def build(self, cfg: ModelConfig) -> VPRModel:
        backbone = DinoV2Backbone(cfg.arch, cfg.image_size, depth=cfg.depth, block_wrapper=SelaBlock)
        return VPRModel(backbone, SelaVPRHead(backbone.dim, cfg.grid))

    def outputs(self, cfg: ModelConfig) -> Dict[str, List[int]]:
        gh, gw = cfg.grid
        return {"descriptor": [cfg.embed_dim], "local_features": [4 * gh - 3, 4 * gw - 3, 128]}


@register_model
def selavpr_dinov2_vitl14() -> ModelConfig:
    """SelaVPR: DINOv2 ViT-L/14 with adapters, GeM global (1024-D) + 61x61x128 local features"""
    return ModelConfig(name="selavpr-dinov2-vitl14", method="selavpr", arch="vitl14", image_size=(224, 224))
