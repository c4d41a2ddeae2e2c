"""The memory planner: one budget in, a MemoryPlan out, or a refusal with the minimum.

Owns the rule that decides whether a model can run under a budget: resident
bytes (dense weights, routers, shared experts) + KV cache + activation
workspace + I/O buffers + the arena, where the arena must at least hold one
token's routed experts at the lowest stored level (k experts in each of the
L layers, each slot page aligned, plus one alignment page for the arena base).
Knows nothing about where these byte counts come from (the engine computes
them from the model) nor about files.
"""

from __future__ import annotations

from collections.abc import Sequence

from .budget import BudgetTooSmallError, MemoryPlan, align_up, format_bytes

DEFAULT_ALIGNMENT = 4096


def min_arena_bytes(
    expert_level_bytes: Sequence[int],
    experts_per_token_per_layer: int,
    n_layers: int,
    alignment: int = DEFAULT_ALIGNMENT,
) -> int:
    """Smallest arena that holds one token's experts at the lowest level.

    Args:
        expert_level_bytes: bytes of one expert at each stored level (any order).
        experts_per_token_per_layer: top-k.
        n_layers: number of MoE layers.
        alignment: slot alignment in bytes.

    Returns:
        Bytes, including one alignment page for the arena's base address.
    """
    lowest = min(expert_level_bytes)
    return experts_per_token_per_layer * n_layers * align_up(lowest, alignment) + alignment


def plan_memory(
    resident_bytes: int,
    kv_bytes: int,
    workspace_bytes: int,
    io_buffer_bytes: int,
    expert_level_bytes: Sequence[int],
    experts_per_token_per_layer: int,
    n_layers: int,
    budget: int,
    alignment: int = DEFAULT_ALIGNMENT,
    min_arena: int | None = None,
) -> MemoryPlan:
    """Split a budget into resident, KV, workspace, I/O and arena bytes.

    Args:
        resident_bytes: dense weights, routers and shared experts.
        kv_bytes: KV cache for the configured context.
        workspace_bytes: activation workspace.
        io_buffer_bytes: staging buffers for reads (0 when reads land in the arena).
        expert_level_bytes: bytes of ONE routed expert at each stored level.
        experts_per_token_per_layer: top-k.
        n_layers: number of MoE layers.
        budget: the budget in bytes (from ``parse_memory``).
        alignment: arena slot alignment (4096 allows O_DIRECT).
        min_arena: the smallest usable arena when the caller knows better than "one token's experts at
            the lowest level" (e.g. nested levels under the ``exact`` policy need every plane of one
            token's experts); None = :func:`min_arena_bytes`.

    Returns:
        A MemoryPlan whose ``arena_bytes`` is everything left over.

    Raises:
        ValueError: negative sizes, no levels, or k / n_layers < 1.
        BudgetTooSmallError: the budget is below the minimum; the message and
            ``minimum_bytes`` give the exact minimum.
    """
    _check_inputs(resident_bytes, kv_bytes, workspace_bytes, io_buffer_bytes,
                  expert_level_bytes, experts_per_token_per_layer, n_layers)
    fixed = resident_bytes + kv_bytes + workspace_bytes + io_buffer_bytes
    arena_min = min_arena if min_arena is not None else \
        min_arena_bytes(expert_level_bytes, experts_per_token_per_layer, n_layers, alignment)
    minimum = fixed + arena_min
    if budget < minimum:
        raise BudgetTooSmallError(
            f"memory budget {format_bytes(budget)} ({budget} bytes) is too small: "
            f"the minimum is {format_bytes(minimum)} ({minimum} bytes) = resident "
            f"{format_bytes(resident_bytes)} + KV cache {format_bytes(kv_bytes)} + workspace "
            f"{format_bytes(workspace_bytes)} + I/O buffers {format_bytes(io_buffer_bytes)} + "
            f"one token's experts {format_bytes(arena_min)}. "
            f"Give --memory {minimum} or more, or shorten --ctx to shrink the KV cache.",
            minimum_bytes=minimum,
            budget_bytes=budget,
        )
    return MemoryPlan(
        budget_bytes=budget,
        resident_bytes=resident_bytes,
        kv_bytes=kv_bytes,
        workspace_bytes=workspace_bytes,
        io_buffer_bytes=io_buffer_bytes,
        arena_bytes=budget - fixed,
        min_budget_bytes=minimum,
        alignment=alignment,
        expert_level_bytes=tuple(int(b) for b in expert_level_bytes),
        experts_per_token_per_layer=experts_per_token_per_layer,
        n_layers=n_layers,
    )


def _check_inputs(
    resident: int, kv: int, workspace: int, io: int,
    level_bytes: Sequence[int], k: int, n_layers: int,
) -> None:
    for name, value in (("resident_bytes", resident), ("kv_bytes", kv),
                        ("workspace_bytes", workspace), ("io_buffer_bytes", io)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if len(level_bytes) == 0 or min(level_bytes) <= 0:
        raise ValueError(f"expert_level_bytes must list positive sizes, got {list(level_bytes)}")
    if k < 1 or n_layers < 1:
        raise ValueError(f"experts_per_token_per_layer and n_layers must be >= 1, got {k}, {n_layers}")


def split_arena(arena_bytes: int, plane_slot_bytes: Sequence[int], plane_counts: Sequence[int],
                min_slots: Sequence[int]) -> list[int]:
    """Slots per plane pool for nested levels: proportional to how many experts store each plane.

    A cached expert at its highest level holds one slot in every pool up to that level, so pools are
    sized for ``m`` cached experts with ``n_j = m * plane_counts[j] / plane_counts[0]`` (never fewer
    than ``min_slots[j]``, never more than ``plane_counts[j]``, the experts that store plane j).

    Args:
        arena_bytes: bytes available for slots (base alignment already taken off).
        plane_slot_bytes: slot size of each plane pool (aligned).
        plane_counts: experts (over all layers) that store plane j; non-increasing.
        min_slots: the fewest slots each pool must get (one token's experts, or 0).

    Returns:
        Slot counts per pool, fitting ``arena_bytes``.

    Raises:
        ValueError: the minimum counts alone do not fit (the planner should have refused the budget).
    """
    floor = sum(n * b for n, b in zip(min_slots, plane_slot_bytes))
    if floor > arena_bytes:
        raise ValueError(f"arena of {arena_bytes} bytes cannot hold the minimum slots {list(min_slots)}")
    total = plane_counts[0]
    per_cached = sum(b * c / total for b, c in zip(plane_slot_bytes, plane_counts))
    m = arena_bytes / per_cached
    counts = [min(c, max(lo, int(m * c / total))) for c, lo in zip(plane_counts, min_slots)]
    excess = sum(n * b for n, b in zip(counts, plane_slot_bytes)) - arena_bytes
    for j in reversed(range(len(counts))):  # rounding up to the minimums can overshoot: trim high planes first
        if excess <= 0:
            break
        cut = min(counts[j] - min_slots[j], -(-excess // plane_slot_bytes[j]))
        counts[j] -= cut
        excess -= cut * plane_slot_bytes[j]
    return counts
