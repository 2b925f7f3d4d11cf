"""Bundle loading and the ONNX Runtime backend, without torch (also run on Python 3.10)."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import runtime.trt_env as trt_env
from runtime.backends import open_backend
from runtime.bundle import BundleError, file_entry, load_bundle, write_manifest

TINY = Path(__file__).parent / "fixtures" / "tiny_mean_l2.onnx"


def make_bundle(folder: Path, **extra) -> Path:
    folder.mkdir(parents=True)
    shutil.copy(TINY, folder / "model.onnx")
    manifest = {
        "format_version": 1, "model": {"name": "tiny", "batch_mode": "independent"},
        "preprocessing": {"size": [28, 28], "resize": "pil_bilinear", "mean": [0.5] * 3, "std": [0.5] * 3},
        "precision": "fp32", "backend": "onnxruntime",
        "inputs": {"images": {"shape": ["batch", 3, 28, 28], "dtype": "float32"}},
        "outputs": {"descriptor": {"shape": ["batch", 3], "dtype": "float32"}},
        "batch": {"min": 1, "opt": 2, "max": 4}, "files": {"onnx": file_entry(folder / "model.onnx")},
        "weights": {"random_weights": True}, "build": {}, **extra}
    write_manifest(folder, manifest)
    return folder


def test_onnxruntime_backend_runs_a_verified_bundle(tmp_path):
    bundle = load_bundle(make_bundle(tmp_path / "b"))
    assert bundle.preprocessing.size == (28, 28) and bundle.batch["max"] == 4
    backend = open_backend(bundle, threads=1)
    x = np.random.default_rng(0).standard_normal((3, 3, 28, 28)).astype(np.float32)
    out = backend.run(x)["descriptor"]
    ref = x.mean(axis=(2, 3))
    np.testing.assert_allclose(out, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-6)


def test_manifest_problems_are_named(tmp_path):
    folder = make_bundle(tmp_path / "b")
    m = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**m, "format_version": 99}))
    with pytest.raises(BundleError, match="bundle format 99"):
        load_bundle(folder)
    (folder / "manifest.json").write_text(json.dumps({**m, "preprocessing": {"size": [1, 1], "resize": "nearest", "mean": [0] * 3, "std": [1] * 3}}))
    with pytest.raises(BundleError, match="preprocessing"):
        load_bundle(folder)
    with pytest.raises(BundleError, match="no such bundle"):
        load_bundle(tmp_path / "nowhere")


def test_engine_for_another_tensorrt_or_gpu_is_refused(tmp_path, monkeypatch):
    folder = make_bundle(tmp_path / "e", backend="tensorrt",
                         tensorrt={"version": "10.3.0", "gpu": "Orin", "compute_capability": "8.7"})
    monkeypatch.setattr(trt_env, "tensorrt_version", lambda backend="tensorrt": None)
    with pytest.raises(BundleError, match="TensorRT does not import"):
        load_bundle(folder)
    monkeypatch.setattr(trt_env, "tensorrt_version", lambda backend="tensorrt": "10.16.1")
    with pytest.raises(BundleError, match="TensorRT 10.3.0, this machine has 10.16.1; rebuild it: python export/build_engine.py --from-bundle"):
        load_bundle(folder)
    monkeypatch.setattr(trt_env, "tensorrt_version", lambda backend="tensorrt": "10.3.0")
    monkeypatch.setattr(trt_env, "gpu_info", lambda device=0: {"name": "RTX 4090", "compute_capability": "8.9"})
    with pytest.raises(BundleError, match="built for Orin .compute capability 8.7.*RTX 4090"):
        load_bundle(folder)


def test_tensorrt_rtx_engine_needs_the_package_and_an_rtx_class_gpu(tmp_path, monkeypatch):
    folder = make_bundle(tmp_path / "e", backend="tensorrt-rtx",
                         tensorrt={"library": "tensorrt_rtx", "version": "1.7.1.116", "compute_capabilities": "default"})
    monkeypatch.setattr(trt_env, "tensorrt_version", lambda backend="tensorrt": None)
    with pytest.raises(BundleError, match="TensorRT-RTX does not import here; install it .pip install tensorrt-rtx-cu13"):
        load_bundle(folder)
    monkeypatch.setattr(trt_env, "tensorrt_version", lambda backend="tensorrt": "1.7.1.116" if backend == "tensorrt-rtx" else None)
    monkeypatch.setattr(trt_env, "gpu_info", lambda device=0: None)
    with pytest.raises(BundleError, match="needs an NVIDIA GPU of compute capability 8.0 or newer"):
        load_bundle(folder)
    monkeypatch.setattr(trt_env, "gpu_info", lambda device=0: {"name": "RTX 2080 Ti", "compute_capability": "7.5"})
    with pytest.raises(BundleError, match="built for compute capability 8.0 or newer .*RTX 2080 Ti .7.5."):
        load_bundle(folder)
    monkeypatch.setattr(trt_env, "gpu_info", lambda device=0: {"name": "RTX 5090", "compute_capability": "12.0"})
    assert load_bundle(folder).backend == "tensorrt-rtx"  # portable: any RTX GPU from Ampere on
    assert load_bundle(folder, check_engine=False).backend == "tensorrt-rtx"
    monkeypatch.setattr(trt_env, "tensorrt_version", lambda backend="tensorrt": "1.8.0.1")
    with pytest.raises(BundleError, match="built with TensorRT-RTX 1.7.1.116, this machine has 1.8.0.1.*--backend tensorrt-rtx"):
        load_bundle(folder)


def test_gpu_probe_is_safe_without_a_gpu():
    info = trt_env.gpu_info()
    assert info is None or set(info) == {"name", "compute_capability"}


def test_tensorrt_buffer_planning_without_a_gpu():
    from runtime.backends.tensorrt_backend import plan_buffers

    io = [("images", True, (-1, 3, 322, 322), np.dtype(np.float32)),
          ("descriptor", False, (-1, 8448), np.dtype(np.float32)),
          ("local_features", False, (-1, 61, 61, 128), np.dtype(np.float16))]
    sizes = plan_buffers(io, max_batch=8)
    assert sizes == {"images": 8 * 3 * 322 * 322 * 4, "descriptor": 8 * 8448 * 4, "local_features": 8 * 61 * 61 * 128 * 2}
    with pytest.raises(BundleError, match="dynamic axis other than the batch"):
        plan_buffers([("x", True, (-1, 3, -1, 224), np.dtype(np.float32))], 4)


def test_profile_command_writes_json_markdown_and_plot(tmp_path):
    import json as _json
    import subprocess
    import sys

    from reference import DATA, ROOT
    folder = make_bundle(tmp_path / "b")
    out = tmp_path / "prof"
    proc = subprocess.run([sys.executable, "-m", "runtime", "profile", "--bundle", str(folder), "--batch", "1,2,9",
                           "--iterations", "4", "--warmup", "2", "--images", str(DATA / "vprbench_corridor" / "queries"),
                           "--map-size", "500", "--device", "cpu", "--output", str(out)], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert "skipping batch 9" in proc.stderr  # outside the bundle's 1..4 profile
    report = _json.loads((out / "profile.json").read_text())
    assert set(report["batches"]) == {"1", "2"} and report["warmup_excluded"] == 2
    assert report["device"] == "cpu" and report["cuda_graph"] is False
    for r in report["batches"].values():
        for s in r["stages"].values():
            assert s["p50"] <= s["p95"] <= s["p99"] <= s["max"]
        assert r["images_per_s"] > 0 and {"inference", "search"} <= set(r["stages"])
    assert report["per_image"]["decode"]["n"] > 0 and report["peak_rss_mb"] > 0
    assert "| 2 | inference |" in (out / "profile.md").read_text()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (out / "profile.png").read_bytes()[:4] == b"\x89PNG"
