"""Registry of VPR methods and their named configurations (timm's ``@register_model`` pattern).

Everything about one method lives in its module under ``export/models/`` (listed once in
``export/models/__init__.py``): a :class:`Method` subclass registered with
:func:`register_method` declares construction, outputs and their layout, preprocessing, the
official checkpoint formats (detection and key mapping), FP32 islands, batch modes and the image
sizes it takes; functions decorated with :func:`register_model` return its named configurations::

    @register_method
    class Salad(Method):
        name = "salad"
        ...

    @register_model
    def salad_dinov2_vitb14() -> ModelConfig:
        \"\"\"DINOv2 ViT-B/14 + SALAD (8448-D) at 322x322, as in the official README.\"\"\"
        return ModelConfig(name="salad-dinov2-vitb14", method="salad", arch="vitb14", image_size=(322, 322))

This module imports neither torch nor the method modules until a model is asked for, so the
CLIs' argument parsing (:func:`parse_image_size`) stays torch-free.
"""
from __future__ import annotations

import argparse
import importlib
import re
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from runtime.errors import OptionError, UserError
from runtime.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

PATCH = 14
# DINOv2 backbones: arch -> (timm model name, embedding dim, depth)
ARCHS = {
    "vits14": ("vit_small_patch14_dinov2", 384, 12),
    "vitb14": ("vit_base_patch14_dinov2", 768, 12),
    "vitl14": ("vit_large_patch14_dinov2", 1024, 24),
    "vitg14": ("vit_giant_patch14_dinov2", 1536, 40),
}
# FP32 islands every graph has (besides LayerNorm / softmax / L2 ops): the decomposed LayerNorms
# of the ViT blocks (trt8.5 exports). Methods add their own scopes (Method.fp32_scopes).
BACKBONE_FP32_SCOPES = (r"norm\d*",)

ImageSize = Union[int, Tuple[int, int], Sequence[int]]


class UnknownModelError(UserError, ValueError):
    pass


class UnsupportedImageSizeError(OptionError):
    """An image size a model cannot take; the message says which sizes it can."""


def parse_image_size(text: str) -> Tuple[int, int]:
    """``'322'`` -> (322, 322); ``'240x320'`` -> (240, 320) (height x width). For argparse ``type=``."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", str(text))
    if not m or int(m.group(1)) < 1 or (m.group(2) is not None and int(m.group(2)) < 1):
        raise argparse.ArgumentTypeError(f"{text!r}: expected N (square) or HxW, e.g. 322 or 240x320")
    h = int(m.group(1))
    return (h, int(m.group(2)) if m.group(2) is not None else h)


def _as_size(size: ImageSize) -> Tuple[int, int]:
    if isinstance(size, str):
        return parse_image_size(size)
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


def size_text(size: Sequence[int]) -> str:
    return f"{size[0]}x{size[1]}"


@dataclass(frozen=True)
class ModelConfig:
    """One named, fixed-size configuration of a method: what a bundle is built from."""

    name: str
    method: str  # a registered Method.name
    arch: str  # DINOv2 arch key: vits14, vitb14, vitl14, vitg14
    image_size: Tuple[int, int]  # (height, width) the network sees
    resize: str = ""  # runtime.preprocess resize mode; default: the method's
    registers: bool = False
    batch_mode: str = "independent"  # CricaVPR: "batched" descriptors depend on the batch
    depth: Optional[int] = None  # reduced depth, for tests and quick experiments only
    checkpoint_formats: Tuple[str, ...] = ()  # default: all the method's formats
    checkpoint_url: Optional[str] = None
    description: str = ""
    first_resize: Optional[Tuple[int, int]] = None  # MegaLoc: the evaluation's size before its own rounding

    @property
    def grid(self) -> Tuple[int, int]:
        return (self.image_size[0] // PATCH, self.image_size[1] // PATCH)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def embed_dim(self) -> int:
        return ARCHS[self.arch][1]

    @property
    def num_heads(self) -> int:
        return self.embed_dim // 64  # DINOv2: 64 channels per attention head

    @property
    def spec(self) -> "Method":
        return get_method(self.method)

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing(size=self.image_size, resize=self.resize, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                             first_resize=self.first_resize)

    @property
    def layout(self) -> str:
        return self.spec.layout

    def outputs(self) -> Dict[str, List[int]]:
        """Output name -> shape without the batch axis."""
        return self.spec.outputs(self)

    def to_dict(self) -> dict:
        return {"name": self.name, "method": self.method, "arch": self.arch,
                "image_size": list(self.image_size), "registers": self.registers,
                "batch_mode": self.batch_mode, "depth": self.depth,
                "preprocessing": self.preprocessing.to_dict(), "outputs": self.outputs(), "layout": self.layout}


@dataclass(frozen=True)
class CheckpointFormat:
    """An official checkpoint layout: how to recognise it from its keys, and how its tensors map
    onto our modules (``export/checkpoints.py`` reads the file and loads strictly)."""

    name: str
    description: str  # keys and container, as the README's models table says
    detect: Callable[[frozenset], bool]  # key set -> is it this format
    to_model: Callable[[Dict[str, Any], ModelConfig], Dict[str, Any]]  # tensors -> our model's keys


class Method:
    """Everything about one VPR method. Subclass it in the method's module and register it.

    The defaults describe a plain DINOv2 model: any H and W that are multiples of 14, one
    descriptor per image independent of its batch-mates, preprocessing ``resize``.
    """

    name: str = ""
    resize: str = "pil_bilinear"  # runtime.preprocess mode of the official evaluation code
    layout: str = ""  # the descriptor layout, recorded in every manifest
    batch_modes: Tuple[str, ...] = ("independent",)
    fp32_scopes: Tuple[str, ...] = ()  # ONNX node-name scopes kept in FP32 (regex, between slashes)
    formats: Tuple[CheckpointFormat, ...] = ()
    min_patches: int = 1  # patches the head needs (SALAD-style heads: more than their clusters)
    fixed_sizes: Tuple[Tuple[int, int], ...] = ()  # non-empty: the only sizes the method takes
    fixed_size_reason: str = ""

    def build(self, cfg: ModelConfig):
        """The architecture of ``cfg`` (a ``VPRModel``) with fresh weights."""
        raise NotImplementedError

    def outputs(self, cfg: ModelConfig) -> Dict[str, List[int]]:
        raise NotImplementedError

    def sizes_text(self) -> str:
        """One phrase saying which sizes the method takes (for error messages and --help)."""
        if self.fixed_sizes:
            return f"it takes {' or '.join(size_text(s) for s in self.fixed_sizes)} only ({self.fixed_size_reason})"
        need = f" and give more than {self.min_patches - 1} patches" if self.min_patches > 1 else ""
        return f"it takes H and W that are multiples of the patch size {PATCH}{need} (e.g. 322 or 224x308)"

    def round_size(self, size: Tuple[int, int]) -> Tuple[int, int]:
        """The size the network sees for a requested one; the default takes it as it is."""
        return size

    def with_size(self, cfg: ModelConfig, size: Tuple[int, int]) -> ModelConfig:
        """``cfg`` at another image size, or UnsupportedImageSizeError in one line."""
        fixed = self.round_size(size)
        first = size if fixed != size else None
        patches = (fixed[0] // PATCH) * (fixed[1] // PATCH)
        ok = (fixed in self.fixed_sizes) if self.fixed_sizes else (
            fixed[0] % PATCH == 0 and fixed[1] % PATCH == 0 and patches >= self.min_patches)
        if not ok:
            seen = f" (rounded to {size_text(fixed)}: {patches} patches)" if first else ""
            raise UnsupportedImageSizeError(f"{cfg.name} cannot take {size_text(size)}{seen}: {self.sizes_text()}")
        return replace(cfg, image_size=fixed, first_resize=first)

    def format_names(self) -> Tuple[str, ...]:
        return tuple(f.name for f in self.formats)


_METHODS: Dict[str, Method] = {}
_MODELS: Dict[str, ModelConfig] = {}
_FORMATS: Dict[str, CheckpointFormat] = {}
_loaded = False


def register_method(cls: type) -> type:
    """Class decorator: instantiate and register a Method subclass."""
    method = cls()
    if not method.name or method.name in _METHODS:
        raise ValueError(f"method {method.name!r} has no name or is registered twice")
    for fmt in method.formats:
        if fmt.name in _FORMATS:
            raise ValueError(f"checkpoint format {fmt.name!r} registered twice")
        _FORMATS[fmt.name] = fmt
    _METHODS[method.name] = method
    return cls


def register_model(fn: Callable[[], Union[ModelConfig, Iterable[ModelConfig]]]) -> Callable:
    """Function decorator (timm's pattern): ``fn()`` returns one configuration or several; each is
    checked against its method and registered under its name. ``fn``'s docstring is the default
    description."""
    made = fn()
    for cfg in [made] if isinstance(made, ModelConfig) else list(made):
        if cfg.name in _MODELS:
            raise ValueError(f"model {cfg.name!r} registered twice")
        method = _METHODS.get(cfg.method)
        if method is None:
            raise ValueError(f"model {cfg.name!r}: method {cfg.method!r} is not registered (register_method first)")
        if cfg.arch not in ARCHS:
            raise ValueError(f"model {cfg.name!r}: unknown DINOv2 arch {cfg.arch!r}")
        if cfg.batch_mode not in method.batch_modes:
            raise ValueError(f"model {cfg.name!r}: batch mode {cfg.batch_mode!r} not in {method.batch_modes}")
        unknown = set(cfg.checkpoint_formats) - set(method.format_names())
        if unknown:
            raise ValueError(f"model {cfg.name!r}: formats {sorted(unknown)} are not {method.name}'s")
        cfg = replace(cfg, resize=cfg.resize or method.resize,
                      checkpoint_formats=cfg.checkpoint_formats or method.format_names(),
                      description=cfg.description or " ".join((fn.__doc__ or "").split()))
        _MODELS[cfg.name] = method.with_size(cfg, cfg.image_size)  # the official size must be valid
    return fn


def _load() -> None:
    """Import every method module once (their decorators fill the registry)."""
    global _loaded
    if not _loaded:
        from .models import METHOD_MODULES
        _loaded = True  # before the imports: a module may look itself up while registering
        try:
            for module in METHOD_MODULES:
                importlib.import_module(f".models.{module}", __package__)
        except BaseException:
            _loaded = False
            raise


def list_models() -> List[str]:
    _load()
    return sorted(_MODELS)


def get_method(name: str) -> Method:
    _load()
    return _METHODS[name]


def checkpoint_formats() -> Dict[str, CheckpointFormat]:
    _load()
    return dict(_FORMATS)


def fp32_scopes() -> Tuple[str, ...]:
    """Every node-name scope that must stay FP32, over all methods (a scope names one module)."""
    _load()
    scopes = list(BACKBONE_FP32_SCOPES)
    for method in _METHODS.values():
        scopes += [s for s in method.fp32_scopes if s not in scopes]
    return tuple(scopes)


def get_config(name: str, image_size: Optional[ImageSize] = None, depth: Optional[int] = None) -> ModelConfig:
    """The named config, optionally at another image size (N, (H, W) or 'HxW') or a reduced depth."""
    _load()
    if name not in _MODELS:
        raise UnknownModelError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    cfg = _MODELS[name]
    if image_size is not None:
        cfg = cfg.spec.with_size(cfg, _as_size(image_size))
    if depth is not None:
        cfg = replace(cfg, depth=depth)
    return cfg
