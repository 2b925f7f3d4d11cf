"""python -m runtime end to end on the sample data with small registry models (ONNX Runtime)."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from reference import DATA, ROOT  # noqa: E402
from runtime.datasets import load_dataset  # noqa: E402
from runtime.evaluate import recall_at_k  # noqa: E402
from runtime.preprocess import list_images  # noqa: E402

CORRIDOR = DATA / "vprbench_corridor"


def run(*args, module="runtime"):
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, capture_output=True, text=True)
    return proc


def build(out, *args):
    proc = subprocess.run([sys.executable, str(ROOT / "export" / "build_engine.py"), *map(str, args),
                           "--random-weights", "--depth", "1", "--backend", "onnxruntime", "--output", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def gem(tmp_path_factory):
    return build(tmp_path_factory.mktemp("b") / "gem", "--model", "gem-dinov2-vits14", "--precision", "fp32", "--batch", "1:8:16")


def test_encode_matches_the_pytorch_reference(gem, tmp_path):
    proc = run("encode", "--bundle", gem, "--images", CORRIDOR / "queries", "--output", tmp_path / "rt.npy", "--quiet")
    assert proc.returncode == 0, proc.stderr
    proc = run("--model", "gem-dinov2-vits14", "--random-weights", "--depth", "1", "--images", CORRIDOR / "queries",
               "--output", tmp_path / "pt.npy", module="export.encode")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "rt.txt").read_text() == (tmp_path / "pt.txt").read_text()
    assert np.abs(np.load(tmp_path / "rt.npy") - np.load(tmp_path / "pt.npy")).max() <= 1e-4


def test_map_build_add_info_localize_and_evaluate(gem, tmp_path):
    db = list_images(CORRIDOR / "database")
    first, second = tmp_path / "db1", tmp_path / "db2"
    for folder, files in ((first, db[:60]), (second, db[60:])):
        folder.mkdir()
        for f in files:
            shutil.copy(f, folder / f.name)
    poses = tmp_path / "poses.csv"
    poses.write_text("name,x,y\n" + "".join(f"{f.name},{i},0\n" for i, f in enumerate(db)))
    mp = tmp_path / "map"
    assert run("map", "build", "--bundle", gem, "--images", first, "--output", mp, "--poses", poses, "--quiet").returncode == 0
    proc = run("map", "add", "--bundle", gem, "--map", mp, "--images", second, "--poses", poses, "--quiet")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(run("map", "info", "--map", mp).stdout)
    assert info["count"] == 111 and info["index"] == "flat" and info["poses"] and info["version"] == "v000002"

    out = tmp_path / "res.jsonl"
    proc = run("localize", "--bundle", gem, "--map", mp, "--source", CORRIDOR / "queries", "--output", out,
               "--top-k", "20", "--ground-truth", CORRIDOR)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 111 and all("pose" in r and len(r["top_k"]) == 20 for r in lines)
    assert "received 111, processed 111" in proc.stdout and "| inference |" in proc.stdout

    # evaluate's Recall@K equals a brute-force numpy computation on the same descriptors
    ev = tmp_path / "ev.json"
    proc = run("evaluate", "--bundle", gem, "--dataset", CORRIDOR, "--output", ev, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "RANDOM WEIGHTS" in proc.stdout
    got = {int(k): v for k, v in json.loads(ev.read_text())["recall"].items()}
    for part in ("database", "queries"):
        assert run("encode", "--bundle", gem, "--images", CORRIDOR / part, "--output", tmp_path / f"{part}.npy", "--quiet").returncode == 0
    d, q = np.load(tmp_path / "database.npy"), np.load(tmp_path / "queries.npy")
    ranked = np.argsort(-(q @ d.T), axis=1, kind="stable")[:, :20]
    ds = load_dataset(CORRIDOR)
    brute = {k: float(np.mean([len(set(r[:k].tolist()) & p) > 0 for r, p in zip(ranked, ds.positives)])) for k in (1, 5, 10, 20)}
    assert got == pytest.approx(brute, abs=1e-9)
    assert recall_at_k(ranked, ds.positives) == pytest.approx(brute)
    # the loop's own recall (printed) is the same retrieval
    assert f"R@1 {brute[1]:.4f}" in run("localize", "--bundle", gem, "--map", mp, "--source", CORRIDOR / "queries",
                                        "--top-k", "5", "--ground-truth", CORRIDOR).stdout


def test_split_bundle_with_numpy_sinkhorn_equals_fused_graph(tmp_path):
    fused = build(tmp_path / "fused", "--model", "salad-dinov2-vitb14", "--precision", "fp32", "--skip-parity", "--image-size", "224")
    split = build(tmp_path / "split", "--model", "salad-dinov2-vitb14", "--precision", "fp32", "--skip-parity", "--image-size", "224", "--split")
    images = CORRIDOR / "queries"
    for b in (fused, split):
        assert run("encode", "--bundle", b, "--images", images, "--output", tmp_path / f"{b.name}.npy", "--quiet").returncode == 0
    a, b = np.load(tmp_path / "fused.npy"), np.load(tmp_path / "split.npy")
    assert a.shape == b.shape == (111, 8448)
    assert np.abs(a - b).max() <= 1e-5


def test_selavpr_rerank_through_map_localize_and_evaluate(tmp_path):
    sela = build(tmp_path / "sela", "--model", "selavpr-dinov2-vitl14", "--precision", "fp32", "--skip-parity", "--batch", "1:4:8")
    ds = tmp_path / "ds"
    for sub in ("database", "queries"):
        (ds / sub).mkdir(parents=True)
        for f in list_images(CORRIDOR / sub)[:12]:
            shutil.copy(f, ds / sub / f.name)
    gt = json.loads((CORRIDOR / "ground_truth.json").read_text())
    keep = {f.name for f in (ds / "database").iterdir()}
    queries = sorted(f.name for f in (ds / "queries").iterdir())
    (ds / "ground_truth.json").write_text(json.dumps({
        "database": sorted(keep), "queries": queries,
        "positives": {q: [p for p in gt["positives"][q] if p in keep] for q in queries}}))
    mp = tmp_path / "map"
    assert run("map", "build", "--bundle", sela, "--images", ds / "database", "--output", mp, "--quiet").returncode == 0
    assert json.loads(run("map", "info", "--map", mp).stdout)["local_features"] is True
    out = tmp_path / "r.jsonl"
    proc = run("localize", "--bundle", sela, "--map", mp, "--source", ds / "queries", "--rerank", "5", "--output", out)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert all(r["reranked"] and r["mnn_count"] > 0 for r in lines)
    proc = run("evaluate", "--bundle", sela, "--dataset", ds, "--rerank", "5", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "re-ranked 5:" in proc.stdout and "| rerank |" in proc.stdout


def test_cli_errors_are_clear(gem, tmp_path):
    proc = run("map", "info", "--map", tmp_path)
    assert proc.returncode == 2 and "not a map" in proc.stderr
    proc = run("encode", "--bundle", tmp_path, "--images", CORRIDOR / "queries", "--output", tmp_path / "x.npy")
    assert proc.returncode == 2 and "not a bundle" in proc.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run("encode", "--bundle", gem, "--images", empty, "--output", tmp_path / "x.npy")
    assert proc.returncode == 2 and "no images found" in proc.stderr


RTABMAP_CALLS = """
import sys
import numpy as np
from PIL import Image
sys.path.append(sys.argv[1])
import vpr_edge_rtabmap as plugin
plugin.init(int(sys.argv[2]))
bgr = np.ascontiguousarray(np.asarray(Image.open(sys.argv[3]).convert("RGB"))[:, :, ::-1])
frame = np.frombuffer(bytearray(bgr.tobytes()), dtype=np.int8).reshape(bgr.shape)  # RTAB-Map's NPY_BYTE wrap
np.save(sys.argv[4], plugin.extract(frame))
"""


def test_rtabmap_plugin_on_a_real_model_equals_runtime_encode(gem, tmp_path):
    proc = run("encode", "--bundle", gem, "--images", CORRIDOR / "queries", "--output", tmp_path / "q.npy", "--quiet")
    assert proc.returncode == 0, proc.stderr
    names = (tmp_path / "q.txt").read_text().split()
    frame = CORRIDOR / "queries" / names[7]
    proc = subprocess.run([sys.executable, "-c", RTABMAP_CALLS, str(ROOT / "integrations" / "rtabmap"), "384", str(frame),
                           str(tmp_path / "plugin.npy")], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "VPR_EDGE_BUNDLE": str(gem)})
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    got = np.load(tmp_path / "plugin.npy")
    assert got.shape == (1, 384) and got.dtype == np.float32
    assert np.abs(got[0] - np.load(tmp_path / "q.npy")[7]).max() <= 1e-6
def test_non_square_boq_bundle_encodes_like_pytorch_and_localizes(tmp_path):
    """A 4:3-ish camera size (224x308): the bundle, the runtime's bicubic preprocessing and the
    PyTorch reference agree; the map and the loop take the non-square bundle as any other."""
    boq = build(tmp_path / "boq", "--model", "boq-dinov2-vitb14", "--precision", "fp32", "--image-size", "224x308",
                "--batch", "1:4:8")
    m = json.loads((boq / "manifest.json").read_text())
    assert m["inputs"]["images"]["shape"] == ["batch", 3, 224, 308] and m["preprocessing"]["size"] == [224, 308]
    assert m["checks"]["parity_vs_pytorch"]["min_cosine"] >= 0.99999
    images, database = tmp_path / "q", tmp_path / "db"
    for sub, folder in (("queries", images), ("database", database)):
        folder.mkdir()
        for f in list_images(CORRIDOR / sub)[:16]:
            shutil.copy(f, folder / f.name)
    assert run("encode", "--bundle", boq, "--images", images, "--output", tmp_path / "rt.npy", "--quiet").returncode == 0
    proc = run("--model", "boq-dinov2-vitb14", "--random-weights", "--depth", "1", "--image-size", "224x308",
               "--images", images, "--output", tmp_path / "pt.npy", module="export.encode")
    assert proc.returncode == 0, proc.stderr
    assert np.abs(np.load(tmp_path / "rt.npy") - np.load(tmp_path / "pt.npy")).max() <= 1e-4
    mp = tmp_path / "map"
    assert run("map", "build", "--bundle", boq, "--images", database, "--output", mp, "--quiet").returncode == 0
    proc = run("localize", "--bundle", boq, "--map", mp, "--source", images, "--top-k", "3", "--output", tmp_path / "r.jsonl")
    assert proc.returncode == 0, proc.stderr
    assert "received 16, processed 16" in proc.stdout
