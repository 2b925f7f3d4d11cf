"""Stage statistics in bounded memory: percentiles within 1 % of numpy's exact ones."""
import numpy as np
import pytest

from runtime.timing import Histogram, StageTimer

RNG = np.random.default_rng(0)
DISTRIBUTIONS = {
    "lognormal": RNG.lognormal(0.0, 1.5, 50_000),
    "uniform": RNG.uniform(0.01, 50.0, 20_000),
    "bimodal (a stall tail)": np.concatenate([RNG.normal(5.0, 0.2, 9_000), RNG.normal(500.0, 5.0, 1_000)]),
    "sub-millisecond": RNG.uniform(0.002, 0.05, 5_000),
    "a few samples": RNG.uniform(1.0, 2.0, 7),
    "ties": np.repeat([1.0, 2.0, 3.0], [5, 3, 2]),
}


@pytest.mark.parametrize("name", list(DISTRIBUTIONS))
def test_percentiles_within_one_percent_of_exact(name):
    x = DISTRIBUTIONS[name]
    h = Histogram()
    for v in x:
        h.add(float(v))
    for q in (50, 95, 99):
        exact = float(np.percentile(x, q))
        assert abs(h.quantile(q / 100) - exact) <= 0.01 * exact, (q, h.quantile(q / 100), exact)
    s = h.summary()
    assert s["n"] == len(x) and s["max"] == x.max() and s["min"] == x.min()
    assert s["mean"] == pytest.approx(x.mean(), rel=1e-9)


def test_memory_stays_the_same_whatever_the_run_length():
    timer = StageTimer()
    timer.add("search", 1.0)
    size = sum(h.counts.nbytes for h in timer.stages.values())
    for v in RNG.lognormal(0.0, 2.0, 200_000):
        timer.add("search", float(v))
    assert sum(h.counts.nbytes for h in timer.stages.values()) == size < 64 * 1024
    assert timer.summary()["search"]["n"] == 200_001


def test_batch_times_are_shared_by_their_items_and_tables_list_stages_in_order():
    timer = StageTimer()
    timer.add("inference", 40.0, 4)  # one batch of four: four samples of 10 ms
    with timer.stage("decode"):
        pass
    s = timer.summary()
    assert list(s) == ["decode", "inference"]
    assert s["inference"]["n"] == 4 and s["inference"]["p50"] == pytest.approx(10.0)
    assert "| inference | 4 |" in timer.table() and "decode" not in timer.table(only=["inference"])
