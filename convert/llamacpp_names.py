"""Names and keys of stock llama.cpp MoE GGUFs, and their mapping to moestream's canonical names.

Owns, in one place (gguf-py ``constants.py`` style): which HF ``model_type``
becomes which llama.cpp architecture, the per-layer tensor name table
(canonical HF-style suffix <-> llama.cpp ``blk.{bid}.*`` name) shared by the
exporter (``convert/llamacpp_export.py``) and the reader
(``convert/llamacpp_gguf.py``), the metadata keys both use, and the
pre-tokenizer regexes llama.cpp recognises by name.

Knows nothing about files, quantization or the engine.
"""

from __future__ import annotations

import re

#: HF model_type -> llama.cpp ``general.architecture``.
ARCH_OF_MODEL_TYPE: dict[str, str] = {
    "qwen3_moe": "qwen3moe",
    "qwen2_moe": "qwen2moe",
    "mixtral": "llama",
    "olmoe": "olmoe",
    "deepseek_v2": "deepseek2",
    "deepseek_v3": "deepseek2",
}
#: llama.cpp architectures the reader maps back (``llama`` only when it has experts: Mixtral).
SUPPORTED_ARCHS: tuple[str, ...] = ("qwen3moe", "qwen2moe", "llama", "olmoe", "deepseek2")

# Global (non-layer) tensors: canonical name <-> GGUF name.
GLOBAL_NAMES: dict[str, str] = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}

# Per-layer tensors: canonical suffix after ``model.layers.{L}.`` <-> GGUF suffix after ``blk.{L}.``.
# ``self_attn.kv_b_proj.weight`` is special (split into attn_k_b / attn_v_b, see the exporter).
LAYER_NAMES: dict[str, str] = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "self_attn.q_a_proj.weight": "attn_q_a.weight",
    "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight",
    "self_attn.q_b_proj.weight": "attn_q_b.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
    "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
    "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
    "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
    "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
KV_B_CANONICAL = "self_attn.kv_b_proj.weight"
KV_B_GGUF = "attn_kv_b.weight"  # legacy unsplit form (reader only)
K_B_GGUF = "attn_k_b.weight"
V_B_GGUF = "attn_v_b.weight"

#: Stacked 3-D routed-expert tensors, by canonical projection.
EXPERT_TENSOR: dict[str, str] = {
    "gate_proj": "blk.{bid}.ffn_gate_exps.weight",
    "up_proj": "blk.{bid}.ffn_up_exps.weight",
    "down_proj": "blk.{bid}.ffn_down_exps.weight",
}
FUSED_GATE_UP = "blk.{bid}.ffn_gate_up_exps.weight"

LAYER_PREFIX = "model.layers.{bid}."
GGUF_LAYER_PREFIX = "blk.{bid}."
_CANON_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_GGUF_LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")

# Metadata keys (prefix ``{arch}.``) as llama.cpp reads them.
KEY = {
    "context_length": "{arch}.context_length",
    "embedding_length": "{arch}.embedding_length",
    "block_count": "{arch}.block_count",
    "feed_forward_length": "{arch}.feed_forward_length",
    "head_count": "{arch}.attention.head_count",
    "head_count_kv": "{arch}.attention.head_count_kv",
    "key_length": "{arch}.attention.key_length",
    "value_length": "{arch}.attention.value_length",
    "key_length_mla": "{arch}.attention.key_length_mla",
    "value_length_mla": "{arch}.attention.value_length_mla",
    "rms_eps": "{arch}.attention.layer_norm_rms_epsilon",
    "clamp_kqv": "{arch}.attention.clamp_kqv",
    "q_lora_rank": "{arch}.attention.q_lora_rank",
    "kv_lora_rank": "{arch}.attention.kv_lora_rank",
    "rope_freq_base": "{arch}.rope.freq_base",
    "rope_dim": "{arch}.rope.dimension_count",
    "rope_scaling_type": "{arch}.rope.scaling.type",
    "rope_scaling_factor": "{arch}.rope.scaling.factor",
    "rope_orig_ctx": "{arch}.rope.scaling.original_context_length",
    "rope_yarn_log_mul": "{arch}.rope.scaling.yarn_log_multiplier",
    "expert_count": "{arch}.expert_count",
    "expert_used_count": "{arch}.expert_used_count",
    "expert_ff": "{arch}.expert_feed_forward_length",
    "expert_shared_ff": "{arch}.expert_shared_feed_forward_length",
    "expert_shared_count": "{arch}.expert_shared_count",
    "expert_weights_scale": "{arch}.expert_weights_scale",
    "expert_weights_norm": "{arch}.expert_weights_norm",
    "expert_gating_func": "{arch}.expert_gating_func",
    "expert_group_count": "{arch}.expert_group_count",
    "expert_group_used_count": "{arch}.expert_group_used_count",
    "leading_dense": "{arch}.leading_dense_block_count",
    "vocab_size": "{arch}.vocab_size",
}
GATING_SOFTMAX = 1
GATING_SIGMOID = 2

# Pre-tokenizer split regexes llama.cpp knows by name (``tokenizer.ggml.pre``).
PRE_TOKENIZER_REGEX: dict[str, str] = {
    "qwen2": (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+"),
    "llama-bpe": (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+"),
}
#: The GPT-2 byte-level split (``ByteLevel(use_regex=True)``).
GPT2_PRE = "gpt-2"


def gguf_name(canonical: str) -> str | None:
    """llama.cpp name of a canonical non-expert tensor (``None`` when it has no 1:1 counterpart)."""
    if canonical in GLOBAL_NAMES:
        return GLOBAL_NAMES[canonical]
    m = _CANON_LAYER_RE.match(canonical)
    if m and m.group(2) in LAYER_NAMES:
        return f"blk.{m.group(1)}.{LAYER_NAMES[m.group(2)]}"
    return None


_REVERSE_LAYER = {v: k for k, v in LAYER_NAMES.items()}


def canonical_name(gguf: str, shared_plural: bool) -> str | None:
    """Canonical name of a 1:1 llama.cpp tensor (``None`` for experts, k_b/v_b and unknown names).

    Args:
        gguf: llama.cpp tensor name.
        shared_plural: DeepSeek spells the shared expert ``shared_experts``; Qwen2-MoE ``shared_expert``.
    """
    for canon, g in GLOBAL_NAMES.items():
        if g == gguf:
            return canon
    m = _GGUF_LAYER_RE.match(gguf)
    if not m or m.group(2) not in _REVERSE_LAYER:
        return None
    suffix = _REVERSE_LAYER[m.group(2)]
    if "shexp" in m.group(2) and "gate_inp" not in m.group(2):
        proj = suffix.split(".")[-2]
        suffix = f"mlp.{'shared_experts' if shared_plural else 'shared_expert'}.{proj}.weight"
    return f"model.layers.{m.group(1)}.{suffix}"
