"""Streaming nested-codec experts (matryoshka / residual planes, mixed stored levels) through the arena.

Level j of an expert = planes 0..j, each plane its own arena slot (one pool per plane). Checked:

- ``exact``: logits equal the fully resident decode of the same shards (``load_eval_model``) at the
  minimum, a middle and the full budget, for uniform levels and for bit-allocated models whose experts
  store different numbers of planes — bit for bit without the native kernels; with them (the default on
  the CPU) see :func:`assert_matches_resident`, and every budget still gives bit-identical logits;
- ``level`` caps: the engine at level j equals the resident model at level j, and never reads a
  plane above j;
- ``adaptive``: at its own minimum (room for one token's lowest level only) every expert runs at
  level 0 — equal to the resident level-0 model — and the minimum is below ``exact``'s; with a slow
  disk, late experts run at a lower resident level (counted as fallbacks) instead of stalling;
- the planner splits the arena in proportion to the experts storing each plane;
- native kernels: experts are served as views over their plane bytes (no fp32 scratch, none planned);
  ``MOESTREAM_NATIVE_KERNELS=0`` brings back decode-into-scratch, bit-identical to the resident decode.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from runtime_model import build_runtime_model  # noqa: E402
from streaming_helpers import CTX, budgets, run_logits  # noqa: E402

from moestream.convert.calibration import collect_stats  # noqa: E402
from moestream.convert.compress import CompressOptions, compress_checkpoint  # noqa: E402
from moestream.convert.shard_reader import ShardedModel  # noqa: E402
from moestream.engine.api import Engine  # noqa: E402
from moestream.engine import native_kernels  # noqa: E402
from moestream.engine.compressed_models import load_calibration_model, load_eval_model  # noqa: E402
from moestream.engine.planning import all_experts_arena_bytes, min_streaming_budget  # noqa: E402
from moestream.engine.streaming import (COMPILE_DECODE_ENV, StreamingExperts, load_streaming_model,  # noqa: E402
                                        shard_footprint)
from moestream.scheduler.planner import split_arena  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("nested")
    hf = build_runtime_model(root / "hf")
    out = {"hf": hf}
    for codec in ("matryoshka_floor", "residual"):
        out[codec], _ = compress_checkpoint(hf, root / codec, CompressOptions(codec=codec, group_size=64),
                                            progress=False)
    calib = collect_stats(load_calibration_model(hf),
                          torch.randint(3, 300, (4, 48), generator=torch.Generator().manual_seed(0)).tolist())
    out["mixed"], _ = compress_checkpoint(hf, root / "mixed", CompressOptions(codec="matryoshka_floor", group_size=64,
                                          size_budget="8bpw"), calibration=calib, progress=False)
    return {k: (v[0].parent if isinstance(v, list) else v) for k, v in out.items()}


def footprint(path):
    with ShardedModel.open(path, verify="off") as r:
        return shard_footprint(r, CTX), {(l, e): r.n_levels(l, e) for l, e in r.expert_keys()}


IDS = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(3))
#: Logit tolerance of the native kernels vs the resident decode (see assert_matches_resident).
NATIVE_ATOL, NATIVE_RTOL = 5e-5, 1e-5


def assert_matches_resident(got: torch.Tensor, ref: torch.Tensor, what: object) -> None:
    """Streamed logits vs the resident decode of the same levels.

    Without the native kernels both sides run ``F.linear`` on the same decoded fp32 weights: bit for
    bit. With them the streamed side computes straight from the plane bytes; each weight it forms
    equals the decoded one bit for bit, but its fp32 sums over K run in another order (8 lanes,
    group partial sums scaled once by α), so each projection differs by fp32 summation rounding
    (~K·2^-24 relative) and the logits after 4 layers by ~1e-6 (measured <= 2.5e-6 for every codec
    and level). The tolerance (5e-5 absolute + 1e-5 relative) is 10x that and 10^4 below a level
    change (>= 0.69 here); the greedy token must be the same at every position.
    """
    if not native_kernels.available():
        assert torch.equal(got, ref), (what, (got - ref).abs().max())
        return
    torch.testing.assert_close(got, ref, atol=NATIVE_ATOL, rtol=NATIVE_RTOL, msg=lambda m: f"{what}: {m}")
    assert torch.equal(got.argmax(-1), ref.argmax(-1)), what


@pytest.mark.parametrize("name", ["matryoshka_floor", "residual", "mixed"])
def test_exact_streaming_equals_resident_decode_at_any_budget(models, name):
    path = models[name]
    ref = run_logits(load_eval_model(path)[0], IDS)
    fp, levels = footprint(path)
    if name == "mixed":
        assert len(set(levels.values())) > 1  # bit allocation stored different numbers of planes
    low = min_streaming_budget(fp)
    full = low + all_experts_arena_bytes(fp)
    first = None
    for budget in (low, (low + full) // 2, full):
        loaded = load_streaming_model(path, memory=budget, ctx=CTX)
        provider = loaded.model.expert_provider
        assert isinstance(provider, StreamingExperts)
        try:
            got = run_logits(loaded.model, IDS)
            assert_matches_resident(got, ref, (name, budget))
            first = got if first is None else first
            assert torch.equal(got, first), (name, budget)  # the budget never changes the numbers
            st = provider.stats()
            assert st["totals"]["fallbacks"] == 0 and st["totals"]["capped"] == 0
            assert len(provider.arena.slot_counts) == max(levels.values())  # one pool per plane
            assert provider.arena.nbytes <= loaded.plan.arena_bytes
        finally:
            provider.close()


def test_level_cap_equals_resident_level_and_reads_only_its_planes(models):
    path = models["matryoshka_floor"]
    fp, levels = footprint(path)
    for level in (0, 1):
        ref = run_logits(load_eval_model(path, level)[0], IDS)
        with Engine.load(path, memory=10 * min_streaming_budget(fp), ctx=CTX, level=level, device="cpu") as engine:
            got = run_logits(engine.model, IDS)
            assert_matches_resident(got, ref, level)
            provider = engine.model.expert_provider
            assert len(provider.arena.slot_counts) == level + 1
            with ShardedModel.open(path, verify="off") as r:
                capped_bytes = sum(r.expert_plane_range(l, e, j).nbytes
                                   for l, e in r.expert_keys() for j in range(level + 1))
            st = engine.stats()["experts"]
            assert all(key[2] <= level for key in provider.arena.keys())
            assert 0 < st["loader"]["bytes_read"] <= capped_bytes  # planes above the cap are never read
            assert engine.stats()["memory_budget_bytes"] > 0


def test_adaptive_minimum_runs_level_zero_and_is_below_exact(models):
    path = models["matryoshka_floor"]
    fp, _ = footprint(path)
    low_exact = min_streaming_budget(fp)
    low_adaptive = min_streaming_budget(fp, precision_policy="adaptive")
    assert low_adaptive < low_exact
    loaded = load_streaming_model(path, memory=low_adaptive, ctx=CTX, precision_policy="adaptive")
    provider = loaded.model.expert_provider
    try:
        assert provider.arena.slot_counts[1:] == [0] * (len(provider.arena.slot_counts) - 1)
        got = run_logits(loaded.model, IDS)
        assert_matches_resident(got, run_logits(load_eval_model(path, 0)[0], IDS), "adaptive")  # all at level 0
        assert provider.stats()["totals"]["capped"] > 0
    finally:
        provider.close()
    with pytest.raises(Exception, match="minimum"):
        load_streaming_model(path, memory=low_adaptive, ctx=CTX, precision_policy="exact")


def test_adaptive_runs_late_experts_at_a_resident_lower_level(models):
    """A slow disk: an expert whose top plane is late runs at the level already resident (no stall)."""
    path = models["matryoshka_floor"]
    fp, _ = footprint(path)
    full = min_streaming_budget(fp, precision_policy="adaptive") + all_experts_arena_bytes(fp)
    loaded = load_streaming_model(path, memory=full, ctx=CTX, precision_policy="adaptive")
    provider = loaded.model.expert_provider
    real_reader = provider.loader.reader

    def slow_high_planes(fd, buf, offset):  # plane 0 (small) fast, larger planes slow
        if len(buf) > 8192:
            time.sleep(0.05)
        return real_reader(fd, buf, offset)

    provider.loader.reader = slow_high_planes
    try:
        got = run_logits(loaded.model, IDS)
        st = provider.stats()["totals"]
        assert st["fallbacks"] > 0
        ref_top = run_logits(load_eval_model(path)[0], IDS)
        assert (got - ref_top).abs().max() > 100 * NATIVE_ATOL  # some experts ran below their top level
    finally:
        provider.close()


def test_split_arena_proportional_to_stored_planes():
    sizes, counts = [4096, 8192, 16384], [100, 50, 10]
    got = split_arena(60 * 4096, sizes, counts, [4, 4, 4])
    assert sum(n * b for n, b in zip(got, sizes)) <= 60 * 4096
    assert got[0] >= got[1] >= got[2] >= 4 and all(n <= c for n, c in zip(got, counts))
    assert split_arena(10**9, sizes, counts, [0, 0, 0]) == counts  # everything fits: every stored plane
    with pytest.raises(ValueError):
        split_arena(4096, sizes, counts, [4, 4, 4])


def test_native_views_hold_no_scratch_and_fallback_is_bit_exact(models, monkeypatch):
    """Native: views over the plane bytes, no fp32 scratch allocated or planned. Switched off
    (``MOESTREAM_NATIVE_KERNELS=0``): decode into scratch (planned), bit-identical to the resident decode."""
    if not native_kernels.available():
        pytest.skip("native kernels unavailable (no C compiler, or MOESTREAM_NATIVE_KERNELS=0)")
    path = models["residual"]
    ref = run_logits(load_eval_model(path)[0], IDS)
    fp_native, _ = footprint(path)
    budget = min_streaming_budget(fp_native) * 2
    with Engine.load(path, memory=budget, ctx=CTX, device="cpu") as engine:
        provider = engine.model.expert_provider
        assert provider.stats()["native_nested_kernel"] and provider._scratch == []
        views = provider.acquire(0, [0, 1], [0.5, 0.5])
        try:
            assert all(isinstance(v, native_kernels.NestedPlaneView) for v in views.values())
            assert all(v.nbytes == sum(provider.range_of(0, e, j).nbytes for j in range(v.level + 1))
                       for e, v in views.items())
        finally:
            provider.release(0, [0, 1])
        assert_matches_resident(run_logits(engine.model, IDS), ref, "native")
    assert fp_native.scratch_bytes == 0
    monkeypatch.setenv(native_kernels.ENV_SWITCH, "0")
    assert not native_kernels.available()
    fp_off, _ = footprint(path)
    assert fp_off.scratch_bytes > 0  # top-k + 1 fp32 experts
    ref_off = run_logits(load_eval_model(path)[0], IDS)  # the switch also turns off the native decode-step kernels
    with Engine.load(path, memory=budget + fp_off.scratch_bytes, ctx=CTX, device="cpu") as engine:
        provider = engine.model.expert_provider
        assert not provider.stats()["native_nested_kernel"] and len(provider._scratch) > 0
        assert torch.equal(run_logits(engine.model, IDS), ref_off)


@pytest.mark.parametrize("compiled", ["0", "1"])
@pytest.mark.parametrize("name", ["matryoshka_floor", "residual", "mixed"])
def test_staged_arena_decodes_planes_where_they_live_bit_exact(models, name, compiled, monkeypatch):
    """The GPU path's logic on the CPU: a staged (device-style) arena holds the plane bytes, copied in
    from staging buffers; experts are decoded from those bytes with torch (``PlaneDecoder``) into the
    planned fp32 scratch on the arena's device — bit-identical to the resident decode at every budget.
    ``MOESTREAM_COMPILE_DECODE=1``: matryoshka levels through the torch.compile'd expert decode (the
    CUDA default), same bits; residual stays eager."""
    monkeypatch.setenv(COMPILE_DECODE_ENV, compiled)
    path = models[name]
    ref = run_logits(load_eval_model(path)[0], IDS)
    with ShardedModel.open(path, verify="off") as r:
        fp = shard_footprint(r, CTX, staged=True)
    assert fp.scratch_bytes > 0  # the decode target is planned (none for native views)
    low = min_streaming_budget(fp)
    for budget in (low, low + all_experts_arena_bytes(fp)):
        loaded = load_streaming_model(path, memory=budget, ctx=CTX, staged=True)
        provider = loaded.model.expert_provider
        try:
            assert isinstance(provider.arena.buffer, torch.Tensor) and provider.staging is not None
            st = provider.stats()
            assert st["device_decode"] and not st["native_nested_kernel"]
            assert torch.equal(run_logits(loaded.model, IDS), ref), (name, budget)
            st = provider.stats()
            assert st["compiled_decode"] is (compiled == "1" and name != "residual"), st
            st = provider.stats()
            assert st["transfer"]["copies"] == st["loader"]["reads"] > 0
            assert st["transfer"]["bytes_copied"] == st["loader"]["bytes_read"]
        finally:
            provider.close()


def test_staged_arena_refuses_an_expert_with_a_foreign_header(models):
    """Every plane 0 read into a device arena is checked against the model's header (one decoder per model)."""
    from moestream.convert.errors import ModelFormatError
    from moestream.convert.nested_planes import pack_header
    from moestream.convert.codecs import get_codec

    loaded = load_streaming_model(models["matryoshka_floor"], memory=10 ** 9, ctx=CTX, staged=True)
    provider = loaded.model.expert_provider
    try:
        dec = provider._plane_decoder
        inter, hidden = dec.shapes["gate_proj"]
        dec.check_header(np.frombuffer(dec.header, np.uint8))
        foreign = np.frombuffer(pack_header(get_codec("residual"), 64, hidden, inter), np.uint8)
        with pytest.raises(ModelFormatError, match="mixes conversions"):
            dec.check_header(foreign, "expert 3 of layer 1")
    finally:
        provider.close()


def test_doctor_times_the_kernels_the_model_is_stored_for(models, tmp_path):
    """``moestream doctor``'s compute measurement runs the stored formats' kernels: nested experts on the
    native kernels at their top level, Q8_0 dense matrices on the block kernels (whole model, and the
    one-layer path used for large models)."""
    from moestream.engine.commands_streaming import measure_decode_compute

    if not native_kernels.available():
        pytest.skip("native kernels unavailable (no C compiler, or MOESTREAM_NATIVE_KERNELS=0)")
    shards, _ = compress_checkpoint(models["hf"], tmp_path / "q8", CompressOptions(
        codec="matryoshka_floor", group_size=64, dense="q8_0", favour=False), progress=False)
    with ShardedModel.open(shards[0].parent, verify="off") as reader:
        top = max(reader.n_levels(l, e) for l, e in reader.expert_keys()) - 1
        for limit in (512 * 2**20, 0):  # the whole model, then one layer x layers + LM head
            got = measure_decode_compute(reader.model_type, reader.config, steps=4, full_model_limit=limit,
                                         reader=reader)
            assert got["experts"] == f"native matryoshka_floor level {top}", got
            assert got["quantized_dense"] > 0 and got["compute_s_per_token"] > 0, got
        plain = measure_decode_compute(reader.model_type, reader.config, steps=4)
        assert plain["experts"] == "fp32" and plain["quantized_dense"] == 0


def test_bad_compile_decode_setting_is_one_clear_error(models, monkeypatch):
    """A bad MOESTREAM_COMPILE_DECODE is a SettingError (a MoestreamError: the CLI prints one line)."""
    from moestream.convert.errors import MoestreamError

    monkeypatch.setenv(COMPILE_DECODE_ENV, "sometimes")
    with pytest.raises(MoestreamError, match="MOESTREAM_COMPILE_DECODE must be auto, 0 or 1"):
        load_streaming_model(models["matryoshka_floor"], memory=10 ** 9, ctx=CTX, staged=True)
