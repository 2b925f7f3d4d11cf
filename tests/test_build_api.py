"""The build's API (export/build.py): BuildConfig -> build_bundle -> the bundle folder. Small
models at 56 px; where TensorRT would run, a stand-in for the TensorRT builder records what it is
given (TensorRT is absent here), everything else is real."""
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from calibration.dataset import calibration_set  # noqa: E402
from export import build, bundle_writer, onnx_export  # noqa: E402
from export.build import BatchProfile, BuildConfig, CalibrationConfig, build_bundle  # noqa: E402
from reference import DATA, ROOT  # noqa: E402
from runtime.backends import open_backend  # noqa: E402
from runtime.bundle import BundleError, load_bundle, read_manifest  # noqa: E402
from runtime.errors import OptionError, UserError  # noqa: E402
from runtime.preprocess import Preprocessing, list_images, preprocess_file  # noqa: E402

CORRIDOR = DATA / "vprbench_corridor"
SMALL = dict(model="gem-dinov2-vits14", random_weights=True, depth=1, image_size=56, backend="onnxruntime",
             batch=BatchProfile(1, 2, 4))


def _images(bundle, n=4):
    return np.stack([preprocess_file(f, bundle.preprocessing) for f in list_images(CORRIDOR / "queries")[:n]])


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    return build_bundle(BuildConfig(**SMALL, precision="fp32", target="trt8.6",
                                    output=tmp_path_factory.mktemp("api") / "fp32"))


def test_build_bundle_returns_a_checked_bundle(fp32):
    m = load_bundle(fp32).manifest
    assert m["precision"] == "fp32" and m["batch"] == {"min": 1, "opt": 2, "max": 4}
    parity = m["checks"]["parity_vs_pytorch"]
    assert parity["threshold"] == 0.99999 and parity["min_cosine"] >= 0.99999 and parity["images"] == 4
    assert m["checks"]["tensorrt_static_check"] == {**m["checks"]["tensorrt_static_check"], "target": "trt8.6",
                                                    "problems": 0, "passed": True}
    assert m["checks"]["onnx_checker"]["passed"]


@pytest.mark.parametrize("config, message", [
    (BuildConfig(), "exactly one source"),
    (BuildConfig(model="gem-dinov2-vits14"), "--checkpoint PATH|URL or --random-weights"),
    (BuildConfig(model="gem-dinov2-vits14", random_weights=True, precision="int8"), "--calibration-images"),
    (BuildConfig(model="gem-dinov2-vits14", random_weights=True, backend="tpu"), "--backend 'tpu'"),
])
def test_config_mistakes_are_user_errors(config, message):
    with pytest.raises(OptionError, match=message):
        build_bundle(config)


def test_from_bundle_refuses_export_options(fp32):
    with pytest.raises(OptionError, match="--image-size, --split: export options"):
        build_bundle(BuildConfig(from_bundle=fp32, image_size=224, split=True))
    with pytest.raises(OptionError, match="holds a fp32 graph and --from-bundle keeps it"):
        build_bundle(BuildConfig(from_bundle=fp32, precision="fp16", output=fp32.parent / "x"))
    assert not (fp32.parent / "x").exists()


def test_from_bundle_in_place_replaces_the_bundle_and_nothing_else(fp32, tmp_path):
    import shutil
    folder = tmp_path / "engines" / "b"
    shutil.copytree(fp32, folder)
    (tmp_path / "engines" / "notes.txt").write_text("mine")
    assert build_bundle(BuildConfig(from_bundle=folder, backend="onnxruntime", batch=BatchProfile(1, 1, 2))) == folder
    assert load_bundle(folder).batch == {"min": 1, "opt": 1, "max": 2}
    assert sorted(p.name for p in (tmp_path / "engines").iterdir()) == ["b", "notes.txt"]


def test_batch_profile_is_checked():
    assert BatchProfile.parse("2").to_dict() == {"min": 2, "opt": 2, "max": 2}
    for bad in ("8:2:4", "0:1:2", "a:b:c", "1:2"):
        with pytest.raises(OptionError):
            BatchProfile.parse(bad)


def test_a_missed_parity_threshold_fails_the_build_and_keeps_the_previous_bundle(fp32, tmp_path, monkeypatch):
    out = tmp_path / "b"
    build_bundle(BuildConfig(**SMALL, precision="fp32", skip_parity=True, output=out))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setitem(bundle_writer.PARITY_MIN_COSINE, "fp32", 1.5)  # a threshold no graph meets
    with pytest.raises(bundle_writer.CheckFailed, match=r"min cosine 1\.0+ < 1\.5"):
        build_bundle(BuildConfig(**SMALL, precision="fp32", output=out))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    assert issubclass(bundle_writer.CheckFailed, UserError)


def test_parity_check_measures_and_fails_below_its_threshold():
    ref = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    noisy = ref + 0.05 * np.random.default_rng(1).standard_normal(ref.shape).astype(np.float32)
    rec = bundle_writer.parity(ref, noisy, "int8", "test")
    assert 0.99 <= rec["min_cosine"] < 0.9999 and rec["threshold"] == 0.99
    with pytest.raises(bundle_writer.CheckFailed, match="fp16 graph"):
        bundle_writer.parity(ref, noisy, "fp16", "test")
    with pytest.raises(bundle_writer.CheckFailed):
        bundle_writer.parity(ref, np.full_like(ref, np.nan), "fp32", "test")


def test_large_model_path_external_data_through_fp32_fp16_int8_and_from_bundle(fp32, tmp_path, monkeypatch):
    """ViT-g's ONNX is over 2 GB: its weights go to model.onnx.data. The threshold is forced to 0
    here so that a small model takes the same path through every step."""
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_ABOVE", 0)
    x = _images(load_bundle(fp32))
    reference = open_backend(load_bundle(fp32)).run(x)["descriptor"]
    outputs = {}
    for precision in ("fp32", "fp16", "int8"):
        out = build_bundle(BuildConfig(**SMALL, precision=precision, output=tmp_path / precision,
                                       calibration=CalibrationConfig(images=(CORRIDOR / "database",), count=16)))
        bundle = load_bundle(out)
        files = bundle.manifest["files"]
        names = sorted(p.name for p in out.iterdir())
        assert names == sorted(["manifest.json"] + [e["name"] for e in files.values()])
        outputs[precision] = open_backend(bundle).run(x)["descriptor"]
        # one mode for every file, the umask's (onnx writes external data 0600)
        assert {(out / e["name"]).stat().st_mode & 0o777 for e in files.values()} == {0o666 & ~_umask()}
        if precision != "int8":  # the Q/DQ graph (1/4 of the size) is written as one file
            assert files["onnx_data"]["name"] == "model.onnx.data" and (out / "model.onnx").stat().st_size < 100_000
            graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
            assert graph.graph.value_info  # shapes were inferred (by path)
    assert np.abs(outputs["fp32"] - reference).max() <= 1e-6
    copy = build_bundle(BuildConfig(from_bundle=tmp_path / "fp32", backend="onnxruntime", output=tmp_path / "copy"))
    assert read_manifest(copy)["files"]["onnx_data"] == read_manifest(tmp_path / "fp32")["files"]["onnx_data"]


def _umask() -> int:
    import os
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _as_tensorrt(monkeypatch, installed, strongly_typed=False):
    monkeypatch.setattr(build, "resolve_backend", lambda requested: ("tensorrt", "stand-in for TensorRT"))
    monkeypatch.setattr(build, "installed_target", lambda: installed)
    monkeypatch.setattr(build, "trt_strongly_typed", lambda: strongly_typed)
    monkeypatch.setattr(build, "tensorrt_version", lambda backend="tensorrt": {"trt8.5": "8.5.2", "trt8.6": "8.6.1"}.get(installed, "10.3"))


def test_from_bundle_trt_calibrator_feeds_the_calibration_images(fp32, tmp_path, monkeypatch):
    _as_tensorrt(monkeypatch, "trt8.6")
    fed = {}

    def builder(onnx_path, engine_path, manifest, settings, feed=None):  # drains the feed as TensorRT does
        batches = []
        while (b := feed.next_batch()) is not None:
            batches.append(b)
        fed.update(images=np.concatenate(batches), batch=feed.batch, precision=manifest["precision"])
        feed.write_cache(b"calibration table")
        engine_path.write_bytes(b"plan")
        return {"version": "8.6.1", "int8": "implicit (IInt8EntropyCalibrator2)"}

    monkeypatch.setattr(build, "build_trt_engine", builder)
    db = CORRIDOR / "database"
    out = build_bundle(BuildConfig(from_bundle=fp32, precision="int8", backend="tensorrt", output=tmp_path / "int8",
                                   calibration=CalibrationConfig(images=(db,), count=24, trt_calibrator=True)))
    expected = calibration_set([db], Preprocessing.from_dict(read_manifest(fp32)["preprocessing"]), 24, 0)
    assert fed["precision"] == "int8" and fed["batch"] == 8
    np.testing.assert_array_equal(fed["images"], np.asarray(expected))
    m = read_manifest(out)
    assert m["calibration"] == {"mode": "implicit", "images": 24, "method": "entropy (IInt8EntropyCalibrator2)"}
    assert {"onnx", "engine", "calibration_cache"} <= set(m["files"]) and m["backend"] == "tensorrt"


def test_from_bundle_refuses_a_graph_newer_than_the_installed_tensorrt(tmp_path, monkeypatch):
    src = build_bundle(BuildConfig(**SMALL, precision="fp32", skip_parity=True, output=tmp_path / "trt10"))
    before = (src / "manifest.json").read_bytes()
    _as_tensorrt(monkeypatch, "trt8.5")
    with pytest.raises(BundleError) as info:
        build_bundle(BuildConfig(from_bundle=src, backend="tensorrt"))
    msg = str(info.value)
    assert "exported for trt10, the installed TensorRT 8.5.2 needs trt8.5" in msg
    assert "LayerNormalization" in msg  # what the 8.5 parser would have choked on
    assert ("python export/build_engine.py --model gem-dinov2-vits14 --random-weights --precision fp32 "
            "--image-size 56 --depth 1 --batch 1:2:4 --target trt8.5 --backend onnxruntime") in msg
    assert (src / "manifest.json").read_bytes() == before
    # a graph for an older generation builds on a newer TensorRT
    build.check_target(read_manifest(src), src, "trt11")


def test_default_output_is_quiet_and_verbose_shows_the_third_party_notes(tmp_path):
    cmd = [sys.executable, str(ROOT / "export" / "build_engine.py"), "--model", "gem-dinov2-vits14", "--random-weights",
           "--depth", "1", "--image-size", "56", "--precision", "fp16", "--backend", "onnxruntime"]
    quiet = subprocess.run(cmd + ["--output", str(tmp_path / "q")], cwd=ROOT, capture_output=True, text=True)
    assert quiet.returncode == 0, quiet.stderr
    assert all(line.startswith("[build] ") for line in quiet.stderr.splitlines()), quiet.stderr
    assert "checks passed" in quiet.stdout and "parity vs PyTorch (FP32) on 4 images" in quiet.stdout
    assert quiet.stdout.startswith("bundle ") and "colored" not in quiet.stdout + quiet.stderr
    loud = subprocess.run(cmd + ["--output", str(tmp_path / "v"), "-v"], cwd=ROOT, capture_output=True, text=True)
    assert loud.returncode == 0, loud.stderr
    both = loud.stdout + loud.stderr  # Polygraphy logs to stdout
    assert "TracerWarning" in both and "Folding Constants" in both and "[W:onnxruntime" in both


def test_summary_and_manifest_record_the_measured_values(fp32):
    lines = bundle_writer.summary_lines(load_bundle(fp32))
    passed = [line for line in lines if "checks passed" in line][0]
    m = json.loads((fp32 / "manifest.json").read_text())
    assert f"min cosine {m['checks']['parity_vs_pytorch']['min_cosine']:.7f} >= 0.99999" in passed
    assert f"0 problems in {m['checks']['tensorrt_static_check']['nodes']} nodes" in passed
