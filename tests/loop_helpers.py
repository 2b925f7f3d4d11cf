"""Shared by the loop tests: a tiny bundle with a map of colour patches (place i is colour i), a
fault injector around the real ONNX Runtime backend, a scripted camera over a real video file,
and checks on a run's records."""
import time
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
from PIL import Image

from runtime.backends import open_backend
from runtime.bundle import load_bundle
from runtime.encoder import Encoder
from runtime.maps import bundle_identity, save_map
from runtime.preprocess import preprocess_image
from test_bundle import make_bundle


def colours(n: int = 20, size=(28, 28)) -> List[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.new("RGB", size, tuple(int(v) for v in c)) for c in rng.integers(0, 255, (n, 3))]


def tiny_map(tmp_path: Path, n_places: int = 20):
    """(bundle folder, map folder, the places' images): the tiny bundle's descriptor is the
    normalised mean colour, so colour i localizes to place i."""
    folder = make_bundle(tmp_path / "b")
    bundle = load_bundle(folder)
    enc = Encoder(bundle, open_backend(bundle, threads=1), batch_size=4)
    images = colours(n_places)
    desc = enc.infer(np.stack([preprocess_image(im, enc.pre) for im in images]))["descriptor"]
    save_map(tmp_path / "map", desc, [f"p{i}" for i in range(n_places)], bundle_identity(bundle))
    return folder, tmp_path / "map", images


def encoder(bundle_dir: Path, delay: float = 0.0, stalls: Sequence[Tuple[float, float]] = (), batch_size: int = 4):
    bundle = load_bundle(bundle_dir)
    backend = FaultyBackend(open_backend(bundle, threads=1), delay, stalls)
    return Encoder(bundle, backend, batch_size=batch_size), backend


class FaultyBackend:
    """The real backend with faults injected: ``delay`` seconds more per call (a slower machine),
    and ``stalls``: (seconds after the first call, duration) hangs, like a GC pause or a thermal
    throttle. ``injected`` lists each stall's wall-clock (start, end)."""

    def __init__(self, inner, delay: float = 0.0, stalls: Sequence[Tuple[float, float]] = ()) -> None:
        self.inner, self.delay = inner, delay
        self.max_batch = inner.max_batch
        self.pending = sorted(stalls)
        self.injected: List[Tuple[float, float]] = []
        self.t0 = None

    def run(self, images):
        now = time.perf_counter()
        self.t0 = now if self.t0 is None else self.t0
        if self.pending and now - self.t0 >= self.pending[0][0]:
            _, seconds = self.pending.pop(0)
            start = time.time()
            time.sleep(seconds)
            self.injected.append((start, time.time()))
        if self.delay:
            time.sleep(self.delay)
        return self.inner.run(images)


class ScriptedCamera:
    """A camera for tests (none is attached here): the frames of a real video file through
    ``cv2.VideoCapture``, following ``script`` ("frame" or "empty" per grab); after the script,
    every grab fails, as an unplugged camera's does."""

    def __init__(self, video: Path, script: Sequence[str]) -> None:
        import cv2
        self.cap = cv2.VideoCapture(str(video))
        self.script, self.i, self.kind = list(script), 0, None

    def isOpened(self) -> bool:  # noqa: N802 - OpenCV's name
        return self.cap.isOpened()

    def get(self, prop: int) -> float:
        return self.cap.get(prop)

    def grab(self) -> bool:
        if self.i >= len(self.script):
            return False
        self.kind = self.script[self.i]
        self.i += 1
        return self.cap.grab() if self.kind == "frame" else True

    def retrieve(self):
        if self.kind == "empty":
            return True, np.zeros((0, 0, 3), np.uint8)
        return self.cap.retrieve()

    def release(self) -> None:
        self.cap.release()


def write_video(path: Path, images: Sequence[Image.Image], fps: float = 25.0) -> Path:
    import cv2
    w, h = images[0].size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    for im in images:
        writer.write(np.asarray(im)[:, :, ::-1].copy())
    writer.release()
    return path


def result_time(r: dict) -> float:
    """Wall-clock time a processed frame's result was ready."""
    return r["timestamp"] + r["times_ms"]["total"] / 1000.0


def check_recovery(records: List[dict], stalls: Sequence[Tuple[float, float]], budget_ms: float, period_s: float,
                   within_s: float = 1.0) -> None:
    """After each stall, frames are localized again within ``within_s``; processed frames that
    did not live through a stall meet the budget plus one frame period; frames captured from
    ``within_s`` after a stall on (to the next stall) are nearly all processed.

    The latency bound holds for every frame on a quiet machine. A shared CI machine can starve
    the process for longer than a budget (at load 7-9 on 2 cores, 1-2 frames of one batch in ~200
    spent 40 ms preprocessing two 28x28 images), which no admission control can prevent: the
    frames of one batch (4) or 1 % of the frames may be late, never more."""
    processed = [r for r in records if r["status"] == "processed"]

    def lived_through_stall(r: dict) -> bool:
        return any(r["timestamp"] <= end and result_time(r) >= start for start, end in stalls)

    late = [(r["frame"], r["times_ms"]["total"]) for r in processed if not lived_through_stall(r)
            and r["times_ms"]["total"] > budget_ms + period_s * 1000]
    assert len(late) <= max(4, len(processed) // 100), f"over budget + one period outside stalls: {late[:10]}"
    last = max(r["timestamp"] for r in records)
    for k, (start, end) in enumerate(stalls):
        after = sorted((r for r in processed if r["timestamp"] >= end), key=lambda r: r["timestamp"])
        assert after, f"nothing localized after the stall ending at {end}"
        assert result_time(after[0]) <= end + within_s, f"first result {result_time(after[0]) - end:.2f} s after the stall"
        until = stalls[k + 1][0] if k + 1 < len(stalls) else last
        window = [r for r in records if end + within_s <= r["timestamp"] <= until]
        done = [r for r in window if r["status"] == "processed"]
        assert window and len(done) >= 0.9 * len(window), f"{len(done)} of {len(window)} frames processed after recovery"
