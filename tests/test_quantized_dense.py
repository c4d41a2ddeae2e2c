"""Dense matrices kept as Q8_0 / Q4_0 at run time (issue 9): modules, loading, planning, corruption.

Unit level: :class:`QuantizedLinear` equals ``dense_kernels.reference_linear`` (the kernel's own bound:
1e-5·|x|·|W|ᵀ + 1e-6) and differs from fp32 ``F.linear`` on the dequantized weight by at most the int8
rounding of the activations: |Δy[m, n]| <= Σ_b (max|x[m, b]| / 127 / 2) · Σ_{k∈b} |W[n, k]| (half a
quantization step per input, plus fp32 slack). :class:`QuantizedEmbedding` is exact.

End to end: the runtime test model (tests/runtime_model.py) converted with ``--dense q8_0`` / ``q4_0``
and ``--no-favour`` loads through ``Engine.load`` with every block-typed matrix held packed; its
memory plan counts the packed bytes (exactly the bytes the loaded model holds, below the f16
conversion's fp32 load); its logits match the same shards loaded with dense weights widened to fp32
(``load_resident_shard_model``: the model on the dequantized weights) within 5 % of the largest
logit on every position whose routing agreed so far (activation rounding can flip a near-tie in a
router: from there on the two models legitimately differ), and greedy tokens agree.
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

from runtime_model import build_runtime_model  # noqa: E402
from streaming_helpers import CTX  # noqa: E402
from tiny_models import build_tiny_hf_model  # noqa: E402

from moestream.convert.compress import CompressOptions, compress_checkpoint  # noqa: E402
from moestream.convert.errors import ChecksumError  # noqa: E402
from moestream.convert.shard_reader import QUANTIZED_TYPES, ShardedModel  # noqa: E402
from moestream.engine import dense_kernels, quantized_dense  # noqa: E402
from moestream.engine.api import Engine  # noqa: E402
from moestream.engine.hf_loading import build_model  # noqa: E402
from moestream.engine.quantized_dense import QuantizedEmbedding, QuantizedLinear, quantized_targets  # noqa: E402
from moestream.engine.streaming import load_resident_shard_model, load_streaming_model, shard_footprint  # noqa: E402

torch.set_num_threads(1)
KINDS = ("q8_0", "q4_0")
#: Logit tolerance relative to the largest reference logit (measured: <= 2.8 % on this model).
LOGIT_RTOL = 0.05


def _convert(hf: Path, out: Path, dense: str) -> Path:
    compress_checkpoint(hf, out, CompressOptions(codec="none", dtype="f16", dense=dense, favour=False), progress=False)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quantized_dense")
    hf = build_runtime_model(root / "hf")
    return {"hf": hf, **{d: _convert(hf, root / d, d) for d in ("f16", *KINDS)}}


@pytest.fixture(autouse=True)
def native_or_reference(monkeypatch):
    """Keep blocks packed even where the native kernel cannot build (the reference path is exact, just slow)."""
    if not dense_kernels.available():
        monkeypatch.setattr(quantized_dense, "widen_reason", lambda device="cpu": None)


# ------------------------------------------------------------------------------------------- modules
def _activation_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Half an int8 step per input, summed with |W| per block: [M, N]."""
    m, k = x.shape
    half_step = x.abs().view(m, k // 32, 32).amax(-1).double() / 127 / 2  # [M, K/32]
    wabs = w.abs().double().view(w.shape[0], k // 32, 32).sum(-1)  # [N, K/32]
    return half_step @ wabs.T + 1e-5 * (x.abs().double() @ w.abs().double().T) + 1e-6


@pytest.mark.parametrize("kind", KINDS)
def test_quantized_linear_matches_reference_and_fp32(kind):
    g = torch.Generator().manual_seed(0)
    w, bias = torch.randn(48, 96, generator=g), torch.randn(48, generator=g)
    packed = dense_kernels.quantize(w, kind)
    lin = QuantizedLinear(packed, bias)
    x = torch.randn(2, 3, 96, generator=g)
    y = lin(x)
    assert y.shape == (2, 3, 48) and y.dtype == torch.float32
    x2, y2 = x.reshape(-1, 96), y.reshape(-1, 48).double()
    wd = dense_kernels.dequantize(packed)
    ref = dense_kernels.reference_linear(x2, packed).double() + bias.double()
    kernel_bound = 1e-5 * (x2.abs().double() @ wd.abs().double().T) + 1e-6
    assert bool(((y2 - ref).abs() <= kernel_bound).all())
    fp32 = F.linear(x2, wd, bias).double()
    assert bool(((y2 - fp32).abs() <= _activation_bound(x2, wd)).all())
    assert set(lin.state_dict()) == {"qs", "d", "bias"} and lin.nbytes == packed.nbytes
    assert lin.weight_numel == 48 * 96 and lin(x.to(torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("kind", KINDS)
def test_quantized_embedding_is_exact(kind):
    g = torch.Generator().manual_seed(1)
    packed = dense_kernels.quantize(torch.randn(40, 64, generator=g), kind)
    emb = QuantizedEmbedding(packed)
    ids = torch.tensor([[0, 7, 39], [3, 3, 12]])
    assert torch.equal(emb(ids), F.embedding(ids, dense_kernels.dequantize(packed)))


def test_targets_skip_weights_read_directly():
    """MLA's kv_b_proj (absorbed attention reads its weight) and a tied embedding stay fp32."""
    from tiny_models import TINY_CONFIGS

    cfg = {**TINY_CONFIGS["deepseek_v2"][2], "model_type": "deepseek_v2", "kv_lora_rank": 32, "v_head_dim": 16}
    with torch.device("meta"):
        model, _ = build_model("deepseek_v2", cfg)
    stored = {n: SimpleNamespace(ggml_type=GGMLQuantizationType.Q8_0, shape=tuple(p.shape))
              for n, p in model.state_dict().items() if p.dim() == 2 and p.shape[1] % 32 == 0}
    reader = SimpleNamespace(dense_names=lambda: list(stored), dense_record=stored.__getitem__)
    targets = quantized_targets(model, reader)
    assert "model.layers.0.self_attn.q_proj" in targets and "model.embed_tokens" in targets
    assert "model.layers.1.mlp.shared_experts.down_proj" in targets and "lm_head" in targets
    assert not any(t.endswith("kv_b_proj") for t in targets)
    assert not any(t.endswith("mlp.gate") for t in targets)  # routers are not nn.Linear
    with torch.device("meta"):
        tied, _ = build_model("deepseek_v2", {**cfg, "tie_word_embeddings": True})
    assert "model.embed_tokens" not in quantized_targets(tied, reader)


# ------------------------------------------------------------------------------------------- end to end
def _held_bytes(model: nn.Module) -> int:
    """Parameters and buffers, without the RoPE tables grown on demand."""
    buffers = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if not n.endswith(("_cos", "_sin")))
    return sum(p.numel() * p.element_size() for p in model.parameters()) + buffers


def _routed_logits(model: nn.Module, ids: torch.Tensor, prefill: int) -> tuple[torch.Tensor, list[tuple]]:
    """Logits of a prefill then one-token decode steps, and each position's experts in every MoE layer."""
    routes: dict[int, list[torch.Tensor]] = {}

    def hook(layer: int, expert_ids: torch.Tensor, _w: torch.Tensor) -> None:
        routes.setdefault(layer, []).append(expert_ids.sort(dim=-1).values)

    model.add_routing_hook(hook)
    try:
        cache = model.make_cache(1, CTX)
        with torch.no_grad():
            outs = [model(ids[:, :prefill], cache)]
            outs += [model(ids[:, t:t + 1], cache) for t in range(prefill, ids.shape[1])]
    finally:
        model.remove_routing_hook(hook)
    per_layer = [torch.cat(routes[layer]) for layer in sorted(routes)]  # [T, k] each
    return torch.cat(outs, dim=1)[0], [tuple(tuple(r[t].tolist()) for r in per_layer) for t in range(ids.shape[1])]


def _check_greedy_near_reference(eng: Engine, ref_model: nn.Module, prompt: str, n: int) -> None:
    """Each greedy token is the widened model's top token, or within the logit tolerance of it.

    Checked on the generated sequence teacher-forced through both models, up to the first position whose
    routing differs (from there the sequences may legitimately part).
    """
    ids = eng.tokenizer.encode(prompt, add_special_tokens=False)
    out = eng.generate(prompt, max_tokens=n, temperature=0.0).token_ids
    seq = torch.tensor([ids + out])
    _, routes = _routed_logits(eng.model, seq, prefill=len(ids))
    want, want_routes = _routed_logits(ref_model, seq, prefill=len(ids))
    tol = LOGIT_RTOL * want.abs().max().item()
    agreed = _agreed_prefix(routes, want_routes)
    for i, token in enumerate(out):
        t = len(ids) + i - 1  # the position whose logits chose ``token``
        if t >= agreed:
            break
        assert want[t].max().item() - want[t, token].item() <= 2 * tol, (prompt, i, token)


def _agreed_prefix(routes: list[tuple], want_routes: list[tuple]) -> int:
    """Positions before the first one whose experts differ in some MoE layer."""
    return next((t for t, (a, b) in enumerate(zip(routes, want_routes)) if a != b), len(routes))


@pytest.mark.parametrize("kind", KINDS)
def test_engine_keeps_dense_blocks_and_matches_the_widened_model(models, kind):
    eng = Engine.load(models[kind], device="cpu", ctx=CTX)
    ref_model, _, reader = load_resident_shard_model(models[kind])
    ref = Engine(ref_model, eng.tokenizer, name="widened", source=None, device=torch.device("cpu"), ctx=CTX,
                 memory_bytes=None)
    try:
        model = eng.model
        for name, module in model.named_modules():  # every Q8_0/Q4_0 matrix is held packed, nothing else
            rec = reader.dense_record(f"{name}.weight") if f"{name}.weight" in reader.dense_names() else None
            if isinstance(module, (nn.Linear, nn.Embedding)):
                assert rec is not None and rec.ggml_type not in QUANTIZED_TYPES, name
            if isinstance(module, (QuantizedLinear, QuantizedEmbedding)):
                assert module.kind == kind and rec.ggml_type.name.lower() == kind, name
        assert isinstance(model.lm_head, QuantizedLinear) and isinstance(model.model.embed_tokens, QuantizedEmbedding)
        assert isinstance(model.model.layers[1].mlp.down_proj, QuantizedLinear)  # the dense MLP layer
        resident = eng.info["memory_plan"]["resident_bytes"]
        assert _held_bytes(model) == resident  # planning counts exactly what the load holds
        with ShardedModel.open(models["f16"], verify="off") as r16:
            f16_resident = shard_footprint(r16, CTX).resident_bytes
        assert resident < (0.35 if kind == "q8_0" else 0.2) * f16_resident
        assert _held_bytes(ref_model) == f16_resident  # the widened model holds what an f16 load holds

        agreed, total = 0, 0
        for seed in range(3):
            ids = torch.randint(0, 300, (1, 14), generator=torch.Generator().manual_seed(seed))
            got, routes = _routed_logits(model, ids, prefill=8)
            want, want_routes = _routed_logits(ref_model, ids, prefill=8)
            n = _agreed_prefix(routes, want_routes)
            diff = (got[:n] - want[:n]).abs().max().item() if n else 0.0
            assert diff <= LOGIT_RTOL * want.abs().max().item(), (seed, n, diff)
            agreed, total = agreed + n, total + len(routes)
        assert agreed >= 0.6 * total, (agreed, total)

        prompt = "Memory budgets"  # reference top-1 margins >= 0.086 over these 5 tokens (both kinds)
        out = eng.generate(prompt, max_tokens=5, temperature=0.0).token_ids
        assert out == ref.generate(prompt, max_tokens=5, temperature=0.0).token_ids
        _check_greedy_near_reference(eng, ref_model, "The quick brown fox", 10)
    finally:
        eng.close()
        ref.close()
        reader.close()


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v2"])
def test_families_with_biases_and_shared_experts(tmp_path, family):
    """qkv biases + gated shared expert (Qwen2-MoE), MLA + shared experts (DeepSeek-V2) at q8_0."""
    hf = tmp_path / "hf"
    build_tiny_hf_model(family, hf)
    path = _convert(hf, tmp_path / "q8", "q8_0")
    loaded = load_streaming_model(path, ctx=CTX)
    ref_model, _, reader = load_resident_shard_model(path)
    try:
        packed = [n for n, m in loaded.model.named_modules() if isinstance(m, QuantizedLinear)]
        assert packed and any("shared_expert" in n for n in packed)
        if family == "qwen2_moe":
            assert loaded.model.model.layers[0].self_attn.q_proj.bias is not None
        ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(0))
        got, routes = _routed_logits(loaded.model, ids, prefill=6)
        want, want_routes = _routed_logits(ref_model, ids, prefill=6)
        n = _agreed_prefix(routes, want_routes)
        assert n >= 3 and (got[:n] - want[:n]).abs().max() <= LOGIT_RTOL * want.abs().max()
    finally:
        loaded.model.expert_provider.close()
        reader.close()


def test_without_native_kernels_blocks_are_widened(models, monkeypatch, caplog):
    monkeypatch.setattr(quantized_dense, "widen_reason", lambda device="cpu": "test: no kernels")
    with caplog.at_level(logging.INFO, logger="moestream"):
        loaded = load_streaming_model(models["q8_0"], ctx=CTX)
    try:
        assert not any(isinstance(m, (QuantizedLinear, QuantizedEmbedding)) for m in loaded.model.modules())
        assert "widened to fp32 at load: test: no kernels" in caplog.text
        assert _held_bytes(loaded.model) == loaded.footprint.resident_bytes
    finally:
        loaded.model.expert_provider.close()


def test_corrupt_dense_block_fails_with_checksum_error(models, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(models["q8_0"], bad)
    name = "model.layers.0.self_attn.q_proj.weight"
    with ShardedModel.open(bad, verify="off") as r:
        rec = r.dense_record(name)
        assert rec.ggml_type == GGMLQuantizationType.Q8_0
    with open(rec.path, "r+b") as f:  # a code byte of the first block
        f.seek(rec.offset + 5)
        b = f.read(1)
        f.seek(rec.offset + 5)
        f.write(bytes([b[0] ^ 0x40]))
    with pytest.raises(ChecksumError, match=rf"{Path(rec.path).name}.*tensor {name}"):
        ShardedModel.open(bad).read_dense_raw(name)
    with pytest.raises(ChecksumError, match=rf"tensor {name}.*re-run convert or re-copy"):
        Engine.load(bad, device="cpu", ctx=CTX)
