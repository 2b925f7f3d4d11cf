"""A VPR model = DINOv2 backbone + one head; what every tool here builds, loads and exports."""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn


class VPRModel(nn.Module):
    """``images (B,3,H,W) -> {output name: tensor}``; ``descriptor`` is always present."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        cls, patches = self.backbone(images)
        return self.head(cls, patches)
