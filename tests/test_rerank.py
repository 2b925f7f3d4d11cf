import numpy as np
import pytest

from reference import fixture
from runtime.rerank import mnn_counts, rerank


def test_counts_match_official_pairs_from_stored_local_features():
    local = fixture("selavpr", "local_features.npy")  # query0, query1, db[0], db[3]
    official = fixture("selavpr", "rerank_mnn_counts_by_database_index.npy")
    for q in range(2):
        counts = mnn_counts(local[q], local[2:4])
        assert np.abs(counts - official[q, [0, 3]]).max() <= 2


def test_chunking_does_not_change_counts():
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((7, 9, 9, 16)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=-1, keepdims=True)
    whole = mnn_counts(feats[0], feats[1:])
    tiny = mnn_counts(feats[0], feats[1:], max_bytes=1)  # one candidate at a time
    np.testing.assert_array_equal(whole, tiny)
    assert mnn_counts(feats[0], feats[:1])[0] == 81  # an image matches itself everywhere


def test_mnn_definition_on_a_hand_made_case():
    q = np.eye(3, dtype=np.float32)  # 3 locations, orthogonal features
    cand = np.stack([q, q[[1, 0, 2]], np.tile(q[:1], (3, 1))])
    assert mnn_counts(q, cand).tolist() == [3, 3, 1]


def test_rerank_orders_by_count_and_keeps_ties_stable():
    assert rerank([10, 11, 12, 13], np.array([5, 9, 5, 1])).tolist() == [11, 10, 12, 13]
    with pytest.raises(ValueError):
        mnn_counts(np.zeros((4, 8), np.float32), np.zeros((2, 4, 9), np.float32))
