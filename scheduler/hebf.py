"""HEBF (hottest-expert-bit-first) read ordering and the load/compute timeline model.

Owns the D²MoE ordering rule from the streaming-scheduler spec: for the
experts a step needs, each expert's missing slices form a queue in ascending
level order; repeatedly take the head slice of the expert whose head is
needed by the most tokens (cumulative over higher levels). Also owns the
spec's timeline: one I/O stream, one compute stream, the bubble (idle
compute time). Knows nothing about files, arenas or models: experts are any
hashable ids, levels small ints.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass

Slice = tuple[Hashable, int]  # (expert, level)


def head_demand(demand: Mapping[int, int], level: int) -> int:
    """Tokens that need slice ``level``: those using the expert at ``level`` or above.

    Args:
        demand: level -> number of tokens using the expert at that level (B[j, .]).
        level: the slice's level.
    """
    return sum(n for lv, n in demand.items() if lv >= level)


def hebf_order(
    missing: Mapping[Hashable, Sequence[int]],
    demand: Mapping[Hashable, Mapping[int, int]],
) -> list[Slice]:
    """Order missing slices hottest-expert-bit-first.

    Args:
        missing: expert -> its missing levels (any order; sorted ascending here).
        demand: expert -> {level: tokens using the expert at that level}.

    Returns:
        Every missing (expert, level) exactly once; per expert in ascending
        level order. Ties: lower level first, then expert order of ``missing``.
    """
    queues = {e: sorted(levels) for e, levels in missing.items() if levels}
    rank = {e: i for i, e in enumerate(missing)}
    order: list[Slice] = []
    while queues:
        best = max(queues, key=lambda e: (head_demand(demand.get(e, {}), queues[e][0]),
                                          -queues[e][0], -rank[e]))
        order.append((best, queues[best].pop(0)))
        if not queues[best]:
            del queues[best]
    return order


@dataclass(frozen=True)
class TimelineEntry:
    """One loaded slice and the compute job it unblocks."""

    expert: Hashable
    level: int
    load_end: float
    comp_start: float
    comp_end: float


@dataclass(frozen=True)
class Timeline:
    """Result of ``simulate_timeline``: entries, idle compute time and total time."""

    entries: tuple[TimelineEntry, ...]
    resident_compute: float
    bubble: float
    makespan: float


def simulate_timeline(
    order: Sequence[Slice],
    demand: Mapping[Hashable, Mapping[int, int]],
    t_io: Callable[[int], float],
    t_comp: Callable[[int], float],
    resident_jobs: Sequence[tuple[Hashable, int]] = (),
) -> Timeline:
    """The spec's two-stream model: loads back to back, compute as slices arrive.

    Compute first runs the jobs of already-resident experts, then for each
    loaded slice s = (j, k): load_end[s] = load_end[s-1] + T_io(k),
    comp_start[s] = max(load_end[s], comp_end[s-1]), comp_end = comp_start +
    B[j, k] * T_comp(k). The bubble is the compute stream's idle time before
    its last job.

    Args:
        order: slices in load order.
        demand: expert -> {level: tokens} (B).
        t_io: seconds to load one expert's slice of a level.
        t_comp: seconds to run one token through an expert at a level.
        resident_jobs: (expert, level) jobs whose slices are already resident.

    Returns:
        A Timeline.
    """
    clock = sum(demand.get(e, {}).get(lv, 0) * t_comp(lv) for e, lv in resident_jobs)
    resident = clock
    load_end, comp_end, bubble = 0.0, clock, 0.0
    entries = []
    for expert, level in order:
        load_end += t_io(level)
        start = max(load_end, comp_end)
        bubble += start - comp_end
        comp_end = start + demand.get(expert, {}).get(level, 0) * t_comp(level)
        entries.append(TimelineEntry(expert, level, load_end, start, comp_end))
    return Timeline(tuple(entries), resident, bubble, max(comp_end, load_end))
