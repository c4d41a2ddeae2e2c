"""Budget parsing and the memory planner."""

import pytest

from moestream.scheduler.budget import (GIB, MIB, BudgetTooSmallError, MemorySpecError, align_up,
                                        parse_memory)
from moestream.scheduler.planner import min_arena_bytes, plan_memory


@pytest.mark.parametrize("spec,expected", [
    ("6GB", 6 * 10**9), ("6GiB", 6 * GIB), ("6gib", 6 * GIB), ("6G", 6 * GIB), ("512MB", 512 * 10**6),
    ("512 MiB", 512 * MIB), ("1.5GiB", int(1.5 * GIB)), ("1234", 1234), (4096, 4096),
])
def test_parse_memory_units(spec, expected):
    assert parse_memory(spec) == expected


def test_parse_memory_percent_of_total_ram():
    assert parse_memory("75%", total_ram=8 * GIB) == 6 * GIB
    assert parse_memory("100%", total_ram=1000) == 1000


@pytest.mark.parametrize("bad", ["", "six GB", "6XB", "0", "-1GB", "150%", "0%", True])
def test_parse_memory_rejects(bad):
    with pytest.raises(MemorySpecError):
        parse_memory(bad)


def _plan(budget, **kw):
    args = dict(resident_bytes=100 * MIB, kv_bytes=10 * MIB, workspace_bytes=5 * MIB,
                io_buffer_bytes=1 * MIB, expert_level_bytes=[3 * MIB + 5, MIB + 7],
                experts_per_token_per_layer=2, n_layers=4, budget=budget)
    args.update(kw)
    return plan_memory(**args)


def test_minimum_is_exact_and_refused_below():
    arena_min = 2 * 4 * align_up(MIB + 7, 4096) + 4096
    assert min_arena_bytes([3 * MIB + 5, MIB + 7], 2, 4) == arena_min
    minimum = 116 * MIB + arena_min
    plan = _plan(minimum)  # exactly the minimum works
    assert plan.min_budget_bytes == minimum and plan.arena_bytes == arena_min
    with pytest.raises(BudgetTooSmallError) as err:
        _plan(minimum - 1)
    assert err.value.minimum_bytes == minimum
    assert str(minimum) in str(err.value) and "--memory" in str(err.value)


def test_plan_gives_the_rest_to_the_arena():
    plan = _plan(2 * GIB)
    assert plan.arena_bytes == 2 * GIB - 116 * MIB
    assert plan.slot_bytes(0) == align_up(3 * MIB + 5, 4096)
    assert plan.max_slots(1) == plan.arena_bytes // align_up(MIB + 7, 4096)
    assert plan.as_dict()["budget_bytes"] == 2 * GIB


def test_planner_rejects_nonsense():
    with pytest.raises(ValueError):
        _plan(GIB, kv_bytes=-1)
    with pytest.raises(ValueError):
        _plan(GIB, expert_level_bytes=[])
