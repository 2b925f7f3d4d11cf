"""The localization loop on a tiny bundle (no torch): records, accounting, budget control that
cannot latch, best effort, decisions, sources and how they end."""
import json
import logging
import threading
import time

import pytest

from loop_helpers import ScriptedCamera, check_recovery, encoder, tiny_map, write_video
from runtime.decisions import DecisionRule
from runtime.errors import UserError
from runtime.loop import CostModel, JsonlWriter, LocalizationLoop, LoopConfig, admit, format_summary
from runtime.maps import load_map
from runtime.pipeline import Match
from runtime.sources import FolderSource, Frame, OpenCVSource, ReplaySource, SourceError, open_source

STAGES = {"decode", "queue", "preprocess", "inference", "aggregation", "search", "rerank", "service", "total"}


@pytest.fixture
def tiny(tmp_path):
    return tiny_map(tmp_path)


def test_folder_loop_localizes_every_frame_with_stage_times(tiny, tmp_path):
    bundle, map_dir, images = tiny
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in (3, 7, 11):
        images[i].save(folder / f"q{i:02d}.png")
    (folder / "q99.png").write_bytes(b"not an image")
    writer = JsonlWriter(tmp_path / "r.jsonl")
    enc, _ = encoder(bundle)
    loop = LocalizationLoop(enc, load_map(map_dir), LoopConfig(top_k=3), writer)
    stats = loop.run(FolderSource(folder))
    writer.close()
    records = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert stats.accounted() and stats.received == 4 and stats.processed == 3 and stats.failed == 1
    good = sorted((r for r in records if r["status"] == "processed"), key=lambda r: r["frame"])
    assert [r["place"] for r in good] == ["p3", "p7", "p11"]
    assert all(len(r["top_k"]) == 3 and r["accepted"] and r["reason"] == "ok" for r in good)
    for r in good:
        t = r["times_ms"]
        assert set(t) == STAGES and t["aggregation"] is None and t["rerank"] is None  # not run: None
        assert t["decode"] > 0 and r["timestamp"] > 1e9
        # a frame's stages happen one after another within its capture-to-result time
        assert t["total"] >= t["decode"] + t["queue"] + t["preprocess"] + t["inference"] + t["search"] - 0.05
    assert [r for r in records if r["status"] == "failed"][0]["name"] == "q99.png"
    summary = loop.summary()
    assert summary["run"] == "throughput" and summary["end"] == "complete"
    assert summary["latency"]["measure"].startswith("service") and summary["latency"]["n"] == 3
    text = format_summary(summary, loop.timer)
    assert "run: throughput" in text and "| total |" not in text and "| service |" in text


def test_match_record_round_trips_through_json(tiny):
    bundle, map_dir, images = tiny
    enc, _ = encoder(bundle)
    matches = LocalizationLoop(enc, load_map(map_dir), LoopConfig(top_k=2)).pipeline.run(
        [Frame(0, "a", time.perf_counter(), images[5])])
    assert isinstance(matches[0], Match)
    back = json.loads(matches[0].to_json())
    assert back == matches[0].to_dict() and back["place"] == "p5" and back["status"] == "processed"


def test_overload_stays_accounted_and_bounded(tiny):
    bundle, map_dir, images = tiny
    enc, _ = encoder(bundle, delay=0.01)
    records = []
    loop = LocalizationLoop(enc, load_map(map_dir), LoopConfig(budget_ms=5.0, queue_size=8), records.append)
    stats = loop.run(ReplaySource(images, 1000.0, 600))  # ten times faster than the loop
    assert stats.accounted() and stats.received == len(records) and stats.processed > 0
    assert stats.dropped_queue + stats.dropped_stale > 0
    assert len({r["frame"] for r in records}) == len(records)  # one record per frame


def test_cost_model_follows_the_machine_both_ways():
    cost = CostModel()
    assert cost.estimate(1) == 0.0  # nothing measured yet: admit
    cost.observe(4, 5000.0)  # the very first batch hung
    cost.observe(4, 10.0)
    assert cost.estimate(4) == 10.0  # one stall among the first samples counts for nothing
    for _ in range(3):
        cost.observe(4, 10.0)
    cost.observe(4, 5000.0)  # a one-off stall later on
    assert cost.estimate(4) == 10.0
    cost.observe(4, 50.0)
    assert cost.estimate(4) == 50.0  # two slow batches in five: a lasting slowdown is followed...
    for _ in range(3):
        cost.observe(4, 50.0)
    for _ in range(3):
        cost.observe(4, 10.0)
    assert cost.estimate(4) == 50.0
    cost.observe(4, 10.0)
    assert cost.estimate(4) == 10.0  # ...and so is the recovery, after four fast batches
    assert cost.estimate(2) == pytest.approx(5.0) and cost.estimate(8) == pytest.approx(20.0)  # scaled


def test_admission_drops_the_frames_that_cannot_make_the_budget():
    now = 100.0
    frames = [Frame(i, f"f{i}", now - age / 1000) for i, age in enumerate((90, 60, 30, 10, 5, 1))]
    stale, batch, rest = admit(frames, now, 50.0, 2, lambda n: 10.0 * n)
    assert [f.index for f in stale] == [0, 1, 2] and [f.index for f in batch] == [3, 4] and [f.index for f in rest] == [5]
    stale, batch, rest = admit(frames, now, 5.0, 2, lambda n: 10.0 * n)
    assert len(stale) == 6 and not batch and not rest


@pytest.mark.parametrize("stall_s", [0.1, 0.5])
def test_one_stall_in_the_backend_does_not_stop_localization(tiny, stall_s):
    """The latch: one stall used to push the batch-time estimate over the budget for good."""
    bundle, map_dir, images = tiny
    enc, backend = encoder(bundle, delay=0.002, stalls=[(1.0, stall_s)])
    records = []
    fps, budget = 50.0, 50.0  # the old loop latched whenever a stall exceeded the budget
    loop = LocalizationLoop(enc, load_map(map_dir), LoopConfig(budget_ms=budget), records.append)
    stats = loop.run(ReplaySource(images, fps, int(fps * (1.0 + stall_s + 2.5))))
    assert stats.accounted() and len(records) == stats.received
    assert len(backend.injected) == 1
    check_recovery(records, backend.injected, budget, 1 / fps)


def test_a_budget_the_machine_cannot_meet_degrades_to_best_effort(tiny, caplog):
    bundle, map_dir, images = tiny
    enc, _ = encoder(bundle, delay=0.025)  # a frame takes about 26 ms
    records = []
    loop = LocalizationLoop(enc, load_map(map_dir), LoopConfig(budget_ms=15.0), records.append)
    with caplog.at_level(logging.WARNING, logger="runtime.loop"):
        stats = loop.run(ReplaySource(images, 50.0, 150))
    assert stats.accounted()
    # the machine keeps up with about one frame in two; the loop used to process one in 400
    assert stats.processed >= 0.3 * stats.received and stats.best_effort > 0
    assert all(r["batch"] == 1 for r in records if r["status"] == "processed")  # the smallest batch
    warnings = [r for r in caplog.records if "cannot be met" in r.getMessage()]
    assert len(warnings) == 1  # said once
    summary = loop.summary()
    assert "best effort" in summary["best_effort"] and "best effort:" in format_summary(summary, loop.timer)


def test_stop_ends_the_run_with_every_frame_accounted_for(tiny):
    bundle, map_dir, images = tiny
    enc, _ = encoder(bundle, delay=0.05)
    records = []
    loop = LocalizationLoop(enc, load_map(map_dir), LoopConfig(), records.append)
    threading.Timer(0.5, loop.stop, args=("SIGTERM",)).start()
    t0 = time.perf_counter()
    stats = loop.run(ReplaySource(images, 100.0, 10_000))
    assert time.perf_counter() - t0 < 3.0
    assert stats.accounted() and len(records) == stats.received and stats.processed > 0
    assert loop.end == ("interrupted", "SIGTERM")


def test_decisions_min_score_and_consistency(tiny):
    bundle, map_dir, images = tiny
    route = [3, 4, 5, 12, 13, 14, 15]  # a drive along places 3-5, a jump, then 12-15
    frames = [images[i] for i in route]
    enc, _ = encoder(bundle)
    records = []
    rule = DecisionRule(consistency=3, window=1)
    LocalizationLoop(enc, load_map(map_dir), LoopConfig(rule=rule), records.append).run(ReplaySource(frames, 0, len(frames)), live=False)
    records.sort(key=lambda r: r["frame"])
    assert [r["place"] for r in records] == [f"p{i}" for i in route]
    assert [r["accepted"] for r in records] == [False, False, True, False, False, True, True]
    assert [r["consistent"] for r in records] == [1, 2, 3, 1, 2, 3, 4]
    assert {r["reason"] for r in records if not r["accepted"]} == {"inconsistent"}
    records.clear()
    strict = DecisionRule(min_score=1.01)  # above any cosine similarity
    LocalizationLoop(enc, load_map(map_dir), LoopConfig(rule=strict), records.append).run(ReplaySource(frames, 0, 3), live=False)
    assert all(not r["accepted"] and r["reason"] == "low_score" and r["place"] for r in records)


def test_sources_name_bad_input(tmp_path):
    with pytest.raises(SourceError, match="not a folder, a video file or a camera"):
        open_source(str(tmp_path / "nowhere"))
    with pytest.raises(SourceError, match="its own rate"):
        open_source("0", fps=10)
    with pytest.raises(SourceError, match="expected a rate"):
        open_source(str(tmp_path), fps=-1)
    with pytest.raises(SourceError, match="no images found"):
        open_source(str(tmp_path))


def test_video_plays_at_its_rate_and_says_how_it_ended(tiny, tmp_path):
    cv2 = pytest.importorskip("cv2")
    bundle, map_dir, images = tiny
    path = write_video(tmp_path / "clip.avi", [images[i] for i in (2, 5, 9)], fps=10)
    enc, _ = encoder(bundle)
    records = []
    source = open_source(str(path))
    assert source.live and source.fps == 10  # its recorded rate: a live run
    loop = LocalizationLoop(enc, load_map(map_dir), LoopConfig(top_k=1), records.append)
    stats = loop.run(source)
    assert stats.processed == 3 and stats.accounted() and loop.end[0] == "complete"
    assert sorted((r["frame"], r["place"]) for r in records) == [(0, "p2"), (1, "p5"), (2, "p9")]
    assert all(r["times_ms"]["decode"] > 0 for r in records)  # video decoding is timed
    assert loop.summary()["run"] == "live"

    # cut short: the header announces more frames than the file holds
    long = write_video(tmp_path / "long.avi", [images[i % 20] for i in range(60)], fps=100)
    data = long.read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: len(data) // 2])
    if int(cv2.VideoCapture(str(cut)).get(cv2.CAP_PROP_FRAME_COUNT)) != 60:
        pytest.skip("this OpenCV build does not read the frame count of a cut AVI")
    loop = LocalizationLoop(enc, load_map(map_dir), LoopConfig())
    stats = loop.run(open_source(str(cut), fps=0))
    assert 0 < stats.processed < 60 and loop.end[0] == "truncated" and "of the 60 frames" in loop.end[1]


def test_camera_empty_frames_fail_and_a_disconnect_ends_the_run(tiny, tmp_path):
    pytest.importorskip("cv2")
    bundle, map_dir, images = tiny
    video = write_video(tmp_path / "cam.avi", [images[i] for i in range(6)])
    camera = ScriptedCamera(video, ["frame", "frame", "empty", "frame", "empty", "frame"])
    source = OpenCVSource(0, capture=camera, retries=3, retry_wait=0.01)
    enc, _ = encoder(bundle)
    records = []
    loop = LocalizationLoop(enc, load_map(map_dir), LoopConfig(), records.append)
    stats = loop.run(source)
    assert stats.received == 6 and stats.processed == 4 and stats.failed == 2 and stats.accounted()
    assert all("empty frame" in r["error"] for r in records if r["status"] == "failed")
    assert loop.end[0] == "disconnected" and loop.summary()["run"] == "live"


def test_a_source_that_breaks_ends_the_run_with_its_reason(tiny):
    bundle, map_dir, images = tiny

    def camera_driver():
        for i in range(30):
            yield Frame(i, f"f{i}", time.perf_counter(), images[i % 20])
        raise OSError("VIDIOC_DQBUF: No such device")

    enc, _ = encoder(bundle)
    records = []
    loop = LocalizationLoop(enc, load_map(map_dir), LoopConfig(), records.append)
    stats = loop.run(camera_driver(), live=False)
    assert stats.received == 30 == len(records) and stats.processed == 30 and stats.accounted()
    assert loop.end == ("failed", "OSError: VIDIOC_DQBUF: No such device")


def test_a_small_map_is_searched_on_one_faiss_thread_and_the_setting_is_restored(tiny):
    import faiss

    bundle, map_dir, images = tiny
    enc, _ = encoder(bundle)
    before = faiss.omp_get_max_threads()
    during = []
    loop = LocalizationLoop(enc, load_map(map_dir), LoopConfig(), lambda r: during.append(faiss.omp_get_max_threads()))
    loop.run(ReplaySource(images, 0, 8), live=False)
    assert set(during) == {1} and faiss.omp_get_max_threads() == before
    with pytest.raises(UserError, match="--search-threads"):
        LoopConfig(search_threads=-1)
