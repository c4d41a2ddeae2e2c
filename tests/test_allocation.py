"""Bit allocation: budget respected, exact solvers match brute force, greedy is close, parsing."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moestream.convert.allocation import (
    allocate, allocate_experts, bytes_per_level, mc_importance, parse_size_budget,
)
from moestream.convert.errors import BudgetError


def instance(seed: int, n: int, levels: int = 3):
    rng = np.random.default_rng(seed)
    nbytes = np.sort(rng.integers(1, 20, size=(n, levels)), axis=1) * 64
    cost = np.sort(rng.random((n, levels)), axis=1)[:, ::-1] * rng.random((n, 1))
    lo, hi = nbytes.min(axis=1).sum(), nbytes.max(axis=1).sum()
    budget = int(rng.integers(lo, hi + 1))
    return cost, nbytes, budget


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 100_000), n=st.integers(1, 6), levels=st.integers(1, 4))
def test_exact_solvers_match_brute_force(seed, n, levels):
    cost, nbytes, budget = instance(seed, n, levels)
    brute = allocate(cost, nbytes, budget, method="brute")
    for method in ("milp", "dp"):
        got = allocate(cost, nbytes, budget, method=method)
        assert got.total_bytes <= budget
        assert got.objective == pytest.approx(brute.objective, rel=1e-9, abs=1e-12), method
    greedy = allocate(cost, nbytes, budget, method="greedy")
    assert greedy.total_bytes <= budget
    assert greedy.objective >= brute.objective - 1e-12


def test_greedy_is_near_optimal_on_typical_instances():
    # many experts, identical byte sizes per level (the real case): greedy within 2% of MILP
    rng = np.random.default_rng(0)
    n = 200
    nbytes = np.array([3_000, 5_000, 8_000])
    err = np.stack([np.full(n, 0.25), np.full(n, 0.02), np.full(n, 0.001)], 1) * rng.lognormal(0, 0.3, (n, 1))
    imp = mc_importance(rng.integers(1, 100, n).astype(float), rng.random(n))
    budget = int(n * 5_500)
    exact = allocate(imp[:, None] * err, nbytes, budget, method="milp")
    greedy = allocate(imp[:, None] * err, nbytes, budget, method="greedy")
    assert exact.optimal and exact.total_bytes <= budget and greedy.total_bytes <= budget
    assert greedy.objective <= exact.objective * 1.02


def test_more_important_experts_get_more_bits():
    freq = np.array([100.0, 1.0, 50.0, 2.0])
    gate = np.array([60.0, 0.5, 30.0, 1.0])
    errors = np.tile([0.3, 0.05, 0.01], (4, 1))
    alloc = allocate_experts(freq, gate, errors, np.array([2, 4, 8]), budget=2 * 8 + 2 * 2)
    assert alloc.choice.tolist() == [2, 0, 2, 0]


def test_budget_below_minimum_raises_with_minimum():
    with pytest.raises(BudgetError, match="at least that"):
        allocate(np.ones((3, 2)), np.array([10, 20]), budget=29)
    with pytest.raises(ValueError, match="unknown method"):
        allocate(np.ones((1, 2)), np.array([1, 2]), budget=5, method="magic")


def test_importance_is_normalised_per_layer():
    imp = mc_importance(np.array([1.0, 3.0, 10.0, 30.0]), np.array([1.0, 1.0, 5.0, 5.0]),
                        groups=np.array([0, 0, 1, 1]))
    np.testing.assert_allclose(imp[:2], imp[2:])
    np.testing.assert_allclose(imp[:2], [0.25 * 0.5 ** 1.5, 0.75 * 0.5 ** 1.5])


def test_parse_size_budget():
    assert parse_size_budget("4bpw", 1000) == 500
    assert parse_size_budget("3.5 bpw", 16) == 7
    assert parse_size_budget("12GB", 1) == 12_000_000_000
    assert parse_size_budget("1MiB", 1) == 1 << 20
    assert parse_size_budget("4096", 1) == 4096
    with pytest.raises(ValueError, match="3.5bpw"):
        parse_size_budget("lots", 1)


def test_bytes_per_level():
    assert bytes_per_level([2.1875, 4.1875], 1024).tolist() == [280, 536]
