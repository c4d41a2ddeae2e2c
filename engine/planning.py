"""Memory planning for the engine: what a model needs, and how one budget is split.

Owns the byte counts the scheduler's planner needs, computed from the model
itself BEFORE any weight is read:

- ``resident``: every non-routed-expert parameter and buffer as the loader
  holds it, taken from a ``meta``-device model (no memory allocated): fp32 by
  default; shard models pass the held size of each parameter (Q8_0/Q4_0
  matrices kept packed count their packed bytes, ``engine/quantized_dense.py``);
- ``kv``: the KV cache for ``ctx`` positions (built on ``meta`` too, so MLA and
  GQA caches are counted by the family's own ``make_cache``);
- ``workspace``: activations of the largest forward (a prefill chunk: logits,
  attention scores, hidden states), the fp32 decode scratch of the experts one
  acquire may hold, plus a fixed interpreter/runtime reserve (Python, torch,
  tokenizer: memory the process holds whatever the model is);
- ``io``: staging for dense loading (the largest stored tensor plus the largest
  parameter as held: its fp32 copy, or its packed form);
  expert reads land directly in arena slots, so they need no staging.

:func:`plan_for` hands these to ``scheduler.planner.plan_memory`` and turns
``BudgetTooSmallError`` into :class:`BudgetError` naming the minimum.
:func:`resolve_budget` is where a missing ``--memory`` becomes the default
(a safe fraction of available RAM). Knows nothing about the loader, the arena
or the CLI.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from moestream.convert.errors import BudgetError
from moestream.scheduler.budget import (BudgetTooSmallError, MemoryPlan, MemorySpecError, align_up, default_budget,
                                        format_bytes, parse_memory)
from moestream.scheduler.planner import DEFAULT_ALIGNMENT, plan_memory

#: Memory the process holds whatever the model (interpreter, torch, numpy, tokenizer, allocator slack).
#: Measured: ``import moestream.engine.api`` is ~150 MiB unique set size on CPU; a tiny model's
#: ``moestream run`` peaks at 320-350 MiB of cgroup usage (anonymous + library pages) with no limit.
#: Override with the ``MOESTREAM_RUNTIME_RESERVE`` environment variable (bytes or a size such as ``300MiB``).
RUNTIME_RESERVE_BYTES = 384 * 2**20
#: Prompt tokens per forward during prefill (engine/generate.py PREFILL_CHUNK).
PREFILL_TOKENS = 512
FP32 = 4


@dataclass(frozen=True)
class ModelFootprint:
    """What one model needs, in bytes, before any budget is applied.

    Attributes:
        resident_bytes: dense weights as held (fp32, or packed Q8_0/Q4_0) + buffers.
        kv_bytes: KV cache for ``ctx`` positions (batch 1).
        activation_bytes: largest forward's activations (prefill chunk).
        scratch_bytes: fp32 decode scratch for the experts one acquire holds.
        runtime_bytes: interpreter/runtime reserve.
        io_buffer_bytes: staging for dense loading.
        expert_level_bytes: stored bytes of one routed expert per level (largest expert).
        expert_compute_bytes: one routed expert at fp32.
        top_k: experts per token per MoE layer.
        n_moe_layers: MoE layers.
        n_experts: routed experts per MoE layer (the largest when layers differ: adaptive pruning).
        routed_experts: routed experts over all MoE layers (0 = ``n_experts * n_moe_layers``).
        active_experts: routed experts one token uses over all MoE layers, per-layer top-k summed
            (0 = ``top_k * n_moe_layers``; ``top_k`` is the largest per-layer value).
        ctx: context length planned for.
        expert_plane_bytes: stored bytes of plane j (what level j adds), largest expert; empty = one
            plane per level, derived from ``expert_level_bytes``.
        experts_per_plane: routed experts (all layers) that store plane j; empty = every expert stores
            every plane. Bit allocation stores fewer planes for less important experts.
    """

    resident_bytes: int
    kv_bytes: int
    activation_bytes: int
    scratch_bytes: int
    runtime_bytes: int
    io_buffer_bytes: int
    expert_level_bytes: tuple[int, ...]
    expert_compute_bytes: int
    top_k: int
    n_moe_layers: int
    n_experts: int
    ctx: int
    routed_experts: int = 0
    active_experts: int = 0
    expert_plane_bytes: tuple[int, ...] = ()
    experts_per_plane: tuple[int, ...] = ()

    @property
    def plane_bytes(self) -> tuple[int, ...]:
        """Stored bytes of each plane (largest expert)."""
        if self.expert_plane_bytes:
            return self.expert_plane_bytes
        lv = self.expert_level_bytes
        return tuple(b - (lv[j - 1] if j else 0) for j, b in enumerate(lv))

    @property
    def plane_counts(self) -> tuple[int, ...]:
        """Experts storing each plane."""
        return self.experts_per_plane or tuple(self.n_experts * self.n_moe_layers for _ in self.plane_bytes)

    @property
    def total_routed_experts(self) -> int:
        """Routed experts over all MoE layers (exact with per-layer counts)."""
        return self.routed_experts or self.n_experts * self.n_moe_layers

    @property
    def active_experts_per_token(self) -> int:
        """Routed experts one token uses over all MoE layers (exact with per-layer top-k)."""
        return self.active_experts or self.top_k * self.n_moe_layers

    @property
    def workspace_bytes(self) -> int:
        """What the planner counts as workspace: activations + expert scratch + runtime reserve."""
        return self.activation_bytes + self.scratch_bytes + self.runtime_bytes

    @property
    def total_expert_bytes(self) -> int:
        """Stored bytes of every routed expert at its highest level."""
        return sum(b * c for b, c in zip(self.plane_bytes, self.plane_counts))

    @property
    def expert_bytes_per_token(self) -> int:
        """Stored expert bytes one token routes to (k experts in each MoE layer, highest level)."""
        return self.expert_level_bytes[-1] * self.active_experts_per_token

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready view (with the derived sizes)."""
        d = asdict(self)
        d["expert_level_bytes"] = list(self.expert_level_bytes)
        d["expert_plane_bytes"], d["experts_per_plane"] = list(self.plane_bytes), list(self.plane_counts)
        d.update(workspace_bytes=self.workspace_bytes, total_expert_bytes=self.total_expert_bytes,
                 expert_bytes_per_token=self.expert_bytes_per_token)
        return d


def runtime_reserve() -> int:
    """The runtime reserve in bytes (``MOESTREAM_RUNTIME_RESERVE`` overrides the default).

    Raises:
        BudgetError: the environment variable is not a size.
    """
    spec = os.environ.get("MOESTREAM_RUNTIME_RESERVE")
    if not spec:
        return RUNTIME_RESERVE_BYTES
    try:
        return parse_memory(spec)
    except MemorySpecError as exc:
        raise BudgetError(f"MOESTREAM_RUNTIME_RESERVE={spec!r}: {exc}") from exc


def resolve_budget(memory: str | int | None) -> int:
    """The budget in bytes: ``parse_memory`` of what the user gave, else the safe default.

    Args:
        memory: ``"6GB"``, ``"75%"``, a byte count, or None (default: a fraction of available RAM).

    Returns:
        Bytes.

    Raises:
        BudgetError: an unparseable size.
    """
    if memory is None:
        return default_budget()
    try:
        return int(parse_memory(memory))
    except MemorySpecError as exc:
        raise BudgetError(f"cannot use --memory {memory!r}: {exc}") from exc


def _meta_model(model_type: str, config: dict) -> Any:
    """Build the family's model on the ``meta`` device (shapes only, nothing allocated)."""
    from moestream.engine.hf_loading import build_model

    with torch.device("meta"):
        model, _ = build_model(model_type, config, torch.float32)
    return model


def activation_bytes(model: Any, ctx: int) -> int:
    """Estimated activation peak of one prefill chunk (batch 1) at fp32.

    Counts the chunk's logits ``[T, V]`` twice (projection and fp32 result),
    attention scores and probabilities ``[heads, T, S]`` twice, and a dozen
    ``[T, W]`` hidden-size buffers where ``W`` is the widest per-token vector
    (hidden, dense intermediate, 2x expert intermediate, q/kv projections).

    Args:
        model: a family model (may live on ``meta``).
        ctx: context length.

    Returns:
        Bytes.
    """
    a = model.args
    t = min(ctx, PREFILL_TOKENS)
    heads = int(a.num_attention_heads)
    widths = [a.hidden_size, 2 * a.expert_intermediate_size, heads * int(a.head_dim or 0)]
    widths += [int(getattr(a, name, 0) or 0) for name in ("intermediate_size", "shared_expert_intermediate_size")]
    logits = 2 * t * a.vocab_size * FP32
    scores = 2 * heads * t * ctx * FP32
    hidden = 12 * t * max(widths) * FP32
    return logits + scores + hidden


def model_footprint(model_type: str, config: dict, expert_level_bytes: list[int] | tuple[int, ...], ctx: int,
                    largest_dense_stored_bytes: int = 0, scratch_experts: int = 0,
                    expert_plane_bytes: tuple[int, ...] = (), experts_per_plane: tuple[int, ...] = (),
                    held_weight_bytes: Callable[[Any], dict[str, int]] | None = None) -> ModelFootprint:
    """Everything :func:`plan_for` needs, from a config alone.

    Args:
        model_type: HF model type.
        config: the HF config dict.
        expert_level_bytes: stored bytes of one routed expert per level (largest expert).
        ctx: context length (KV cache positions).
        largest_dense_stored_bytes: biggest dense tensor as stored (for the load staging buffer).
        scratch_experts: experts whose fp32 decode scratch is held at once (0 when views alias the arena).
        held_weight_bytes: ``f(meta model) -> {parameter name: bytes as loaded}``; None = every
            parameter at fp32 (``engine/quantized_dense.py: held_weight_bytes`` for shard models).

    Returns:
        The footprint.

    Raises:
        UnsupportedModelError / ModelFormatError: from the family's config checks.
    """
    model = _meta_model(model_type, config)
    costs = model.costs(bytes_per_param=FP32)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    kv = int(model.make_cache(1, ctx, dtype=torch.float32, device="meta").nbytes)
    held = (held_weight_bytes(model) if held_weight_bytes is not None
            else {n: p.numel() * FP32 for n, p in model.named_parameters()})
    biggest = max(held.values(), default=0)
    io = largest_dense_stored_bytes + biggest if largest_dense_stored_bytes else 0
    return ModelFootprint(
        resident_bytes=int(sum(held.values()) + buffers), kv_bytes=kv, activation_bytes=activation_bytes(model, ctx),
        scratch_bytes=scratch_experts * costs.expert_bytes, runtime_bytes=runtime_reserve(), io_buffer_bytes=io,
        expert_level_bytes=tuple(int(b) for b in expert_level_bytes), expert_compute_bytes=costs.expert_bytes,
        top_k=costs.top_k, n_moe_layers=costs.moe_layers, n_experts=costs.experts_per_layer, ctx=ctx,
        routed_experts=costs.routed_experts, active_experts=costs.active_experts_per_token,
        expert_plane_bytes=tuple(expert_plane_bytes), experts_per_plane=tuple(experts_per_plane))


def min_slots_per_plane(fp: ModelFootprint, precision_policy: str = "exact") -> list[int]:
    """Slots each plane pool needs at the least: one token's experts (k in each MoE layer).

    ``exact`` needs every stored plane of those experts; ``adaptive`` only plane 0 (the lowest level):
    higher planes are loaded when there is room and used when they arrived in time.
    """
    one_token = fp.top_k * fp.n_moe_layers
    return [min(c, one_token) if (j == 0 or precision_policy == "exact") else 0
            for j, c in enumerate(fp.plane_counts)]


def min_arena_for(fp: ModelFootprint, precision_policy: str = "exact", alignment: int = DEFAULT_ALIGNMENT) -> int:
    """The smallest arena that runs: :func:`min_slots_per_plane` slots plus one alignment page."""
    return sum(n * align_up(b, alignment) for n, b in zip(min_slots_per_plane(fp, precision_policy),
                                                          fp.plane_bytes)) + alignment


def plan_for(fp: ModelFootprint, budget: int, alignment: int = DEFAULT_ALIGNMENT,
             precision_policy: str = "exact") -> MemoryPlan:
    """Split ``budget`` for a streamed model (experts in the arena).

    Args:
        fp: the model's footprint.
        budget: bytes.
        alignment: arena slot alignment.
        precision_policy: ``exact`` (the minimum holds every plane of one token's experts) or
            ``adaptive`` (the minimum holds their lowest level).

    Returns:
        The plan; ``arena_bytes`` is what is left for the expert arena.

    Raises:
        BudgetError: the budget is below the minimum (the message names it, in bytes and GiB/MiB).
    """
    try:
        return plan_memory(fp.resident_bytes, fp.kv_bytes, fp.workspace_bytes, fp.io_buffer_bytes,
                           fp.expert_level_bytes, fp.top_k, fp.n_moe_layers, budget, alignment,
                           min_arena=min_arena_for(fp, precision_policy, alignment))
    except BudgetTooSmallError as exc:
        raise BudgetError(f"{exc} (runtime reserve {format_bytes(fp.runtime_bytes)} included in workspace)") \
            from exc


def min_streaming_budget(fp: ModelFootprint, alignment: int = DEFAULT_ALIGNMENT,
                         precision_policy: str = "exact") -> int:
    """The smallest budget :func:`plan_for` accepts."""
    return (fp.resident_bytes + fp.kv_bytes + fp.workspace_bytes + fp.io_buffer_bytes
            + min_arena_for(fp, precision_policy, alignment))


def all_experts_arena_bytes(fp: ModelFootprint, alignment: int = DEFAULT_ALIGNMENT) -> int:
    """Arena bytes that hold every routed expert at its highest level (beyond this, memory is unused)."""
    return sum(c * align_up(b, alignment) for b, c in zip(fp.plane_bytes, fp.plane_counts)) + alignment


def resident_requirement(fp: ModelFootprint) -> int:
    """Bytes a fully resident load (every expert at fp32 in memory, no arena) needs."""
    return (fp.resident_bytes + fp.kv_bytes + fp.activation_bytes + fp.runtime_bytes + fp.io_buffer_bytes
            + fp.expert_compute_bytes * fp.total_routed_experts)


def check_resident_budget(fp: ModelFootprint, budget: int, what: str) -> None:
    """Refuse a fully resident load (HF folder) that does not fit ``budget``.

    Args:
        fp: the footprint.
        budget: bytes.
        what: the model path, for the message.

    Raises:
        BudgetError: naming the minimum and how to stream instead.
    """
    need = resident_requirement(fp)
    if budget < need:
        raise BudgetError(
            f"memory budget {format_bytes(budget)} ({budget} bytes) is too small for {what}: a Hugging Face folder "
            f"is loaded fully resident, which needs at least {format_bytes(need)} ({need} bytes); give "
            f"--memory {need} or more, or convert it (`moestream convert {what} OUT`) to stream experts from disk "
            f"under a smaller budget.")
