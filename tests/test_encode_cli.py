"""python -m export.encode, as a user runs it, on real images."""
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from export.encode import encode_files  # noqa: E402
from export.zoo import create_model  # noqa: E402
from reference import DATA, ROOT  # noqa: E402
from runtime.preprocess import list_images  # noqa: E402


@pytest.fixture()
def images(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    src = list_images(DATA / "vprbench_corridor" / "queries")[:5]
    for i, f in enumerate(reversed(src)):  # copied in reverse: the tool must sort by name
        shutil.copy(f, folder / f.name)
    return folder


def _run(*args):
    return subprocess.run([sys.executable, "-m", "export.encode", *args], cwd=ROOT, capture_output=True, text=True)


def test_encode_writes_sorted_descriptors_equal_to_the_model(images, tmp_path):
    out = tmp_path / "out" / "desc.npy"
    proc = _run("--model", "cricavpr-dinov2-vitb14", "--random-weights", "--depth", "1",
                "--images", str(images), "--output", str(out), "--batch-size", "2")
    assert proc.returncode == 0, proc.stderr
    assert "RANDOM WEIGHTS" in proc.stderr
    names = out.with_suffix(".txt").read_text().split()
    assert names == sorted(names) and len(names) == 5
    desc = np.load(out)
    assert desc.shape == (5, 10752)
    # batched CricaVPR: consecutive files in sorted order form the batches (2 + 2 + 1)
    model, cfg, _ = create_model("cricavpr-dinov2-vitb14", random_weights=True, depth=1)
    files = list_images(images)
    expected = encode_files(model, cfg, files, batch_size=2, progress=False).outputs["descriptor"]
    np.testing.assert_allclose(desc, expected, atol=1e-6)
    other = encode_files(model, cfg, files, batch_size=5, progress=False).outputs["descriptor"]
    assert np.abs(other - desc).max() > 1e-4


def test_encode_saves_selavpr_local_features(images, tmp_path):
    out = tmp_path / "d.npy"
    proc = _run("--model", "selavpr-dinov2-vitl14", "--random-weights", "--depth", "1",
                "--images", str(images), "--output", str(out), "--save-local")
    assert proc.returncode == 0, proc.stderr
    assert np.load(out).shape == (5, 1024)
    assert np.load(tmp_path / "d.local.npy").shape == (5, 61, 61, 128)


def test_encode_errors_are_clear(tmp_path):
    proc = _run("--model", "nope", "--random-weights", "--images", str(tmp_path), "--output", str(tmp_path / "x.npy"))
    assert proc.returncode == 2 and "unknown model 'nope'" in proc.stderr
    proc = _run("--model", "gem-dinov2-vits14", "--random-weights", "--images", str(tmp_path), "--output", str(tmp_path / "x.npy"))
    assert proc.returncode == 2 and "no images found" in proc.stderr
    proc = _run("--model", "gem-dinov2-vits14", "--images", str(tmp_path), "--output", str(tmp_path / "x.npy"))
    assert proc.returncode == 2 and "--checkpoint" in proc.stderr


def test_encode_refuses_a_size_the_model_cannot_take_in_one_line(tmp_path):
    proc = _run("--model", "megaloc-dinov2-vitb14", "--random-weights", "--image-size", "64x32",
                "--images", str(tmp_path), "--output", str(tmp_path / "x.npy"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "error: megaloc-dinov2-vitb14 cannot take 64x32 (rounded to 70x28: 10 patches): it takes any H and W, "
        "each rounded to the nearest multiple of 14 as the official model does (240x320 -> 238x322), with more "
        "patches than its 64 clusters (e.g. 126x126: 81 patches)")
    proc = _run("--model", "boq-dinov2-vitb14", "--random-weights", "--image-size", "x",
                "--images", str(tmp_path), "--output", str(tmp_path / "x.npy"))
    assert proc.returncode == 2 and "expected N (square) or HxW" in proc.stderr
