"""Map building on a local Ray cluster that the tests start themselves (marker ``cluster``):
the same descriptors as the single-process build, every image exactly once even when a worker
is killed, bad images reported the same way."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reference import ROOT
from runtime.maps import load_map
from test_bundle import make_bundle

pytest.importorskip("ray.data")
pytestmark = pytest.mark.cluster


def make_images(folder: Path, n: int, bad: int = 0) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = folder / f"part{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(sub / f"{i // 3:04d}.png")
    for i in range(bad):
        (folder / f"bad{i}.jpg").write_bytes(b"not an image")
    return folder


def cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "runtime", *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def by_name(m):
    x = np.asarray(m.descriptors, dtype=np.float32)
    return {n: x[i] for i, n in enumerate(m.names)}


def test_ray_build_equals_the_single_process_build_and_reports_bad_images(tmp_path):
    bundle = make_bundle(tmp_path / "b")
    images = make_images(tmp_path / "imgs", 60, bad=2)
    single = cli("map", "build", "--bundle", bundle, "--images", images, "--output", tmp_path / "m1", "--quiet",
                 "--store-dtype", "float32", "--threads", "1")
    out1, err1 = single.communicate(timeout=300)
    assert single.returncode == 0, err1
    ray = cli("map", "build", "--bundle", bundle, "--images", images, "--output", tmp_path / "m2", "--quiet",
              "--store-dtype", "float32", "--threads", "1", "--ray", "--ray-workers", "2")
    out2, err2 = ray.communicate(timeout=600)
    assert ray.returncode == 0, err2
    for err in (err1, err2):
        lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
        assert len(lines) == 2 and all("bad" in ln and "not an image" in ln for ln in lines), err
        assert "2 of 62 images could not be read" in err
    m1, m2 = load_map(tmp_path / "m1"), load_map(tmp_path / "m2")  # an ordinary map
    assert m1.names == m2.names and len(m2) == 60 and "part1/0003.png" in m2.names
    a, b = by_name(m1), by_name(m2)
    assert max(float(np.abs(a[n] - b[n]).max()) for n in a) <= 1e-6


def ray_workers():
    """PIDs of the Ray worker processes running an encoder actor."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "MapWorker" in cmd and "EncodeActor" in cmd:
                pids.append(int(d.name))
    return pids


def test_every_image_exactly_once_when_a_worker_is_killed(tmp_path):
    bundle = make_bundle(tmp_path / "b")
    images = make_images(tmp_path / "imgs", 400)
    proc = cli("map", "build", "--bundle", bundle, "--images", images, "--output", tmp_path / "m", "--quiet",
               "--store-dtype", "float32", "--threads", "1", "--batch-size", "1", "--ray", "--ray-workers", "2")
    killed = None
    deadline = time.time() + 300
    while killed is None and time.time() < deadline and proc.poll() is None:
        workers = ray_workers()
        if workers:
            time.sleep(1.0)  # let it encode some batches first
            os.kill(workers[0], signal.SIGKILL)
            killed = workers[0]
        time.sleep(0.2)
    out, err = proc.communicate(timeout=600)
    assert killed is not None, "no encoder worker was seen"
    assert proc.returncode == 0, err
    m = load_map(tmp_path / "m")
    assert len(m) == 400 and len(set(m.names)) == 400
    single = subprocess.run([sys.executable, "-m", "runtime", "map", "build", "--bundle", bundle, "--images", images,
                             "--output", tmp_path / "s", "--quiet", "--store-dtype", "float32", "--threads", "1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    a, b = by_name(load_map(tmp_path / "s")), by_name(m)
    assert a.keys() == b.keys() and max(float(np.abs(a[n] - b[n]).max()) for n in a) <= 1e-6
