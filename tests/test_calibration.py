"""The INT8 path on CPU with real images: calibration sets, Q/DQ graphs that ONNX Runtime runs
with integer kernels, and the precision report (random weights: agreement and cosine matter)."""
import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from PIL import Image

from calibration.dataset import calibration_set, sample_files
from export.trt_rtx import rtx_available
from reference import DATA, ROOT
from runtime.preprocess import Preprocessing
from test_runtime_no_torch import BLOCKER

CORRIDOR = DATA / "vprbench_corridor"
NORDLAND = DATA / "nordland_summer_winter_64x32"


def test_sampling_spreads_over_the_whole_sequence_and_is_seeded(tmp_path):
    for i in range(100):
        Image.new("RGB", (4, 4)).save(tmp_path / f"{i:03d}.png")
    picks = [int(p.stem) for p in sample_files([tmp_path], 10, seed=0)]
    assert [p // 10 for p in picks] == list(range(10))  # one per tenth of the sequence
    assert picks == [int(p.stem) for p in sample_files([tmp_path], 10, seed=0)]
    assert picks != [int(p.stem) for p in sample_files([tmp_path], 10, seed=1)]
    assert len(sample_files([tmp_path], 500)) == 100


def test_calibration_set_is_preprocessed_cached_and_skips_bad_files(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for f in sorted(CORRIDOR.joinpath("database").iterdir())[:6]:
        shutil.copy(f, folder / f.name)
    (folder / "zz_broken.jpg").write_bytes(b"\xff\xd8 truncated")
    pre = Preprocessing(size=(28, 28))
    data = calibration_set([folder], pre, count=7, cache_dir=tmp_path / "cache")
    err = capsys.readouterr().err
    assert data.shape == (6, 3, 28, 28) and "zz_broken.jpg" in err and "1 of 7 calibration images" in err
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1
    again = calibration_set([folder], pre, count=7, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(np.asarray(again), np.asarray(data))
    assert isinstance(again, np.memmap)


def _build(*args):
    proc = subprocess.run([sys.executable, str(ROOT / "export" / "build_engine.py"), *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("int8")
    common = ["--model", "gem-dinov2-vits14", "--random-weights", "--depth", "2", "--batch", "1:8:16", "--skip-parity",
              "--backend", "onnxruntime"]
    _build(*common, "--precision", "fp32", "--output", root / "fp32")
    _build(*common, "--precision", "fp16", "--output", root / "fp16")
    _build(*common, "--precision", "int8", "--calibration-images", CORRIDOR / "database", NORDLAND / "database",
           "--calibration-count", "64", "--output", root / "int8")
    return root


def test_int8_bundle_runs_integer_kernels_and_passes_the_checks(bundles):
    m = json.loads((bundles / "int8" / "manifest.json").read_text())
    assert m["precision"] == "int8" and m["calibration"]["mode"] == "explicit Q/DQ"
    assert m["calibration"]["attention_fp32"] > 0  # 322 x 322: 530 tokens, over ModelOpt's 512 for INT8 attention
    assert m["calibration"]["images"] == 64 and m["calibration"]["method"] == "entropy"
    assert sum(m["calibration"]["integer_ops"].values()) >= 8  # integer kernels, not dequantised FP32
    assert m["checks"]["tensorrt_static_check"]["passed"] and m["checks"]["tensorrt_static_check"]["target"] == "trt10"
    graph = onnx.load(str(bundles / "int8" / "model.onnx"))
    ops = {n.op_type for n in graph.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "LayerNormalization"} <= ops
    # TensorRT's layout: INT8 Q/DQ only (no INT32 bias), zero points 0, only the backbone quantized
    inits = {i.name: i for i in graph.graph.initializer}
    for n in graph.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            assert inits[n.input[0]].data_type == onnx.TensorProto.INT8, n.name
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert not onnx.numpy_helper.to_array(inits[n.input[2]]).any(), n.name
    consumers = [c for n in graph.graph.node if n.op_type == "DequantizeLinear"
                 for c in graph.graph.node if n.output[0] in c.input]
    assert consumers and all("/backbone/" in c.name for c in consumers)
    # LayerNorm, softmax and the L2 normalisations stay FP32: nothing quantizes their inputs
    producers = {o: n for n in graph.graph.node for o in n.output}
    for n in graph.graph.node:
        if n.op_type in ("LayerNormalization", "Softmax", "ReduceL2"):
            assert producers.get(n.input[0]) is None or producers[n.input[0]].op_type != "DequantizeLinear", n.name


def test_precision_report_agreement_and_cosine(bundles, tmp_path):
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "calibration", "report", "--bundle", bundles / "fp32",
                           "--bundle", bundles / "fp16", "--bundle", bundles / "int8", "--dataset", CORRIDOR,
                           "--output", out], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "| int8 |" in proc.stdout and "RANDOM WEIGHTS" in proc.stdout
    rows = {r["precision"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["fp16"]["cosine_to_fp32"]["min"] >= 0.999 and rows["fp16"]["top1_agreement"] >= 0.98
    assert rows["int8"]["cosine_to_fp32"]["p1"] >= 0.999 and rows["int8"]["top1_agreement"] >= 0.95
    for row in rows.values():
        assert row["top1_agreement_within_tie"] >= row["top1_agreement"]
        assert len(row["top1_disagreements"]) == round((1 - row["top1_agreement"]) * 111)
    # the report says which fidelity gate each precision class must pass
    assert rows["fp16"]["gate"] == {"metric": "min_cosine", "threshold": 0.999,
                                    "value": rows["fp16"]["cosine_to_fp32"]["min"], "passed": True}
    assert rows["int8"]["gate"]["metric"] == "top1_agreement" and rows["int8"]["gate"]["threshold"] == 0.98
    assert "fidelity gate" in proc.stdout and "top-1 agreement" in proc.stdout
    assert (bundles / "int8" / "precision_report.json").is_file()


def test_agreement_up_to_ties_forgives_only_a_near_tie_that_fp32_broke():
    from calibration.report import top1_agreement
    from runtime.evaluate import retrieve

    rng = np.random.default_rng(0)

    def unit(a):
        return a / np.linalg.norm(a, axis=-1, keepdims=True)

    db = unit(rng.standard_normal((6, 32)))
    # query 0 sits between db 0 and db 1 (FP32 prefers db 0 by ~2e-6); query 1 is db 2 plus noise
    q = unit(np.stack([db[0] + db[1] + 4e-6 * db[0], db[2] + 0.3 * rng.standard_normal(32)]))
    top2 = retrieve(q.astype(np.float32), db.astype(np.float32), 2)
    assert list(top2[:, 0]) == [0, 2]
    flipped = top1_agreement(q, db, top2, np.array([1, 2]))  # the near tie broken the other way
    assert flipped["strict"] == 0.5 and flipped["within_tie"] == 1.0
    (d,) = flipped["disagreements"]
    assert d["query"] == 0 and 0 < d["fp32_margin"] == d["fp32_gap"] < 1e-5
    wrong = top1_agreement(q, db, top2, np.array([0, 3]))  # a clearly worse match is no tie
    assert wrong["strict"] == 0.5 and wrong["within_tie"] == 0.5 and wrong["disagreements"][0]["fp32_gap"] > 1e-2
    assert top1_agreement(q, db, top2, np.array([1, 2]), tie=1e-7)["within_tie"] == 0.5


@pytest.mark.parametrize("method", ["minmax", "percentile"])
def test_standalone_quantize_is_torch_free(bundles, tmp_path, method):
    out = tmp_path / f"int8-{method}"
    code = BLOCKER.split("import importlib\nfor m")[0] + (
        "import sys, runpy; sys.argv = ['calibration', 'quantize', '--bundle', %r, '--calibration-images', %r, "
        "'--count', '16', '--method', %r, '--output', %r]; runpy.run_module('calibration', run_name='__main__')"
        % (str(bundles / "fp32"), str(CORRIDOR / "database"), method, str(out)))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["calibration"]["method"] == method and m["calibration"]["integer_ops"]
    # the same writer and checks as build_engine: the Q/DQ graph's static TensorRT check and parity
    assert m["checks"]["tensorrt_static_check"]["passed"]
    assert m["checks"]["parity_vs_fp32_graph"]["min_cosine"] >= m["checks"]["parity_vs_fp32_graph"]["threshold"] == 0.99
    assert "checks passed" in proc.stdout and "parity vs the FP32 graph" in proc.stdout
    if rtx_available():  # the graph a device's TensorRT gets: parsed and built by TensorRT itself
        assert m["checks"]["tensorrt_rtx"]["profile"] == m["batch"] and "parse + AOT build" in proc.stdout


def test_int8_without_calibration_images_is_refused():
    proc = subprocess.run([sys.executable, str(ROOT / "export" / "build_engine.py"), "--model", "gem-dinov2-vits14",
                           "--random-weights", "--precision", "int8"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "--calibration-images" in proc.stderr
