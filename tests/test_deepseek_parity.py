"""DeepSeek-V2 / V3 parity with transformers 5.24, routing, MLA cache and config handling.

Tiny random-init transformers models (``tests/tiny_models.py``) are saved with
``save_pretrained`` and loaded by the engine (``load_hf_model``); the engine
must match the transformers fp32 logits within 1e-4 on a 24-token prompt
(prefill, chunked prefill, then 8 incremental decode steps through the KV
cache) and reproduce a 16-token greedy generation. Variants cover V2-Lite
style (plain ``q_proj``, softmax, ``group_limited_greedy`` and ``greedy``)
and V3 (q LoRA, sigmoid + non-zero ``e_score_correction_bias``,
``n_group > topk_group``, ``first_k_dense_replace=1``,
``routed_scaling_factor != 1``), plus YaRN RoPE (both layouts) read from the
Hub ``rope_scaling`` spelling.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import pytest
import torch

from moestream.convert.errors import ModelFormatError, UnsupportedModelError
from moestream.convert.hf_checkpoint import HFCheckpoint
from moestream.engine.experts import ExpertView, ResidentExperts
from moestream.engine.hf_loading import load_hf_model
from moestream.engine.models import get_model_classes
from moestream.engine.models.deepseek_v2 import GroupedTopKRouter, build_router
from moestream.engine.models.mla import MLADims, MLAttention

from tiny_models import TINY_CONFIGS, build_tiny_hf_model

PROMPT_LEN, DECODE_STEPS, GEN_TOKENS, ATOL = 24, 8, 16, 1e-4

torch.set_num_threads(1)

_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
         "mscale": 0.9, "mscale_all_dim": 0.8, "beta_fast": 32, "beta_slow": 1}

#: variant -> (model_type, config overrides)
VARIANTS: dict[str, tuple[str, dict]] = {
    "v2_group_limited": ("deepseek_v2", {}),
    "v2_greedy": ("deepseek_v2", {"topk_method": "greedy", "n_group": None, "topk_group": None,
                                  "routed_scaling_factor": 1.0}),
    "v3": ("deepseek_v3", {}),
    "v3_yarn_rotate_half": ("deepseek_v3", {"rope_parameters": dict(_YARN), "rope_interleave": False}),
    "v2_yarn": ("deepseek_v2", {"rope_parameters": {**_YARN, "mscale": 1.0, "mscale_all_dim": 1.0}}),
}
PARITY = ["v2_group_limited", "v2_greedy", "v3"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """variant -> (saved folder, transformers reference), built once."""
    out = {}
    for name, (mt, overrides) in VARIANTS.items():
        path = tmp_path_factory.mktemp(name)
        out[name] = (path, build_tiny_hf_model(mt, path, seed=3, overrides=overrides))
    return out


def _tokens(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (1, n), generator=g)


@torch.no_grad()
def _ref(ref: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return ref(ids).logits.float()


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


class CountingProvider:
    """Wraps :class:`ResidentExperts`, recording every acquire/release (the seam under test)."""

    def __init__(self, inner: ResidentExperts) -> None:
        self.inner = inner
        self.acquired: list[tuple[int, list[int]]] = []
        self.released: list[tuple[int, list[int]]] = []

    def hint(self, layer: int, predicted_ids: torch.Tensor, predicted_weights: torch.Tensor) -> None:
        self.inner.hint(layer, predicted_ids, predicted_weights)

    def acquire(self, layer: int, expert_ids: Sequence[int], gate_weights: Sequence[float]) -> dict[int, ExpertView]:
        self.acquired.append((layer, list(expert_ids)))
        return self.inner.acquire(layer, expert_ids, gate_weights)

    def release(self, layer: int, expert_ids: Sequence[int]) -> None:
        self.released.append((layer, list(expert_ids)))
        self.inner.release(layer, expert_ids)

    def stats(self) -> dict:
        return self.inner.stats()


# --- parity ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", PARITY + ["v3_yarn_rotate_half", "v2_yarn"])
@torch.no_grad()
def test_prefill_and_decode_match_transformers(tiny, variant):
    path, ref = tiny[variant]
    model, _ = load_hf_model(path)
    ids = _tokens(PROMPT_LEN + DECODE_STEPS)
    expected = _ref(ref, ids)  # [1, 32, V]

    assert _max_err(model(ids[:, :PROMPT_LEN]), expected[:, :PROMPT_LEN]) < ATOL  # cache-less

    cache = model.make_cache(1, 64)
    assert _max_err(model(ids[:, :PROMPT_LEN], cache), expected[:, :PROMPT_LEN]) < ATOL
    for i in range(PROMPT_LEN, PROMPT_LEN + DECODE_STEPS):
        step = model(ids[:, i:i + 1], cache)  # [1, 1, V]
        assert _max_err(step, expected[:, i:i + 1]) < ATOL, f"decode step at position {i}"
    assert cache.seq_len == PROMPT_LEN + DECODE_STEPS

    chunked = model.make_cache(1, 64)  # prefill in two chunks: masked attention with start > 0
    model(ids[:, :16], chunked)
    assert _max_err(model(ids[:, 16:PROMPT_LEN], chunked), expected[:, 16:PROMPT_LEN]) < ATOL


@pytest.mark.parametrize("variant", ["v2_group_limited", "v3"])
@torch.no_grad()
def test_batched_prefill_and_decode(tiny, variant):
    path, ref = tiny[variant]
    model, _ = load_hf_model(path)
    ids = torch.cat([_tokens(PROMPT_LEN + 2, seed=7), _tokens(PROMPT_LEN + 2, seed=8)])  # [2, 26]
    expected = _ref(ref, ids)
    cache = model.make_cache(2, 32)
    assert _max_err(model(ids[:, :PROMPT_LEN], cache), expected[:, :PROMPT_LEN]) < ATOL
    for i in (PROMPT_LEN, PROMPT_LEN + 1):
        assert _max_err(model(ids[:, i:i + 1], cache), expected[:, i:i + 1]) < ATOL


@pytest.mark.parametrize("variant", PARITY)
@torch.no_grad()
def test_greedy_generation_identical(tiny, variant):
    path, ref = tiny[variant]
    model, _ = load_hf_model(path)
    prompt = _tokens(PROMPT_LEN, seed=2)

    hf_ids = prompt
    for _ in range(GEN_TOKENS):
        nxt = _ref(ref, hf_ids)[:, -1].argmax(-1, keepdim=True)
        hf_ids = torch.cat([hf_ids, nxt], dim=1)

    cache = model.make_cache(1, PROMPT_LEN + GEN_TOKENS)
    logits = model(prompt, cache)
    ours: list[int] = []
    for _ in range(GEN_TOKENS):
        nxt = int(logits[0, -1].argmax())
        ours.append(nxt)
        logits = model(torch.tensor([[nxt]]), cache)
    assert ours == hf_ids[0, PROMPT_LEN:].tolist()


# --- routing, hooks, the provider seam ------------------------------------------------------------


@pytest.mark.parametrize("variant", PARITY)
@torch.no_grad()
def test_routing_hooks_fire_and_experts_come_through_provider(tiny, variant):
    path, _ = tiny[variant]
    model, args = load_hf_model(path)
    provider = CountingProvider(model.expert_provider)
    model.set_expert_provider(provider)
    assert not [n for n in model.state_dict() if ".experts." in n]  # routed experts are not parameters

    calls: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    model.add_routing_hook(lambda layer, ids, w: calls.append((layer, ids.clone(), w.clone())))
    cache = model.make_cache(1, 64)
    model(_tokens(PROMPT_LEN), cache)
    model(_tokens(1, seed=5), cache)

    assert model.moe_layers() == [1, 2]  # first_k_dense_replace = 1
    assert [c[0] for c in calls] == [1, 2, 1, 2]
    for layer, ids, w in calls:
        assert ids.shape == w.shape and ids.shape[1] == args.num_experts_per_tok
        assert ids.dtype == torch.int64 and int(ids.min()) >= 0 and int(ids.max()) < args.n_routed_experts
        assert bool((w > 0).all())
        if args.model_type == "deepseek_v3":  # renormalised, then scaled
            torch.testing.assert_close(w.sum(-1), torch.full((ids.shape[0],), args.routed_scaling_factor))
        else:  # softmax probabilities times the scaling factor, never renormalised
            assert bool((w.sum(-1) < args.routed_scaling_factor).all())
        if args.n_group and args.topk_method != "greedy":  # chosen experts lie in <= topk_group groups
            groups = ids // (args.n_routed_experts // args.n_group)
            assert all(len(set(row)) <= args.topk_group for row in groups.tolist())

    assert [a[0] for a in provider.acquired] == [1, 2, 1, 2]
    assert provider.acquired == provider.released
    for (layer, ids, _), (_, acquired) in zip(calls, provider.acquired):
        assert sorted(set(ids.flatten().tolist())) == sorted(acquired)


def _hf_router(model_type: str, overrides: dict):
    import transformers
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    cfg_name, _, kwargs = TINY_CONFIGS[model_type]
    config = getattr(transformers, cfg_name)(**{**kwargs, **overrides})
    router_cls = DeepseekV3TopkRouter if model_type == "deepseek_v3" else DeepseekV2TopkRouter
    return router_cls(config), config


@pytest.mark.parametrize("model_type,overrides", [
    ("deepseek_v2", {"topk_method": "greedy"}),
    ("deepseek_v2", {"topk_method": "group_limited_greedy", "routed_scaling_factor": 16.0}),
    ("deepseek_v3", {}),
    ("deepseek_v3", {"norm_topk_prob": False, "n_routed_experts": 16, "n_group": 8, "topk_group": 3,
                     "num_experts_per_tok": 4}),
])
@torch.no_grad()
def test_router_matches_transformers(model_type, overrides):
    torch.manual_seed(0)
    hf_router, _ = _hf_router(model_type, overrides)
    ours = build_router(_args(model_type, **overrides))
    hf_router.weight.normal_(0.0, 0.3)
    if model_type == "deepseek_v3":
        hf_router.e_score_correction_bias.normal_(0.0, 0.1)
    ours.load_state_dict(hf_router.state_dict())
    x = torch.randn(64, TINY_CONFIGS[model_type][2]["hidden_size"])

    _, ref_w, ref_ids = hf_router(x)
    ids, w = ours(x)
    ref_order, order = ref_ids.argsort(-1), ids.argsort(-1)
    assert torch.equal(ref_ids.gather(1, ref_order), ids.gather(1, order))
    torch.testing.assert_close(ref_w.gather(1, ref_order), w.gather(1, order), rtol=0, atol=1e-6)


@torch.no_grad()
def test_noaux_tc_bias_steers_choice_not_weights():
    router = GroupedTopKRouter(16, 8, 2, scoring_func="sigmoid", topk_method="noaux_tc", n_group=4, topk_group=2,
                               norm_topk_prob=False, routed_scaling_factor=1.0)
    torch.manual_seed(0)
    router.weight.normal_(0.0, 0.5)
    x = torch.randn(32, 16)
    ids_plain, _ = router(x)
    router.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0]))
    ids_biased, w_biased = router(x)
    assert not torch.equal(ids_plain.sort(-1).values, ids_biased.sort(-1).values)
    assert bool((ids_biased == 7).any(-1).all())  # the bias forces expert 7 in for every token
    torch.testing.assert_close(w_biased, router.scores(x).gather(1, ids_biased))  # weights stay unbiased


# --- MLA ---------------------------------------------------------------------------------------------


@torch.no_grad()
def test_mla_cache_holds_latent_and_paths_agree():
    dims = MLADims(hidden_size=32, num_heads=4, q_lora_rank=12, kv_lora_rank=10, qk_nope_head_dim=6,
                   qk_rope_head_dim=4, v_head_dim=8)
    torch.manual_seed(0)
    attn = MLAttention(dims, scale=0.3)
    for p in attn.parameters():
        p.normal_(0.0, 0.3)
    entry = attn.new_cache_entry(2, 20)
    assert [tuple(b.shape) for b in entry.buffers] == [(2, 20, 10), (2, 20, 4)]  # latent + shared rope key only

    q_nope, q_rope = torch.randn(2, 4, 5, 6), torch.randn(2, 4, 5, 4)
    c_kv, k_rope = torch.randn(2, 12, 10), torch.randn(2, 12, 4)  # 7 cached + 5 new positions
    expanded = attn._attend_expanded(q_nope, q_rope, c_kv, k_rope, start=7)
    absorbed = attn._attend_absorbed(q_nope, q_rope, c_kv, k_rope, start=7)
    torch.testing.assert_close(expanded, absorbed, rtol=0, atol=1e-5)


# --- configs and checkpoints ----------------------------------------------------------------------


@torch.no_grad()
def test_hub_config_spelling(tiny, tmp_path):
    """Real Hub configs: top-level rope_theta + rope_scaling {type: yarn}, torch_dtype, extra DeepSeek keys."""
    src, ref = tiny["v3_yarn_rotate_half"]
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((src / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")
    cfg["rope_scaling"] = rope
    cfg["torch_dtype"] = cfg.pop("dtype")
    cfg.update({"topk_method": "noaux_tc", "scoring_func": "sigmoid", "moe_layer_freq": 1, "ep_size": 1,
                "num_nextn_predict_layers": 1})
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model, args = load_hf_model(tmp_path)
    assert args.rope_scaling["type"] == "yarn" and args.rope_theta == 10000.0
    ids = _tokens(PROMPT_LEN)
    assert _max_err(model(ids), _ref(ref, ids)) < ATOL


def test_extra_mtp_layers_are_ignored(tiny):
    path, _ = tiny["v3"]
    ckpt = HFCheckpoint.open(path)
    model_cls, args_cls = get_model_classes("deepseek_v3")
    model = model_cls(args_cls.from_config(ckpt.config))
    dense = {n: ckpt.read_canonical(n) for n in ckpt.canonical_names() if ".experts." not in n}
    dense["model.layers.3.eh_proj.weight"] = torch.zeros(64, 128)  # an MTP layer past num_hidden_layers
    model.load_canonical(dense)
    ckpt.close()
    with pytest.raises(ModelFormatError):
        model.load_canonical({**dense, "model.layers.1.self_attn.q_proj.weight": torch.zeros(1)})


def _args(model_type: str, **overrides):
    _, args_cls = get_model_classes(model_type)
    _, _, kwargs = TINY_CONFIGS[model_type]
    return args_cls.from_config({**kwargs, **overrides, "model_type": model_type})


def test_moe_layer_freq_and_dense_layers():
    args = _args("deepseek_v2", num_hidden_layers=5, first_k_dense_replace=1, moe_layer_freq=2)
    model_cls, _ = get_model_classes("deepseek_v2")
    assert model_cls(args).moe_layers() == [2, 4]
    assert model_cls(_args("deepseek_v3", first_k_dense_replace=0)).moe_layers() == [0, 1, 2]


@pytest.mark.parametrize("model_type,overrides,words", [
    ("deepseek_v3", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "dynamic"),
    ("deepseek_v2", {"norm_topk_prob": True}, "norm_topk_prob"),
    ("deepseek_v2", {"topk_method": "noaux_tc"}, "noaux_tc"),
    ("deepseek_v3", {"topk_method": "greedy"}, "greedy"),
    ("deepseek_v3", {"scoring_func": "softmax"}, "softmax"),
    ("deepseek_v3", {"quantization_config": {"quant_method": "fp8"}}, "dequantize"),
    ("deepseek_v2", {"mlp_bias": True}, "mlp_bias"),
    ("deepseek_v3", {"n_group": 3}, "n_group"),
])
def test_unsupported_configs_raise_clearly(model_type, overrides, words):
    model_cls, _ = get_model_classes(model_type)
    with pytest.raises(UnsupportedModelError, match=words):
        model_cls(_args(model_type, **overrides))


def test_v2_lite_hub_config_builds():
    """DeepSeek-V2-Lite's config.json keys (scaled down): q_lora_rank null, greedy, n_group 1, YaRN."""
    cfg = {
        "model_type": "deepseek_v2", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 96,
        "moe_intermediate_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4,
        "n_shared_experts": 2, "n_routed_experts": 8, "ep_size": 1, "routed_scaling_factor": 1.0,
        "kv_lora_rank": 16, "q_lora_rank": None, "qk_rope_head_dim": 8, "v_head_dim": 12, "qk_nope_head_dim": 8,
        "topk_method": "greedy", "n_group": 1, "topk_group": 1, "num_experts_per_tok": 2, "moe_layer_freq": 1,
        "first_k_dense_replace": 1, "norm_topk_prob": False, "scoring_func": "softmax", "aux_loss_alpha": 0.001,
        "seq_aux": True, "hidden_act": "silu", "max_position_embeddings": 1024, "rms_norm_eps": 1e-6,
        "rope_theta": 10000, "torch_dtype": "bfloat16",
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 4, "mscale": 0.707, "mscale_all_dim": 0.707,
                         "original_max_position_embeddings": 256, "type": "yarn"},
    }
    model_cls, args_cls = get_model_classes("deepseek_v2")
    model = model_cls(args_cls.from_config(cfg))
    attn = model.model.layers[0].self_attn
    assert hasattr(attn, "q_proj") and not hasattr(attn, "q_a_proj")
    assert attn.scale == pytest.approx(16 ** -0.5 * (0.1 * 0.707 * torch.log(torch.tensor(4.0)).item() + 1) ** 2)
    gate = model.model.layers[1].mlp.gate
    assert (gate.scoring_func, gate.topk_method, gate.e_score_correction_bias) == ("softmax", "greedy", None)
    assert model.moe_layers() == [1, 2]
