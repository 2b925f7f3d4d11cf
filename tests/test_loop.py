"""The localization loop on a tiny bundle (no torch): accounting, budget, degradation."""
import time

import numpy as np
from PIL import Image

from runtime.backends import open_backend
from runtime.bundle import load_bundle
from runtime.encoder import Encoder
from runtime.loop import Localizer, LoopConfig
from runtime.maps import bundle_identity, save_map
from runtime.preprocess import preprocess_image
from runtime.sources import FolderSource, Frame
from test_bundle import make_bundle


def _setup(tmp_path, n_places=20):
    bundle = load_bundle(make_bundle(tmp_path / "b"))
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 255, (n_places, 3))
    enc = Encoder(bundle, open_backend(bundle, threads=1), batch_size=4)
    images = [Image.new("RGB", (40, 30), tuple(int(v) for v in c)) for c in colours]
    x = np.stack([preprocess_image(im, enc.pre) for im in images])
    desc = enc.infer(x)["descriptor"]
    place_map = save_map(tmp_path / "map", desc, [f"p{i}" for i in range(n_places)], bundle_identity(bundle))
    return enc, place_map, images


def test_folder_loop_localizes_every_frame(tmp_path):
    enc, place_map, images = _setup(tmp_path)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in (3, 7, 11):
        images[i].save(folder / f"q{i:02d}.png")
    (folder / "q99.png").write_bytes(b"not an image")
    results = []
    loop = Localizer(enc, place_map, LoopConfig(top_k=3), results.append)
    stats = loop.run(FolderSource(folder))
    assert stats.accounted() and stats.received == 4 and stats.processed == 3 and stats.failed == 1
    good = [r for r in results if "place" in r]
    assert [r["place"] for r in good] == ["p3", "p7", "p11"]
    assert all(len(r["top_k"]) == 3 for r in good)
    assert any("error" in r and r["name"] == "q99.png" for r in results)


def test_overload_stays_accounted_and_bounded(tmp_path):
    enc, place_map, images = _setup(tmp_path)

    def fast_source(n=300):
        for i in range(n):
            yield Frame(i, f"f{i}", time.perf_counter(), images[i % len(images)])

    results = []
    loop = Localizer(enc, place_map, LoopConfig(budget_ms=5.0, queue_size=8), results.append)
    stats = loop.run(fast_source(), live=True)
    assert stats.accounted() and stats.received == 300
    assert stats.dropped_queue + stats.dropped_stale > 0  # the source outran the loop
    assert len(results) == 300  # every frame has a line: result, drop or error


def test_video_file_source(tmp_path):
    import pytest
    cv2 = pytest.importorskip("cv2")
    from runtime.sources import open_source

    enc, place_map, images = _setup(tmp_path)
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (40, 30))
    for i in (2, 5, 9):
        writer.write(np.asarray(images[i])[:, :, ::-1].copy())
    writer.release()
    results = []
    stats = Localizer(enc, place_map, LoopConfig(top_k=1), results.append).run(open_source(str(path)))
    assert stats.processed == 3 and stats.accounted()
    assert [r["place"] for r in results] == ["p2", "p5", "p9"]
