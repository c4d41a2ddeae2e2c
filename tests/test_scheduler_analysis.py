"""SRP, SCH, Belady and the online policies on traces; trace files; the analyze report."""

import argparse
import functools
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moestream.scheduler.analysis import (analyze, format_report, knee, routing_load, srp,
                                          srp_from_histogram, window_histogram)
from moestream.scheduler.commands import register
from moestream.scheduler.policies import ConsistencyPolicy, LFUPolicy, LRUPolicy
from moestream.scheduler.simulate import (RoutingTrace, TraceFormatError, TraceRecorder, shuffle_trace,
                                          simulate_belady, simulate_policy, simulate_sch, synthetic_trace)

# ----------------------------------------------------------------------------- independent references


def brute_force_optimum(tokens, capacity):
    """Max hits over every eviction choice (sequential demand paging, pre-warmed)."""
    accesses = tuple(x for row in tokens for x in row)

    @functools.lru_cache(maxsize=None)
    def best(i, cache, seen):
        if i == len(accesses):
            return 0
        x = accesses[i]
        hit = int(x in cache or (x not in seen and len(cache) < capacity))
        seen2 = seen | {x}
        if x in cache:
            return hit + best(i + 1, cache, seen2)
        if len(cache) < capacity:
            return hit + best(i + 1, cache | {x}, seen2)
        return hit + max(best(i + 1, (cache - {v}) | {x}, seen2) for v in cache)

    return best(0, frozenset(), frozenset())


def sch_reference(tokens, capacity, m):
    """SCH recomputing the window counts from scratch at every access."""
    rows = [list(map(int, r)) for r in tokens]
    cache, seen, last, hits, clock = [], set(), {}, 0, 0
    for t, row in enumerate(rows):
        at_start = list(cache)
        done = []
        for x in row:
            hits += x in at_start or (x not in seen and len(cache) < capacity)
            seen.add(x)
            if x not in cache:
                if len(cache) == capacity:
                    window = [e for r in rows[t:t + m] for e in r]

                    def prio(e):
                        return (window.count(e) - done.count(e), last[e])
                    cache.remove(sorted(cache, key=prio)[0])
                cache.append(x)
            done.append(x)
            clock += 1
            last[x] = clock
    return hits


def srp_brute_force(tokens, n_experts, m):
    """Max micro-F1 over every segment router R in {0,1}^(windows x experts)."""
    T = len(tokens)
    f = [sum(int(e in tokens[p + i]) for i in range(m)) for p in range(T - m + 1) for e in range(n_experts)]
    best = 0.0
    for R in itertools.product([0, 1], repeat=len(f)):
        best = max(best, 2 * sum(r * v for r, v in zip(R, f)) / sum(m * r + v for r, v in zip(R, f)))
    return best


# ----------------------------------------------------------------------------- SRP


def test_srp_hand_computed():
    tokens = np.array([[0], [0], [1], [1]])
    hist = window_histogram(tokens, 2, 2)
    assert hist.tolist() == [2, 2, 2]
    r = srp_from_histogram(hist, 2)
    assert r.srp == pytest.approx(6 / 7) and r.alpha == 1 and r.size_ratio == pytest.approx(8 / 6)


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000), st.integers(3, 5), st.integers(1, 3))
def test_srp_matches_brute_force(seed, T, m):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 3, size=(T, 1))
    brute = srp_brute_force(tokens.tolist(), 3, m)
    assert srp_from_histogram(window_histogram(tokens, 3, m), m).srp == pytest.approx(brute)


def test_srp_pooling_and_shuffled_baseline():
    trace = synthetic_trace(n_layers=2, n_experts=16, top_k=2, n_sequences=4, seq_len=256, stickiness=0.8)
    assert max(routing_load(trace)["busiest_over_uniform_per_layer"]) <= 2.0  # balanced load
    observed, shuffled = srp(trace, 16), srp(shuffle_trace(trace, seed=1), 16)
    assert len(observed["per_layer"]) == 2
    assert observed["model"] > shuffled["model"] + 0.1
    assert all(o > s for o, s in zip(observed["per_layer"], shuffled["per_layer"]))
    assert min(observed["per_layer"]) - 1e-12 <= observed["model"] <= max(observed["per_layer"]) + 1e-12


# ----------------------------------------------------------------------------- SCH, Belady, online policies


def test_sch_lru_belady_hand_computed():
    tokens = [[0], [1], [2], [0], [1]]
    assert simulate_sch(tokens, 2, m=2) == 3
    assert simulate_policy(tokens, 2, LRUPolicy()) == 2
    assert simulate_belady(tokens, 2) == 3
    assert brute_force_optimum(tokens, 2) == 3


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 40), st.integers(1, 3), st.integers(0, 4), st.integers(1, 20))
def test_sch_matches_reference(seed, T, k, extra, m):
    rng = np.random.default_rng(seed)
    E = k + 1 + extra
    tokens = np.array([rng.choice(E, k, replace=False) for _ in range(T)])
    C = int(rng.integers(k, E + 1))
    assert simulate_sch(tokens, C, m) == sch_reference(tokens, C, m)


def _random_tokens(seed, T, k, E, sticky):
    if sticky:
        return synthetic_trace(1, E, k, 1, T, stickiness=0.85, seed=seed).layer_tokens(0, 0)
    rng = np.random.default_rng(seed)
    return np.array([rng.choice(E, k, replace=False) for _ in range(T)])


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 60), st.integers(1, 3), st.integers(0, 6), st.booleans())
def test_belady_never_beaten_by_online_policies(seed, T, k, extra, sticky):
    E = k + 1 + extra
    tokens = _random_tokens(seed, T, k, E, sticky)
    C = int(np.random.default_rng(seed + 1).integers(k, E + 1))
    bound = simulate_belady(tokens, C)
    hints = [list(tokens[t + 1]) if t + 1 < T else [] for t in range(T)]
    for policy, h in [(LRUPolicy(), None), (LFUPolicy(), None), (ConsistencyPolicy(window=4 * k), None),
                      (ConsistencyPolicy(window=16 * k), hints)]:
        assert simulate_policy(tokens, C, policy, hints=h) <= bound


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 7), st.integers(1, 2), st.integers(0, 3), st.booleans())
def test_belady_equals_brute_force_optimum(seed, T, k, extra, sticky):
    E = k + 1 + extra
    tokens = _random_tokens(seed, T, k, E, sticky).tolist()
    C = int(np.random.default_rng(seed + 2).integers(k, E + 1))
    assert simulate_belady(tokens, C) == brute_force_optimum(tokens, C)


def test_capacity_below_token_is_refused():
    with pytest.raises(ValueError):
        simulate_policy([[0, 1, 2]], 2, LRUPolicy())


# ----------------------------------------------------------------------------- trace files, recorder, report


def test_trace_roundtrip_and_validation(tmp_path):
    trace = synthetic_trace(n_layers=3, n_experts=8, top_k=2, n_sequences=2, seq_len=10)
    trace.save(tmp_path / "t.npz")
    back = RoutingTrace.load(tmp_path / "t.npz")
    assert back.n_layers == 3 and back.top_k == 2 and back.meta["synthetic"] is True
    assert all((a == b).all() for a, b in zip(trace.ids, back.ids))
    assert all(np.allclose(a, b) for a, b in zip(trace.weights, back.weights))
    with pytest.raises(TraceFormatError):
        RoutingTrace(1, 4, 2, [np.array([[[1, 1]]])])
    with pytest.raises(TraceFormatError):
        RoutingTrace(1, 4, 2, [np.array([[[1, 4]]])])
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(TraceFormatError):
        RoutingTrace.load(tmp_path / "other.npz")


def test_recorder_concatenates_prefill_and_decode():
    rec = TraceRecorder(n_layers=2, n_experts=4, top_k=2)
    rec.begin_sequence()
    for ids in ([[0, 1], [2, 3]], [[1, 2]]):  # prefill of 2 tokens, then one decode step
        for layer in range(2):
            rec(layer, np.array(ids), np.full((len(ids), 2), 0.5))
    rec.end_sequence()
    trace = rec.trace()
    assert trace.ids[0].shape == (2, 3, 2) and trace.ids[0][1, 2].tolist() == [1, 2]


def test_model_tokens_offsets_layers():
    trace = RoutingTrace(2, 4, 1, [np.array([[[1], [2]], [[3], [0]]])])
    assert trace.model_tokens(0).tolist() == [[1, 7], [2, 4]]


def test_knee():
    assert knee([1, 2, 3, 4, 5, 6], [0.2, 0.8, 0.9, 0.93, 0.95, 0.96]) == 2
    assert knee([1, 2], [0.5, 0.6]) == 1
    assert knee([1, 2, 3], [0.5, 0.5, 0.5]) == 1


def test_analyze_report_and_cli(tmp_path, capsys):
    trace = synthetic_trace(n_layers=2, n_experts=8, top_k=2, n_sequences=2, seq_len=40, stickiness=0.8)
    report = analyze(trace, segment_lengths=(4, 16))
    layer = report["hit_rate"]["layer"]
    assert report["settings"]["rhos"] == [1, 2, 3, 4]
    for name in ("lru", "lfu", "consistency"):
        assert all(h <= b + 1e-12 for h, b in zip(layer[name]["observed"], layer["belady"]["observed"]))
    assert layer["belady"]["observed"][-1] == pytest.approx(1.0)  # rho = E/k holds every expert
    assert set(report["srp"]["16"]) == {"observed", "shuffled"}
    assert 1 <= report["recommendation"]["rho"] <= 4
    assert "SRP" in format_report(report)

    trace.save(tmp_path / "t.npz")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["analyze", str(tmp_path / "t.npz"), "--out", str(tmp_path / "out"),
                              "--segment-lengths", "4", "--rho", "1", "2", "--scope", "layer", "--no-plot"])
    assert args.func(args) == 0
    assert "recommended cache" in capsys.readouterr().out
    assert (tmp_path / "out" / "report.json").exists()
