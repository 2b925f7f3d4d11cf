"""Frame sources for the localization loop: a folder of images, a video file, or a camera
(OpenCV, imported only for those two). Every frame carries its arrival time."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np
from PIL import Image

from .errors import PathError, UserError
from .preprocess import list_images, load_rgb


@dataclass
class Frame:
    index: int
    name: str
    arrival: float  # time.perf_counter() when the frame became available
    image: Optional[Image.Image] = None
    error: Optional[str] = None
    decode_ms: float = 0.0


class FolderSource:
    """Images of a folder in name order; ``fps`` > 0 paces them like a live camera."""

    live = False

    def __init__(self, folder: Union[str, Path], fps: float = 0.0) -> None:
        self.files = list_images(folder)
        self.fps = fps
        self.live = fps > 0

    def __iter__(self) -> Iterator[Frame]:
        start = time.perf_counter()
        for i, path in enumerate(self.files):
            if self.fps > 0:
                wait = start + i / self.fps - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
            arrival = time.perf_counter()
            try:
                image = load_rgb(path)
            except Exception as exc:  # noqa: BLE001 - a bad file is reported, the stream goes on
                yield Frame(i, path.name, arrival, None, str(exc))
                continue
            yield Frame(i, path.name, arrival, image, decode_ms=(time.perf_counter() - arrival) * 1000)


class OpenCVSource:
    """A video file or a camera index through OpenCV (``pip install opencv-python-headless``)."""

    def __init__(self, spec: Union[str, int]) -> None:
        try:
            import cv2
        except ImportError as exc:
            raise UserError("video files and cameras need OpenCV: pip install opencv-python-headless") from exc
        self.cv2 = cv2
        self.spec = spec
        self.live = isinstance(spec, int)
        self.capture = cv2.VideoCapture(spec)
        if not self.capture.isOpened():
            raise UserError(f"{spec}: cannot open this {'camera' if self.live else 'video file'}")

    def __iter__(self) -> Iterator[Frame]:
        i = 0
        try:
            while True:
                ok, bgr = self.capture.read()
                if not ok:
                    break
                rgb = np.ascontiguousarray(bgr[:, :, ::-1])
                yield Frame(i, f"frame{i:06d}", time.perf_counter(), Image.fromarray(rgb))
                i += 1
        finally:
            self.capture.release()


def open_source(spec: str, fps: float = 0.0):
    """A folder, a video file, or a camera index (a number)."""
    if spec.isdigit():
        return OpenCVSource(int(spec))
    path = Path(spec)
    if path.is_dir():
        return FolderSource(path, fps)
    if path.is_file():
        return OpenCVSource(str(path))
    raise PathError(f"{spec}: not a folder, a video file or a camera index")
