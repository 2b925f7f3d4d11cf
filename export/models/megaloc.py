"""MegaLoc (Berton & Masone, 2025): DINOv2 ViT-B/14, a SALAD-style optimal-transport aggregator
(64 clusters x 256 channels + a 256-D scene token = 16640) and a Linear 16640 -> 8448, then L2.

Facts from the official code (gmberton/MegaLoc@1af071c, MIT; preprocessing from
gmberton/VPR-methods-evaluation; shared/research/round2-anchors.md §1):

* The backbone is MegaLoc's own DINOv2-compatible ViT-B/14 (LayerNorm eps 1e-6, exact GELU,
  LayerScale); its position embedding is resampled as DINOv2 does (bicubic, +0.1 scale offset,
  in (H, W) order since MegaLoc@4a23a2b; the older (W, H) order moved non-square descriptors by
  1.3e-4). Our timm backbone with the resampled embedding baked in computes the same function.
* The aggregator is SALAD's with 256-channel clusters and the same 3-iteration Sinkhorn, so it
  is our TensorRT-safe SALAD head (``salad.py``), followed by the Linear (141M parameters).
* ``MegaLoc.forward`` resizes any side that is not a multiple of 14 to ``round(x / 14) * 14``
  (Python ``round``: half to even) with an antialiased bilinear resize. TensorRT has no
  antialiased resize, so that step is preprocessing here (``round_size`` below, applied by
  ``runtime/preprocess.py``) and the engine gets the rounded, fixed size: 240x320 -> 238x322.
* With fewer patches than clusters the official Sinkhorn fails (``math domain error`` from
  ``log(n - m)``); such sizes are refused when the configuration is made.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import route_keys
from ..registry import PATCH, CheckpointFormat, Method, ModelConfig, register_method, register_model
from .dinov2 import DinoV2Backbone
from .salad import SALAD
from .vpr_model import VPRModel

NUM_CLUSTERS, CLUSTER_DIM, TOKEN_DIM, HIDDEN, OUT_DIM = 64, 256, 256, 512, 8448


class MegaLocHead(nn.Module):
    """``L2(linear(SALAD(cls, patches)))``; ``agg`` and ``linear`` are the checkpoint's
    ``aggregator.agg`` and ``aggregator.linear``."""

    def __init__(self, num_channels: int = 768, num_patches: int = 529) -> None:
        super().__init__()
        self.agg = SALAD(num_channels=num_channels, num_clusters=NUM_CLUSTERS, cluster_dim=CLUSTER_DIM,
                         token_dim=TOKEN_DIM, num_patches=num_patches, hidden=HIDDEN)
        self.linear = nn.Linear(self.agg.dim, OUT_DIM)

    def forward(self, cls: torch.Tensor, patches: torch.Tensor) -> dict:
        return {"descriptor": F.normalize(self.linear(self.agg(cls, patches)["descriptor"]), dim=-1)}


def _is_megaloc(keys: frozenset) -> bool:
    return "aggregator.agg.dust_bin" in keys and "aggregator.linear.weight" in keys


@register_method
class MegaLocMethod(Method):
    name = "megaloc"
    resize = "tensor_bilinear_antialias"  # VPR-methods-evaluation: normalise, then antialiased resize
    layout = ("L2(Linear 16640->8448 of L2([L2(token) (256), L2 per cluster of 256 channels x 64 clusters, "
              "channel-major: 256 + l*64 + k]))")
    fp32_scopes = ("sinkhorn",)
    min_patches = NUM_CLUSTERS + 1
    formats = (
        CheckpointFormat(
            "megaloc", "Hugging Face `gberton/MegaLoc` `model.safetensors`: flat dict, `backbone.<ViT key>`, "
                       "`aggregator.agg.*`, `aggregator.linear.*`",
            lambda keys: _is_megaloc(keys) and "backbone.cls_token" in keys,
            lambda sd, cfg: route_keys(sd, cfg, backbone="backbone.",
                                       head=[("aggregator.agg.", "agg."), ("aggregator.linear.", "linear.")])),
        CheckpointFormat(
            "megaloc-legacy", "GitHub release v1.0 `megaloc.torch` (before 2026-01-21): raw state_dict, "
                              "`backbone.model.<DINOv2 key>` (+ unused `mask_token`), `aggregator.*`",
            lambda keys: _is_megaloc(keys) and "backbone.model.cls_token" in keys,
            lambda sd, cfg: route_keys(sd, cfg, backbone="backbone.model.",
                                       head=[("aggregator.agg.", "agg."), ("aggregator.linear.", "linear.")],
                                       unused=("backbone.model.mask_token",))),
    )

    def round_size(self, size: Tuple[int, int]) -> Tuple[int, int]:
        """MegaLoc.forward's own resize target: each side to the nearest multiple of 14, by Python's
        ``round`` (half to even, as the official code)."""
        return tuple(round(side / PATCH) * PATCH for side in size)

    def sizes_text(self) -> str:
        return (f"it takes any H and W, each rounded to the nearest multiple of {PATCH} as the official model does "
                f"(240x320 -> 238x322), with more patches than its {NUM_CLUSTERS} clusters "
                "(e.g. 126x126: 81 patches)")

    def build(self, cfg: ModelConfig) -> VPRModel:
        backbone = DinoV2Backbone(cfg.arch, cfg.image_size, depth=cfg.depth)
        return VPRModel(backbone, MegaLocHead(backbone.dim, cfg.num_patches))

    def outputs(self, cfg: ModelConfig) -> Dict[str, List[int]]:
        return {"descriptor": [OUT_DIM]}


@register_model
def megaloc_dinov2_vitb14() -> ModelConfig:
    """MegaLoc: DINOv2 ViT-B/14 + SALAD-style aggregator + Linear (8448-D); 322x322 by default, any
    size rounded to multiples of 14 as the official model does"""
    return ModelConfig(name="megaloc-dinov2-vitb14", method="megaloc", arch="vitb14", image_size=(322, 322),
                       checkpoint_url="https://huggingface.co/gberton/MegaLoc/resolve/main/model.safetensors")
