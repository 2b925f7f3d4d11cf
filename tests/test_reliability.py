"""Faults a robot meets: bad images, crashes mid-save, overload. Nothing is lost, and each
problem gets one clear line naming the file."""
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reference import DATA, ROOT
from runtime.maps import load_map
from test_bundle import make_bundle

CORRIDOR = DATA / "vprbench_corridor"
GOOD_CASES = ("cmyk.jpg", "gray.png", "gray16.png", "alpha.png", "exif_rotated.jpg", "one_pixel.png")
BAD_CASES = {"zero_bytes.jpg": "empty file", "truncated.jpg": "truncated or corrupt", "truncated.png": "truncated or corrupt",
             "text.jpg": "not an image", "bomb.png": "decompression-bomb", "dangling_link.jpg": "cannot be read"}


def make_fault_folder(folder: Path) -> Path:
    folder.mkdir()
    real_jpg = sorted((CORRIDOR / "database").iterdir())[0]
    shutil.copy(real_jpg, folder / "real.jpg")
    Image.new("CMYK", (30, 20), (10, 20, 30, 40)).save(folder / "cmyk.jpg")
    Image.new("L", (30, 20), 128).save(folder / "gray.png")
    Image.fromarray(np.full((20, 30), 40000, dtype=np.uint16)).save(folder / "gray16.png")
    Image.new("RGBA", (30, 20), (200, 10, 10, 0)).save(folder / "alpha.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (30, 20), (0, 200, 0)).save(folder / "exif_rotated.jpg", exif=exif.tobytes())
    Image.new("RGB", (1, 1), (9, 9, 9)).save(folder / "one_pixel.png")
    (folder / "zero_bytes.jpg").write_bytes(b"")
    data = real_jpg.read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    png = sorted((DATA / "nordland_summer_winter_64x32" / "database").iterdir())[0].read_bytes()
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    (folder / "text.jpg").write_text("this is not an image\n")
    Image.new("1", (20000, 20000)).save(folder / "bomb.png")  # 400 Mpx, a few kB on disk
    os.symlink(folder / "missing_target.jpg", folder / "dangling_link.jpg")
    return folder


def run(*args):
    return subprocess.run([sys.executable, "-m", "runtime", *map(str, args)], cwd=ROOT, capture_output=True, text=True)


def test_every_image_fault_gets_one_clear_line_and_the_rest_goes_on(tmp_path):
    bundle = make_bundle(tmp_path / "b")
    folder = make_fault_folder(tmp_path / "imgs")
    proc = run("encode", "--bundle", bundle, "--images", folder, "--output", tmp_path / "d.npy", "--quiet")
    assert proc.returncode == 0, proc.stderr
    err_lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(err_lines) == len(BAD_CASES)
    for name, why in BAD_CASES.items():
        assert sum(name in ln and why in ln for ln in err_lines) == 1, (name, err_lines)
    assert f"{len(BAD_CASES)} of {len(BAD_CASES) + len(GOOD_CASES) + 1} images could not be read" in proc.stderr
    names = (tmp_path / "d.txt").read_text().split()
    assert sorted(names) == sorted(GOOD_CASES + ("real.jpg",))
    assert np.isfinite(np.load(tmp_path / "d.npy")).all()
    # --strict: any failure fails the command (the output is still written)
    assert run("encode", "--bundle", bundle, "--images", folder, "--output", tmp_path / "s.npy", "--quiet", "--strict").returncode == 1
    # nothing processable: non-zero
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.jpg").write_bytes(b"")
    proc = run("encode", "--bundle", bundle, "--images", only_bad, "--output", tmp_path / "n.npy", "--quiet")
    assert proc.returncode == 1 and "no image could be processed" in proc.stderr


def test_map_build_and_localize_go_on_past_bad_images(tmp_path):
    bundle = make_bundle(tmp_path / "b")
    folder = make_fault_folder(tmp_path / "imgs")
    assert run("map", "build", "--bundle", bundle, "--images", folder, "--output", tmp_path / "m", "--quiet").returncode == 0
    assert load_map(tmp_path / "m").names == sorted(GOOD_CASES + ("real.jpg",))
    proc = run("localize", "--bundle", bundle, "--map", tmp_path / "m", "--source", folder, "--output", tmp_path / "r.jsonl")
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert len(lines) == len(BAD_CASES) + len(GOOD_CASES) + 1
    assert sum("error" in r for r in lines) == len(BAD_CASES)
    assert f"failed {len(BAD_CASES)}" in proc.stdout


WRITER = r"""
import sys, numpy as np
sys.path.insert(0, {root!r})
from runtime.maps import add_to_map, load_map, save_map
ident = {{"model": "m", "dim": 128, "preprocessing": {{}}, "batch_mode": "independent", "weights": "w",
          "precision": "fp32", "onnx_sha256": "x"}}
i = 0
while True:
    x = np.full((5000, 128), float(i % 7 + 1), dtype=np.float32) / 16.0  # segment i: every value i%7+1
    names = [f"n{{i}}-{{j}}" for j in range(5000)]
    if i % 3 == 0:  # a new build replaces the content (IVF-PQ: training takes a while)
        m = save_map({folder!r}, x, names, ident, index_type="ivfpq")
    else:  # adds append segments
        m = add_to_map(m, x, names)
    print(i, flush=True)
    i += 1
"""


def test_build_or_add_killed_at_any_moment_leaves_a_loadable_intact_map(tmp_path):
    folder = tmp_path / "map"
    code = WRITER.format(root=str(ROOT), folder=str(folder))
    t = time.perf_counter()
    first = subprocess.run([sys.executable, "-c", code.replace("while True:", "for _ in range(3):")],
                           capture_output=True, text=True)  # a build and two adds, to time them
    assert first.returncode == 0, first.stderr
    span = time.perf_counter() - t
    rng = random.Random(0)
    kills = 0
    for attempt in range(12):
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(0.5, span))  # anywhere in a build (training) or an add
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        m = load_map(folder, verify="full")  # every file's checksum holds
        assert len(m) % 5000 == 0 and len(set(m.names)) == len(m)
        for part in m.descriptors.parts:  # whole segments, never a mix
            assert len(np.unique(np.asarray(part))) == 1
        m.close()
    assert kills == 12 and (folder / "CURRENT").exists()
    once = subprocess.run([sys.executable, "-c", code.replace("while True:", "for _ in range(2):")],
                          capture_output=True, text=True)
    assert once.returncode == 0, once.stderr
    # what killed writers left behind is cleaned up: staging folders and unlisted segments
    assert not list(folder.glob("*/.*partial*")) and not list(folder.glob("index/*/.*.tmp"))
    assert sorted(p.name for p in (folder / "segments").iterdir()) == \
        [s["name"] for s in load_map(folder).meta["segments"]]


def _limited(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_full_disk_mid_add_leaves_the_previous_version(tmp_path):
    """A file-size limit (RLIMIT_FSIZE) in the writing process stands in for a full disk."""
    bundle = make_bundle(tmp_path / "b")
    first, more = tmp_path / "first", tmp_path / "more"
    for folder, n in ((first, 4), (more, 300)):
        folder.mkdir()
        for i in range(n):
            Image.new("RGB", (20, 20), (i % 255, 3 * i % 255, 7)).save(folder / f"{folder.name}{i:04d}.png")
    assert run("map", "build", "--bundle", bundle, "--images", first, "--output", tmp_path / "m", "--quiet").returncode == 0
    proc = subprocess.run([sys.executable, "-m", "runtime", "map", "add", "--bundle", str(bundle), "--map",
                           str(tmp_path / "m"), "--images", str(more), "--quiet"], cwd=ROOT, capture_output=True,
                          text=True, preexec_fn=_limited(4096))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "writing the new segment failed (File too large)" in lines[0]
    assert "the map is unchanged (still v000001)" in lines[0]
    m = load_map(tmp_path / "m", verify="full")
    assert len(m) == 4 and m.version == "v000001" and not list((tmp_path / "m").glob("segments/.*"))


def test_add_with_bad_images_adds_the_good_ones_and_keeps_the_map(tmp_path):
    bundle = make_bundle(tmp_path / "b")
    (tmp_path / "first").mkdir()
    shutil.copy(sorted((CORRIDOR / "database").iterdir())[0], tmp_path / "first" / "a.jpg")
    assert run("map", "build", "--bundle", bundle, "--images", tmp_path / "first", "--output", tmp_path / "m",
               "--quiet").returncode == 0
    folder = make_fault_folder(tmp_path / "imgs")
    proc = run("map", "add", "--bundle", bundle, "--map", tmp_path / "m", "--images", folder, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert f"{len(BAD_CASES)} of {len(BAD_CASES) + len(GOOD_CASES) + 1} images could not be read" in proc.stderr
    m = load_map(tmp_path / "m", verify="full")
    assert m.names == ["a.jpg"] + sorted(GOOD_CASES + ("real.jpg",)) and m.version == "v000002"


def test_overload_keeps_latency_within_budget_and_accounts_for_every_frame(tmp_path):
    pytest.importorskip("torch")
    from runtime.backends import open_backend
    from runtime.bundle import load_bundle
    from runtime.encoder import Encoder
    from runtime.loop import LocalizationLoop, LoopConfig
    from runtime.maps import bundle_identity, save_map
    from runtime.preprocess import load_rgb
    from runtime.sources import Frame

    out = tmp_path / "gem"
    proc = subprocess.run([sys.executable, str(ROOT / "export" / "build_engine.py"), "--model", "gem-dinov2-vits14",
                           "--random-weights", "--depth", "1", "--image-size", "224", "--precision", "fp32",
                           "--batch", "1:4:4", "--skip-parity", "--backend", "onnxruntime", "--output", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    bundle = load_bundle(out)
    enc = Encoder(bundle, open_backend(bundle, threads=2), batch_size=4)
    images = [load_rgb(p) for p in sorted((CORRIDOR / "queries").iterdir())[:20]]
    from runtime.preprocess import preprocess_image
    desc = enc.infer(np.stack([preprocess_image(im, enc.pre) for im in images]))["descriptor"]
    place_map = save_map(tmp_path / "map", desc, [f"p{i}" for i in range(20)], bundle_identity(bundle))

    # sustainable rate, measured with the same loop
    t0 = time.perf_counter()
    warm = LocalizationLoop(enc, place_map, LoopConfig())
    warm.run((Frame(i, f"w{i}", time.perf_counter(), images[i % 20]) for i in range(40)))
    per_frame = (time.perf_counter() - t0) / 40
    period = per_frame / 5  # five times faster than sustainable

    def source(n=1000):
        start = time.perf_counter()
        for i in range(n):
            delay = start + i * period - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            yield Frame(i, f"f{i}", time.perf_counter(), images[i % 20])

    budget_ms = max(8 * per_frame * 1000, 50.0)
    results = []
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    stats = LocalizationLoop(enc, place_map, LoopConfig(budget_ms=budget_ms, queue_size=8), results.append).run(source(), live=True)
    rss_growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert stats.received == 1000 and stats.accounted() and len(results) == 1000
    processed = [r for r in results if r["status"] == "processed"]
    assert len(processed) == stats.processed > 0
    assert stats.dropped_queue + stats.dropped_stale > 0
    # admission control keeps frames within the budget; a frame whose thread another process
    # preempted (a shared 2-core CI machine) may overrun once, a loop that ignores the budget overruns often
    bound = budget_ms + period * 1000 + per_frame * 1000
    late = [r["times_ms"]["total"] for r in processed if r["times_ms"]["total"] > bound]
    assert len(late) <= max(1, len(processed) // 50), (bound, sorted(late))
    assert rss_growth_mb < 200
