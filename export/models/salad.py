"""SALAD: optimal-transport aggregation of DINOv2 tokens (Izquierdo & Civera, CVPR 2024).

Written from the method's equations (shared/research/salad-dinov2.md §1.3), not from the GPL
reference code, so that its ONNX graph builds in TensorRT with a dynamic batch:

* no axis-less ``Squeeze`` (potentials keep their reduced axis: ``keepdim=True``);
* no ``ReduceLogSumExp``: TensorRT lowers it without the max shift and overflows
  (NVIDIA/TensorRT#4772), so the log-sum-exp is max-shifted here;
* no in-place slice writes (``ScatterND``) and no ``repeat`` (``Tile``): the dustbin row is
  concatenated and the aggregation is one batched matmul;
* the Sinkhorn marginals are constants derived from the patch count of the fixed image size.

Descriptor: ``L2(concat[L2(token) (256), L2-per-cluster(V) flattened channel-major (128 x 64)])``
= 8448-D for the official configuration.
"""
from __future__ import annotations

import math
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import route_keys
from ..registry import CheckpointFormat, Method, ModelConfig, register_method, register_model
from .dinov2 import DinoV2Backbone
from .vpr_model import VPRModel


def _logsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    shift = x.amax(dim=dim, keepdim=True).detach()
    return shift + (x - shift).exp().sum(dim=dim, keepdim=True).log()


class Sinkhorn(nn.Module):
    """Log-domain Sinkhorn with a dustbin row, reg = 1, as in SALAD.

    Marginals: each of the ``m`` clusters receives 1/(n+m), the dustbin (n-m)/(n+m), and each of
    the ``n`` patches sends 1/(n+m). The returned log-plan is scaled by (n+m), so every patch
    column sums to one.
    """

    def __init__(self, num_clusters: int, num_patches: int, iterations: int = 3) -> None:
        super().__init__()
        m, n = num_clusters, num_patches
        if n <= m:
            raise ValueError(f"SALAD needs more patches ({n}) than clusters ({m}): use a larger image")
        self.iterations = iterations
        norm = -torch.tensor(float(n + m)).log()
        log_a = norm.expand(m + 1).clone()
        log_a[-1] = log_a[-1] + math.log(n - m)
        self.register_buffer("log_a", log_a.reshape(1, m + 1, 1), persistent=False)
        self.register_buffer("log_b", norm.expand(n).clone().reshape(1, 1, n), persistent=False)
        self.register_buffer("norm", norm.reshape(1, 1, 1), persistent=False)

    def forward(self, scores: torch.Tensor, dust_bin: torch.Tensor) -> torch.Tensor:
        """scores (B, m, n) -> log transport plan (B, m + 1, n); float32 throughout."""
        scores = scores.float()
        dust = dust_bin.float().reshape(1, 1, 1).expand(scores.shape[0], 1, scores.shape[2])
        s = torch.cat([scores, dust], dim=1)
        u = self.log_a - _logsumexp(s, dim=2)  # first step from v = 0
        v = self.log_b - _logsumexp(s + u, dim=1)
        for _ in range(self.iterations - 1):
            u = self.log_a - _logsumexp(s + v, dim=2)
            v = self.log_b - _logsumexp(s + u, dim=1)
        return s + u + v - self.norm


class SALAD(nn.Module):
    """The SALAD head. Parameter names and shapes follow the official checkpoint, except that the
    1x1 convolutions are stored as Linear weights (the loader reshapes them)."""

    def __init__(self, num_channels: int = 768, num_clusters: int = 64, cluster_dim: int = 128,
                 token_dim: int = 256, num_patches: int = 529, hidden: int = 512,
                 dropout: float = 0.3, sinkhorn_iterations: int = 3) -> None:
        super().__init__()
        self.num_clusters, self.cluster_dim, self.token_dim = num_clusters, cluster_dim, token_dim
        self.token_features = nn.Sequential(
            nn.Linear(num_channels, hidden), nn.ReLU(), nn.Linear(hidden, token_dim))
        self.cluster_features = nn.Sequential(
            nn.Linear(num_channels, hidden), nn.Dropout(dropout), nn.ReLU(), nn.Linear(hidden, cluster_dim))
        self.score = nn.Sequential(
            nn.Linear(num_channels, hidden), nn.Dropout(dropout), nn.ReLU(), nn.Linear(hidden, num_clusters))
        self.dust_bin = nn.Parameter(torch.tensor(1.0))
        self.sinkhorn = Sinkhorn(num_clusters, num_patches, sinkhorn_iterations)

    @property
    def dim(self) -> int:
        return self.token_dim + self.num_clusters * self.cluster_dim

    def scores(self, patches: torch.Tensor) -> torch.Tensor:
        """Cluster scores (B, m, n) of the patch tokens."""
        return self.score(patches).transpose(1, 2)

    def aggregate(self, cls: torch.Tensor, patches: torch.Tensor, log_plan: torch.Tensor) -> torch.Tensor:
        """Descriptor from the tokens and a Sinkhorn log-plan (B, m + 1, n)."""
        features = self.cluster_features(patches)  # (B, n, l)
        plan = log_plan[:, : self.num_clusters, :].exp()  # (B, m, n), dustbin dropped
        clusters = torch.bmm(features.transpose(1, 2), plan.transpose(1, 2))  # (B, l, m)
        clusters = F.normalize(clusters, dim=1).flatten(1)  # channel-major: index l * m + k
        token = F.normalize(self.token_features(cls), dim=-1)
        return F.normalize(torch.cat([token, clusters], dim=-1), dim=-1)

    def forward(self, cls: torch.Tensor, patches: torch.Tensor) -> dict:
        log_plan = self.sinkhorn(self.scores(patches), self.dust_bin)
        return {"descriptor": self.aggregate(cls, patches, log_plan)}


class SaladSplit(nn.Module):
    """A SALAD model that stops before the optimal transport: the runtime's numpy Sinkhorn
    (``runtime/sinkhorn.py``) finishes the descriptor. Outputs: ``token`` (B, 256) before its
    L2, ``cluster_features`` (B, n, 128) and ``scores`` (B, 64, n)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not isinstance(model.head, SALAD):
            raise ValueError("split mode is for SALAD models only")
        self.model = model

    def forward(self, images: torch.Tensor) -> dict:
        cls, patches = self.model.backbone(images)
        head = self.model.head
        return {"token": head.token_features(cls), "cluster_features": head.cluster_features(patches),
                "scores": head.scores(patches)}

    def split_info(self) -> dict:
        head = self.model.head
        return {"method": "salad", "dust_bin": float(head.dust_bin.detach()),
                "iterations": head.sinkhorn.iterations, "descriptor_dim": head.dim}


# --- the method ---------------------------------------------------------------------------------

@register_method
class SaladMethod(Method):
    name = "salad"
    resize = "pil_bilinear"  # eval.py input_transform: PIL resize, then normalise
    layout = "L2([L2(token) (256), L2 per cluster of 128 channels x 64 clusters, channel-major: 256 + l*64 + k])"
    fp32_scopes = ("sinkhorn",)
    min_patches = 65  # the Sinkhorn's dustbin mass is log(n - m): more patches than the 64 clusters
    formats = (CheckpointFormat(
        "salad", "`dino_salad.ckpt`: raw state_dict, `backbone.model.<DINOv2>`, `aggregator.*`",
        lambda keys: "aggregator.dust_bin" in keys and "backbone.model.cls_token" in keys,
        lambda sd, cfg: route_keys(sd, cfg, backbone="backbone.model.", head=[("aggregator.", "")])),)

    def build(self, cfg: ModelConfig) -> VPRModel:
        backbone = DinoV2Backbone(cfg.arch, cfg.image_size, depth=cfg.depth)
        return VPRModel(backbone, SALAD(num_channels=backbone.dim, num_patches=cfg.num_patches))

    def outputs(self, cfg: ModelConfig) -> Dict[str, List[int]]:
        return {"descriptor": [256 + 64 * 128]}


@register_model
def salad_dinov2_vitb14() -> ModelConfig:
    """DINOv2 ViT-B/14 + SALAD (8448-D), evaluated at 322x322 as in the official README"""
    return ModelConfig(name="salad-dinov2-vitb14", method="salad", arch="vitb14", image_size=(322, 322),
                       checkpoint_url="https://github.com/serizba/salad/releases/download/v1.0.0/dino_salad.ckpt")
