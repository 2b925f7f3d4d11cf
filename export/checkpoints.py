"""Official checkpoints, read offline and mapped strictly onto our modules.

Each method module declares its official formats (``export/registry.py: CheckpointFormat``):
how to recognise one from its keys, whatever the file is called, and where its tensors go. This
module does the rest for all of them: reading the file safely, unwrapping containers, detecting
the format (exactly one must match), and the strict load that names missing and unexpected keys.

Files are read with ``torch.load(weights_only=True)`` (a pickle that would run code is refused)
or, for ``.safetensors``, with ``safetensors.torch.load_file``, which holds no code at all.
Nothing is downloaded unless an https:// URL is given.
"""
from __future__ import annotations

import os
import shutil
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Dict, Iterable, Sequence, Tuple

import torch
from torch import nn

from runtime.errors import UserError
from runtime.files import atomic_write, sha256_file

from .models.dinov2 import interpolate_pos_embed
from .registry import checkpoint_formats

DEFAULT_CACHE = Path(os.environ.get("VPR_EDGE_CACHE", Path.home() / ".cache" / "vpr-edge")) / "checkpoints"


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used for the requested model; the message says why."""


def fetch_checkpoint(url: str, cache_dir: Path = DEFAULT_CACHE) -> Path:
    """Download an official release once into ``cache_dir`` and record its sha256 beside it.

    A cached file whose recorded hash no longer matches is downloaded again.
    """
    name = Path(urllib.parse.urlparse(url).path).name or "checkpoint"
    cache_dir.mkdir(parents=True, exist_ok=True)
    target, digest_file = cache_dir / name, cache_dir / (name + ".sha256")
    if target.exists() and digest_file.exists() and digest_file.read_text().split()[0] == sha256_file(target):
        return target
    try:
        with urllib.request.urlopen(url, timeout=60) as resp:  # noqa: S310 (https or file URLs only)
            atomic_write(target, lambda f: shutil.copyfileobj(resp, f))
    except UserError:
        raise
    except (urllib.error.URLError, OSError) as exc:  # HTTPError, refused, DNS, timeout, reset
        reason = getattr(exc, "reason", None) or exc
        raise CheckpointError(f"{url}: download failed ({reason}); check the URL and the network, or download "
                              "the file yourself and pass its path to --checkpoint") from None
    digest = sha256_file(target)
    digest_file.write_text(f"{digest}  {url}\n")
    return target


def resolve_checkpoint(spec: str, cache_dir: Path = DEFAULT_CACHE) -> Path:
    """A local path, or an https:// / file:// URL fetched into the cache."""
    scheme = urllib.parse.urlparse(spec).scheme
    if scheme in ("https", "http", "file"):
        return fetch_checkpoint(spec, cache_dir)
    path = Path(spec)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    return path


def read_state_dict(path: Path) -> Tuple[Dict[str, torch.Tensor], str]:
    """Tensors of a checkpoint file (container unwrapped, ``module.`` stripped) and the container name."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path)), "safetensors"
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every failure here means "not a safe tensor file"
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise CheckpointError(
                f"{path}: refused: the pickle holds objects other than tensors, and loading it would "
                f"run code (torch.load weights_only=True). Re-save its state_dict alone.") from exc
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({exc})") from exc
    container = "state_dict"
    if isinstance(obj, dict):
        for key in ("model_state_dict", "state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj, container = obj[key], key
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: no state_dict of tensors found (top-level type {type(obj).__name__})")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj, container


def detect_format(sd: Dict[str, torch.Tensor]) -> str:
    """The one registered format whose key pattern ``sd`` has."""
    keys = frozenset(sd)
    formats = checkpoint_formats()
    found = [name for name, fmt in formats.items() if fmt.detect(keys)]
    if len(found) == 1:
        return found[0]
    sample = ", ".join(sorted(keys)[:6])
    if found:  # a bug in the detectors, not in the file
        raise RuntimeError(f"checkpoint matches several formats ({', '.join(found)}; keys e.g. {sample})")
    raise CheckpointError(f"unrecognised checkpoint format ({len(keys)} keys, e.g. {sample}); "
                          f"supported formats: {', '.join(formats)}")


def dinov2_to_timm(sd: Dict[str, torch.Tensor], grid: Tuple[int, int], registers: bool,
                   official: bool) -> Dict[str, torch.Tensor]:
    """DINOv2 backbone keys (official or timm layout) -> our timm model at ``grid``; the position
    embedding is resampled by the official rule (``interpolate_pos_embed``)."""
    out = {}
    for key, value in sd.items():
        if key == "mask_token":
            continue  # only used for masked-image training
        key = key.replace("register_tokens", "reg_token").replace("mlp.w12.", "mlp.fc1.").replace("mlp.w3.", "mlp.fc2.")
        out[key] = value
    if "pos_embed" in out:
        pos = out["pos_embed"]
        if registers and official:
            # timm's register models carry no class-token position: fold it into cls_token
            out["cls_token"] = out["cls_token"] + pos[:, :1]
            out["pos_embed"] = interpolate_pos_embed(pos[:, 1:], grid, registers=True, has_cls=False)
        else:
            out["pos_embed"] = interpolate_pos_embed(pos, grid, registers=registers, has_cls=not registers)
    return out


def route_keys(sd: Dict[str, torch.Tensor], cfg, backbone: str, head: Sequence[Tuple[str, str]] = (),
               unused: Sequence[str] = (), official: bool = True) -> Dict[str, torch.Tensor]:
    """Checkpoint tensors -> our ``VPRModel`` keys, the mapping every format is made of.

    * keys under the ``backbone`` prefix form a DINOv2 state dict (``dinov2_to_timm``) and go to
      ``backbone.vit.*``;
    * for each ``(checkpoint prefix, head prefix)`` pair of ``head``, matching keys go to
      ``head.<head prefix><rest>``;
    * ``unused``: exact keys the official forward never reads (dropped, and documented so);
    * anything else is kept as ``unmapped.<key>`` and reported as unexpected by the strict load.
    """
    backbone_sd, out = {}, {}
    for key, value in sd.items():
        if key in unused:
            continue
        for src, dst in head:
            if key.startswith(src):
                out["head." + dst + key[len(src):]] = value
                break
        else:
            if key.startswith(backbone):
                backbone_sd[key[len(backbone):]] = value
            else:
                out["unmapped." + key] = value
    for key, value in dinov2_to_timm(backbone_sd, cfg.grid, cfg.registers, official).items():
        out["backbone.vit." + key] = value
    return out


def _listing(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_into(model: nn.Module, mapped: Dict[str, torch.Tensor], fmt: str, source: str) -> None:
    """Strict load: every parameter and buffer filled, nothing left over, shapes equal."""
    target = model.state_dict()
    missing = [k for k in target if k not in mapped]
    unexpected = [k for k in mapped if k not in target]
    fixed, bad_shape = {}, []
    for k, v in mapped.items():
        if k not in target:
            continue
        want = target[k].shape
        if v.shape != want and v.dim() == 4 and v.shape[2:] == (1, 1) and tuple(v.shape[:2]) == tuple(want):
            v = v.reshape(want)  # 1x1 convolution stored in the checkpoint, Linear here
        if v.shape != want:
            bad_shape.append(f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(want)}")
        fixed[k] = v.to(target[k].dtype)
    if missing or unexpected or bad_shape:
        parts = [f"{source}: checkpoint (format detected: {fmt}) does not match the model"]
        if missing:
            parts.append(f"missing {len(missing)} keys: {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys: {_listing(unexpected)}")
        if bad_shape:
            parts.append(f"{len(bad_shape)} shape mismatches: {_listing(bad_shape, 6)}")
        raise CheckpointError("; ".join(parts))
    model.load_state_dict(fixed, strict=True)


def load_checkpoint(model: nn.Module, cfg, spec: str, cache_dir: Path = DEFAULT_CACHE) -> dict:
    """Resolve, read, detect, check against ``cfg`` and load. Returns facts for the manifest."""
    path = resolve_checkpoint(spec, cache_dir)
    sd, container = read_state_dict(path)
    fmt = detect_format(sd)
    if fmt not in cfg.checkpoint_formats:
        raise CheckpointError(f"{path}: this is a {fmt!r} checkpoint, but model {cfg.name} loads "
                              f"{' or '.join(repr(f) for f in cfg.checkpoint_formats)} checkpoints")
    load_into(model, checkpoint_formats()[fmt].to_model(sd, cfg), fmt, str(path))
    return {"path": str(path), "source": spec, "format": fmt, "container": container,
            "sha256": sha256_file(path), "num_tensors": len(sd)}
