"""Shared by the streaming tests (CPU, nested codecs, GPU): shard models, budgets, and a logits run.

Owns :func:`build_converted` (the runtime test model converted to shards in
several dtypes), :func:`budgets` (the planner's minimum, a middle and the
every-expert-fits budget of a shard model) and :func:`run_logits` (prefill then
one-token decode steps over the model's own KV cache, every position's logits).
Knows nothing about what a test asserts.
"""

from __future__ import annotations

from pathlib import Path

import torch

from runtime_model import build_runtime_model

from moestream.convert.convert import convert_checkpoint
from moestream.convert.shard_reader import ShardedModel
from moestream.engine.planning import all_experts_arena_bytes, min_streaming_budget
from moestream.engine.streaming import shard_footprint

CTX = 64


def build_converted(root: Path, dtypes: tuple[str, ...] = ("f32", "f16")) -> dict[str, Path]:
    """``{"hf": folder, dtype: shard folder, ...}`` under ``root``."""
    hf = build_runtime_model(root / "hf")
    out = {"hf": hf}
    for dtype in dtypes:
        out[dtype] = root / f"shards_{dtype}"
        convert_checkpoint(hf, out[dtype], dtype=dtype, progress=False)
    return out


def budgets(path: Path, precision_policy: str = "exact", ctx: int = CTX) -> tuple[int, int, int]:
    """(minimum, middle, every expert fits) budgets of a shard model in bytes."""
    with ShardedModel.open(path, verify="off") as r:
        fp = shard_footprint(r, ctx)
    low = min_streaming_budget(fp, precision_policy=precision_policy)
    full = low + all_experts_arena_bytes(fp)
    return low, (low + full) // 2, full


def run_logits(model, ids: torch.Tensor, prefill: int = 16, device: str = "cpu", ctx: int = CTX) -> torch.Tensor:
    """Prefill ``ids[:, :prefill]`` then decode the rest one token at a time; all logits, on the CPU."""
    ids = ids.to(device)
    cache = model.make_cache(1, ctx, device=device)
    with torch.no_grad():
        outs = [model(ids[:, :prefill], cache)]
        for t in range(prefill, ids.shape[1]):
            outs.append(model(ids[:, t:t + 1], cache))
    return torch.cat(outs, dim=1).cpu()
