"""python export/build_engine.py as a user runs it, the bundles it writes, and the checks on them."""
import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

torch = pytest.importorskip("torch")

from export.onnx_export import export_onnx  # noqa: E402
from export.precision import to_fp16  # noqa: E402
from export.registry import list_models  # noqa: E402
from export.trt_check import TensorRTCompatibilityError, check_graph, find_problems  # noqa: E402
from export.trt_rtx import rtx_available  # noqa: E402
from export.zoo import create_model  # noqa: E402
from reference import DATA, ROOT, fixture, image_path, save_official_checkpoint, spec  # noqa: E402
from runtime.backends import open_backend  # noqa: E402
from runtime.bundle import BundleError, load_bundle  # noqa: E402
from runtime.compare import row_cosine  # noqa: E402
from runtime.preprocess import list_images, preprocess_file  # noqa: E402
from runtime.trt_env import tensorrt_usable  # noqa: E402
from test_runtime_no_torch import BLOCKER  # noqa: E402

SCRIPT = ROOT / "export" / "build_engine.py"


def build(*args, blocker=False):
    cmd = [sys.executable, str(SCRIPT), *args]
    if blocker:  # prove the path never imports torch
        prelude = BLOCKER.split("import importlib\nfor m")[0]
        code = prelude + f"import runpy, sys; sys.argv = {[str(SCRIPT), *args]!r}; runpy.run_path({str(SCRIPT)!r}, run_name='__main__')"
        cmd = [sys.executable, "-c", code]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


cosine = row_cosine


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "gem-fp32"
    proc = build("--model", "gem-dinov2-vits14", "--random-weights", "--depth", "1", "--precision", "fp32",
                 "--backend", "onnxruntime", "--batch", "1:2:4", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_build_writes_a_verified_bundle_and_a_summary(small_bundle):
    out, proc = small_bundle
    assert "backend: onnxruntime (TensorRT does not import" in proc.stderr or "backend: onnxruntime" in proc.stderr
    assert "checks passed" in proc.stdout and "RANDOM WEIGHTS" in proc.stdout
    bundle = load_bundle(out)
    m = bundle.manifest
    assert m["batch"] == {"min": 1, "opt": 2, "max": 4} and m["precision"] == "fp32"
    assert m["inputs"]["images"]["shape"] == ["batch", 3, 322, 322]
    assert m["outputs"]["descriptor"]["shape"] == ["batch", 384]
    assert m["weights"]["random_weights"] is True and m["export"]["opset"] == 17
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx"]
    assert not list(out.parent.glob(".*partial*"))
    if rtx_available():  # TensorRT's own parser and builder checked the graph, with the bundle's profile
        assert m["checks"]["tensorrt_rtx"]["profile"] == m["batch"] and m["checks"]["tensorrt_rtx"]["engine_bytes"] > 0
        assert "TensorRT-RTX" in proc.stdout.splitlines()[-1] and "parse + AOT build" in proc.stdout


def test_salad_bundle_reproduces_official_descriptors(tmp_path):
    ckpt = save_official_checkpoint("salad", tmp_path / "dino_salad.ckpt")
    out = tmp_path / "salad-fp32"
    proc = build("--model", "salad-dinov2-vitb14", "--checkpoint", str(ckpt), "--precision", "fp32",
                 "--backend", "onnxruntime", "--batch", "1:4:12", "--output", str(out), "--skip-parity")
    assert proc.returncode == 0, proc.stderr
    bundle = load_bundle(out)
    assert bundle.manifest["weights"]["format"] == "salad"
    backend = open_backend(bundle, threads=2)
    x = np.stack([preprocess_file(image_path(f), bundle.preprocessing) for f in spec("salad")["images"]["files_in_batch_order"]])
    desc = backend.run(x)["descriptor"]
    assert np.abs(desc - fixture("salad", "descriptors.npy")).max() <= 1e-4

    # FP16 graph of the same weights on ONNX Runtime: cosine >= 0.999 to the FP32 reference
    fp16 = tmp_path / "salad-fp16.onnx"
    onnx.save(to_fp16(onnx.load(str(bundle.file("onnx")))), str(fp16))
    import onnxruntime as ort
    half = ort.InferenceSession(str(fp16), providers=["CPUExecutionProvider"]).run(["descriptor"], {"images": x})[0]
    assert cosine(half, fixture("salad", "descriptors.npy")).min() >= 0.999


def _sample_batch(cfg, n=6):
    files = list_images(DATA / "vprbench_corridor" / "queries")[:n // 2] + list_images(DATA / "nordland_summer_winter_64x32" / "queries")[:n // 2]
    return np.stack([preprocess_file(f, cfg.preprocessing) for f in files])


@pytest.mark.parametrize("name", list_models())
def test_every_registry_model_exports_clean_and_fp16_keeps_cosine(name, tmp_path):
    model, cfg, _ = create_model(name, random_weights=True, depth=2)  # LayerScale 0.1: the blocks matter
    path = export_onnx(model, cfg.image_size, list(cfg.outputs()), tmp_path / "m.onnx")
    graph = onnx.load(str(path))
    check_graph(graph, "trt10")
    x = _sample_batch(cfg)
    with torch.no_grad():
        ref = model(torch.from_numpy(x))["descriptor"].numpy()
    import onnxruntime as ort
    onnx.save(to_fp16(graph), str(tmp_path / "h.onnx"))
    half = ort.InferenceSession(str(tmp_path / "h.onnx"), providers=["CPUExecutionProvider"]).run(["descriptor"], {"images": x})[0]
    assert cosine(half, ref).min() >= 0.999


def test_trt85_target_decomposes_layernorm(tmp_path):
    out = tmp_path / "b"
    proc = build("--model", "salad-dinov2-vitb14", "--random-weights", "--depth", "1", "--precision", "fp32",
                 "--backend", "onnxruntime", "--target", "trt8.5", "--output", str(out), "--skip-parity")
    assert proc.returncode == 0, proc.stderr
    graph = onnx.load(str(out / "model.onnx"))
    assert not any(n.op_type == "LayerNormalization" for n in graph.graph.node)
    assert find_problems(graph, "trt8.5") == []
    assert load_bundle(out).manifest["export"]["decomposed_layernorm"] is True


def _graph(node, inputs, outputs, inits=()):
    g = helper.make_graph([node], "g", inputs, outputs, list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def test_static_check_names_each_pitfall():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    cases = {
        "Squeeze without axes": _graph(helper.make_node("Squeeze", ["x"], ["y"], name="sq"), [x], [y]),
        "max shift": _graph(helper.make_node("ReduceLogSumExp", ["x"], ["y"], name="lse"), [x], [y]),
        "antialiased Resize": _graph(helper.make_node("Resize", ["x", "", "s"], ["y"], name="rs", antialias=1, mode="cubic"),
                                     [x], [y], [helper.make_tensor("s", TensorProto.FLOAT, [3], [1, 1, 2])]),
        "depends on the data": _graph(helper.make_node("NonZero", ["x"], ["y"], name="nz"), [x], [y]),
    }
    for why, model in cases.items():
        with pytest.raises(TensorRTCompatibilityError, match=why):
            check_graph(model)
    ln = _graph(helper.make_node("LayerNormalization", ["x", "w"], ["y"], name="ln"), [x], [y],
                [helper.make_tensor("w", TensorProto.FLOAT, [4], [1, 1, 1, 1])])
    assert check_graph(ln, "trt10") == {"LayerNormalization": 1}
    assert "trt8.5" in find_problems(ln, "trt8.5")[0] and "ln" in find_problems(ln, "trt8.5")[0]


def test_from_bundle_never_imports_torch(small_bundle, tmp_path):
    out, _ = small_bundle
    copy = tmp_path / "copy"
    proc = build("--from-bundle", str(out), "--backend", "onnxruntime", "--output", str(copy), blocker=True)
    assert proc.returncode == 0, proc.stderr
    assert load_bundle(copy).manifest["files"]["onnx"]["sha256"] == load_bundle(out).manifest["files"]["onnx"]["sha256"]
    if not tensorrt_usable():
        proc = build("--from-bundle", str(out), "--backend", "tensorrt", "--output", str(tmp_path / "t"), blocker=True)
        assert proc.returncode != 0 and "--backend tensorrt" in proc.stderr and "torch" not in proc.stderr


def test_bundle_tampering_is_refused(small_bundle, tmp_path):
    out, _ = small_bundle
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    data = bytearray((bad / "model.onnx").read_bytes())
    data[-10] ^= 0xFF
    (bad / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256 differs"):
        load_bundle(bad)
    (bad / "model.onnx").write_bytes(bytes(data[:1000]))
    with pytest.raises(BundleError, match="truncated"):
        load_bundle(bad)
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="malformed JSON"):
        load_bundle(bad)
    (bad / "manifest.json").write_text(json.dumps({"format_version": 1}))
    with pytest.raises(BundleError, match="missing model"):
        load_bundle(bad)
    (bad / "manifest.json").unlink()
    with pytest.raises(BundleError, match="not a bundle"):
        load_bundle(bad)


def test_failed_build_leaves_the_previous_bundle_intact(small_bundle, tmp_path):
    out, _ = small_bundle
    target = tmp_path / "keep"
    shutil.copytree(out, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    torch.save({"x": torch.zeros(1)}, tmp_path / "wrong.ckpt")
    proc = build("--model", "gem-dinov2-vits14", "--checkpoint", str(tmp_path / "wrong.ckpt"), "--output", str(target))
    assert proc.returncode != 0 and "unrecognised checkpoint format" in proc.stderr
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert not list(tmp_path.glob(".*partial*"))


def test_cli_help_and_argument_errors():
    proc = build("--help")
    assert proc.returncode == 0 and "--from-bundle" in proc.stdout and "--timing-cache" in proc.stdout
    proc = build("--model", "gem-dinov2-vits14", "--random-weights", "--batch", "8:2:4")
    assert proc.returncode == 2 and "MIN <= OPT <= MAX" in proc.stderr
    proc = build("--model", "gem-dinov2-vits14")
    assert proc.returncode == 2 and "--checkpoint" in proc.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not tensorrt_usable(), reason="needs TensorRT and an NVIDIA GPU")
def test_tensorrt_fp16_engine_matches_onnxruntime(small_bundle, tmp_path):
    fp32, _ = small_bundle
    engine = tmp_path / "trt-fp16"
    proc = build("--model", "gem-dinov2-vits14", "--random-weights", "--depth", "1", "--precision", "fp16",
                 "--backend", "tensorrt", "--batch", "1:2:4", "--output", str(engine))
    assert proc.returncode == 0, proc.stderr
    bundle = load_bundle(engine)
    assert bundle.precision == "fp16" and bundle.backend == "tensorrt" and bundle.file("engine").is_file()
    x = np.stack([preprocess_file(f, bundle.preprocessing) for f in list_images(DATA / "vprbench_corridor" / "queries")[:4]])
    trt_out = open_backend(bundle).run(x)["descriptor"]
    ort_out = open_backend(load_bundle(fp32)).run(x)["descriptor"]
    assert cosine(trt_out, ort_out).min() >= 0.999


def _standard_ops_only(graph) -> None:
    """Only default-domain ONNX ops, each on the TensorRT parser's list (no fused fast-path or
    contrib ops such as com.microsoft Attention)."""
    assert {n.domain for n in graph.graph.node} <= {"", "ai.onnx"}
    assert find_problems(graph, "trt10") == []


def test_boq_bundle_reproduces_official_descriptors_with_standard_ops_and_folded_queries(tmp_path):
    ckpt = save_official_checkpoint("boq", tmp_path / "dinov2_12288.pth")
    out = tmp_path / "boq-fp32"
    proc = build("--model", "boq-dinov2-vitb14", "--checkpoint", str(ckpt), "--precision", "fp32",
                 "--batch", "1:4:12", "--output", str(out), "--skip-parity")
    assert proc.returncode == 0, proc.stderr
    bundle = load_bundle(out)
    m = bundle.manifest
    assert m["weights"]["format"] == "boq-dinov2" and m["preprocessing"]["resize"] == "tensor_bicubic_antialias"
    assert m["model"]["layout"].startswith("L2(fc over the 2 x 64 query outputs")
    graph = onnx.load(str(bundle.file("onnx")))
    _standard_ops_only(graph)
    # the queries' self-attention and norm_q depend on no input: folded to constants
    assert not [n.name for n in graph.graph.node if "/self_attn/" in n.name and "/encoder/" not in n.name]
    assert not [n.name for n in graph.graph.node if "/norm_q/" in n.name]
    assert sum(n.op_type == "Softmax" for n in graph.graph.node) == 12 + 2 * 2  # backbone + encoder/cross per block
    x = np.stack([preprocess_file(image_path(f), bundle.preprocessing) for f in spec("boq")["images"]["files_in_batch_order"]])
    desc = open_backend(bundle, threads=2).run(x)["descriptor"]
    assert np.abs(desc - fixture("boq", "descriptors.npy")).max() <= 1e-4
    import onnxruntime as ort
    fp16 = tmp_path / "boq-fp16.onnx"
    onnx.save(to_fp16(graph), str(fp16))
    half = ort.InferenceSession(str(fp16), providers=["CPUExecutionProvider"]).run(["descriptor"], {"images": x})[0]
    assert cosine(half, fixture("boq", "descriptors.npy")).min() >= 0.999


@pytest.mark.slow
def test_megaloc_non_square_bundle_reproduces_official_native_descriptors(tmp_path):
    """MegaLoc at the corridor images' native 120x160, which the model rounds to 126x154 (a 9x11
    grid): the bundle gets the rounded size and records the evaluation's size for preprocessing.
    The 141M-parameter Linear goes into the FP16 graph like the rest."""
    ckpt = save_official_checkpoint("megaloc", tmp_path / "model.safetensors")
    out = tmp_path / "megaloc-fp32"
    proc = build("--model", "megaloc-dinov2-vitb14", "--checkpoint", str(ckpt), "--precision", "fp32",
                 "--image-size", "120x160", "--batch", "1:2:6", "--output", str(out), "--skip-parity")
    assert proc.returncode == 0, proc.stderr
    bundle = load_bundle(out)
    m = bundle.manifest
    assert m["inputs"]["images"]["shape"] == ["batch", 3, 126, 154]
    assert m["preprocessing"]["size"] == [126, 154] and m["preprocessing"]["first_resize"] == [120, 160]
    assert m["weights"]["format"] == "megaloc"
    graph = onnx.load(str(bundle.file("onnx")))
    _standard_ops_only(graph)
    files = spec("megaloc")["images"]["native_corridor_files_in_batch_order"]
    x = np.stack([preprocess_file(image_path(f), bundle.preprocessing) for f in files])
    expected = fixture("megaloc", "descriptors_native_corridor.npy")
    assert np.abs(open_backend(bundle, threads=2).run(x)["descriptor"] - expected).max() <= 1e-4
    import onnxruntime as ort
    half_graph = to_fp16(graph)
    linear = [i for i in half_graph.graph.initializer if tuple(i.dims) == (16640, 8448) or tuple(i.dims) == (8448, 16640)]
    assert linear and all(i.data_type == TensorProto.FLOAT16 for i in linear)
    onnx.save(half_graph, str(tmp_path / "megaloc-fp16.onnx"))
    half = ort.InferenceSession(str(tmp_path / "megaloc-fp16.onnx"), providers=["CPUExecutionProvider"]).run(
        ["descriptor"], {"images": x})[0]
    assert cosine(half, expected).min() >= 0.999


def test_image_size_errors_are_one_line_saying_which_sizes_work(tmp_path):
    proc = build("--model", "salad-dinov2-vitb14", "--random-weights", "--image-size", "320", "--output", str(tmp_path / "b"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: salad-dinov2-vitb14 cannot take 320x320: it takes H and W that are multiples of the patch size 14 "
        "and give more than 64 patches (e.g. 322 or 224x308)")
    proc = build("--model", "megaloc-dinov2-vitb14", "--random-weights", "--image-size", "64x32", "--output", str(tmp_path / "b"))
    assert proc.returncode == 2 and "rounded to 70x28: 10 patches" in proc.stderr and "more patches than its 64 clusters" in proc.stderr
    proc = build("--model", "gem-dinov2-vits14", "--random-weights", "--image-size", "240by320", "--output", str(tmp_path / "b"))
    assert proc.returncode == 2 and "expected N (square) or HxW" in proc.stderr
    assert not (tmp_path / "b").exists()
