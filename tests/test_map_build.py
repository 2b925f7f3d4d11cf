"""``map build`` / ``map add`` / ``map verify`` from the command line: images from a folder, a list
file or a glob, named by their path relative to that root; a build whose memory does not grow
with the number of images."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reference import ROOT
from runtime.images import ImageListError, find_images
from runtime.maps import load_map
from test_bundle import make_bundle


def run(*args, **kw):
    return subprocess.run([sys.executable, "-m", "runtime", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, **kw)


def write_images(folder: Path, names, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    for n in names:
        (folder / n).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / n)
    return folder


def test_images_from_a_folder_a_list_file_or_a_glob_are_named_relative_to_their_root(tmp_path):
    root = write_images(tmp_path / "city", ["north/0001.jpg", "south/0001.jpg", "south/deep/0002.png", "0003.png"])
    (root / "notes.txt.bak").write_text("x")
    found = find_images(root)
    assert found.names == ["0003.png", "north/0001.jpg", "south/0001.jpg", "south/deep/0002.png"]
    glob = find_images(f"{root}/south/**/*.png")
    assert glob.names == ["deep/0002.png"] and glob.root == root / "south"
    (root / "list.txt").write_text("# the route\nsouth/0001.jpg\n\nnorth/0001.jpg\n")
    listed = find_images(root / "list.txt")
    assert listed.names == ["south/0001.jpg", "north/0001.jpg"] and listed.files[0] == root / "south" / "0001.jpg"
    (root / "twice.txt").write_text("0003.png\n0003.png\n")
    with pytest.raises(ImageListError, match="twice.txt:2: 0003.png is listed twice"):
        find_images(root / "twice.txt")
    with pytest.raises(ImageListError, match="no such folder, list file or glob"):
        find_images(tmp_path / "nowhere")
    with pytest.raises(ImageListError, match="no images found"):
        find_images(f"{root}/*.gif")


def test_map_build_add_verify_and_encode_use_relative_names(tmp_path):
    bundle = make_bundle(tmp_path / "b")
    root = write_images(tmp_path / "city", ["north/0001.jpg", "south/0001.jpg"])
    write_images(tmp_path / "more", ["east/0001.jpg"], seed=1)
    (tmp_path / "poses.csv").write_text("name,x,y\nnorth/0001.jpg,1,2\nsouth/0001.jpg,3,4\n")
    proc = run("map", "build", "--bundle", bundle, "--images", root, "--output", tmp_path / "m", "--poses",
               tmp_path / "poses.csv", "--quiet")
    assert proc.returncode == 0, proc.stderr
    m = load_map(tmp_path / "m")
    assert m.names == ["north/0001.jpg", "south/0001.jpg"] and m.poses.tolist() == [[1, 2], [3, 4]]
    proc = run("map", "add", "--bundle", bundle, "--map", tmp_path / "m", "--images", tmp_path / "more", "--quiet")
    assert proc.returncode == 2 and proc.stderr.startswith("error: poses must be given")  # the map has poses
    assert load_map(tmp_path / "m").version == "v000001"
    proc = run("encode", "--bundle", bundle, "--images", f"{root}/**/*.jpg", "--output", tmp_path / "d.npy")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "d.txt").read_text().split() == ["north/0001.jpg", "south/0001.jpg"]
    info = json.loads(run("map", "info", "--map", tmp_path / "m").stdout)
    assert info["count"] == 2 and info["segments"] == 1 and info["weights"].startswith("random weights")
    proc = run("map", "verify", "--map", tmp_path / "m")
    assert proc.returncode == 0 and "intact" in proc.stdout
    store = tmp_path / "m" / "segments" / "s000001" / "descriptors.f32"
    store.write_bytes(bytes(b ^ 1 for b in store.read_bytes()))
    proc = run("map", "verify", "--map", tmp_path / "m")
    assert proc.returncode == 2 and "segment s000001 is corrupted" in proc.stderr and "damaged" in proc.stdout
    # not a map: refused in one line, nothing touched
    proc = run("map", "build", "--bundle", bundle, "--images", root, "--output", root, "--quiet")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "exists and is not a map" in proc.stderr


def big_descriptor_bundle(folder: Path, dim: int = 8448) -> Path:
    """A bundle whose graph turns each 28x28 image into a ``dim``-D unit descriptor (no weights:
    flatten, tile, slice, L2-normalise), so that descriptors weigh what real ones do."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from runtime.bundle import file_entry, write_manifest
    folder.mkdir(parents=True)
    reps = -(-dim // (3 * 28 * 28))
    nodes = [helper.make_node("Flatten", ["images"], ["flat"], axis=1),
             helper.make_node("Tile", ["flat", "reps"], ["tiled"]),
             helper.make_node("Slice", ["tiled", "starts", "ends", "axes"], ["cut"]),
             helper.make_node("LpNormalization", ["cut"], ["descriptor"], axis=1, p=2)]
    inits = [helper.make_tensor("reps", TensorProto.INT64, [2], [1, reps]),
             helper.make_tensor("starts", TensorProto.INT64, [1], [0]),
             helper.make_tensor("ends", TensorProto.INT64, [1], [dim]),
             helper.make_tensor("axes", TensorProto.INT64, [1], [1])]
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 28, 28])],
                              [helper.make_tensor_value_info("descriptor", TensorProto.FLOAT, ["batch", dim])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), folder / "model.onnx")
    write_manifest(folder, {
        "format_version": 1, "model": {"name": "big", "batch_mode": "independent"},
        "preprocessing": {"size": [28, 28], "resize": "pil_bilinear", "mean": [0.5] * 3, "std": [0.5] * 3},
        "precision": "fp32", "backend": "onnxruntime",
        "inputs": {"images": {"shape": ["batch", 3, 28, 28], "dtype": "float32"}},
        "outputs": {"descriptor": {"shape": ["batch", dim], "dtype": "float32"}},
        "batch": {"min": 1, "opt": 8, "max": 8}, "files": {"onnx": file_entry(folder / "model.onnx")},
        "weights": {"random_weights": True, "tensors_sha256": "0" * 64}, "build": {}})
    return folder


PEAK = r"""
import resource, subprocess, sys
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
sys.stderr.write(proc.stderr)
print(proc.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def test_map_build_peak_memory_does_not_grow_with_the_number_of_images(tmp_path):
    bundle = big_descriptor_bundle(tmp_path / "b")
    peaks = {}
    for n in (100, 1000):
        folder = tmp_path / f"imgs{n}"
        folder.mkdir()
        rng = np.random.default_rng(n)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
        proc = subprocess.run([sys.executable, "-c", PEAK, sys.executable, "-m", "runtime", "map", "build", "--bundle",
                               str(bundle), "--images", str(folder), "--output", str(tmp_path / f"m{n}"), "--quiet",
                               "--threads", "1", "--store-dtype", "float32"],
                              cwd=ROOT, capture_output=True, text=True, timeout=600)
        code, peak_kb = proc.stdout.split()
        assert code == "0", proc.stderr
        peaks[n] = int(peak_kb) * 1024
    # 1000 descriptors of 8448 floats are 34 MB: holding them (twice, to concatenate) would show
    assert abs(peaks[1000] - peaks[100]) <= 0.10 * peaks[100], peaks
    assert len(load_map(tmp_path / "m1000", verify="full")) == 1000
