"""Match decisions (no torch): the rules, the precision-recall sweep against brute force, and the
rule saved beside a map."""

import numpy as np
import pytest

from runtime.decisions import ACCEPTANCE_KEY, Decider, DecisionError, DecisionRule, load_acceptance, save_acceptance
from runtime.errors import UserError
from runtime.evaluate import operating_points, plot_precision_recall, precision_recall


def test_min_score_and_consistency_rules():
    d = Decider(DecisionRule(min_score=0.5, consistency=3, window=2))
    got = [d.decide(i, s) for i, s in [(10, 0.9), (11, 0.9), (13, 0.9), (14, 0.4), (15, 0.9), (16, 0.9), (17, 0.9),
                                       (40, 0.9), (None, None)]]
    assert [g.accepted for g in got] == [False, False, True, False, False, False, True, False, False]
    assert [g.reason for g in got] == ["inconsistent", "inconsistent", "ok", "low_score", "inconsistent",
                                      "inconsistent", "ok", "inconsistent", "no_place"]
    assert [g.consistent for g in got] == [1, 2, 3, 0, 1, 2, 3, 1, 0]  # a weak frame or a jump restarts the chain
    assert all(Decider().decide(i, -1.0).accepted for i in range(3))  # default: every place is accepted


@pytest.mark.parametrize("bad", [dict(consistency=0), dict(window=-1), dict(min_score=float("nan")), dict(consistency=1.5)])
def test_bad_rules_are_user_errors(bad):
    with pytest.raises(UserError):
        DecisionRule(**bad)


def _brute_force(scores, places, correct, has_match, rule, t):
    d = Decider(DecisionRule(float(t), rule.consistency, rule.window))
    acc = np.array([d.decide(int(p), float(s)).accepted for p, s in zip(places, scores)])
    tp = int((acc & correct).sum())
    return (tp / acc.sum() if acc.sum() else 1.0), tp / max(has_match.sum(), 1), int(acc.sum())


@pytest.mark.parametrize("consistency", [1, 3])
def test_precision_recall_sweep_equals_brute_force(consistency):
    rng = np.random.default_rng(1)
    n = 300
    places = np.cumsum(rng.integers(0, 3, n))  # a route: the best place moves forward
    correct = rng.random(n) < 0.7
    scores = np.round(np.where(correct, rng.normal(0.7, 0.1, n), rng.normal(0.5, 0.1, n)), 3)  # ties on purpose
    has_match = correct | (rng.random(n) < 0.5)
    rule = DecisionRule(consistency=consistency, window=2)
    pr = precision_recall(scores, places, correct, has_match, rule)
    assert pr["thresholds"] == sorted(set(scores.tolist()))
    for t, p, r, a in zip(pr["thresholds"], pr["precision"], pr["recall"], pr["accepted"]):
        bp, br, ba = _brute_force(scores, places, correct, has_match, rule, t)
        assert (p, r, a) == pytest.approx((bp, br, ba))
    points = operating_points(pr, 0.9)
    perfect = [(r, t) for t, p, r, a in zip(pr["thresholds"], pr["precision"], pr["recall"], pr["accepted"]) if p == 1.0 and a]
    assert points["recall_at_100_precision"] == max(perfect)[0]
    ok = [(r, t) for t, p, r, a in zip(pr["thresholds"], pr["precision"], pr["recall"], pr["accepted"]) if p >= 0.9 and a]
    assert (points["at_target"]["recall"], points["at_target"]["threshold"]) == max(ok)
    assert points["at_target"]["precision"] >= 0.9


def test_no_threshold_reaching_the_target_is_said():
    pr = precision_recall([0.9, 0.8], [0, 1], [False, False], [True, True])
    points = operating_points(pr, 0.99)
    assert points["at_target"] is None and points["recall_at_100_precision"] == 0.0


def test_pr_curve_png(tmp_path):
    pytest.importorskip("matplotlib")
    pr = precision_recall([0.9, 0.8, 0.7, 0.6], [0, 1, 2, 3], [True, True, False, True], [True] * 4)
    path = tmp_path / "pr.png"
    assert plot_precision_recall(pr, operating_points(pr, 0.99), path, "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rule_saved_with_a_map_round_trips_and_bad_entries_are_named(tmp_path):
    from runtime.maps import load_map, save_map, set_metadata

    identity = {"model": "tiny", "dim": 3, "preprocessing": {}, "batch_mode": "independent", "weights": "w",
                "precision": "fp32", "onnx_sha256": "x"}
    folder = tmp_path / "map"
    rows = np.eye(3, dtype=np.float32)
    assert load_acceptance(save_map(folder, rows, ["a", "b", "c"], identity)) is None
    rule = DecisionRule(0.61, 3, 2)
    version = save_acceptance(folder, rule, {"precision": 0.99, "recall": 0.4}, {"model": "tiny", "dim": 3})
    place_map = load_map(folder)
    assert place_map.version == version and len(place_map) == 3  # a new version of the same places
    saved = load_acceptance(place_map)
    assert saved["rule"] == rule and saved["measured"]["recall"] == 0.4 and saved["bundle"]["model"] == "tiny"
    assert load_acceptance(save_map(folder, rows, ["a", "b", "c"], identity)) is None  # a rebuilt map has none
    for entry in ({"rule": {"min_score": "x"}}, {"rule": {"min_score": 0.5, "consistency": 0, "window": 1}, "bundle": {}}):
        set_metadata(folder, {ACCEPTANCE_KEY: entry})
        with pytest.raises(DecisionError, match="saved decision rule"):
            load_acceptance(load_map(folder))
