"""FAISS place maps: index choice, search quality, atomic versioned saves, checks. No torch."""
import json

import numpy as np
import pytest

from runtime.maps import MapError, add_to_map, check_compatible, choose_index, load_map, read_poses, save_map

ID = {"model": "m", "dim": 64, "preprocessing": {"size": [28, 28]}, "batch_mode": "independent",
      "precision": "fp32", "onnx_sha256": "x"}


def clustered(n, d, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 20), d))
    x = centres[rng.integers(0, len(centres), n)] + 0.6 * rng.standard_normal((n, d)) / np.sqrt(d) * 3
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def test_index_choice_follows_size_and_budget():
    assert choose_index(1000, 8448, None) == "flat"
    assert choose_index(200_000, 512, None) == "ivfpq"
    assert choose_index(5000, 8448, budget=5000 * 8448 * 2) == "ivfpq"  # flat over budget
    assert choose_index(500, 8448, budget=500 * 8448 * 2) == "sqfp16"  # too few to train IVF-PQ
    assert choose_index(1_000_000, 8448, budget=2 << 30) == "ivfpq"
    assert choose_index(10, 8, None, "hnsw") == "hnsw"
    with pytest.raises(MapError, match="unknown index"):
        choose_index(10, 8, None, "lsh")


@pytest.mark.parametrize("kind,min_recall", [("flat", 1.0), ("sqfp16", 0.95), ("hnsw", 0.9), ("ivfpq", 0.9)])
def test_every_index_finds_the_source_of_noisy_queries(tmp_path, kind, min_recall):
    n, d = 3000, 64
    x = clustered(n, d)
    names = [f"img{i:05d}.jpg" for i in range(n)]
    m = save_map(tmp_path / "map", x, names, ID, index_type=kind)
    assert m.kind == kind
    rng = np.random.default_rng(1)
    src = rng.choice(n, 200, replace=False)
    q = x[src] + 0.02 * rng.standard_normal((200, d)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    exact = np.argmax(q @ x.T, axis=1)
    scores, ids = m.search(q, 5)
    assert (ids[:, 0] == exact).mean() >= min_recall
    assert np.all(np.diff(scores, axis=1) <= 1e-5)  # best first


def test_save_is_versioned_verified_and_incremental(tmp_path):
    x = clustered(300, 64)
    names = [f"a{i}.png" for i in range(300)]
    folder = tmp_path / "map"
    m1 = save_map(folder, x[:200], names[:200], ID, poses=np.arange(400, dtype=float).reshape(200, 2))
    assert (folder / "CURRENT").read_text().strip() == "v000001"
    m2 = add_to_map(m1, x[200:], names[200:], poses=np.zeros((100, 2)))
    assert (folder / "CURRENT").read_text().strip() == "v000002" and len(m2) == 300
    assert not (folder / "v000001").exists()  # older versions are removed once the new one is live
    loaded = load_map(folder)
    _, ids = loaded.search(x[250:251], 1)
    assert loaded.names[ids[0, 0]] == "a250" + ".png"
    assert loaded.poses.shape == (300, 2)
    with pytest.raises(MapError, match="already in the map"):
        add_to_map(loaded, x[:1], ["a0.png"], poses=np.zeros((1, 2)))
    # corruption is caught by the checksum
    desc = folder / "v000002" / "descriptors.npy"
    data = bytearray(desc.read_bytes())
    data[-3] ^= 0xFF
    desc.write_bytes(bytes(data))
    with pytest.raises(MapError, match="checksum"):
        load_map(folder)


def test_bad_descriptors_and_metadata_are_refused(tmp_path):
    x = clustered(10, 64)
    x[3, 5] = np.nan
    with pytest.raises(MapError, match="NaN or Inf .*n3"):
        save_map(tmp_path / "m", x, [f"n{i}" for i in range(10)], ID)
    assert not (tmp_path / "m" / "CURRENT").exists()
    with pytest.raises(MapError, match="unique"):
        save_map(tmp_path / "m", clustered(2, 64), ["a", "a"], ID)
    with pytest.raises(MapError, match="64-D"):
        save_map(tmp_path / "m", clustered(2, 32), ["a", "b"], ID)
    with pytest.raises(MapError, match="not a map"):
        load_map(tmp_path / "nothing")


def test_map_from_another_bundle_is_refused(tmp_path):
    with pytest.raises(MapError, match="another bundle .model"):
        check_compatible(ID, {**ID, "model": "other"}, tmp_path)
    check_compatible(ID, {**ID, "precision": "fp16", "onnx_sha256": "y"}, tmp_path)  # same model: fine


def test_poses_from_csv_and_json(tmp_path):
    (tmp_path / "p.csv").write_text("name,x,y\na.jpg,1,2\nb.jpg,3,4\n")
    np.testing.assert_array_equal(read_poses(tmp_path / "p.csv", ["b.jpg", "a.jpg"]), [[3, 4], [1, 2]])
    (tmp_path / "p.json").write_text(json.dumps({"a.jpg": [1, 2, 3]}))
    assert read_poses(tmp_path / "p.json", ["a.jpg"]).shape == (1, 3)
    with pytest.raises(MapError, match="no pose for 1 images"):
        read_poses(tmp_path / "p.json", ["a.jpg", "z.jpg"])
    (tmp_path / "bad.csv").write_text("name,x\na.jpg,notanumber\n")
    with pytest.raises(MapError, match="unreadable poses"):
        read_poses(tmp_path / "bad.csv", ["a.jpg"])
