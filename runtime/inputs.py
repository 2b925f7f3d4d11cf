"""What the Python API accepts as an image, and how each kind becomes the 8-bit RGB image that
preprocessing expects.

* **A path** (``str`` or ``pathlib.Path``): decoded as the CLI decodes files (Pillow, EXIF
  orientation applied, any mode to RGB); a file that cannot be read raises ``ImageDecodeError``
  naming it.
* **A PIL image**: taken as it is (no EXIF rotation: that belongs to decoding a file); any mode
  becomes RGB (grey is replicated, alpha dropped, 16-bit grey scaled to 8 bits).
* **A numpy array**, (H, W) or (H, W, C), of any strides (slices, flipped views):

  ====================  =====================================================================
  uint8                 the pixels; C = 3 is RGB (BGR with ``bgr=True``), C = 4 RGBA (BGRA),
                        (H, W) and C = 1 grey (replicated to RGB); alpha is dropped
  uint16                16-bit pixels over their full range: ``round(x / 257)`` to 8 bits
  float16/32/64         values in [0, 1]: ``round(x * 255)``; anything outside [0, 1], NaN or
                        infinity is refused (a 0-255 float image is ``a.astype(np.uint8)``)
  anything else         refused: int8 included, whose meaning (signed data, or an 8-bit image
                        wrapped as signed bytes, as RTAB-Map's NPY_BYTE) the array cannot tell;
                        the latter is ``a.view(np.uint8)``
  ====================  =====================================================================

Every refusal is one ``ImageInputError`` (a ``UserError``) that names the array's shape and dtype
and what would be accepted.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .errors import UserError
from .preprocess import ImageDecodeError, load_rgb, pil_to_rgb

CHANNELS = {1: "grey", 3: "RGB/BGR", 4: "RGBA/BGRA"}


class ImageInputError(UserError, ValueError):
    """An in-memory image the API cannot take; the message names its shape and dtype."""


def describe(x: Any) -> str:
    """``array (480, 640, 3) uint8``, or the type of anything else."""
    if isinstance(x, np.ndarray):
        return f"array {tuple(x.shape)} {x.dtype}"
    return type(x).__name__


def to_rgb(image: Any, bgr: bool = False) -> Image.Image:
    """One image of any accepted kind (module docstring) as an 8-bit RGB PIL image.

    ``bgr``: a 3- or 4-channel array is in OpenCV's BGR(A) order; ignored for paths and PIL
    images, whose order is known."""
    if isinstance(image, Image.Image):
        return pil_to_rgb(image)
    if isinstance(image, (str, Path)):
        try:
            return load_rgb(image)
        except ImageDecodeError as exc:
            raise ImageDecodeError(f"{image}: {exc}") from None
    if isinstance(image, np.ndarray):
        return Image.fromarray(_rgb_array(image, bgr), "RGB")
    raise ImageInputError(f"an image is a numpy array, a PIL image or a path, not {describe(image)}")


def _rgb_array(a: np.ndarray, bgr: bool) -> np.ndarray:
    """(H, W, 3) uint8 RGB, C-contiguous, from an accepted array."""
    what = describe(a)
    if a.ndim == 3 and a.shape[2] not in CHANNELS:
        raise ImageInputError(f"{what}: expected 1, 3 or 4 channels (grey, RGB/BGR, RGBA/BGRA) in the last axis, "
                              f"as (H, W, C)")
    if a.ndim not in (2, 3) or a.shape[0] == 0 or a.shape[1] == 0:
        raise ImageInputError(f"{what}: expected an image of shape (H, W) or (H, W, C) with H, W > 0")
    pixels = _to_uint8(a, what)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.shape[2] == 1:
        return np.ascontiguousarray(np.broadcast_to(pixels, pixels.shape[:2] + (3,)))
    pixels = pixels[:, :, :3]  # alpha dropped
    return np.ascontiguousarray(pixels[:, :, ::-1] if bgr else pixels)


def _to_uint8(a: np.ndarray, what: str) -> np.ndarray:
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.uint16:
        return np.rint(a.astype(np.float32) / np.float32(257.0)).astype(np.uint8)
    if a.dtype.kind == "f":
        with np.errstate(invalid="ignore"):
            low, high = (float(a.min()), float(a.max())) if np.isfinite(a).all() else (float("nan"), float("nan"))
        if not (0.0 <= low and high <= 1.0):
            found = "NaN or infinite values" if low != low else f"values in [{low:g}, {high:g}]"
            raise ImageInputError(f"{what}: a float image must hold values in [0, 1], this one has {found}; "
                                  "a 0-255 image is given as uint8 (a.astype(np.uint8))")
        return np.rint(a.astype(np.float32) * np.float32(255.0)).astype(np.uint8)
    if a.dtype == np.int8:
        raise ImageInputError(f"{what}: pixels must be uint8; an 8-bit image wrapped as signed bytes (RTAB-Map's "
                              "NPY_BYTE) is read with a.view(np.uint8)")
    raise ImageInputError(f"{what}: pixels must be uint8 (or uint16, or float in [0, 1])")
