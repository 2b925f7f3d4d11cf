"""FAISS place maps: index choice, search quality, segments and versions, the writer lock and
readers' leases, identity, verification. No torch."""
import json
import os
import subprocess
import sys

import faiss
import numpy as np
import pytest

from reference import ROOT
from runtime.maps import (
    MapError,
    add_to_map,
    check_compatible,
    choose_index,
    load_map,
    map_info,
    open_add,
    open_build,
    read_poses,
    save_map,
    set_metadata,
    verify_map,
)
from runtime.maps.index import RETRAIN_GROWTH

ID = {"model": "m", "dim": 64, "preprocessing": {"size": [28, 28]}, "batch_mode": "independent",
      "weights": "checkpoint sha256:aaaa", "precision": "fp32", "onnx_sha256": "x"}


def clustered(n, d, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 20), d))
    x = centres[rng.integers(0, len(centres), n)] + 0.6 * rng.standard_normal((n, d)) / np.sqrt(d) * 3
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def noisy(x, idx, seed=1):
    rng = np.random.default_rng(seed)
    q = x[idx] + 0.02 * rng.standard_normal((len(idx), x.shape[1])).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def test_index_choice_follows_size_and_budget():
    assert choose_index(1000, 8448, None) == "flat"
    assert choose_index(200_000, 512, None) == "ivfpq"
    assert choose_index(5000, 8448, budget=5000 * 8448 * 2) == "ivfpq"  # flat over budget
    assert choose_index(500, 8448, budget=500 * 8448 * 2) == "sqfp16"  # too few to train IVF-PQ
    assert choose_index(1_000_000, 8448, budget=1 << 30) == "ivfpq"
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
    src = np.random.default_rng(1).choice(n, 200, replace=False)
    q = noisy(x, src)
    exact = np.argmax(q @ x.T, axis=1)
    scores, ids = m.search(q, 5)
    assert (ids[:, 0] == exact).mean() >= min_recall
    assert np.all(np.diff(scores, axis=1) <= 1e-5)  # best first


@pytest.mark.parametrize("kind", ["ivfpq", "hnsw", "flat"])
def test_add_writes_a_segment_and_extends_the_index_without_rewriting_the_map(tmp_path, kind):
    x = clustered(4000, 64)
    names = [f"route/{i:05d}.jpg" for i in range(4000)]
    folder = tmp_path / "map"
    m1 = save_map(folder, x[:3000], names[:3000], ID, index_type=kind)
    first = folder / "segments" / "s000001" / "descriptors.f32"
    before = os.stat(first)
    training = m1.meta["index"]["training"]
    m1.close()
    old = load_map(folder)
    m2 = add_to_map(old, x[3000:], names[3000:])
    assert m2.version == "v000002" and len(m2) == 4000 and m2.meta["count"] == 4000
    assert [s["name"] for s in m2.meta["segments"]] == ["s000001", "s000002"]
    after = os.stat(first)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # never rewritten
    if kind == "ivfpq":  # not retrained: the new segment is encoded with the existing training
        assert m2.meta["index"]["training"] == training and "s000002.npz" in m2.meta["index"]["files"]
    src = np.arange(3000, 4000, 5)
    _, ids = m2.search(noisy(x, src), 1)
    assert (ids[:, 0] == src).mean() >= 0.9
    assert m2.names[3001] == "route/03001.jpg"
    assert (folder / "versions" / "v000001.json").exists()  # ``old`` still reads it


def test_ivf_uses_an_hnsw_coarse_quantizer_for_large_maps(tmp_path, monkeypatch):
    import faiss

    import runtime.maps.index as index_module
    monkeypatch.setattr(index_module, "HNSW_COARSE_LISTS", 8)  # as for the largest maps, on a small one
    x = clustered(3000, 64)
    m = save_map(tmp_path / "m", x, [str(i) for i in range(3000)], ID, index_type="ivfpq")
    assert m.meta["index"]["params"]["coarse"] == "hnsw"
    assert isinstance(faiss.downcast_index(faiss.extract_index_ivf(m.index).quantizer), faiss.IndexHNSWFlat)
    src = np.arange(0, 3000, 15)
    _, ids = m.search(noisy(x, src), 1)
    assert (ids[:, 0] == src).mean() >= 0.9


def test_ivfpq_is_retrained_when_the_map_has_grown_enough(tmp_path):
    x = clustered(1000 * RETRAIN_GROWTH, 32)
    ident = {**ID, "dim": 32}
    m = save_map(tmp_path / "m", x[:1000], [f"a{i}" for i in range(1000)], ident, index_type="ivfpq")
    first = m.meta["index"]["training"]
    m = add_to_map(m, x[1000:], [f"b{i}" for i in range(len(x) - 1000)])
    assert m.meta["index"]["training"] != first and m.meta["index"]["trained_on"] == len(x)
    set_metadata(tmp_path / "m", {})  # the first map object is gone: its training is collected
    assert not (tmp_path / "m" / "index" / first).exists()
    _, ids = m.search(noisy(x, np.arange(0, len(x), 40)), 1)
    assert (ids[:, 0] == np.arange(0, len(x), 40)).mean() >= 0.9


def test_auto_switches_from_flat_to_ivfpq_when_over_budget(tmp_path):
    x = clustered(1500, 64)
    m = save_map(tmp_path / "m", x[:500], [f"a{i}" for i in range(500)], ID, memory_budget=1000 * 64 * 4)
    assert m.kind == "flat"
    m = add_to_map(m, x[500:], [f"b{i}" for i in range(1000)])
    assert m.kind == "ivfpq" and len(m) == 1500


def test_versions_poses_checksums_and_verify(tmp_path):
    x = clustered(300, 64)
    names = [f"a{i}.png" for i in range(300)]
    folder = tmp_path / "map"
    m1 = save_map(folder, x[:200], names[:200], ID, poses=np.arange(400, dtype=float).reshape(200, 2))
    assert (folder / "CURRENT").read_text().strip() == "v000001"
    m2 = add_to_map(m1, x[200:], names[200:], poses=np.zeros((100, 2)))
    m1.close()
    loaded = load_map(folder)
    _, ids = loaded.search(x[250:251], 1)
    assert loaded.names[ids[0, 0]] == "a250.png" and loaded.poses.shape == (300, 2)
    with pytest.raises(MapError, match="already in the map"):
        add_to_map(loaded, x[:1], ["a0.png"], poses=np.zeros((1, 2)))
    with pytest.raises(MapError, match="poses must be given"):
        add_to_map(loaded, x[:1], ["new.png"])
    m2.close()
    loaded.close()
    assert verify_map(folder)[1] == []
    # a damaged descriptor store keeps its size: loading (quick) reads it, verify names it
    store = folder / "segments" / "s000002" / "descriptors.f32"
    data = bytearray(store.read_bytes())
    data[-3] ^= 0xFF
    store.write_bytes(bytes(data))
    version, problems, _ = verify_map(folder)
    assert len(problems) == 1 and "segment s000002" in problems[0] and "descriptors.f32" in problems[0]
    assert "restore" in problems[0] and "rebuild" in problems[0]
    with pytest.raises(MapError, match="s000002.*sha256"):
        load_map(folder, verify="full")
    # names are small: hashed on every load
    names_file = folder / "segments" / "s000001" / "names.jsonl"
    names_file.write_text(names_file.read_text().replace("a1.png", "a7.png", 1))
    with pytest.raises(MapError, match="s000001/names.jsonl: segment s000001 is corrupted"):
        load_map(folder)
    store.unlink()
    with pytest.raises(MapError, match="descriptors.f32: missing .segment s000002"):
        load_map(folder, verify="none")


def test_bad_descriptors_and_metadata_are_refused_and_the_map_is_kept(tmp_path):
    good = save_map(tmp_path / "m", clustered(10, 64), [f"g{i}" for i in range(10)], ID)
    good.close()
    x = clustered(10, 64)
    x[3, 5] = np.nan
    with pytest.raises(MapError, match="NaN or Inf .*n3"):
        add_to_map(load_map(tmp_path / "m"), x, [f"n{i}" for i in range(10)])
    assert len(load_map(tmp_path / "m")) == 10 and not list((tmp_path / "m" / "segments").glob(".*"))
    with pytest.raises(MapError, match="NaN or Inf"):
        save_map(tmp_path / "new", x, [f"n{i}" for i in range(10)], ID)
    assert not (tmp_path / "new" / "CURRENT").exists()
    with pytest.raises(MapError, match="unique"):
        save_map(tmp_path / "u", clustered(2, 64), ["a", "a"], ID)
    with pytest.raises(MapError, match="64-D"):
        save_map(tmp_path / "d", clustered(2, 32), ["a", "b"], ID)
    with pytest.raises(MapError, match="not a map"):
        load_map(tmp_path / "nothing")


def test_output_that_is_not_a_map_is_refused_and_replacing_a_map_keeps_other_files(tmp_path):
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(MapError, match="exists and is not a map"):
        open_build(other, ID)
    assert (other / "holiday.jpg").read_bytes() == b"x" and not (other / "LOCK").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(MapError, match="not a folder"):
        open_build(tmp_path / "file", ID)
    folder = tmp_path / "map"
    save_map(folder, clustered(20, 64), [f"a{i}" for i in range(20)], ID).close()
    (folder / "README.txt").write_text("notes kept beside the map")
    m = save_map(folder, clustered(30, 64, seed=3), [f"b{i}" for i in range(30)], ID)
    assert len(m) == 30 and m.names[0] == "b0"
    assert (folder / "README.txt").read_text() == "notes kept beside the map"
    assert sorted(p.name for p in (folder / "segments").iterdir()) == ["s000002"]  # the replaced content is gone


def test_one_writer_at_a_time_fails_at_once_naming_the_holder(tmp_path):
    folder = tmp_path / "m"
    save_map(folder, clustered(20, 64), [f"a{i}" for i in range(20)], ID).close()
    with open_add(folder) as w:
        w.append(["x"], clustered(1, 64))
        code = ("import sys; sys.path.insert(0, %r)\n"
                "from runtime.maps import open_add, MapError\n"
                "try:\n    open_add(%r)\nexcept MapError as e:\n    print(e)\n") % (str(ROOT), str(folder))
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert f"another process (PID {os.getpid()}) is writing this map" in proc.stdout
        assert len(proc.stdout.strip().splitlines()) == 1
        reader = load_map(folder)  # readers never wait for the writer
        assert len(reader) == 20
        w.commit()
    assert len(load_map(folder)) == 21


def test_a_reader_keeps_its_version_while_writers_replace_the_map(tmp_path):
    folder = tmp_path / "m"
    x = clustered(50, 64)
    save_map(folder, x, [f"a{i}" for i in range(50)], ID).close()
    reader = load_map(folder)
    held = folder / "segments" / "s000001"
    save_map(folder, clustered(40, 64, seed=5), [f"b{i}" for i in range(40)], ID).close()  # a rebuild
    set_metadata(folder, {"threshold": 0.5})
    assert held.is_dir() and (folder / "versions" / "v000001.json").exists()  # leased: kept
    _, ids = reader.search(x[7:8], 1)
    assert reader.names[ids[0, 0]] == "a7" and np.asarray(reader.descriptors[7:8]).shape == (1, 64)
    reader.close()
    set_metadata(folder, {"threshold": 0.6})  # the next writer collects what nobody reads
    assert not held.exists() and not (folder / "versions" / "v000001.json").exists()
    m = load_map(folder)
    assert m.metadata == {"threshold": 0.6} and len(m) == 40 and map_info(m)["segments"] == 1


def test_map_from_other_weights_is_refused_naming_both(tmp_path):
    with pytest.raises(MapError, match="other weights.*map 'checkpoint sha256:aaaa'.*bundle 'random weights"):
        check_compatible(ID, {**ID, "weights": "random weights sha256:bbbb"}, tmp_path)
    with pytest.raises(MapError, match="model: map 'm', bundle 'other'"):
        check_compatible(ID, {**ID, "model": "other"}, tmp_path)
    assert check_compatible(ID, {**ID, "precision": "fp16", "onnx_sha256": "y"}, tmp_path) == []  # same weights
    warnings = check_compatible(ID, {**ID, "precision": "int8"}, tmp_path)
    assert len(warnings) == 1 and "99.1%" in warnings[0]
    folder = tmp_path / "m"
    save_map(folder, clustered(5, 64), list("abcde"), ID).close()
    with pytest.raises(MapError, match="other weights"):
        open_add(folder, {**ID, "weights": "checkpoint sha256:cccc"})
    assert not list((folder / "segments").glob(".*"))
    open_add(folder, ID).abort()  # the lock was released by the refusal


def test_float32_store_is_exact_and_float16_within_rounding(tmp_path):
    x = clustered(100, 64)
    m32 = save_map(tmp_path / "a", x, [str(i) for i in range(100)], ID, store_dtype="float32")
    np.testing.assert_array_equal(np.asarray(m32.descriptors), x)
    m16 = save_map(tmp_path / "b", x, [str(i) for i in range(100)], ID, store_dtype="float16")
    assert np.abs(np.asarray(m16.descriptors, dtype=np.float32) - x).max() < 1e-3
    assert json.loads((tmp_path / "b" / "versions" / "v000001.json").read_text())["store_dtype"] == "float16"


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


def test_coarse_quantizer_is_flat_up_to_8192_lists_and_hnsw_beyond():
    from runtime.maps.index import index_bytes, ivf_params
    assert ivf_params(1_000_000, 8448)["nlist"] == 4096 and ivf_params(1_000_000, 8448)["coarse"] == "flat"
    assert ivf_params(4_000_000, 8448)["nlist"] == 8192 and ivf_params(4_000_000, 8448)["coarse"] == "flat"
    assert ivf_params(20_000_000, 8448)["nlist"] == 16384 and ivf_params(20_000_000, 8448)["coarse"] == "hnsw"
    # 1M: codes and ids 72 MB, PCA 8.7 MB, centroids 4 MB (no precomputed distance tables)
    assert 80e6 < index_bytes("ivfpq", 1_000_000, 8448) < 90e6


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_ivfpq_search_reranks_its_shortlist_exactly_from_the_store(tmp_path, dtype):
    x = clustered(4000, 64)
    folder = tmp_path / "m"
    save_map(folder, x[:2500], [f"a{i}" for i in range(2500)], ID, index_type="ivfpq", store_dtype=dtype).close()
    m = add_to_map(load_map(folder), x[2500:], [f"b{i}" for i in range(1500)])  # two segments
    ivf = faiss.downcast_index(faiss.extract_index_ivf(m.index))
    assert ivf.precomputed_table.size() == 0 and ivf.use_precomputed_table != 1  # tables computed per query
    rows = np.asarray(m.descriptors, dtype=np.float32)  # what the store holds (float16 rounding included)
    q = noisy(x, np.arange(0, 4000, 37), seed=3)
    for k in (1, 10, 300):  # 300: a shortlist longer than the scorer's first buffer
        scores, ids = m.search(q, k)
        _, cand = m.index.search(q, max(100, k))
        for i in range(len(q)):
            short = np.unique(cand[i][cand[i] >= 0])
            exact = rows[short] @ q[i]
            order = np.argsort(-exact, kind="stable")[:k]
            np.testing.assert_allclose(scores[i], exact[order], rtol=0, atol=1e-5)
            np.testing.assert_allclose(rows[ids[i]] @ q[i], scores[i], rtol=0, atol=1e-5)  # ids match their scores
            assert set(ids[i]) <= set(short)
    # a batch is searched like its queries one by one
    one = np.concatenate([m.search(q[i:i + 1], 5)[1] for i in range(len(q))])
    np.testing.assert_array_equal(m.search(q, 5)[1], one)


def test_tune_sets_the_search_depth_of_this_reader_only(tmp_path):
    x = clustered(3000, 64)
    folder = tmp_path / "m"
    save_map(folder, x, [f"a{i}" for i in range(3000)], ID, index_type="ivfpq").close()
    m, other = load_map(folder), load_map(folder)
    ivf = faiss.extract_index_ivf(m.index)
    q = noisy(x, np.arange(0, 3000, 97), seed=5)
    m.tune(nprobe=ivf.nlist, shortlist=400)
    assert ivf.nprobe == ivf.nlist and faiss.extract_index_ivf(other.index).nprobe == 16
    _, ids = m.search(q, 10)
    _, cand = m.index.search(q, 400)  # every list probed: the exact re-rank sees 400 rows a query
    rows = np.asarray(m.descriptors, dtype=np.float32)
    for i in range(len(q)):
        short = np.unique(cand[i][cand[i] >= 0])
        assert len(short) == 400
        np.testing.assert_array_equal(ids[i], short[np.argsort(-(rows[short] @ q[i]), kind="stable")[:10]])
    assert other.meta["index"]["params"]["shortlist"] == 100  # the other reader keeps the map's defaults
    with pytest.raises(MapError, match="nprobe must be a positive integer"):
        m.tune(nprobe=0)
    flat = tmp_path / "f"
    save_map(flat, x[:500], [f"a{i}" for i in range(500)], ID).close()
    with pytest.raises(MapError, match="flat map has no nprobe"):
        load_map(flat).tune(nprobe=8)


def seen_and_unseen(places, d, traversals=4, seed=0):
    """A map of ``places`` seen in ``traversals`` passes, each under its own appearance (a direction
    shared by every view of the pass), and one view of every place under an unseen appearance."""
    rng = np.random.default_rng(seed)

    def unit(a):
        return a / np.linalg.norm(a, axis=-1, keepdims=True)
    lat, looks, mean = unit(rng.standard_normal((places, d))), unit(rng.standard_normal((traversals + 1, d))), \
        unit(rng.standard_normal(d))

    def views(t):
        return unit(lat + mean + 0.5 * looks[t] + 0.3 * unit(rng.standard_normal((places, d)))).astype(np.float32)
    return np.concatenate([views(t) for t in range(traversals)]), views(traversals)


def test_whitened_pca_has_unit_variance_along_the_same_axes():
    from runtime.maps.index import pca_transform
    x, _ = seen_and_unseen(600, 384)
    plain, white = pca_transform(x, 32), pca_transform(x, 32, whiten=True)
    a, b = (faiss.vector_to_array(t.A).reshape(32, 384) for t in (plain, white))
    np.testing.assert_allclose(a @ a.T, np.eye(32), atol=1e-4)  # plain: orthonormal axes
    cos = np.abs(np.sum(a * b, 1)) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.999  # the same axes, rescaled
    y, z = plain.apply(x), white.apply(x)
    np.testing.assert_allclose(z.var(axis=0), 1.0, rtol=0.05)  # the randomized SVD's variances, within 3 %
    assert y.var(axis=0)[:3].min() > 5 * y.var(axis=0)[3:].max()  # the 4 appearances span 3 dominant axes
    full = pca_transform(x[:, :64], 64, whiten=True)  # no reduction: every axis, still whitened
    np.testing.assert_allclose(full.apply(x[:, :64]).var(axis=0), 1.0, rtol=0.02)


def test_ivfpq_finds_places_under_an_unseen_appearance(tmp_path):
    # unwhitened, k-means split this map by traversal and a query under the fifth appearance found
    # its exact top-1 in the 4 nearest lists for 0.70 of the places (0.96 in 16); whitened: 1.00
    x, q = seen_and_unseen(500, 384)
    m = save_map(tmp_path / "m", x, [f"t{i // 500}/{i % 500}" for i in range(len(x))], {**ID, "dim": 384},
                 index_type="ivfpq")
    assert m.meta["index"]["params"]["whiten"] is True
    exact = np.argmax(q @ x.T, axis=1)
    m.tune(nprobe=4)
    _, ids = m.search(q, 1)
    assert (ids[:, 0] == exact).mean() >= 0.97


def test_a_map_trained_before_whitening_loads_searches_and_grows_as_before(tmp_path, monkeypatch):
    import runtime.maps.index as index_module
    new_params = index_module.ivf_params

    def old_params(n, d):  # what maps were trained with before whitening
        p = {k: v for k, v in new_params(n, d).items() if k != "whiten"}
        return {**p, "nprobe": min(p["nlist"], 32)}
    x = np.concatenate([clustered(3000, 64), clustered(500, 64, seed=7)])  # the 500 added: other places
    folder = tmp_path / "m"
    monkeypatch.setattr(index_module, "ivf_params", old_params)
    save_map(folder, x[:3000], [f"a{i}" for i in range(3000)], ID, index_type="ivfpq").close()
    monkeypatch.undo()
    m = load_map(folder)
    params = m.meta["index"]["params"]
    assert "whiten" not in params and faiss.extract_index_ivf(m.index).nprobe == 32
    pre = faiss.downcast_VectorTransform(faiss.downcast_index(m.index).chain.at(0))
    np.testing.assert_array_equal(faiss.vector_to_array(pre.A).reshape(64, 64), np.eye(64))  # as trained
    src = np.arange(0, 3000, 29)
    before = m.search(noisy(x, src), 5)
    assert (before[1][:, 0] == src).mean() >= 0.9
    training = m.meta["index"]["training"]
    m = add_to_map(m, x[3000:], [f"b{i}" for i in range(500)])  # no retrain: the old training encodes it
    assert m.meta["index"]["training"] == training and m.meta["index"]["params"] == params
    after = m.search(noisy(x, src), 5)
    np.testing.assert_array_equal(after[1], before[1])
    added = np.arange(3000, 3500, 7)
    _, ids = m.search(noisy(x, added), 1)
    assert (ids[:, 0] == added).mean() >= 0.9


def test_store_rows_are_read_in_runs_across_segments(tmp_path):
    from runtime.maps.search import StoreFiles
    x = clustered(300, 64)
    folder = tmp_path / "m"
    save_map(folder, x[:100], [f"a{i}" for i in range(100)], ID, store_dtype="float16").close()
    m = add_to_map(load_map(folder), x[100:], [f"b{i}" for i in range(200)])
    paths = [folder / "segments" / s["name"] / "descriptors.f16" for s in m.meta["segments"]]
    store = StoreFiles(paths, [100, 200], 64 * 2)
    ids = np.array([0, 1, 2, 50, 98, 99, 100, 101, 180, 299])
    assert [(s, first, b - a) for s, first, a, b in store.runs(ids)] == [
        (0, 0, 3), (0, 50, 1), (0, 98, 2), (1, 0, 2), (1, 80, 1), (1, 199, 1)]  # runs never cross segments
    out = np.zeros((len(ids), 64 * 2), np.uint8)
    store.read(ids, out)
    np.testing.assert_array_equal(out.view(np.float16), np.asarray(m.descriptors)[ids])


def test_a_store_truncated_after_loading_is_named_when_searched(tmp_path):
    x = clustered(2000, 64)
    m = save_map(tmp_path / "m", x, [str(i) for i in range(2000)], ID, index_type="ivfpq")
    store = tmp_path / "m" / "segments" / "s000001" / "descriptors.f32"
    os.truncate(store, 64 * 4 * 10)  # rows beyond the 10th are gone
    with pytest.raises(MapError, match="descriptors.f32: .* bytes where .* expected .*map verify"):
        m.search(x[1500:1501], 5)


def test_small_batches_leave_faiss_threads_as_they_were(tmp_path):
    import faiss
    m = save_map(tmp_path / "m", clustered(2000, 64), [str(i) for i in range(2000)], ID, index_type="ivfpq")
    before = faiss.omp_get_max_threads()
    m.search(clustered(3, 64, seed=4), 5)
    m.search(clustered(20, 64, seed=4), 5)
    assert faiss.omp_get_max_threads() == before
