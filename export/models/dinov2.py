"""DINOv2 ViT backbones built with timm at one fixed image size.

The official DINOv2 code resamples its 37x37 position-embedding grid on every forward with
``F.interpolate(scale_factor=(g + 0.1) / 37, mode='bicubic', antialias=False)`` (register models:
``size=g, antialias=True``, no offset). timm resamples differently (``size=`` with antialias), which
moves a SALAD descriptor by ~7e-5 (shared/research/salad-dinov2.md §3.3). We resample once, the
official way, when the checkpoint is loaded and bake the result into a timm model built at that
size: the graph then holds no Resize at all (TensorRT cannot run an antialiased one).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import timm
import torch
import torch.nn.functional as F
from torch import nn

from ..registry import ARCHS, PATCH  # noqa: F401 (PATCH is re-exported for the method modules)


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: Tuple[int, int], registers: bool,
                          has_cls: bool = True) -> torch.Tensor:
    """Resample a square DINOv2 position embedding to ``grid`` exactly as the official code does.

    ``pos_embed`` is (1, [1 +] M*M, C); the class-token entry, if present, is kept unchanged.
    """
    prefix = pos_embed[:, :1] if has_cls else pos_embed[:, :0]
    patch = pos_embed[:, 1:] if has_cls else pos_embed
    n, dim = patch.shape[1], patch.shape[2]
    m = int(math.isqrt(n))
    if m * m != n:
        raise ValueError(f"position embedding has {n} patch entries, not a square grid")
    gh, gw = grid
    if (gh, gw) == (m, m):
        return pos_embed.clone()  # the official code returns it untouched at its native size
    src = patch.float().reshape(1, m, m, dim).permute(0, 3, 1, 2)
    with torch.no_grad():
        if registers:  # dinov2_*_reg: interpolate_offset=0, interpolate_antialias=True
            out = F.interpolate(src, size=(gh, gw), mode="bicubic", antialias=True)
        else:  # interpolate_offset=0.1: the sampling grid is stretched by (g + 0.1) / M
            out = F.interpolate(src, scale_factor=((gh + 0.1) / m, (gw + 0.1) / m),
                                mode="bicubic", antialias=False)
    if tuple(out.shape[-2:]) != (gh, gw):
        raise ValueError(f"position-embedding resample gave {tuple(out.shape[-2:])}, expected {(gh, gw)}")
    out = out.permute(0, 2, 3, 1).reshape(1, gh * gw, dim).to(pos_embed.dtype)
    return torch.cat([prefix, out], dim=1)


class DinoV2Backbone(nn.Module):
    """A timm DINOv2 ViT at a fixed size, returning the final-LayerNorm'd tokens (or, with
    ``final_norm=False``, the last block's output).

    ``block_wrapper`` lets an adapter method (SelaVPR, CricaVPR) replace every transformer block by
    one that reuses the block's own sub-modules, so state-dict keys keep their official names.
    """

    def __init__(self, arch: str, image_size: Tuple[int, int], registers: bool = False,
                 depth: Optional[int] = None,
                 block_wrapper: Optional[Callable[[nn.Module], nn.Module]] = None,
                 final_norm: bool = True) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown DINOv2 arch {arch!r}; expected one of {sorted(ARCHS)}")
        h, w = image_size
        if h % PATCH or w % PATCH:
            raise ValueError(f"image size {image_size} must be a multiple of the patch size {PATCH}")
        name, self.dim, full_depth = ARCHS[arch]
        if registers:
            name = name.replace("_dinov2", "_reg4_dinov2")
        self.arch, self.registers = arch, registers
        self.grid = (h // PATCH, w // PATCH)
        kwargs = {"depth": depth} if depth else {}
        self.vit = timm.create_model(name, pretrained=False, num_classes=0, img_size=(h, w), **kwargs)
        self.depth = depth or full_depth
        if block_wrapper is not None:
            self.vit.blocks = nn.Sequential(*[block_wrapper(b) for b in self.vit.blocks])
        if not final_norm:  # BoQ aggregates the last block's tokens, before DINOv2's final LayerNorm
            self.vit.norm = nn.Identity()

    @property
    def num_prefix_tokens(self) -> int:
        return self.vit.num_prefix_tokens

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B,3,H,W) -> class token (B,C) and patch tokens (B,N,C), row-major over the grid."""
        tokens = self.vit.forward_features(images)
        return tokens[:, 0], tokens[:, self.num_prefix_tokens:]
