"""Image preprocessing, bit-compatible with the official VPR code, in numpy + Pillow.

Four resize modes cover the models we ship (see tests/fixtures/reference/README.md):

* ``pil_bilinear`` (SALAD ``eval.py:input_transform``): ``PIL.Image.resize((W, H), BILINEAR)``,
  which Pillow antialiases, then /255 and ImageNet normalisation.
* ``tensor_bilinear`` (SelaVPR / CricaVPR ``datasets_ws.base_transform`` with torchvision 0.15):
  /255, normalisation, *then* a bilinear resize of the float tensor with ``align_corners=False``
  and no antialias. torchvision >= 0.17 switched tensor resizes to antialias=True; the official
  models were trained and evaluated without it.
* ``tensor_bilinear_antialias`` (MegaLoc through VPR-methods-evaluation): /255, normalisation,
  then an *antialiased* bilinear resize of the float tensor. MegaLoc's own ``forward`` then
  resizes again, the same way, to the nearest multiples of 14: ``first_resize`` records the
  evaluation's size when that second step is not a no-op (240x320 -> 238x322).
* ``tensor_bicubic_antialias`` (BoQ's README transform): /255, an antialiased bicubic resize of
  the [0, 1] float tensor (Keys a = -0.5, PIL's filter; overshoot is *not* clamped), *then*
  normalisation.

TensorRT has no antialiased resize, so these run here, on the CPU, before the engine; the
antialiased kernels reproduce PyTorch's ``F.interpolate(antialias=True)`` (CPU) to about 1e-6.

The export side feeds the PyTorch models through this module too, so deployment and reference
see exactly the same tensors.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import PathError, UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_MODES = ("pil_bilinear", "tensor_bilinear", "tensor_bilinear_antialias", "tensor_bicubic_antialias")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass(frozen=True)
class Preprocessing:
    """What a model expects as input; stored verbatim in every bundle manifest."""

    size: Tuple[int, int]  # (height, width)
    resize: str = "pil_bilinear"
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD
    first_resize: Optional[Tuple[int, int]] = None  # (height, width) resized to before ``size``

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"unknown resize mode {self.resize!r}; expected one of {RESIZE_MODES}")
        if self.first_resize is not None and self.resize != "tensor_bilinear_antialias":
            raise ValueError(f"first_resize is only defined for tensor_bilinear_antialias, not {self.resize!r}")

    def to_dict(self) -> dict:
        d = {"size": list(self.size), "resize": self.resize, "mean": list(self.mean), "std": list(self.std)}
        if self.first_resize is not None:
            d["first_resize"] = list(self.first_resize)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        first = d["first_resize"] if "first_resize" in d else None  # not a dict: TypeError, as for the others
        return cls(size=tuple(int(v) for v in d["size"]), resize=d["resize"],
                   mean=tuple(float(v) for v in d["mean"]), std=tuple(float(v) for v in d["std"]),
                   first_resize=tuple(int(v) for v in first) if first is not None else None)


class ImageDecodeError(UserError, ValueError):
    """An image file that cannot be used; the message says why (callers name the file)."""


def pil_to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB. 16-bit and float greyscale are scaled to 8 bits (Pillow's own
    conversion would clip them); alpha is dropped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).round().astype(np.uint8), "L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def load_rgb(path: Union[str, Path]) -> Image.Image:
    """Decode an image file as RGB, applying its EXIF orientation.

    Raises ImageDecodeError with a one-line reason for: a missing or unreadable file, an empty
    file, a file that is no image, truncated or corrupt data, and images over Pillow's
    decompression-bomb limit (its warning counts as an error here)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                img = ImageOps.exif_transpose(img)
                return pil_to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"refused, larger than the decompression-bomb limit "
                               f"({Image.MAX_IMAGE_PIXELS} pixels): {exc}") from None
    except UnidentifiedImageError:
        size = Path(path).stat().st_size if Path(path).exists() else 0
        what = "empty file" if size == 0 else "not an image Pillow can read (unknown format or corrupt header)"
        raise ImageDecodeError(what) from None
    except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        raise ImageDecodeError(f"cannot be read ({exc.strerror or exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"truncated or corrupt image data ({exc})") from None


def _normalise(chw: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    # Same float32 operations, in the same order, as torchvision's ToTensor + Normalize.
    m = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
    return (chw - m) / s


def _to_chw_float(img: Image.Image) -> np.ndarray:
    arr = np.asarray(img, dtype=np.uint8)
    return arr.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)


def _bilinear_weights(in_size: int, out_size: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of PyTorch's CPU bilinear resize (align_corners=False, no
    antialias): a float32 scale, the source coordinate ``scale * (dst + 0.5) - 0.5`` evaluated in
    double and rounded to float32, clamped at 0. Matching these roundings keeps us within 5e-7
    of PyTorch instead of 1.5e-5."""
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(out_size, dtype=np.float64)
    src = np.maximum((np.float64(scale) * (dst + 0.5) - 0.5).astype(np.float32), np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.where(i0 < in_size - 1, i0 + 1, i0)
    w1 = np.clip(src - i0.astype(np.float32), 0.0, 1.0).astype(np.float32)
    w0 = (np.float32(1.0) - w1).astype(np.float32)
    return i0, i1, w0, w1


def resize_bilinear_chw(chw: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float32 CHW array, equal to ``F.interpolate(mode='bilinear')``."""
    h_out, w_out = size
    _, h_in, w_in = chw.shape
    if (h_in, w_in) == (h_out, w_out):
        return chw.copy()
    y0, y1, wy0, wy1 = _bilinear_weights(h_in, h_out)
    x0, x1, wx0, wx1 = _bilinear_weights(w_in, w_out)
    rows0, rows1 = chw[:, y0, :], chw[:, y1, :]
    # interpolate along width first, then height, as PyTorch's CPU kernel does
    top = rows0[:, :, x0] * wx0 + rows0[:, :, x1] * wx1
    bot = rows1[:, :, x0] * wx0 + rows1[:, :, x1] * wx1
    out = top * wy0[None, :, None] + bot * wy1[None, :, None]
    return out.astype(np.float32, copy=False)


def _triangle(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def _keys_cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    """Keys' cubic convolution kernel; a = -0.5 is PIL's (and PyTorch's antialiased) bicubic."""
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


# filter, half-width in input pixels at scale 1 (PyTorch's interp_size / 2)
_AA_FILTERS = {"bilinear": (_triangle, 1.0), "bicubic": (_keys_cubic, 2.0)}


def _antialias_taps(in_size: int, out_size: int, kernel: Callable[[np.ndarray], np.ndarray],
                    half_width: float) -> Tuple[np.ndarray, np.ndarray]:
    """Source indices and weights (out_size, taps) of PyTorch's antialiased CPU resize, which is
    PIL's separable convolution: on a down-scale the kernel is stretched by the scale so that it
    averages every source pixel it covers; weights are normalised per output pixel. The float32 /
    float64 mix follows PyTorch's kernel for float32 tensors (within 1-2 ulp)."""
    f32, f64 = np.float32, np.float64
    scale = f32(in_size) / f32(out_size)
    support = f32(half_width * f64(scale)) if scale >= 1 else f32(half_width)
    invscale = f32(1.0 / f64(scale)) if scale >= 1 else f32(1.0)
    center = (f64(scale) * (np.arange(out_size) + 0.5)).astype(f32)
    first = np.maximum(((center - support).astype(f64) + 0.5).astype(np.int64), 0)
    count = np.minimum(((center + support).astype(f64) + 0.5).astype(np.int64), in_size) - first
    taps = np.arange(int(count.max()))
    src = (taps[None, :] + first[:, None]).astype(f32)
    arg = (((src - center[:, None]).astype(f64) + 0.5) * f64(invscale)).astype(f32)
    weights = np.where(taps[None, :] < count[:, None], kernel(arg.astype(f64)).astype(f32), f32(0.0))
    total = np.zeros(out_size, f32)
    for k in range(weights.shape[1]):  # PyTorch sums the weights in tap order
        total += weights[:, k]
    weights = (weights / np.where(total == 0, f32(1.0), total)[:, None]).astype(f32)
    return np.minimum(taps[None, :] + first[:, None], in_size - 1), weights


def _resample_rows(chw: np.ndarray, index: np.ndarray, weights: np.ndarray) -> np.ndarray:
    out = chw[:, index[:, 0], :] * weights[:, 0][None, :, None]
    for k in range(1, index.shape[1]):
        out += chw[:, index[:, k], :] * weights[:, k][None, :, None]
    return out


def resize_antialias_chw(chw: np.ndarray, size: Tuple[int, int], mode: str) -> np.ndarray:
    """Antialiased ``mode`` ('bilinear' or 'bicubic') resize of a float32 CHW array, equal to
    ``F.interpolate(x[None], size, mode=mode, align_corners=False, antialias=True)[0]`` on the
    CPU within ~2e-6. Width first, then height, as PyTorch does; no clamping."""
    kernel, half_width = _AA_FILTERS[mode]
    h_out, w_out = size
    out = chw.astype(np.float32, copy=False)
    if out.shape[2] != w_out:  # resample columns as rows of the transposed array (contiguous gathers)
        taps = _antialias_taps(out.shape[2], w_out, kernel, half_width)
        cols = _resample_rows(np.ascontiguousarray(out.transpose(0, 2, 1)), *taps)
        out = np.ascontiguousarray(cols.transpose(0, 2, 1))
    if out.shape[1] != h_out:
        out = _resample_rows(out, *_antialias_taps(out.shape[1], h_out, kernel, half_width))
    return out if out is not chw else chw.copy()


def preprocess_image(img: Image.Image, pre: Preprocessing) -> np.ndarray:
    """RGB PIL image -> normalised float32 CHW array of ``pre.size``."""
    h, w = pre.size
    if pre.resize == "pil_bilinear":
        if img.size != (w, h):
            img = img.resize((w, h), Image.BILINEAR)
        return _normalise(_to_chw_float(img), pre.mean, pre.std)
    if pre.resize == "tensor_bicubic_antialias":  # resize on [0, 1], then normalise
        return _normalise(resize_antialias_chw(_to_chw_float(img), (h, w), "bicubic"), pre.mean, pre.std)
    chw = _normalise(_to_chw_float(img), pre.mean, pre.std)
    if pre.resize == "tensor_bilinear":
        return resize_bilinear_chw(chw, (h, w))
    if pre.first_resize is not None:  # MegaLoc: the evaluation's resize, then the model's own
        chw = resize_antialias_chw(chw, pre.first_resize, "bilinear")
    return resize_antialias_chw(chw, (h, w), "bilinear")


def preprocess_file(path: Union[str, Path], pre: Preprocessing) -> np.ndarray:
    """Decode and preprocess one image file (CHW float32)."""
    return preprocess_image(load_rgb(path), pre)


def list_images(folder: Union[str, Path]) -> list:
    """Image files of a folder, sorted by name (the order every tool here uses)."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "a file, not a folder of images" if folder.exists() else "no such folder"
        raise PathError(f"{folder}: {what}")
    # links are listed even when broken: a missing target is reported, not silently skipped
    return sorted(p for p in folder.iterdir()
                  if (p.is_file() or p.is_symlink()) and p.suffix.lower() in IMAGE_EXTENSIONS)
