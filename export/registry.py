"""Registry of named model configurations (timm-style): ``build_model('salad-dinov2-vitb14')``.

Each entry records the official image size, the preprocessing the official evaluation code
applies, the outputs and their shapes, and which checkpoint formats it loads.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Tuple

from runtime.errors import OptionError, UserError
from runtime.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

from .models.dinov2 import ARCHS, PATCH


@dataclass(frozen=True)
class ModelConfig:
    name: str
    method: str  # gem | salad | selavpr | cricavpr
    arch: str  # DINOv2 arch key: vits14, vitb14, vitl14, vitg14
    image_size: Tuple[int, int]
    resize: str  # runtime.preprocess resize mode of the official evaluation code
    registers: bool = False
    batch_mode: str = "independent"  # CricaVPR: "batched" descriptors depend on the batch
    depth: Optional[int] = None  # reduced depth, for tests and quick experiments only
    checkpoint_formats: Tuple[str, ...] = ()
    checkpoint_url: Optional[str] = None
    description: str = ""

    @property
    def grid(self) -> Tuple[int, int]:
        return (self.image_size[0] // PATCH, self.image_size[1] // PATCH)

    @property
    def embed_dim(self) -> int:
        return ARCHS[self.arch][1]

    @property
    def num_heads(self) -> int:
        return self.embed_dim // 64  # DINOv2: 64 channels per attention head

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing(size=self.image_size, resize=self.resize, mean=IMAGENET_MEAN, std=IMAGENET_STD)

    def outputs(self) -> Dict[str, List[int]]:
        """Output name -> shape without the batch axis."""
        d, (gh, gw) = self.embed_dim, self.grid
        if self.method == "salad":
            return {"descriptor": [256 + 64 * 128]}
        if self.method == "gem":
            return {"descriptor": [d]}
        if self.method == "selavpr":
            side = 4 * gh - 3
            return {"descriptor": [d], "local_features": [side, 4 * gw - 3, 128]}
        if self.method == "cricavpr":
            return {"descriptor": [14 * d]}
        raise ValueError(f"unknown method {self.method!r}")

    def to_dict(self) -> dict:
        return {"name": self.name, "method": self.method, "arch": self.arch,
                "image_size": list(self.image_size), "registers": self.registers,
                "batch_mode": self.batch_mode, "depth": self.depth,
                "preprocessing": self.preprocessing.to_dict(), "outputs": self.outputs()}


class UnknownModelError(UserError, ValueError):
    pass


_REGISTRY: Dict[str, ModelConfig] = {}


def register(cfg: ModelConfig) -> ModelConfig:
    if cfg.name in _REGISTRY:
        raise ValueError(f"model {cfg.name!r} registered twice")
    _REGISTRY[cfg.name] = cfg
    return cfg


def list_models() -> List[str]:
    return sorted(_REGISTRY)


def get_config(name: str, image_size: Optional[int] = None, depth: Optional[int] = None) -> ModelConfig:
    """The named config, optionally at another (square) image size or a reduced depth."""
    if name not in _REGISTRY:
        raise UnknownModelError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    cfg = _REGISTRY[name]
    if image_size is not None:
        if image_size % PATCH:
            raise OptionError(f"--image-size {image_size} is not a multiple of the patch size {PATCH}")
        if cfg.method in ("selavpr", "cricavpr") and image_size != cfg.image_size[0]:
            raise OptionError(f"{name} is defined at {cfg.image_size[0]}x{cfg.image_size[1]} only "
                             "(its official head hard-codes a 16x16 patch grid)")
        cfg = replace(cfg, image_size=(image_size, image_size))
    if depth is not None:
        cfg = replace(cfg, depth=depth)
    return cfg


_DINOV2_FORMATS = ("dinov2", "timm-dinov2")

# DINOv2 + GeM: every backbone size, with and without registers (SALAD repo's GeM, p = 3).
for _arch in ARCHS:
    for _reg in (False, True):
        register(ModelConfig(
            name=f"gem-dinov2-{_arch}{'-reg' if _reg else ''}", method="gem", arch=_arch,
            image_size=(322, 322), resize="pil_bilinear", registers=_reg,
            checkpoint_formats=_DINOV2_FORMATS,
            description="DINOv2 patch tokens + GeM (p=3) + L2"))

register(ModelConfig(
    name="salad-dinov2-vitb14", method="salad", arch="vitb14", image_size=(322, 322),
    resize="pil_bilinear", checkpoint_formats=("salad",),
    checkpoint_url="https://github.com/serizba/salad/releases/download/v1.0.0/dino_salad.ckpt",
    description="DINOv2 ViT-B/14 + SALAD (8448-D), evaluated at 322x322 as in the official README"))

register(ModelConfig(
    name="selavpr-dinov2-vitl14", method="selavpr", arch="vitl14", image_size=(224, 224),
    resize="tensor_bilinear", checkpoint_formats=("selavpr",),
    description="SelaVPR: DINOv2 ViT-L/14 with adapters, GeM global (1024-D) + 61x61x128 local features"))

for _mode in ("batched", "independent"):
    register(ModelConfig(
        name="cricavpr-dinov2-vitb14" + ("" if _mode == "batched" else "-independent"),
        method="cricavpr", arch="vitb14", image_size=(224, 224), resize="tensor_bilinear",
        batch_mode=_mode, checkpoint_formats=("cricavpr",),
        checkpoint_url="https://github.com/Lu-Feng/CricaVPR/releases/download/v1.0/CricaVPR.pth",
        description=f"CricaVPR (10752-D), cross-image encoder in {_mode} mode"))
