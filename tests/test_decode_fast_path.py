"""The lean single-token decode path (``blocks.FAST_DECODE``) against the general path.

- :meth:`Attention._decode_one`, with the native q/k norm + RoPE + cache write
  (``engine/decode_kernels.py``) and with its torch fallback, equals :meth:`Attention._forward_general` within fp32 rounding (the
  attention sums run in another order) for every attention variant the families use — q/k norm
  none / per head / full, qkv bias, qkv clipping, MHA and GQA ratios, batch 1 and 2 — at several
  cache positions; the v it writes into the cache is bit-identical, and so is k except after the
  native per-head norm (its mean square is summed in double: within fp32 rounding);
- ``F.rms_norm`` is bit-identical to the general :class:`RMSNorm` formula in fp32; the fast
  :class:`RMSNorm` (native rows for small inputs) equals it within fp32 rounding;
- the one-token MoE routing (Python sort of the k pairs) hands the provider the same ids and
  weights in the same order and gives a bit-identical output;
- a whole model decodes to the same logits within fp32 rounding with the switch on and off.
"""
from __future__ import annotations

import pytest
import torch

from moestream.engine import decode_kernels
from moestream.engine.experts import ResidentExperts
from moestream.engine.models import blocks, get_model_classes
from moestream.engine.models.blocks import Attention, MoEBlock, MoERuntime, RMSNorm, RotaryEmbedding, \
    SoftmaxTopKRouter

torch.set_num_threads(1)

RTOL, ATOL = 1e-5, 1e-5  # fp32 rounding of sums over <= a few hundred terms of O(1) values


@pytest.fixture(autouse=True)
def _restore_switch():
    yield
    blocks.FAST_DECODE = True
    blocks.NATIVE_ATTENTION = True


VARIANTS = {
    "mha_plain": dict(heads=4, kv=4, qk_norm=None, bias=False, clip=None),
    "gqa2_bias": dict(heads=4, kv=2, qk_norm=None, bias=True, clip=None),  # Qwen2-MoE
    "gqa4_head_norm": dict(heads=8, kv=2, qk_norm="head", bias=False, clip=None),  # Qwen3-MoE
    "mqa_head_norm_bias": dict(heads=6, kv=1, qk_norm="head", bias=True, clip=None),
    "full_norm_clip": dict(heads=4, kv=4, qk_norm="full", bias=False, clip=0.3),  # OLMoE
    "gqa3_full_norm": dict(heads=6, kv=2, qk_norm="full", bias=True, clip=None),
    "gqa2_clip": dict(heads=4, kv=2, qk_norm=None, bias=False, clip=0.5),
}


def _attention(v: dict, hidden: int = 48, head_dim: int = 16, seed: int = 0) -> Attention:
    torch.manual_seed(seed)
    attn = Attention(hidden, v["heads"], v["kv"], head_dim, qkv_bias=v["bias"], o_bias=v["bias"],
                     qk_norm=v["qk_norm"], eps=1e-6, clip_qkv=v["clip"]).eval()
    with torch.no_grad():
        for name, p in attn.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.3)
    return attn


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("native", [True, False])
def test_attention_decode_one_matches_general(name, batch, native):
    if native and not decode_kernels.available():
        pytest.skip("native decode helpers not built here")
    blocks.NATIVE_ATTENTION = native
    attn = _attention(VARIANTS[name])
    rope = RotaryEmbedding(attn.head_dim, 10000.0)
    entry = attn.new_cache_entry(batch, 40)
    g = torch.Generator().manual_seed(1)
    prompt = 5
    with torch.inference_mode():
        x = torch.randn(batch, prompt, 48, generator=g)
        cos, sin = rope(0, prompt)
        attn._forward_general(x, cos, sin, 0, entry)
        for pos in range(prompt, 37, 4):  # several cache positions
            x1 = torch.randn(batch, 1, 48, generator=g)
            cos, sin = rope(pos, 1)
            want = attn._forward_general(x1, cos, sin, pos, entry)
            k_want, v_want = (b[:, :, :pos + 1].clone() for b in entry.buffers)
            for b in entry.buffers:
                b[:, :, pos].zero_()
            got = attn._decode_one(x1, cos, sin, pos, entry)
            assert got.shape == want.shape == (batch, 1, 48)
            torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
            if native and attn.qk_norm == "head":
                torch.testing.assert_close(entry.buffers[0][:, :, :pos + 1], k_want, rtol=1e-6, atol=1e-6)
            else:
                assert torch.equal(entry.buffers[0][:, :, :pos + 1], k_want)
            assert torch.equal(entry.buffers[1][:, :, :pos + 1], v_want)
            blocks.FAST_DECODE = True
            assert torch.equal(attn(x1, cos, sin, pos, entry), got)  # forward dispatches T=1 to _decode_one


def test_native_prep_declines_what_it_cannot_do():
    if not decode_kernels.available():
        pytest.skip("native decode helpers not built here")
    rope = RotaryEmbedding(16, 10000.0)
    q, k, v = (torch.randn(1, 1, n * 16) for n in (8, 2, 2))
    cos, sin = rope(3, 1)
    caches = [torch.zeros(1, 2, 6, 16) for _ in range(2)]
    assert decode_kernels.prep_one(q, k, v, None, None, 1e-6, cos, sin, *caches, 3, 8) is not None
    assert decode_kernels.prep_one(q, k, v, None, None, 1e-6, cos, sin, *caches, 6, 8) is None  # past the cache
    half = [torch.zeros(1, 2, 6, 16, dtype=torch.bfloat16) for _ in range(2)]
    assert decode_kernels.prep_one(q, k, v, None, None, 1e-6, cos, sin, *half, 3, 8) is None
    assert not any(c.any() for c in half)
    strided = [torch.zeros(1, 6, 2, 16).transpose(1, 2) for _ in range(2)]
    assert decode_kernels.prep_one(q, k, v, None, None, 1e-6, cos, sin, *strided, 3, 8) is None
    w = torch.ones(16, requires_grad=True)
    with torch.enable_grad():  # autograd recording: torch keeps the graph (another test may have left grad off)
        assert decode_kernels.prep_one(q, k, v, w, w, 1e-6, cos, sin, *caches, 3, 8) is None
        assert decode_kernels.rms_norm(q.view(8, 16), w, 1e-6) is None
        assert RMSNorm(16)(q.view(8, 16)).requires_grad
    with torch.no_grad():
        assert decode_kernels.rms_norm(q.view(8, 16), w, 1e-6) is not None


@pytest.mark.parametrize("native", [True, False])
def test_attention_decode_one_cache_full(native):
    blocks.NATIVE_ATTENTION = native
    attn = _attention(VARIANTS["gqa4_head_norm"])
    rope = RotaryEmbedding(attn.head_dim, 10000.0)
    entry = attn.new_cache_entry(1, 3)
    cos, sin = rope(3, 1)
    with torch.inference_mode(), pytest.raises(ValueError, match="KV cache full"):
        attn._decode_one(torch.randn(1, 1, 48), cos, sin, 3, entry)


@pytest.mark.parametrize("dim", [16, 96, 128, 2048])
@pytest.mark.parametrize("lead", [(1,), (1, 1), (3, 5), (1, 8)])
def test_rms_norm_fast(dim, lead):
    g = torch.Generator().manual_seed(dim)
    norm = RMSNorm(dim, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(1.0 + 0.3 * torch.randn(dim, generator=g))
    for x in (torch.randn(*lead, dim, generator=g) * 7.0,
              torch.randn(dim, *lead, generator=g).movedim(0, -1) * 1e-3):  # contiguous, and non-contiguous rows
        blocks.FAST_DECODE = False
        want = norm(x)
        assert torch.equal(torch.nn.functional.rms_norm(x, (dim,), norm.weight, 1e-6), want)
        blocks.FAST_DECODE = True
        got = norm(x)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0.0)
        if not x.is_contiguous() or not decode_kernels.available():
            assert torch.equal(got, want)  # F.rms_norm


class _Recorder(ResidentExperts):
    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.calls: list[tuple[list[int], list[float]]] = []

    def acquire(self, layer, expert_ids, gate_weights):
        self.calls.append((list(expert_ids), list(gate_weights)))
        return super().acquire(layer, expert_ids, gate_weights)


@pytest.mark.parametrize("norm_topk", [True, False])
def test_routed_one_same_ids_weights_and_output(norm_topk):
    torch.manual_seed(0)
    hidden, experts, inter, k = 32, 12, 24, 4
    runtime = MoERuntime()
    router = SoftmaxTopKRouter(hidden, experts, k, norm_topk)
    with torch.no_grad():
        router.weight.normal_(0.0, 1.0)
    block = MoEBlock(0, router, runtime)
    provider = _Recorder({0: torch.randn(experts, 2 * inter, hidden) * 0.2}, {0: torch.randn(experts, hidden, inter) * 0.2})
    runtime.provider = provider
    with torch.inference_mode():
        for seed in range(5):
            x = torch.randn(1, 1, hidden, generator=torch.Generator().manual_seed(seed))
            blocks.FAST_DECODE = False
            want = block(x)
            blocks.FAST_DECODE = True
            got = block(x)
            assert torch.equal(got, want)
            assert provider.calls[-1] == provider.calls[-2]
            assert provider.calls[-1][0] == sorted(provider.calls[-1][0])


@pytest.mark.parametrize("model_type,extra", [
    ("qwen3_moe", {"head_dim": 16}),
    ("olmoe", {"clip_qkv": 0.8}),
    ("qwen2_moe", {"shared_expert_intermediate_size": 24}),
    ("mixtral", {}),
])
def test_model_decode_switch_on_off(model_type, extra):
    model_cls, args_cls = get_model_classes(model_type)
    cfg = {"model_type": model_type, "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 6, "num_local_experts": 6,
           "num_experts_per_tok": 2, "moe_intermediate_size": 24, "intermediate_size": 24, **extra}
    args = args_cls.from_config(cfg)
    torch.manual_seed(0)
    model = model_cls(args).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p)) if "norm" in name else p.normal_(0.0, 0.2)
    inter = args.expert_intermediate_size
    layers = model.moe_layers()
    model.set_expert_provider(ResidentExperts({l: torch.randn(6, 2 * inter, 32) * 0.2 for l in layers},
                                              {l: torch.randn(6, 32, inter) * 0.2 for l in layers}))
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(3))
    out = {}
    with torch.inference_mode():
        for arm in (False, True):
            blocks.FAST_DECODE = arm
            cache = model.make_cache(1, 16)
            model(ids[:, :4], cache)
            out[arm] = torch.cat([model(ids[:, t:t + 1], cache) for t in range(4, 12)], dim=1)
    torch.testing.assert_close(out[True], out[False], rtol=1e-4, atol=1e-4)


def test_quantized_linear_cached_packed_follows_buffers():
    from moestream.engine import dense_kernels
    from moestream.engine.quantized_dense import QuantizedLinear

    lin = QuantizedLinear(dense_kernels.quantize(torch.randn(8, 64), "q8_0"))
    x = torch.randn(2, 64)
    want = lin(x)
    old_qs = lin.qs
    lin._apply(lambda t: t.clone())  # what .to() does with a real move: new buffers
    assert lin._cached is None and lin.qs is not old_qs
    assert torch.equal(lin(x), want) and lin._cached.qs is lin.qs
    lin.qs = lin.qs.clone()  # a buffer swapped by hand is noticed too
    assert torch.equal(lin(x), want) and lin._cached.qs is lin.qs
