"""The public Python API, ``from runtime import Encoder, Localizer``, on the tiny bundle (no torch;
also run on Python 3.10): what it accepts as an image, what it returns, that it gives what the
CLI gives, that localize() is the loop's pipeline with its decisions, and that it releases what
it holds."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loop_helpers import colours, tiny_map, write_video
from runtime import Encoder, Localizer, Match, UserError
from runtime.decisions import DecisionRule, save_acceptance
from runtime.encoder import EncoderClosedError
from runtime.errors import OptionError
from runtime.images import find_images
from runtime.inputs import ImageInputError
from runtime.maps import MapError, bundle_identity, save_map
from runtime.preprocess import ImageDecodeError
from runtime.sources import ReplaySource
from test_bundle import make_bundle

ROOT = Path(__file__).resolve().parents[1]
QUERIES = ROOT / "data" / "vprbench_corridor" / "queries"


@pytest.fixture
def tiny(tmp_path):
    return tiny_map(tmp_path)


@pytest.fixture
def encoder(tmp_path):
    with Encoder.from_bundle(make_bundle(tmp_path / "b"), threads=1) as enc:
        yield enc


def rgb(seed: int = 0, shape=(30, 40, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_import_runtime_is_cheap_and_the_names_are_public():
    code = ("import sys, runtime; heavy = {'numpy', 'PIL', 'onnxruntime', 'faiss'} & set(sys.modules); "
            "assert not heavy, heavy; from runtime import Encoder; assert 'faiss' not in sys.modules; "
            "from runtime import Localizer, Match, UserError; print(Encoder.__module__, Localizer.__module__)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["runtime.encoder", "runtime.localizer"]
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        import runtime
        runtime.Nope  # noqa: B018


def test_encode_returns_float32_n_by_d_equal_to_the_files_path(encoder):
    files = find_images(QUERIES).files[:5]
    from_files = encoder.encode_files(files).outputs["descriptor"]
    arrays = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    for got in (encoder.encode(files), encoder.encode([str(f) for f in files]), encoder.encode(arrays),
                encoder.encode([Image.fromarray(a) for a in arrays]), encoder.encode(np.stack(arrays)),
                encoder.encode([a[:, :, ::-1] for a in arrays], bgr=True)):
        assert got.dtype == np.float32 and got.shape == (5, encoder.dim) and got.flags.c_contiguous
        assert np.abs(got - from_files).max() <= 1e-6
    one = encoder.encode(arrays[2])
    assert one.shape == (1, 3) and np.abs(one[0] - from_files[2]).max() <= 1e-6
    assert encoder.encode([]).shape == (0, 3)


def test_conversions_where_the_meaning_is_clear(encoder):
    x = rgb()
    ref = encoder.encode(x)

    def same(image, **kw):
        return np.abs(encoder.encode(image, **kw) - ref).max() <= 1e-6

    assert same(np.dstack([x, np.full(x.shape[:2], 7, np.uint8)]))  # RGBA: alpha dropped
    assert same(np.dstack([x[:, :, ::-1], np.zeros(x.shape[:2], np.uint8)]), bgr=True)  # BGRA
    wide = np.zeros((30, 80, 3), np.uint8)
    wide[:, ::2] = x
    assert same(wide[:, ::2]) and same(np.asfortranarray(x)) and same(x[::-1][::-1])  # strided views
    assert same(x.astype(np.float32) / 255) and same(x.astype(np.float64) / 255)  # float in [0, 1]
    assert same(x.astype(np.uint16) * 257)  # 16-bit
    grey = x[:, :, 0]
    as_rgb = encoder.encode(np.repeat(grey[:, :, None], 3, axis=2))
    for g in (grey, grey[:, :, None], Image.fromarray(grey)):
        assert np.abs(encoder.encode(g) - as_rgb).max() <= 1e-6


@pytest.mark.parametrize("bad, words", [
    (rgb().view(np.int8), ["(30, 40, 3) int8", "view(np.uint8)"]),
    (rgb().astype(np.float32), ["(30, 40, 3) float32", "[0, 1]", "[0, 255]"]),
    (np.full((4, 4, 3), np.nan, np.float32), ["NaN or infinite"]),
    (rgb().astype(np.int32), ["(30, 40, 3) int32", "uint8"]),
    (rgb(shape=(30, 40, 2)), ["(30, 40, 2) uint8", "1, 3 or 4 channels"]),
    (np.zeros((0, 5, 3), np.uint8), ["(0, 5, 3) uint8", "H, W > 0"]),
    (np.zeros((2, 2, 2, 2, 3), np.uint8), ["(2, 2, 2, 2, 3)"]),
    (42, ["not int"]),
])
def test_bad_arrays_are_one_clear_error_naming_shape_and_dtype(encoder, bad, words):
    with pytest.raises(ImageInputError) as err:
        encoder.encode(bad)
    assert isinstance(err.value, UserError) and all(w in str(err.value) for w in words), str(err.value)


def test_a_file_that_cannot_be_decoded_is_named(encoder, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(ImageDecodeError, match="broken.jpg: not an image"):
        encoder.encode([rgb(), broken])


def test_context_managers_release_the_backend_and_the_map(tiny):
    bundle, map_dir, images = tiny
    with Encoder.from_bundle(bundle, threads=1) as enc:
        enc.encode(images[0])
    assert enc.backend.session is None
    with pytest.raises(EncoderClosedError, match="closed"):
        enc.encode(images[0])
    with Localizer.open(bundle, map_dir, threads=1) as loc:
        assert loc.map.lease is not None
    assert loc.map.lease is None and loc.encoder.closed
    loc.close()  # twice is fine


def test_localize_is_the_loops_pipeline_with_its_decisions(tiny):
    bundle, map_dir, images = tiny
    frames = [images[i] for i in (4, 5, 6, 7, 15, 16, 17)]
    with Localizer.open(bundle, map_dir, threads=1, consistency=3, consistency_window=1, top_k=3) as loc:
        matches = [loc.localize(np.asarray(im)) for im in frames[:3]]
        matches += [loc.localize(im, name=f"q{i}") for i, im in enumerate(frames[3:])]
        assert loc.rule == DecisionRule(None, 3, 1)
    assert all(isinstance(m, Match) for m in matches)
    assert [m.place for m in matches] == ["p4", "p5", "p6", "p7", "p15", "p16", "p17"]
    # the chain carries across calls: 3 consecutive neighbouring places to accept, a jump restarts it
    assert [m.reason for m in matches] == ["inconsistent"] * 2 + ["ok"] * 2 + ["inconsistent"] * 2 + ["ok"]
    assert [m.consistent for m in matches] == [1, 2, 3, 4, 1, 2, 3]
    m = matches[3]
    assert m.name == "q0" and matches[0].name == "frame000000" and m.frame == 3
    assert len(m.top_k) == 3 and m.top_k[0].place == m.place and m.score == m.top_k[0].score
    assert m.pose is None and m.to_dict()["accepted"] is True
    t = m.times_ms
    assert t["inference"] > 0 and t["total"] >= t["decode"] + t["inference"] and t["rerank"] is None
    # the loop over the same frames, with the same options, decides the same
    with Localizer.open(bundle, map_dir, threads=1, consistency=3, consistency_window=1, top_k=3) as loc:
        records = []
        loc.loop(records.append).run(ReplaySource(frames, 0, len(frames)), live=False)
    records.sort(key=lambda r: r["frame"])
    assert [(r["place"], r["reason"]) for r in records] == [(m.place, m.reason) for m in matches]
    assert np.allclose([r["score"] for r in records], [m.score for m in matches], atol=1e-6)


def test_poses_and_the_rule_saved_with_the_map(tmp_path):
    folder = make_bundle(tmp_path / "b")
    images = colours(6)
    with Encoder.from_bundle(folder, threads=1) as enc:
        desc = enc.encode(images)
        identity = bundle_identity(enc.bundle)
    poses = np.arange(12, dtype=np.float64).reshape(6, 2)
    save_map(tmp_path / "map", desc, [f"p{i}" for i in range(6)], identity, poses=poses)
    save_acceptance(tmp_path / "map", DecisionRule(0.9999, 1, 3), {"precision": 1.0, "recall": 0.5}, identity)
    with Localizer.open(folder, tmp_path / "map", threads=1) as loc:
        assert loc.rule.min_score == 0.9999 and "min score 0.9999 from the rule saved with" in loc.rule_source
        m = loc.localize(images[4])
        assert m.place == "p4" and m.pose == [8.0, 9.0] and m.accepted
        far = loc.localize(np.full((28, 28, 3), 128, np.uint8))
        assert far.reason == "low_score" and not far.accepted
    with Localizer.open(folder, tmp_path / "map", threads=1, min_score=-1.0) as loc:
        assert loc.rule.min_score == -1.0 and loc.rule_source is None


def test_open_refuses_bad_options_and_foreign_maps(tiny, tmp_path):
    bundle, map_dir, _ = tiny
    with pytest.raises(OptionError, match="unknown option budget; the loop's options are budget_ms"):
        Localizer.open(bundle, map_dir, budget=5)
    with pytest.raises(OptionError, match="--top-k 0"):
        Localizer.open(bundle, map_dir, top_k=0)
    other = make_bundle(tmp_path / "other", model={"name": "other", "batch_mode": "independent"})
    with pytest.raises(MapError, match="map built with other bundle settings"):
        Localizer.open(other, map_dir)
    with pytest.raises(MapError):
        Localizer.open(bundle, tmp_path / "no-map")


def readme_example() -> str:
    """The README's Python API example, as it is written there."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## The Python API"):]
    return section[section.index("```python\n") + len("```python\n"):section.index("```\n", 10)]


def test_the_readme_example_runs_as_written(tiny, tmp_path):
    """The README's example with the test's bundle and map in place of the demo's, and a video
    file in place of the camera (it says a video file's path may be given)."""
    pytest.importorskip("cv2")
    bundle, map_dir, images = tiny
    video = write_video(tmp_path / "walk.avi", [images[i].resize((64, 48)) for i in (3, 4, 5, 6, 7)])
    code = readme_example()
    for old, new in (('"engines/demo-gem-dinov2-vits14"', repr(str(bundle))),
                     ('"out/demo-map-gem-dinov2-vits14"', repr(str(map_dir))), ("VideoCapture(0)", f"VideoCapture({str(video)!r})")):
        assert old in code, old
        code = code.replace(old, new)
    code += "\nprint('D', d.shape, d.dtype)\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-1] == "D (2, 3) float32"
    # five frames walking through places 3..7: accepted from the third agreeing frame on (consistency=3)
    assert [line.split()[0] for line in lines[:-1]] == ["p5", "p6", "p7"], proc.stdout
    assert all(line.split()[2] == "None" and line.endswith(" ms") for line in lines[:-1])
