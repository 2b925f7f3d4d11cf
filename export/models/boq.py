"""BoQ, Bag-of-Queries (Ali-bey et al., CVPR 2024), DINOv2 ViT-B/14 variant (12288-D).

Facts from the official code (amaralibey/Bag-of-Queries@1a4965e, MIT; written here from them):

* Backbone: DINOv2 ViT-B/14 (official hub model: position embedding resampled bicubic with the
  +0.1 offset), the last block's patch tokens **without** DINOv2's final LayerNorm (its weights
  are in the checkpoint but never used).
* Aggregator: 3x3 convolution 768 -> 384, LayerNorm, then 2 blocks. Each block: a post-LN
  transformer encoder layer over the tokens (6 heads, FFN 1536, ReLU, eps 1e-5); 64 learned
  queries -> ``norm_q(q + self_attn(q, q, q))``; cross-attention of those queries over the
  tokens -> ``norm_out`` (no residual). The 2 x 64 query outputs are concatenated and a Linear
  128 -> 32 maps them per channel: (384, 32), flattened channel-major (``c * 32 + r``), L2.
* The queries' self-attention does not depend on the image: it is written here as ordinary
  operations on parameters, which the ONNX export folds to a constant.
* PyTorch runs the official modules in eval through fused fast paths
  (``_transformer_encoder_layer_fwd``, ``_native_multi_head_attention``). Those are not ONNX or
  TensorRT ops; this module uses MatMul / Softmax / LayerNorm only, with the parameter names of
  ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` so that the checkpoint loads as is.
  The two paths agree within float noise (the fixture README: 3e-8 on descriptors).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import route_keys
from ..registry import CheckpointFormat, Method, ModelConfig, register_method, register_model
from .dinov2 import DinoV2Backbone
from .vpr_model import VPRModel

RELEASE = "https://github.com/amaralibey/Bag-of-Queries/releases/download/v1.0/dinov2_12288.pth"


class Attention(nn.Module):
    """Batch-first multi-head attention from MatMul and Softmax, with ``nn.MultiheadAttention``'s
    parameter names. A query batch of 1 is broadcast over the keys' batch."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, D) -> (B, heads, L, head_dim)
        return x.reshape(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                average_weights: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """-> (output (B, Lq, D), attention weights averaged over heads (B, Lq, Lk) if asked)."""
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        q = self._split(F.linear(query, wq, bq)) * (1.0 / math.sqrt(self.head_dim))
        k, v = self._split(F.linear(key, wk, bk)), self._split(F.linear(value, wv, bv))
        weights = torch.softmax(torch.matmul(q, k.transpose(-2, -1)), dim=-1)
        out = torch.matmul(weights, v).transpose(1, 2)
        out = self.out_proj(out.reshape(out.shape[0], out.shape[1], self.heads * self.head_dim))
        return out, (weights.mean(dim=1) if average_weights else None)


class EncoderLayer(nn.Module):
    """``nn.TransformerEncoderLayer(batch_first=True, norm_first=False, activation=relu,
    dropout=0)``: post-LN self-attention and ReLU feed-forward, same parameter names."""

    def __init__(self, dim: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.self_attn = Attention(dim, heads)
        self.linear1 = nn.Linear(dim, ffn)
        self.linear2 = nn.Linear(ffn, dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.self_attn(x, x, x)[0])
        return self.norm2(x + self.linear2(F.relu(self.linear1(x))))


class BoQBlock(nn.Module):
    def __init__(self, dim: int, num_queries: int, heads: int) -> None:
        super().__init__()
        self.encoder = EncoderLayer(dim, heads, 4 * dim)
        self.queries = nn.Parameter(torch.randn(1, num_queries, dim))
        self.self_attn = Attention(dim, heads)
        self.norm_q = nn.LayerNorm(dim, eps=1e-5)
        self.cross_attn = Attention(dim, heads)
        self.norm_out = nn.LayerNorm(dim, eps=1e-5)

    def learned_queries(self) -> torch.Tensor:
        """``norm_q(q + self_attn(q, q, q))`` (1, Q, D): a function of the parameters alone."""
        q = self.queries
        return self.norm_q(q + self.self_attn(q, q, q)[0])

    def forward(self, x: torch.Tensor, with_attention: bool = False):
        """tokens (B, N, D) -> (encoded tokens, query outputs (B, Q, D), head-averaged attention)."""
        x = self.encoder(x)
        out, attention = self.cross_attn(self.learned_queries(), x, x, average_weights=with_attention)
        return x, self.norm_out(out), attention


class BoQHead(nn.Module):
    def __init__(self, in_channels: int = 768, grid: Tuple[int, int] = (23, 23), proj_channels: int = 384,
                 num_queries: int = 64, num_layers: int = 2, row_dim: int = 32) -> None:
        super().__init__()
        self.grid = grid
        self.proj_c = nn.Conv2d(in_channels, proj_channels, kernel_size=3, padding=1)
        self.norm_input = nn.LayerNorm(proj_channels, eps=1e-5)
        self.boqs = nn.ModuleList([BoQBlock(proj_channels, num_queries, proj_channels // 64)
                                   for _ in range(num_layers)])
        self.fc = nn.Linear(num_layers * num_queries, row_dim)

    def details(self, patches: torch.Tensor, with_attention: bool = False) -> Dict[str, object]:
        """Descriptor and what leads to it: ``block_inputs`` (tokens entering each block),
        ``outputs`` (each block's query outputs), ``attention`` and ``rows`` (the fc output)."""
        gh, gw = self.grid
        fmap = patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], gh, gw)
        x = self.norm_input(self.proj_c(fmap).flatten(2).transpose(1, 2))
        seen: Dict[str, list] = {"block_inputs": [], "outputs": [], "attention": []}
        for block in self.boqs:
            seen["block_inputs"].append(x)
            x, out, attention = block(x, with_attention)
            seen["outputs"].append(out)
            seen["attention"].append(attention)
        rows = self.fc(torch.cat(seen["outputs"], dim=1).transpose(1, 2))  # (B, channels, row_dim)
        return {**seen, "rows": rows, "descriptor": F.normalize(rows.flatten(1), dim=-1)}

    def forward(self, cls: torch.Tensor, patches: torch.Tensor) -> dict:
        return {"descriptor": self.details(patches)["descriptor"]}


@register_method
class BoQMethod(Method):
    name = "boq"
    resize = "tensor_bicubic_antialias"  # README input_transform: bicubic (antialiased) on [0, 1], then normalise
    layout = "L2(fc over the 2 x 64 query outputs: 384 channels x 32 rows, channel-major: c*32 + r)"
    fp32_scopes = ("norm_input", "norm_q", "norm_out")  # decomposed LayerNorms (trt8.5) of the aggregator
    formats = (CheckpointFormat(
        "boq-dinov2", "`dinov2_12288.pth`: raw state_dict, `backbone.dino.<DINOv2 key>` (+ unused `mask_token`, "
                      "`norm.*`), `aggregator.*`",
        lambda keys: "backbone.dino.cls_token" in keys and "aggregator.boqs.0.queries" in keys,
        lambda sd, cfg: route_keys(sd, cfg, backbone="backbone.dino.", head=[("aggregator.", "")],
                                   unused=("backbone.dino.mask_token", "backbone.dino.norm.weight",
                                           "backbone.dino.norm.bias"))),)

    def build(self, cfg: ModelConfig) -> VPRModel:
        backbone = DinoV2Backbone(cfg.arch, cfg.image_size, depth=cfg.depth, final_norm=False)
        return VPRModel(backbone, BoQHead(backbone.dim, cfg.grid))

    def outputs(self, cfg: ModelConfig) -> Dict[str, List[int]]:
        return {"descriptor": [384 * 32]}


@register_model
def boq_dinov2_vitb14() -> ModelConfig:
    """BoQ: DINOv2 ViT-B/14 (no final LayerNorm) + Bag-of-Queries aggregator (12288-D), at 322x322
    as the official README transform"""
    return ModelConfig(name="boq-dinov2-vitb14", method="boq", arch="vitb14", image_size=(322, 322),
                       checkpoint_url=RELEASE)
