"""The pure helpers of benchmarks/weight_sync.py's cross-node model (no processes, no network)."""
import math

import pytest

from vlgrpo.benchmarks.weight_sync import fit_sync_model, predict_sync_s, tree_rounds


def test_tree_rounds_are_gloos_binomial_depth():
    assert [tree_rounds(n) for n in (1, 2, 3, 4, 7, 8, 63, 64)] == [1, 2, 2, 3, 3, 4, 6, 7]


def test_fit_recovers_the_model():
    a, eff = 0.02, 0.9
    pts = [(s, n, r, predict_sync_s(s, n, r, a, eff)) for s in (5e7, 5e8) for n in (1, 2, 3) for r in (1.25e8, 1.25e9)]
    got_a, got_eff = fit_sync_model(pts)
    assert got_a == pytest.approx(a, rel=1e-9) and got_eff == pytest.approx(eff, rel=1e-9)


def test_prediction_for_7b():
    # 14 GB to 64 nodes over 400 Gbit/s: 7 rounds of 0.28 s at eff 1
    assert predict_sync_s(14e9, 64, 50e9, 0.0, 1.0) == pytest.approx(7 * 0.28)
    assert math.isclose(predict_sync_s(14e9, 1, 50e9, 0.1, 0.5), 0.1 + 0.56)
