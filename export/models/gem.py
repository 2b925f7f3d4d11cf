"""Generalised-mean (GeM) pooling over patch tokens."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
