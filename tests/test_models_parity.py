"""Parity of the engine's model families with transformers, and HF checkpoint loading.

For each family a tiny random-init transformers model is saved with
``save_pretrained`` (once per session); the engine loads the folder and must
match the transformers logits within 1e-4 (prefill, then incremental decode
through the KV cache) and reproduce a 16-token greedy generation. Bad input
(unsupported type, missing config, missing/truncated weights) must raise the
documented errors naming the file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from moestream.convert.errors import ModelFormatError, UnsupportedModelError
from moestream.convert.hf_checkpoint import HFCheckpoint, expert_name, parse_expert_name
from moestream.engine.experts import ResidentExperts
from moestream.engine.hf_loading import load_hf_model
from moestream.engine.models import SUPPORTED_MODEL_TYPES, get_model_classes

from tiny_models import TINY_CONFIGS, build_tiny_hf_model

FAMILIES = list(TINY_CONFIGS)  # every family with a tiny config (deepseek_v2/v3 included)
PROMPT_LEN, DECODE_STEPS, GEN_TOKENS, ATOL = 24, 8, 16, 1e-4

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """model_type -> (saved folder, transformers reference model), built once."""
    out = {}
    for mt in FAMILIES:
        path = tmp_path_factory.mktemp(mt)
        out[mt] = (path, build_tiny_hf_model(mt, path))
    return out


def _prompt(seed: int = 1, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (batch, PROMPT_LEN), generator=g)


@torch.no_grad()
def _ref_logits(ref: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return ref(ids).logits.float()


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("model_type", FAMILIES)
@torch.no_grad()
def test_prefill_and_decode_match_transformers(tiny_hf, model_type):
    path, ref = tiny_hf[model_type]
    model, _ = load_hf_model(path)
    ids = _prompt()
    cache = model.make_cache(1, PROMPT_LEN + DECODE_STEPS)
    logits = model(ids, cache)
    assert logits.dtype == torch.float32 and logits.shape == (1, PROMPT_LEN, 256)
    torch.testing.assert_close(logits, _ref_logits(ref, ids), atol=ATOL, rtol=0)
    g = torch.Generator().manual_seed(7)
    seq = ids
    for _ in range(DECODE_STEPS):
        nxt = torch.randint(3, 256, (1, 1), generator=g)
        seq = torch.cat([seq, nxt], dim=1)
        step = model(nxt, cache)  # [1, 1, V]
        torch.testing.assert_close(step[:, -1], _ref_logits(ref, seq)[:, -1], atol=ATOL, rtol=0)
    assert cache.seq_len == PROMPT_LEN + DECODE_STEPS


@pytest.mark.parametrize("model_type", FAMILIES)
@torch.no_grad()
def test_greedy_generation_identical(tiny_hf, model_type):
    path, ref = tiny_hf[model_type]
    model, _ = load_hf_model(path)
    ids = _prompt(seed=2)
    # reference: full recompute each step with transformers
    seq = ids
    for _ in range(GEN_TOKENS):
        seq = torch.cat([seq, _ref_logits(ref, seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    want = seq[0, PROMPT_LEN:].tolist()
    # engine: prefill once, then one token per step through the KV cache
    cache = model.make_cache(1, PROMPT_LEN + GEN_TOKENS)
    tok = model(ids, cache)[:, -1].argmax(-1, keepdim=True)
    got = [tok.item()]
    for _ in range(GEN_TOKENS - 1):
        tok = model(tok, cache)[:, -1].argmax(-1, keepdim=True)
        got.append(tok.item())
    assert got == want
    assert len(set(want)) > 1, "degenerate generation makes this test weak; change the seed"


@torch.no_grad()
def test_batch_and_chunked_prefill_match_single(tiny_hf):
    path, ref = tiny_hf["qwen2_moe"]
    model, _ = load_hf_model(path)
    ids = _prompt(seed=3, batch=2)
    want = _ref_logits(ref, ids)
    torch.testing.assert_close(model(ids), want, atol=ATOL, rtol=0)
    cache = model.make_cache(2, PROMPT_LEN)
    first = model(ids[:, :10], cache)
    second = model(ids[:, 10:], cache)  # chunk at start 10: needs the offset causal mask
    torch.testing.assert_close(torch.cat([first, second], dim=1), want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("model_type", FAMILIES)
@torch.no_grad()
def test_hub_config_spelling(tiny_hf, tmp_path, model_type):
    """Real Hub checkpoints spell num_experts / rope_theta / torch_dtype; still the same model."""
    path, ref = tiny_hf[model_type]
    folder = _copy(path, tmp_path / "hub")
    cfg = json.loads((folder / "config.json").read_text())
    rp = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rp["rope_theta"]
    cfg["torch_dtype"] = cfg.pop("dtype")
    if model_type == "qwen3_moe":
        cfg["num_experts"] = cfg.pop("num_local_experts")
    cfg["some_future_key"] = {"ignored": True}
    (folder / "config.json").write_text(json.dumps(cfg))
    model, args = load_hf_model(folder)
    assert args.n_routed_experts == 8 and args.rope_theta == rp["rope_theta"] and args.torch_dtype == "float32"
    ids = _prompt()
    torch.testing.assert_close(model(ids), _ref_logits(ref, ids), atol=ATOL, rtol=0)


@torch.no_grad()
def test_sharded_checkpoint_loads(tiny_hf, tmp_path):
    path, ref = tiny_hf["mixtral"]
    ref.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ckpt = HFCheckpoint.open(tmp_path)
    assert len(set(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1
    assert ckpt.model_type == "mixtral"
    names = ckpt.canonical_names()
    assert "model.layers.0.mlp.gate.weight" in names
    assert expert_name(2, 7, "down_proj") in names
    assert not any("block_sparse_moe" in n or ".w1." in n for n in names)
    model, _ = load_hf_model(tmp_path)
    ids = _prompt()
    torch.testing.assert_close(model(ids), _ref_logits(ref, ids), atol=ATOL, rtol=0)


@torch.no_grad()
def test_mixtral_canonical_expert_mapping(tiny_hf):
    """w1 -> gate_proj, w3 -> up_proj, w2 -> down_proj, block_sparse_moe -> mlp."""
    path, _ = tiny_hf["mixtral"]
    ckpt = HFCheckpoint.open(path)
    pairs = dict(ckpt.canonical_items())
    assert pairs[expert_name(1, 3, "gate_proj")] == "model.layers.1.block_sparse_moe.experts.3.w1.weight"
    assert pairs[expert_name(1, 3, "up_proj")] == "model.layers.1.block_sparse_moe.experts.3.w3.weight"
    assert pairs[expert_name(1, 3, "down_proj")] == "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    assert pairs["model.layers.1.mlp.gate.weight"] == "model.layers.1.block_sparse_moe.gate.weight"
    assert parse_expert_name(expert_name(1, 3, "up_proj")) == (1, 3, "up_proj")
    assert parse_expert_name("model.layers.1.mlp.gate.weight") is None
    # experts come last, grouped per expert in gate/up/down order
    names = ckpt.canonical_names()
    first = names.index(expert_name(0, 0, "gate_proj"))
    assert all(parse_expert_name(n) is None for n in names[:first])
    assert names[first:first + 3] == [expert_name(0, 0, p) for p in ("gate_proj", "up_proj", "down_proj")]


@torch.no_grad()
def test_fused_expert_tensors_are_split(tiny_hf, tmp_path):
    """A checkpoint storing transformers' in-memory fused layout gives the same model."""
    path, ref = tiny_hf["olmoe"]
    shutil.copy(path / "config.json", tmp_path / "config.json")
    tensors = {k: v.contiguous() for k, v in ref.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in tensors  # [E, 2I, H] in memory
    save_file(tensors, str(tmp_path / "model.safetensors"))
    ckpt = HFCheckpoint.open(tmp_path)
    assert ckpt.is_fused()
    gu = tensors["model.layers.0.mlp.experts.gate_up_proj"]
    torch.testing.assert_close(ckpt.read_canonical(expert_name(0, 5, "up_proj")), gu[5, gu.shape[1] // 2:])
    model, _ = load_hf_model(tmp_path)
    ids = _prompt()
    torch.testing.assert_close(model(ids), _ref_logits(ref, ids), atol=ATOL, rtol=0)


@torch.no_grad()
def test_routing_hook_and_provider_seam(tiny_hf):
    """Hooks see [T, k] routing per MoE layer; experts only come through acquire/release, grouped."""
    path, _ = tiny_hf["qwen3_moe"]  # layer 1 is dense (mlp_only_layers)
    model, args = load_hf_model(path)
    assert model.moe_layers() == [0, 2]

    class Counting:
        def __init__(self, inner: ResidentExperts) -> None:
            self.inner, self.acquired, self.held = inner, [], {}

        def hint(self, layer, ids, weights):
            pass

        def acquire(self, layer, ids, weights):
            assert len(ids) == len(set(ids)) == len(weights)
            self.acquired.append((layer, list(ids)))
            self.held[layer] = list(ids)
            return self.inner.acquire(layer, ids, weights)

        def release(self, layer, ids):
            assert self.held.pop(layer) == list(ids)

        def stats(self):
            return {}

    provider = Counting(model.expert_provider)
    model.set_expert_provider(provider)
    seen = []
    model.add_routing_hook(lambda layer, ids, w: seen.append((layer, ids.clone(), w.clone())))
    cache = model.make_cache(1, PROMPT_LEN + 1)
    model(_prompt(), cache)
    assert [s[0] for s in seen] == [0, 2]
    for layer, ids, w in seen:
        assert ids.shape == w.shape == (PROMPT_LEN, args.num_experts_per_tok)
        torch.testing.assert_close(w.sum(-1), torch.ones(PROMPT_LEN))  # norm_topk_prob
        chosen = sorted(set(ids.flatten().tolist()))
        assert [a for a in provider.acquired if a[0] == layer] == [(layer, chosen)]  # once per layer, grouped
    model(torch.tensor([[5]]), cache)
    assert len(seen) == 4 and seen[-1][1].shape == (1, 2)
    assert not provider.held


def test_costs(tiny_hf):
    path, ref = tiny_hf["qwen2_moe"]
    model, args = load_hf_model(path)
    costs = model.costs()
    n_expert_params = sum(p.numel() for n, p in ref.named_parameters() if ".mlp.experts." in n)
    n_dense_params = sum(p.numel() for p in ref.parameters()) - n_expert_params
    assert costs.dense_bytes == 4 * n_dense_params == model.dense_nbytes()
    assert costs.expert_bytes == 4 * 3 * args.hidden_size * args.moe_intermediate_size == model.expert_nbytes()
    assert costs.total_expert_bytes == 4 * n_expert_params
    assert model.active_experts_per_token() == 3 * 2
    assert costs.active_bytes_per_token == costs.dense_bytes + 6 * costs.expert_bytes


def test_unsupported_model_type(tiny_hf, tmp_path):
    folder = _copy(tiny_hf["olmoe"][0], tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError) as err:
        load_hf_model(folder)
    for name in ("llama", *SUPPORTED_MODEL_TYPES):
        assert name in str(err.value)
    with pytest.raises(UnsupportedModelError, match="qwen3_moe"):
        get_model_classes("gpt2")
    assert get_model_classes("qwen3moe")[0] is get_model_classes("qwen3_moe")[0]


def test_missing_or_invalid_config(tiny_hf, tmp_path):
    folder = _copy(tiny_hf["olmoe"][0], tmp_path / "m")
    (folder / "config.json").unlink()
    with pytest.raises(ModelFormatError, match="config.json"):
        load_hf_model(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelFormatError, match="config.json"):
        HFCheckpoint.open(folder)
    with pytest.raises(ModelFormatError, match="not a folder"):
        HFCheckpoint.open(tmp_path / "nowhere")


def test_missing_or_truncated_weights(tiny_hf, tmp_path):
    folder = _copy(tiny_hf["olmoe"][0], tmp_path / "m")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    with pytest.raises(ModelFormatError, match="model.safetensors"):
        load_hf_model(folder)
    weights.unlink()
    with pytest.raises(ModelFormatError, match="weights are missing"):
        load_hf_model(folder)


def test_missing_or_truncated_shard(tiny_hf, tmp_path):
    _, ref = tiny_hf["qwen2_moe"]
    ref.save_pretrained(tmp_path, max_shard_size="40KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1
    data = shards[-1].read_bytes()
    shards[-1].write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFormatError, match=shards[-1].name):
        load_hf_model(tmp_path)
    shards[-1].unlink()
    with pytest.raises(ModelFormatError, match=f"{shards[-1].name}.*missing"):
        load_hf_model(tmp_path)


def test_checkpoint_missing_a_tensor(tiny_hf, tmp_path):
    path, ref = tiny_hf["mixtral"]
    shutil.copy(path / "config.json", tmp_path / "config.json")
    ckpt = HFCheckpoint.open(path)
    tensors = {n: ckpt.read(n) for n in ckpt.tensor_names() if n != "model.layers.1.self_attn.k_proj.weight"}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelFormatError, match="k_proj"):
        load_hf_model(tmp_path)


@torch.no_grad()
def test_tied_embeddings_and_sparse_step(tmp_path):
    """tie_word_embeddings (no lm_head on disk) and decoder_sparse_step dense layers."""
    ref = build_tiny_hf_model("qwen2_moe", tmp_path, seed=3,
                              overrides={"tie_word_embeddings": True, "decoder_sparse_step": 2})
    model, _ = load_hf_model(tmp_path)
    assert model.lm_head is None and model.moe_layers() == [1]
    ids = _prompt()
    torch.testing.assert_close(model(ids), _ref_logits(ref, ids), atol=ATOL, rtol=0)
