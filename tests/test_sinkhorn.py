"""The runtime's numpy Sinkhorn equals the official one (stress fixture), without torch."""
import numpy as np

from reference import fixture
from runtime.sinkhorn import log_sinkhorn, salad_aggregate


def test_numpy_sinkhorn_matches_official_stress_case():
    log_plan = log_sinkhorn(fixture("salad", "sinkhorn_stress_scores.npy"), 1.0, iterations=3)
    assert np.abs(log_plan - fixture("salad", "sinkhorn_stress_log_P.npy")).max() <= 1e-4
    np.testing.assert_allclose(np.exp(log_plan).sum(axis=1), 1.0, atol=1e-5)
    two = log_sinkhorn(fixture("salad", "sinkhorn_stress_scores.npy"), 1.0, iterations=2)
    assert np.abs(two - fixture("salad", "sinkhorn_stress_log_P.npy")).max() > 1e-2  # the test can fail


def test_aggregate_layout_and_norm():
    rng = np.random.default_rng(0)
    token, feats, scores = rng.standard_normal((2, 256)), rng.standard_normal((2, 100, 128)), rng.standard_normal((2, 64, 100))
    d = salad_aggregate(token.astype(np.float32), feats.astype(np.float32), scores.astype(np.float32), 1.0)
    assert d.shape == (2, 256 + 64 * 128)
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-5)
    # token block first: proportional to the normalised token
    t = token[0] / np.linalg.norm(token[0])
    np.testing.assert_allclose(d[0, :256] / np.linalg.norm(d[0, :256]), t, atol=1e-5)
