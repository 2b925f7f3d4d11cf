"""Dataset formats and Recall@K, without torch."""
import pickle

import numpy as np
import pytest
from PIL import Image

from reference import DATA
from runtime.datasets import DatasetError, load_dataset, read_vprbench_ground_truth
from runtime.evaluate import recall_at_k


def test_vprbench_ground_truth_equals_our_json():
    ours = load_dataset(DATA / "vprbench_corridor", "ours")
    bench = load_dataset(DATA / "vprbench_corridor", "vprbench")
    assert [p.name for p in ours.database] == [p.name for p in bench.database]
    assert ours.positives == bench.positives and len(ours.queries) == 111
    assert ours.positives[0] == {0, 1, 2}


def test_gmberton_positives_within_25_m(tmp_path):
    for sub, names in (("database", ["@100.0@200.0@x@.jpg", "@130.0@200.0@x@.jpg", "@500@500@x@.jpg"]),
                       ("queries", ["@110.0@200.0@q@.jpg", "@900@900@q@.jpg"])):
        (tmp_path / sub).mkdir()
        for n in names:
            Image.new("RGB", (8, 8)).save(tmp_path / sub / n)
    ds = load_dataset(tmp_path)
    assert ds.format == "gmberton"
    assert ds.positives == [{0, 1}, set()]


def test_malicious_ground_truth_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    path = tmp_path / "ground_truth_new.npy"
    arr = np.empty(1, dtype=object)
    arr[0] = Evil()
    with open(path, "wb") as f:
        np.lib.format.write_array(f, arr, allow_pickle=True)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        read_vprbench_ground_truth(path)


def test_missing_dataset_is_named(tmp_path):
    with pytest.raises(DatasetError, match="no such dataset"):
        load_dataset(tmp_path / "nope")


def test_recall_at_k_equals_brute_force():
    rng = np.random.default_rng(0)
    ranked = np.array([rng.permutation(50)[:20] for _ in range(30)])
    positives = [set(rng.choice(50, 3, replace=False).tolist()) for _ in range(30)]
    got = recall_at_k(ranked, positives, (1, 5, 10, 20))
    for k in (1, 5, 10, 20):
        assert got[k] == np.mean([len(set(r[:k]) & p) > 0 for r, p in zip(ranked, positives)])
