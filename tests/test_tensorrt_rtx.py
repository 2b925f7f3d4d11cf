"""Every graph we ship through a real TensorRT ONNX parser and builder: TensorRT-RTX compiles
engines ahead of time without a GPU (export/trt_rtx.py). Also the bad cases: a parser refusal, a
batch profile the engine cannot run, TensorRT-RTX missing, and a TensorRT-RTX bundle on a
machine without a GPU."""
import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.trt_builder import ParserRefusal, TensorRTBuildError
from export.trt_check import find_problems
from export.trt_rtx import parse_and_build, rtx_module
from reference import DATA, ROOT
from runtime.bundle import BundleError, file_entry, load_bundle, write_manifest
from runtime.compare import row_cosine
from runtime.preprocess import list_images, preprocess_file
from runtime.trt_env import gpu_info

needs_rtx = pytest.mark.skipif(rtx_module() is None, reason="tensorrt-rtx-cu13 is not installed (dev extra, x86-64)")
BATCH = {"min": 1, "opt": 2, "max": 4}  # batch 1 is the robot's case
SMALL_SIZE = {"gem": 112, "salad": 126, "megaloc": 126, "boq": 112}  # SALAD/MegaLoc: more patches than clusters
# JetPack 5's target (LayerNorm decomposed) on one model per method: the decomposition is the same
# code for every width, and the whole sweep must stay within a couple of minutes on 2 cores
# (MegaLoc's head is SALAD's plus a Linear: SALAD's run covers it)
TRT85 = {"gem-dinov2-vits14-reg", "salad-dinov2-vitb14", "selavpr-dinov2-vitl14", "cricavpr-dinov2-vitb14",
         "boq-dinov2-vitb14"}
SCRIPT = ROOT / "export" / "build_engine.py"
# tensorrt_rtx made unimportable, as on a machine without the package
NO_RTX = "import sys; sys.modules['tensorrt_rtx'] = None; import runpy; sys.argv = {argv!r}; runpy.run_{kind}({target!r}, run_name='__main__')"


def _variants():
    try:
        from export.registry import get_config, list_models
    except ImportError:  # no torch: the sweep is skipped
        return []

    out = []
    for name in list_models():
        method = get_config(name).method
        for target in ("trt10", "trt8.5") if name in TRT85 else ("trt10",):
            out.append(pytest.param(name, target, False, id=f"{name}-{target}"))
            if method == "salad":
                out.append(pytest.param(name, target, True, id=f"{name}-{target}-split"))
    return out


@pytest.fixture(scope="module")
def images():
    return (list_images(DATA / "vprbench_corridor" / "database")[:4]
            + list_images(DATA / "nordland_summer_winter_64x32" / "database")[:4])


def _graphs(name: str, target: str, split: bool, folder, images) -> tuple:
    """The graphs build_engine.py makes for ``name``: FP32, FP16 (strongly typed TensorRT), INT8 Q/DQ."""
    from calibration.quantize import quantize_onnx
    from export.models.salad import SaladSplit
    from export.onnx_export import decompose_layernorms, export_onnx, save_onnx
    from export.precision import fp32_island_nodes, to_fp16
    from export.registry import get_config
    from export.zoo import create_model

    cfg = get_config(name, depth=1)
    cfg = get_config(name, image_size=SMALL_SIZE.get(cfg.method), depth=1)
    model, cfg, _ = create_model(cfg, random_weights=True)
    if target == "trt8.5":
        decompose_layernorms(model)
    outputs = list(cfg.outputs())
    if split:
        model, outputs = SaladSplit(model), ["token", "cluster_features", "scores"]
    paths = {"fp32": folder / "fp32.onnx", "fp16": folder / "fp16.onnx", "int8": folder / "int8.onnx"}
    export_onnx(model, cfg.image_size, outputs, paths["fp32"])
    graph = onnx.load(str(paths["fp32"]))
    islands = fp32_island_nodes(graph)
    save_onnx(to_fp16(graph), paths["fp16"])
    x = np.stack([preprocess_file(f, cfg.preprocessing) for f in images])
    facts = quantize_onnx(paths["fp32"], paths["int8"], x[::2], "entropy", exclude=islands)
    # at most 257 tokens here: the attention products are quantized too (ModelOpt's rule: <= 512)
    assert facts["quantized_nodes"] > 0 and facts["attention_fp32"] == 0
    return paths, islands, x[1::2], outputs


@needs_rtx
@pytest.mark.parametrize("name,target,split", _variants())
def test_every_graph_parses_and_builds_with_tensorrt_rtx(name, target, split, tmp_path, images):
    pytest.importorskip("torch")
    paths, islands, test_x, outputs = _graphs(name, target, split, tmp_path, images)
    refused = []
    for precision, path in paths.items():
        assert find_problems(str(path), target) == [], precision  # the fast first line agrees
        try:
            facts = parse_and_build(path, BATCH, precision, islands)
        except TensorRTBuildError as exc:  # names the node, its op and the parser's message
            refused.append(f"{precision}: {exc}")
            continue
        assert facts["engine_bytes"] > 0 and facts["layers"] > 0 and facts["profile"] == BATCH
    if refused:
        pytest.fail("\n".join(refused), pytrace=False)
    # the INT8 graph TensorRT builds keeps the descriptors (CricaVPR's head once fell to 0.93)
    run = {p: ort.InferenceSession(str(paths[p]), providers=["CPUExecutionProvider"]).run(outputs, {"images": test_x})
           for p in ("fp32", "int8")}
    flat = {p: np.concatenate([o.reshape(len(test_x), -1) for o in run[p]], axis=1) for p in run}
    assert row_cosine(flat["fp32"], flat["int8"]).min() >= 0.999


def _tiny_conv_model(path, bias_int32: bool):
    """images (B, 3, 8, 8) -> Conv(4) -> ReduceMean -> descriptor; with ``bias_int32`` quantized by
    ONNX Runtime's default options (biases to INT32), else plain FP32."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b")
    nodes = [helper.make_node("Conv", ["images", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("ReduceMean", ["c"], ["descriptor"], name="mean", axes=[2, 3], keepdims=0)]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 8, 8])],
                              [helper.make_tensor_value_info("descriptor", TensorProto.FLOAT, ["batch", 4])], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    if bias_int32:
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.data = iter([{"images": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(4)])

            def get_next(self):
                return next(self.data, None)

        fp32 = path.with_name("fp32_" + path.name)
        path.rename(fp32)
        quantize_static(str(fp32), str(path), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8, extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    return path


def _bundle(folder, model_path):
    folder.mkdir()
    (folder / "model.onnx").write_bytes(model_path.read_bytes())
    write_manifest(folder, {
        "format_version": 1, "model": {"name": "tiny-conv", "batch_mode": "independent"},
        "preprocessing": {"size": [8, 8], "resize": "pil_bilinear", "mean": [0.5] * 3, "std": [0.5] * 3},
        "precision": "int8", "backend": "onnxruntime",
        "inputs": {"images": {"shape": ["batch", 3, 8, 8], "dtype": "float32"}},
        "outputs": {"descriptor": {"shape": ["batch", 4], "dtype": "float32"}},
        "batch": {"min": 1, "opt": 2, "max": 4}, "files": {"onnx": file_entry(folder / "model.onnx")},
        "weights": {"random_weights": True}, "export": {"fp32_nodes": []}, "build": {}})
    return folder


def _run(*cmd):
    return subprocess.run([sys.executable, *map(str, cmd)], cwd=ROOT, capture_output=True, text=True)


def test_static_check_refuses_int32_and_asymmetric_qdq(tmp_path):
    path = _tiny_conv_model(tmp_path / "q.onnx", bias_int32=True)
    problems = find_problems(str(path))
    assert len(problems) == 1 and problems[0].startswith("DequantizeLinear node b_DequantizeLinear: input is INT32")
    model = onnx.load(str(path))
    for init in model.graph.initializer:  # an asymmetric activation: zero point 3
        if init.name.endswith("zero_point") and init.data_type == TensorProto.INT8 and not init.dims:
            init.CopyFrom(numpy_helper.from_array(np.array(3, np.int8), init.name))
            break
    assert any("non-zero zero point" in p for p in find_problems(model))


@needs_rtx
def test_parser_refusal_names_node_op_and_message(tmp_path):
    path = _tiny_conv_model(tmp_path / "q.onnx", bias_int32=True)
    with pytest.raises(ParserRefusal) as info:
        parse_and_build(path, BATCH, "int8")
    msg = str(info.value)
    assert "\n" not in msg and "b_DequantizeLinear (DequantizeLinear)" in msg and "Int32" in msg
    assert "cudaError" not in msg  # the GPU-less machine's noise is not the parser's message
    assert parse_and_build(_tiny_conv_model(tmp_path / "f.onnx", bias_int32=False), BATCH)["engine_bytes"] > 0


@needs_rtx
def test_a_profile_the_engine_cannot_run_fails_the_build(tmp_path):
    # an axis-less Squeeze over the batch axis: TensorRT builds it, warning that batch 1 cannot run
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 1, 4])
    y = helper.make_tensor_value_info("descriptor", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("Squeeze", ["images"], ["descriptor"], name="sq")], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "sq.onnx"))
    with pytest.raises(TensorRTBuildError, match="cannot run the batch profile 1:2:4: .*sq: ISqueezeLayer without an axes"):
        parse_and_build(tmp_path / "sq.onnx", BATCH)
    assert parse_and_build(tmp_path / "sq.onnx", {"min": 2, "opt": 2, "max": 4})["engine_bytes"] > 0


@needs_rtx
def test_tensorrt_rtx_bundle_is_built_here_and_refused_without_a_gpu(tmp_path):
    src = _bundle(tmp_path / "src", _tiny_conv_model(tmp_path / "f.onnx", bias_int32=False))
    out = tmp_path / "rtx"
    proc = _run(SCRIPT, "--from-bundle", src, "--backend", "tensorrt-rtx", "--output", out)
    assert proc.returncode == 0, proc.stderr
    assert "TensorRT-RTX" in proc.stdout and "engine: engine.plan" in proc.stdout
    m = json.loads((out / "manifest.json").read_text())
    assert m["backend"] == "tensorrt-rtx" and m["files"]["engine"]["size"] == (out / "engine.plan").stat().st_size
    trt = m["tensorrt"]
    assert trt["library"] == "tensorrt_rtx" and trt["version"] == rtx_module().__version__
    assert trt["ahead_of_time"] and trt["compute_capabilities"] == "default" and trt["profile"] == BATCH
    assert m["checks"]["tensorrt_rtx"]["engine_bytes"] == m["files"]["engine"]["size"]
    if gpu_info() is not None:
        pytest.skip("this machine has a GPU: the refusal below is for machines without one")
    with pytest.raises(BundleError, match="needs an NVIDIA GPU of compute capability 8.0 or newer"):
        load_bundle(out)
    proc = _run("-m", "runtime", "encode", "--bundle", out, "--images", DATA / "vprbench_corridor" / "queries",
                "--output", tmp_path / "q.npy")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ")
    assert "NVIDIA GPU" in lines[0] and "--backend onnxruntime" in lines[0]
    # without the package, the runtime names it
    code = NO_RTX.format(argv=["runtime", "encode", "--bundle", str(out), "--images", str(DATA / "vprbench_corridor" / "queries"), "--output",
                               str(tmp_path / "q.npy")], kind="module", target="runtime")
    proc = _run("-c", code)
    assert proc.returncode == 2 and "pip install tensorrt-rtx-cu13" in proc.stderr.strip().splitlines()[-1]


@needs_rtx
@pytest.mark.parametrize("backend", ["tensorrt-rtx", "onnxruntime"])
def test_a_refused_graph_fails_the_build_and_leaves_no_bundle(tmp_path, backend):
    src = _bundle(tmp_path / "src", _tiny_conv_model(tmp_path / "q.onnx", bias_int32=True))
    out = tmp_path / "out"
    proc = _run(SCRIPT, "--from-bundle", src, "--backend", backend, "--output", out)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    # TensorRT's parser (a TensorRT-RTX build) or the static check that runs before it names the node
    assert "b_DequantizeLinear" in lines[0] and "int32" in lines[0].lower()
    assert not out.exists() and not list(tmp_path.glob(".*partial*"))


def test_missing_tensorrt_rtx_is_one_line_naming_the_package(tmp_path):
    src = _bundle(tmp_path / "src", _tiny_conv_model(tmp_path / "f.onnx", bias_int32=False))
    argv = [str(SCRIPT), "--from-bundle", str(src), "--backend", "tensorrt-rtx", "--output", str(tmp_path / "o")]
    proc = _run("-c", NO_RTX.format(argv=argv, kind="path", target=str(SCRIPT)))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: --backend tensorrt-rtx") and "pip install tensorrt-rtx-cu13" in lines[0]
    assert not (tmp_path / "o").exists()
