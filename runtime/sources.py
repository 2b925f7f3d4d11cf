"""Frame sources for the localization loop: a folder of images, a video file, a camera (OpenCV,
imported only for those two), or in-memory images replayed like a camera (soak tests,
benchmarks).

Every frame carries its capture time (``arrival``, ``time.perf_counter()``; ``timestamp``, the
wall clock) and how long decoding took. A *live* source (camera, video file, folder paced with
``fps``) is read at its own rate and never waits for the loop; its latency is capture to result.
A folder read as fast as possible is a *throughput* run. A paced recording's capture time is the
moment the frame is due: a frame read late (the process was stalled) arrives already old, as a
camera's would.

After iteration, ``end`` says how the source ended: ``complete`` (the folder or video was read to
its end), ``disconnected`` (a camera stopped delivering frames), ``truncated`` (a video ended
before the length its header announces); ``detail`` says more.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Union

import numpy as np
from PIL import Image

from .errors import UserError
from .preprocess import list_images, load_rgb

COMPLETE, DISCONNECTED, TRUNCATED = "complete", "disconnected", "truncated"


class SourceError(UserError, ValueError):
    """A source that cannot be opened; the message names it and what to do."""


@dataclass
class Frame:
    index: int
    name: str
    arrival: float  # time.perf_counter() at capture (a paced recording: when the frame was due)
    image: Optional[Image.Image] = None
    error: Optional[str] = None
    decode_ms: float = 0.0
    timestamp: float = 0.0  # wall clock (time.time()) at capture
    ready: float = 0.0  # time.perf_counter() when decoded and handed to the loop

    def __post_init__(self) -> None:
        if not self.timestamp:
            self.timestamp = time.time() - (time.perf_counter() - self.arrival)
        if not self.ready:
            self.ready = self.arrival + self.decode_ms / 1000.0


class _Pacer:
    """Frame i is due at start + i / fps; waits until then and returns that time."""

    def __init__(self, fps: float) -> None:
        self.fps = fps
        self.start: Optional[float] = None

    def due(self, i: int) -> float:
        now = time.perf_counter()
        if self.start is None:
            self.start = now - i / self.fps
        t = self.start + i / self.fps
        if t > now:
            time.sleep(t - now)
        return t


class FolderSource:
    """Images of a folder in name order; ``fps`` > 0 paces them like a live camera."""

    def __init__(self, folder: Union[str, Path], fps: float = 0.0) -> None:
        self.files = list_images(folder)
        if not self.files:
            raise SourceError(f"{folder}: no images found")
        self.fps = fps
        self.live = fps > 0
        self.end: Optional[str] = None
        self.detail = ""
        self.kind = f"folder {folder} ({len(self.files)} images" + (f", paced at {fps:g} fps)" if fps > 0 else ")")

    def __iter__(self) -> Iterator[Frame]:
        pacer = _Pacer(self.fps) if self.fps > 0 else None
        for i, path in enumerate(self.files):
            arrival = pacer.due(i) if pacer else time.perf_counter()
            t0 = time.perf_counter()
            try:
                image = load_rgb(path)
            except Exception as exc:  # noqa: BLE001 - a bad file is reported, the stream goes on
                yield Frame(i, path.name, arrival, None, str(exc))
                continue
            ready = time.perf_counter()
            yield Frame(i, path.name, arrival, image, decode_ms=(ready - t0) * 1000, ready=ready)
        self.end, self.detail = COMPLETE, f"all {len(self.files)} images read"


def _bgr_to_image(bgr) -> Optional[Image.Image]:
    if bgr is None or getattr(bgr, "size", 0) == 0:
        return None
    if bgr.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(bgr)).convert("RGB")
    return Image.fromarray(np.ascontiguousarray(bgr[:, :, 2::-1]))


class OpenCVSource:
    """A video file or a camera through OpenCV (``pip install opencv-python-headless``).

    A video plays at its recorded rate (``fps`` None), at ``fps``, or as fast as possible
    (``fps`` 0: a throughput run). A camera delivers at its own rate; ``retries`` failed grabs in
    a row (``retry_wait`` apart) mean it is gone. A grabbed frame that decodes to nothing is a
    failed frame, and the stream goes on. Decoding is timed: OpenCV decodes in ``grab`` for
    files and in ``retrieve`` for cameras.
    """

    def __init__(self, spec: Union[str, int], fps: Optional[float] = None, capture=None,
                 retries: int = 5, retry_wait: float = 0.1) -> None:
        self.spec = spec
        self.camera = isinstance(spec, int)
        if capture is None:
            try:
                import cv2
            except ImportError as exc:
                raise SourceError("video files and cameras need OpenCV: pip install opencv-python-headless") from exc
            capture = cv2.VideoCapture(spec)
        self.capture = capture
        if not self.capture.isOpened():
            raise SourceError(f"{spec}: cannot open this {'camera' if self.camera else 'video file'}")
        self.retries, self.retry_wait = retries, retry_wait
        self.end: Optional[str] = None
        self.detail = ""
        self.expected = 0
        if self.camera:
            self.fps = 0.0
            self.kind = f"camera {spec}"
        else:
            native = float(self.capture.get(5) or 0.0)  # CAP_PROP_FPS
            self.expected = int(self.capture.get(7) or 0)  # CAP_PROP_FRAME_COUNT (0: unknown)
            self.fps = native if fps is None else fps
            if not (self.fps > 0 and np.isfinite(self.fps)):
                self.fps = 0.0
            pace = f"at {self.fps:g} fps" + (" (its recorded rate)" if fps is None else "") if self.fps else "as fast as possible"
            self.kind = f"video {spec} ({self.expected or 'unknown number of'} frames, {pace})"
        self.live = self.camera or self.fps > 0

    def __iter__(self) -> Iterator[Frame]:
        read = self._camera_frames if self.camera else self._video_frames
        try:
            yield from read()
        finally:
            self.capture.release()

    def _camera_frames(self) -> Iterator[Frame]:
        i = failures = 0
        while True:
            if not self.capture.grab():
                failures += 1
                if failures > self.retries:
                    self.end = DISCONNECTED
                    self.detail = f"camera {self.spec} stopped delivering frames after {i} frames"
                    return
                time.sleep(self.retry_wait)
                continue
            failures = 0
            arrival = time.perf_counter()
            ok, bgr = self.capture.retrieve()
            yield self._frame(i, arrival, arrival, bgr if ok else None)
            i += 1

    def _video_frames(self) -> Iterator[Frame]:
        pacer = _Pacer(self.fps) if self.fps > 0 else None
        i = 0
        while True:
            arrival = pacer.due(i) if pacer else time.perf_counter()
            t0 = time.perf_counter()
            if not self.capture.grab():
                break
            ok, bgr = self.capture.retrieve()
            yield self._frame(i, arrival, t0, bgr if ok else None)
            i += 1
        short = self.expected - i
        if self.expected > 0 and short > max(1, self.expected // 100):  # headers may round a little
            self.end, self.detail = TRUNCATED, f"video ended after {i} of the {self.expected} frames its header announces"
        else:
            self.end, self.detail = COMPLETE, f"end of video after {i} frames"

    def _frame(self, i: int, arrival: float, t0: float, bgr) -> Frame:
        name = f"frame{i:06d}"
        image = _bgr_to_image(bgr)
        if image is None:
            return Frame(i, name, arrival, None, "empty frame (nothing decoded)")
        ready = time.perf_counter()
        return Frame(i, name, arrival, image, decode_ms=(ready - t0) * 1000, ready=ready)


class ReplaySource:
    """In-memory images replayed like a camera: ``count`` frames at ``fps``, cycling through
    ``images`` (``fps`` 0: as fast as possible). As with a camera, a frame whose moment passed
    while the process could not run (a stall, SIGSTOP) is never delivered; ``missed`` counts them.
    """

    live = True

    def __init__(self, images: Sequence[Image.Image], fps: float, count: int) -> None:
        if not images:
            raise SourceError("a replay needs at least one image")
        self.images: List[Image.Image] = list(images)
        self.fps, self.count = fps, count
        self.missed = 0
        self.end: Optional[str] = None
        self.detail = ""
        self.kind = f"replay of {len(self.images)} images, {count} frames " + (f"at {fps:g} fps" if fps else "as fast as possible")

    def __iter__(self) -> Iterator[Frame]:
        start = time.perf_counter()
        tick = 0
        for i in range(self.count):
            if self.fps:
                now = time.perf_counter()
                due = start + tick / self.fps
                if now - due > 1.0 / self.fps:  # ticks passed unseen: a camera would have overwritten them
                    late = int((now - start) * self.fps) - tick
                    self.missed += late
                    tick += late
                    due = start + tick / self.fps
                elif due > now:
                    time.sleep(due - now)
            arrival = time.perf_counter()
            yield Frame(i, f"frame{i:06d}", arrival, self.images[i % len(self.images)], ready=arrival)
            tick += 1
        self.end, self.detail = COMPLETE, f"{self.count} frames replayed, {self.missed} missed"


def open_source(spec: str, fps: Optional[float] = None):
    """A folder, a video file, or a camera index (a number). ``fps``: pace a recording (None: a
    folder as fast as possible, a video at its recorded rate; 0: as fast as possible)."""
    if fps is not None and (fps < 0 or not np.isfinite(fps)):
        raise SourceError(f"--fps {fps}: expected a rate >= 0 (0: as fast as possible)")
    if spec.isdigit():
        if fps:
            raise SourceError(f"--fps paces recordings; camera {spec} delivers frames at its own rate")
        return OpenCVSource(int(spec))
    path = Path(spec)
    if path.is_dir():
        return FolderSource(path, fps or 0.0)
    if path.is_file():
        return OpenCVSource(str(path), fps=fps)
    raise SourceError(f"{spec}: not a folder, a video file or a camera index")
