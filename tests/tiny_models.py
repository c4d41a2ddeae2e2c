"""Tiny random-init HF models for parity tests, built offline with transformers.

Owns :data:`TINY_CONFIGS` (one small config per family; other helpers add
families by adding entries) and :func:`build_tiny_hf_model`, which builds the
transformers model with a fixed seed, saves it with ``save_pretrained`` and
returns it (in fp32, eval mode) for use as the reference.

Knows nothing about the engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# Shared sizes: hidden 64, 4 heads (2 kv), 3 layers, 8 experts, top-2, vocab 256.
_COMMON: dict[str, Any] = {
    "vocab_size": 256,
    "hidden_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "num_experts_per_tok": 2,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}

#: model_type -> (transformers config class name, model class name, config kwargs).
TINY_CONFIGS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {
        **_COMMON, "head_dim": 16, "num_experts": 8, "moe_intermediate_size": 32,
        "intermediate_size": 96, "norm_topk_prob": True, "mlp_only_layers": [1],
        "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
    }),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {
        **_COMMON, "num_experts": 8, "moe_intermediate_size": 32, "intermediate_size": 96,
        "shared_expert_intermediate_size": 48, "norm_topk_prob": False, "rope_theta": 10000.0,
    }),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {
        **_COMMON, "num_local_experts": 8, "intermediate_size": 32, "rope_theta": 1e6, "sliding_window": None,
    }),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", {
        **_COMMON, "num_experts": 8, "intermediate_size": 32, "norm_topk_prob": False, "clip_qkv": 8.0,
        "rope_theta": 10000.0,
    }),
}

# DeepSeek (MLA): kv heads must equal heads (transformers expands the latent to
# every head); 8 experts in 4 groups, 2 groups kept; layer 0 dense.
_DEEPSEEK: dict[str, Any] = {
    **_COMMON, "num_key_value_heads": 4, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8,
    "v_head_dim": 12, "n_routed_experts": 8, "n_shared_experts": 1, "moe_intermediate_size": 32,
    "intermediate_size": 96, "first_k_dense_replace": 1, "n_group": 4, "topk_group": 2,
    "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
}
TINY_CONFIGS["deepseek_v2"] = ("DeepseekV2Config", "DeepseekV2ForCausalLM", {
    **_DEEPSEEK, "q_lora_rank": None, "topk_method": "group_limited_greedy", "norm_topk_prob": False,
    "routed_scaling_factor": 1.5, "n_shared_experts": 2,
})
TINY_CONFIGS["deepseek_v3"] = ("DeepseekV3Config", "DeepseekV3ForCausalLM", {
    **_DEEPSEEK, "q_lora_rank": 24, "norm_topk_prob": True, "routed_scaling_factor": 2.5, "rope_interleave": True,
})


def build_tiny_hf_model(model_type: str, path: str | Path, seed: int = 0,
                        overrides: dict[str, Any] | None = None) -> torch.nn.Module:
    """Build a tiny random-init transformers model, save it to ``path`` and return it.

    Weights are re-drawn with a larger std than HF's default (0.02) so that
    routing and logits are far from ties, which makes greedy parity meaningful.

    Args:
        model_type: a key of :data:`TINY_CONFIGS`.
        path: output folder (``config.json`` + ``model.safetensors``).
        seed: RNG seed for the weights.
        overrides: config kwargs replacing the defaults.

    Returns:
        The transformers ``...ForCausalLM`` in fp32 eval mode (the reference).
    """
    import transformers

    cfg_name, model_name, kwargs = TINY_CONFIGS[model_type]
    config = getattr(transformers, cfg_name)(**{**kwargs, **(overrides or {})})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek-V3: non-zero so the bias matters
                b.normal_(0.0, 0.1)
    model.save_pretrained(str(path))
    return model
