"""CricaVPR (Lu et al., CVPR 2024): multi-scale convolutional adapters, multi-level pooling and a
cross-image encoder that attends across the images of a batch.

* MulConv adapter (official ``backbone/dinov2/block.py``, MIT) beside the MLP of every block,
  scaled by 0.2: fc1 -> ReLU -> patch map through three conv-BN-ReLU branches (1x1, 1x1->3x3,
  1x1->5x5), concatenated, class token re-attached, plus the fc1 output, -> fc2.
* 14 region vectors: the class token, then GeM over a 2x2 and a 3x3 split of the patch map
  (row-major), after a per-location channel L2.
* Cross-image encoder: 2 post-norm transformer layers (d 768, 16 heads, FFN 2048, GELU). The
  official code feeds (B, 14, D) to a sequence-first encoder, so each of the 14 region slots
  attends over the B images of the batch. ``batched`` mode reproduces that; ``independent``
  mode lets each image attend only to itself (identical to running the official model one image
  at a time), which makes map descriptors independent of how the map was batched.
"""
from __future__ import annotations

import math
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import route_keys
from ..registry import CheckpointFormat, Method, ModelConfig, register_method, register_model
from .dinov2 import DinoV2Backbone
from .gem import GeM
from .vpr_model import VPRModel

BATCH_MODES = ("batched", "independent")


class ConvBNReLU(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=True)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class MulConvAdapter(nn.Module):
    def __init__(self, dim: int = 768, hidden: int = 384, c1: int = 192, c3_in: int = 24, c3: int = 96,
                 c5_in: int = 24, c5: int = 96, grid: Tuple[int, int] = (16, 16)) -> None:
        super().__init__()
        if c1 + c3 + c5 != hidden:
            raise ValueError("the three branches must add up to the hidden width")
        self.grid = grid
        self.D_fc1 = nn.Linear(dim, hidden)
        self.D_fc2 = nn.Linear(hidden, dim)
        self.branch1 = ConvBNReLU(hidden, c1, 1)
        self.branch2 = nn.Sequential(ConvBNReLU(hidden, c3_in, 1), ConvBNReLU(c3_in, c3, 3))
        self.branch3 = nn.Sequential(ConvBNReLU(hidden, c5_in, 1), ConvBNReLU(c5_in, c5, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.D_fc1(x))
        gh, gw = self.grid
        fmap = h[:, 1:].reshape(-1, gh, gw, h.shape[-1]).permute(0, 3, 1, 2)
        conv = torch.cat([self.branch1(fmap), self.branch2(fmap), self.branch3(fmap)], dim=1)
        conv = conv.flatten(2).transpose(1, 2)
        return self.D_fc2(torch.cat([h[:, :1], conv], dim=1) + h)


class CricaBlock(nn.Module):
    """A DINOv2 block with a MulConv adapter parallel to its MLP (reuses the block's modules)."""

    def __init__(self, block: nn.Module, grid: Tuple[int, int], scale: float = 0.2) -> None:
        super().__init__()
        dim = block.norm1.normalized_shape[0]
        self.norm1, self.attn, self.ls1 = block.norm1, block.attn, block.ls1
        self.norm2, self.mlp, self.ls2 = block.norm2, block.mlp, block.ls2
        self.adapter = MulConvAdapter(dim, dim // 2, dim // 4, dim // 32, dim // 8, dim // 32, dim // 8, grid)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        h = self.norm2(x)
        return x + self.ls2(self.mlp(h) + self.scale * self.adapter(h))


class CrossImageAttention(nn.Module):
    """Multi-head attention over the image axis. Parameter names follow ``nn.MultiheadAttention``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = 1.0 / math.sqrt(dim // heads)
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        """x (B, R, D): B images, R region slots."""
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        if mode == "independent":
            # attention over a one-element sequence: the softmax weight is exactly 1
            return self.out_proj(v)
        b, r, d = x.shape
        hd = d // self.heads

        def split(t: torch.Tensor) -> torch.Tensor:  # (B, R, D) -> (R, heads, B, hd)
            return t.reshape(-1, r, self.heads, hd).permute(1, 2, 0, 3)

        q, k, v = split(q), split(k), split(v)
        attn = torch.softmax(torch.matmul(q * self.scale, k.transpose(-2, -1)), dim=-1)
        out = torch.matmul(attn, v).permute(2, 0, 1, 3).reshape(-1, r, d)
        return self.out_proj(out)


class EncoderLayer(nn.Module):
    """Post-norm transformer layer with ``nn.TransformerEncoderLayer``'s parameter names."""

    def __init__(self, dim: int = 768, heads: int = 16, ffn: int = 2048, dropout: float = 0.1) -> None:
        super().__init__()
        self.self_attn = CrossImageAttention(dim, heads)
        self.linear1 = nn.Linear(dim, ffn)
        self.linear2 = nn.Linear(ffn, dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        x = self.norm1(x + self.dropout(self.self_attn(x, mode)))
        return self.norm2(x + self.dropout(self.linear2(self.dropout(F.gelu(self.linear1(x))))))


class CrossImageEncoder(nn.Module):
    def __init__(self, dim: int = 768, heads: int = 16, ffn: int = 2048, layers: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList([EncoderLayer(dim, heads, ffn) for _ in range(layers)])

    def forward(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, mode)
        return x


def split_bounds(size: int, parts: int) -> List[Tuple[int, int]]:
    """Region bounds of the official split: 16 -> 2: [0:8, 8:16]; 3: [0:5, 5:11, 11:16]."""
    edges = [int(math.floor(size * i / parts + 0.5)) for i in range(parts + 1)]
    return list(zip(edges[:-1], edges[1:]))


class CricaVPRHead(nn.Module):
    def __init__(self, dim: int = 768, grid: Tuple[int, int] = (16, 16), mode: str = "batched",
                 heads: int = 16, ffn: int = 2048, layers: int = 2) -> None:
        super().__init__()
        if mode not in BATCH_MODES:
            raise ValueError(f"unknown CricaVPR batch mode {mode!r}; expected one of {BATCH_MODES}")
        self.grid, self.mode = grid, mode
        self.gem = GeM(p=3.0, learnable=True)
        self.encoder = CrossImageEncoder(dim, heads, ffn, layers)

    def regions(self, cls: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """The 14 region vectors (B, 14, D) fed to the encoder."""
        gh, gw = self.grid
        fmap = F.normalize(patches, dim=-1).reshape(-1, gh, gw, patches.shape[-1])
        out = [cls]
        for parts in (2, 3):
            for r0, r1 in split_bounds(gh, parts):
                for c0, c1 in split_bounds(gw, parts):
                    out.append(self.gem(fmap[:, r0:r1, c0:c1, :].flatten(1, 2)))
        return torch.stack(out, dim=1)

    def forward(self, cls: torch.Tensor, patches: torch.Tensor) -> dict:
        tokens = self.encoder(self.regions(cls, patches), self.mode)
        return {"descriptor": F.normalize(tokens.flatten(1), dim=-1)}


# --- the method ---------------------------------------------------------------------------------

@register_method
class CricaVPRMethod(Method):
    name = "cricavpr"
    resize = "tensor_bilinear"  # datasets_ws.base_transform: normalise, then resize (no antialias)
    layout = "L2(14 regions x C: [cls, 2x2 row-major, 3x3 row-major] after the cross-image encoder)"
    batch_modes = BATCH_MODES
    fp32_scopes = ("gem",)
    fixed_sizes = ((224, 224),)
    fixed_size_reason = "its official head hard-codes a 16x16 patch grid"
    formats = (CheckpointFormat(
        "cricavpr", "`CricaVPR.pth`: `{'model_state_dict'}`, `module.` prefix, `backbone.*` with `adapter`, "
                    "`encoder.*`",
        lambda keys: any(".adapter.D_fc1." in k for k in keys) and any(k.startswith("encoder.layers.") for k in keys),
        lambda sd, cfg: route_keys(sd, cfg, backbone="backbone.",
                                   head=[("aggregation.1.p", "gem.p"), ("encoder.", "encoder.")])),)

    def build(self, cfg: ModelConfig) -> VPRModel:
        grid = cfg.grid
        backbone = DinoV2Backbone(cfg.arch, cfg.image_size, depth=cfg.depth,
                                  block_wrapper=lambda block: CricaBlock(block, grid))
        return VPRModel(backbone, CricaVPRHead(backbone.dim, grid, mode=cfg.batch_mode))

    def outputs(self, cfg: ModelConfig) -> Dict[str, List[int]]:
        return {"descriptor": [14 * cfg.embed_dim]}


@register_model
def cricavpr_dinov2_vitb14() -> List[ModelConfig]:
    """CricaVPR (10752-D), cross-image encoder in batched mode (as the official test loop) or
    independent mode (each image attends only to itself)"""
    return [ModelConfig(name="cricavpr-dinov2-vitb14" + ("" if mode == "batched" else "-independent"),
                        method="cricavpr", arch="vitb14", image_size=(224, 224), batch_mode=mode,
                        checkpoint_url="https://github.com/Lu-Feng/CricaVPR/releases/download/v1.0/CricaVPR.pth",
                        description=f"CricaVPR (10752-D), cross-image encoder in {mode} mode")
            for mode in BATCH_MODES]
