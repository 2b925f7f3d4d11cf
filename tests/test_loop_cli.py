"""``python -m runtime localize`` and ``evaluate`` as real processes on real files (no torch):
signals, sources that end or break, exit statuses, and thresholds saved with a map."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loop_helpers import colours, tiny_map, write_video
from reference import ROOT
from runtime.maps import load_map, set_metadata


def run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "runtime", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def start(*args):
    return subprocess.Popen([sys.executable, "-m", "runtime", *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def frames_folder(folder: Path, images, count: int) -> Path:
    folder.mkdir()
    for i in range(count):
        images[i % len(images)].save(folder / f"f{i:05d}.png")
    return folder


def wait_for_lines(path: Path, count: int, proc, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and path.read_text().count("\n") >= count:
            return
        if proc.poll() is not None:
            pytest.fail(f"localize ended early ({proc.returncode}): {proc.stderr.read()}")
        time.sleep(0.05)
    pytest.fail(f"no {count} lines in {path} after {timeout} s")


def read_records(path: Path):
    text = path.read_text()
    assert text.endswith("\n")  # whole lines only
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture
def tiny(tmp_path):
    return tiny_map(tmp_path)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_leaves_whole_lines_the_summary_and_its_exit_status(tiny, tmp_path, sig):
    bundle, map_dir, images = tiny
    folder = frames_folder(tmp_path / "frames", images, 400)
    out, summary = tmp_path / "r.jsonl", tmp_path / "summary.json"
    proc = start("localize", "--bundle", bundle, "--map", map_dir, "--source", folder, "--fps", 50, "--budget-ms", 100,
                 "--output", out, "--summary", summary)
    wait_for_lines(out, 40, proc)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 128 + sig, stderr
    assert f"ended: interrupted ({sig.name})" in stdout and "| total |" in stdout
    records = read_records(out)
    s = json.loads(summary.read_text())
    f = s["frames"]
    assert s["end"] == "interrupted" and s["run"] == "live" and f["received"] < 400
    assert f["received"] == len(records) == f["processed"] + f["failed"] + f["dropped"]
    assert sum(r["status"] == "processed" for r in records) == f["processed"] > 0


def test_video_to_its_end_exits_0_and_a_cut_video_exits_3(tiny, tmp_path):
    cv2 = pytest.importorskip("cv2")
    bundle, map_dir, images = tiny
    video = write_video(tmp_path / "clip.avi", [images[i % 20] for i in range(60)], fps=100)
    proc = run("localize", "--bundle", bundle, "--map", map_dir, "--source", video, "--output", tmp_path / "a.jsonl")
    assert proc.returncode == 0, proc.stderr
    assert "run: live" in proc.stdout and "ended: complete (end of video after 60 frames)" in proc.stdout
    assert len(read_records(tmp_path / "a.jsonl")) == 60
    data = video.read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: len(data) // 2])
    if int(cv2.VideoCapture(str(cut)).get(cv2.CAP_PROP_FRAME_COUNT)) != 60:
        pytest.skip("this OpenCV build does not read the frame count of a cut AVI")
    proc = run("localize", "--bundle", bundle, "--map", map_dir, "--source", cut, "--fps", 0, "--output", tmp_path / "b.jsonl")
    assert proc.returncode == 3, proc.stderr
    assert "ended: truncated" in proc.stdout and "error: the source was lost: video ended after" in proc.stderr
    assert "run: throughput" in proc.stdout  # --fps 0: read as fast as possible
    assert 0 < len(read_records(tmp_path / "b.jsonl")) < 60


def test_bad_source_and_options_are_one_line_errors(tiny, tmp_path):
    bundle, map_dir, _ = tiny
    for args, why in ((["--source", tmp_path / "nowhere"], "not a folder, a video file or a camera index"),
                      (["--source", "0", "--fps", "5"], "its own rate"),
                      (["--source", tmp_path, "--consistency", "0"], "--consistency 0"),
                      (["--source", tmp_path, "--budget-ms", "-5"], "--budget-ms -5")):
        proc = run("localize", "--bundle", bundle, "--map", map_dir, *args)
        assert proc.returncode == 2 and proc.stderr.startswith("error: ") and why in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


def _colour_dataset(root: Path, n: int = 20) -> Path:
    """Queries are the database's colours shifted by growing amounts: the first ones match their
    place, later ones drift to wrong places with lower scores."""
    db, q = root / "database", root / "queries"
    db.mkdir(parents=True)
    q.mkdir()
    rng = np.random.default_rng(3)
    for i, im in enumerate(colours(n)):
        im.save(db / f"db{i:02d}.png")
        shift = rng.normal(size=3)
        shifted = np.clip(np.asarray(im, dtype=np.float64) + 90.0 * i / n * shift / np.linalg.norm(shift), 0, 255)
        Image.fromarray(shifted.astype(np.uint8)).save(q / f"q{i:02d}.png")
    (root / "ground_truth.json").write_text(json.dumps({"positives": {f"q{i:02d}.png": [f"db{i:02d}.png"] for i in range(n)}}))
    return root


def test_evaluate_finds_the_threshold_saves_it_with_the_map_and_localize_uses_it(tiny, tmp_path):
    bundle, _, _ = tiny
    ds = _colour_dataset(tmp_path / "ds")
    map_dir = tmp_path / "dsmap"
    assert run("map", "build", "--bundle", bundle, "--images", ds / "database", "--output", map_dir, "--quiet").returncode == 0
    ev, png = tmp_path / "ev.json", tmp_path / "pr.png"
    proc = run("evaluate", "--bundle", bundle, "--dataset", ds, "--map", map_dir, "--target-precision", 0.99,
               "--save-threshold", "--pr-curve", png, "--output", ev, "--quiet")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(ev.read_text())["decisions"]

    # the sweep against brute force on the descriptors `encode` writes
    for part in ("database", "queries"):
        assert run("encode", "--bundle", bundle, "--images", ds / part, "--output", tmp_path / f"{part}.npy", "--quiet").returncode == 0
    d, q = np.load(tmp_path / "database.npy"), np.load(tmp_path / "queries.npy")
    sims = q @ d.T
    best, score = sims.argmax(axis=1), sims.max(axis=1)
    correct = best == np.arange(len(q))
    assert 0 < correct.sum() < len(q)  # some right, some wrong: a real trade-off
    for t, p, r in zip(res["thresholds"], res["precision"], res["recall"]):
        acc = score >= t - 1e-6
        assert r == pytest.approx((acc & correct).sum() / len(q), abs=1e-9)
        assert p == pytest.approx((acc & correct).sum() / acc.sum() if acc.sum() else 1.0, abs=1e-9)
    target = res["operating_points"]["at_target"]
    assert target["precision"] >= 0.99
    assert f"Recall@100% precision: {res['operating_points']['recall_at_100_precision']:.4f}" in proc.stdout
    assert f"score >= {target['threshold']:.4f}" in proc.stdout and "| score >= | accepted | precision | recall |" in proc.stdout
    if (png.exists()):
        assert png.read_bytes()[:4] == b"\x89PNG"
    else:
        assert "matplotlib is not installed" in proc.stderr
    saved = load_map(map_dir).metadata["acceptance"]
    assert saved["rule"]["min_score"] == target["threshold"]

    # localize uses the saved threshold without retyping it
    out = tmp_path / "r.jsonl"
    proc = run("localize", "--bundle", bundle, "--map", map_dir, "--source", ds / "queries", "--output", out)
    assert proc.returncode == 0, proc.stderr
    assert f"min score {target['threshold']:.4f} from the rule saved with {map_dir}" in proc.stdout
    records = read_records(out)
    assert all(r["accepted"] == (r["score"] >= target["threshold"]) for r in records)
    assert {r["reason"] for r in records if not r["accepted"]} <= {"low_score"}
    assert sum(r["accepted"] for r in records) == target["accepted"]
    # --min-score overrides it
    proc = run("localize", "--bundle", bundle, "--map", map_dir, "--source", ds / "queries", "--output", out, "--min-score", -1)
    assert proc.returncode == 0 and all(r["accepted"] for r in read_records(out))
    # a threshold measured with another model is not used
    set_metadata(map_dir, {"acceptance": {**saved, "bundle": {**saved["bundle"], "model": "other"}}})
    proc = run("localize", "--bundle", bundle, "--map", map_dir, "--source", ds / "queries", "--output", out)
    assert proc.returncode == 0 and "measured with another model; ignored" in proc.stderr
    assert all(r["accepted"] for r in read_records(out))
    # a damaged entry is named, never a traceback
    set_metadata(map_dir, {"acceptance": {"rule": {"min_score": "x"}}})
    proc = run("localize", "--bundle", bundle, "--map", map_dir, "--source", ds / "queries")
    assert proc.returncode == 2 and "saved decision rule" in proc.stderr and "Traceback" not in proc.stderr
