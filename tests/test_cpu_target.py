"""CPU targets of the build (export/cpu_target.py, export/cpu_graph.py, export/cpu_check.py) and
the OpenVINO backend: path choice from CPU features, what the manifest records, the graph checks,
the load-time fallback, parity. Small models (depth 1-2, 126 px: SALAD needs more patches than
its 64 clusters)."""
import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

torch = pytest.importorskip("torch")

from export.build import BatchProfile, BuildConfig, build_bundle  # noqa: E402
from export.bundle_writer import CheckFailed  # noqa: E402
from export.cpu_check import cpu_graph_checks  # noqa: E402
from export.cpu_graph import fuse_attention  # noqa: E402
from export.cpu_target import choose_path, target_cpu  # noqa: E402
from reference import DATA  # noqa: E402
from runtime.backends import open_backend  # noqa: E402
from runtime.bundle import load_bundle  # noqa: E402
from runtime.compare import row_cosine  # noqa: E402
from runtime.cpu_features import CpuInfo, check_cpu_path, this_cpu  # noqa: E402
from runtime.errors import OptionError  # noqa: E402
from runtime.preprocess import list_images, preprocess_file  # noqa: E402

SMALL = dict(model="salad-dinov2-vitb14", random_weights=True, depth=2, image_size=126, batch=BatchProfile(1, 2, 4))
VNNI_BF16 = CpuInfo("x86_64", frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16"}))
AVX2 = CpuInfo("x86_64", frozenset({"avx2", "fma"}))


def _images(bundle, n=4):
    return np.stack([preprocess_file(f, bundle.preprocessing)
                     for f in list_images(DATA / "vprbench_corridor" / "queries")[:n]])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("cpu")
    return {"fp32": build_bundle(BuildConfig(**SMALL, precision="fp32", backend="onnxruntime", output=root / "fp32")),
            "cpu": build_bundle(BuildConfig(**SMALL, target="cpu", output=root / "cpu")),
            "arm": build_bundle(BuildConfig(**SMALL, target="cpu-arm", output=root / "arm"))}


@pytest.mark.parametrize("cpu, requires", [
    (VNNI_BF16, ("avx512_vnni", "avx2", "fma")),
    (AVX2, ("avx2", "fma")),
    (target_cpu("cpu-x86-avx512"), ("avx512bw",)),
    (target_cpu("cpu-arm"), ("asimd",)),
])
def test_the_int8_path_is_chosen_with_the_features_it_was_measured_on(cpu, requires):
    path = choose_path(cpu)
    assert (path.name, path.backend, path.precision) == ("onnxruntime-int8-dynamic", "onnxruntime", "int8")
    assert path.requires == requires and path.rewrites == ("fuse_attention", "quantize_dynamic")


def test_openvino_path_follows_bf16():
    assert choose_path(VNNI_BF16, "openvino", openvino=True).settings == {"inference_precision": "bf16"}
    assert choose_path(AVX2, "openvino", openvino=True).name == "openvino-fp32"
    with pytest.raises(OptionError, match="openvino package is not installed"):
        choose_path(VNNI_BF16, "openvino", openvino=False)


@pytest.mark.parametrize("config, message", [
    (BuildConfig(**SMALL, target="cpu", precision="int8"), "chooses the precision"),
    (BuildConfig(**SMALL, target="cpu", backend="tensorrt"), "runs on onnxruntime or openvino"),
    (BuildConfig(**SMALL, backend="openvino"), "build it with --target cpu"),
    (BuildConfig(**SMALL, target="cpu-sparc"), "expected one of"),
])
def test_cpu_target_mistakes_are_user_errors(config, message):
    with pytest.raises(OptionError, match=message):
        build_bundle(config)


def test_cpu_bundle_records_its_path_and_passes_its_checks(built):
    m = load_bundle(built["cpu"]).manifest
    cpu = this_cpu()
    assert m["backend"] == "onnxruntime" and m["precision"] == "int8" and m["export"]["target"] == "cpu"
    assert m["cpu"]["path"] == "onnxruntime-int8-dynamic" and m["cpu"]["arch"] == cpu.arch
    assert m["cpu"]["requires"] and not cpu.missing(m["cpu"]["requires"])
    assert m["calibration"]["mode"] == "dynamic" and m["calibration"]["quantized_nodes"] == 2 * 4  # qkv, proj, fc1, fc2
    check = m["checks"]["cpu_graph_check"]
    assert check["passed"] and check["op_types"]["com.microsoft::MultiHeadAttention"] == 2
    assert "tensorrt_static_check" not in m["checks"]
    assert m["checks"]["parity_vs_pytorch"]["min_cosine"] >= 0.99


def test_cpu_bundle_runs_here_without_warning_close_to_fp32(built, caplog):
    fp32, cpu = load_bundle(built["fp32"]), load_bundle(built["cpu"])
    x = _images(fp32)
    with caplog.at_level(logging.WARNING):
        got = open_backend(cpu).run(x)["descriptor"]
    assert not [r for r in caplog.records if "CPU path" in r.getMessage()]
    assert row_cosine(open_backend(fp32).run(x)["descriptor"], got).min() >= 0.999


def test_arm_bundle_builds_here_and_falls_back_with_a_warning(built, caplog):
    m = load_bundle(built["arm"]).manifest
    assert m["cpu"]["target"] == "cpu-arm" and m["cpu"]["arch"] == "aarch64" and m["cpu"]["requires"] == ["asimd"]
    assert m["checks"]["cpu_graph_check"]["passed"] and m["checks"]["cpu_graph_check"]["arch"] == "aarch64"
    if this_cpu().arch == "aarch64":
        pytest.skip("on an ARM machine the ARM bundle is native")
    with caplog.at_level(logging.WARNING):
        backend = open_backend(load_bundle(built["arm"]))
    warnings = [r.getMessage() for r in caplog.records if "CPU path" in r.getMessage()]
    assert len(warnings) == 1 and "built for aarch64" in warnings[0]
    out = backend.run(_images(load_bundle(built["fp32"])))["descriptor"]
    assert np.isfinite(out).all()


def test_from_bundle_refuses_a_cpu_bundle(built):
    with pytest.raises(OptionError, match="is final"):
        build_bundle(BuildConfig(from_bundle=built["cpu"], backend="onnxruntime"))


def test_graph_check_fails_on_an_op_without_kernel(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("NoSuchKernel", ["x"], ["y"], domain="com.microsoft")], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    manifest = {"backend": "onnxruntime", "cpu": {"target": "cpu", "arch": "x86_64"}}
    with pytest.raises(CheckFailed, match="no ONNX Runtime CPU kernel.*NoSuchKernel"):
        cpu_graph_checks(path, manifest)


def test_fuse_attention_leaves_other_graphs_alone(built):
    model = onnx.load(str(load_bundle(built["cpu"]).file("onnx")))
    assert fuse_attention(model, num_heads=12) == 0  # already fused: no attention pattern left




@pytest.fixture(scope="module")
def openvino_bundle(tmp_path_factory):
    pytest.importorskip("openvino")
    return build_bundle(BuildConfig(**SMALL, target="cpu", backend="openvino",
                                    output=tmp_path_factory.mktemp("ov") / "ov"))


def test_openvino_bundle_parity_with_fp32(openvino_bundle, built):
    b = load_bundle(openvino_bundle)
    bf16 = any(f in this_cpu().flags for f in ("avx512_bf16", "amx_bf16"))
    assert b.backend == "openvino" and b.precision == ("bf16" if bf16 else "fp32")
    assert b.manifest["checks"]["cpu_graph_check"]["backend"] == "openvino"
    fp32 = load_bundle(built["fp32"])
    x = _images(fp32)
    backend = open_backend(b, threads=2)
    assert row_cosine(open_backend(fp32).run(x)["descriptor"], backend.run(x)["descriptor"]).min() >= 0.999


def test_openvino_falls_back_to_fp32_without_bf16(openvino_bundle, built, caplog):
    from runtime.backends.openvino_backend import compile_graph
    b = load_bundle(openvino_bundle)
    if b.precision != "bf16":
        pytest.skip("this CPU has no bf16: the bundle is FP32 already")
    with caplog.at_level(logging.WARNING):
        check = check_cpu_path(b.manifest, CpuInfo("x86_64", frozenset({"avx2", "fma"})))
    assert check.settings == {"inference_precision": "f32"} and len(caplog.records) == 1
    compiled = compile_graph(b.file("onnx"), 2, check.settings)
    assert str(compiled.get_property("INFERENCE_PRECISION_HINT")) == "<Type: 'float32'>"
    fp32 = load_bundle(built["fp32"])
    x = _images(fp32)
    got = np.array(compiled.create_infer_request().infer({0: x})[compiled.output("descriptor")])
    assert row_cosine(open_backend(fp32).run(x)["descriptor"], got).min() >= 0.99999


def test_precision_report_applies_the_int8_gate_to_the_cpu_bundle(built):
    from calibration.report import precision_report
    from runtime.datasets import load_dataset
    report = precision_report([load_bundle(built["fp32"]), load_bundle(built["cpu"])],
                              load_dataset(DATA / "vprbench_corridor"), threads=2)
    row = next(r for r in report["rows"] if r["precision"] == "int8")
    assert row["gate"]["metric"] == "top1_agreement" and row["gate"]["threshold"] == 0.98
    assert row["gate"]["value"] == row["top1_agreement"] and row["gate"]["passed"] == (row["top1_agreement"] >= 0.98)
