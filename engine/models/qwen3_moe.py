"""Qwen3-MoE (``model_type: qwen3_moe``): GQA with per-head q/k RMSNorm, softmax top-k router.

Routing: softmax over experts, top-k, renormalised when ``norm_topk_prob``.
Dense layers: those in ``mlp_only_layers`` or not on the ``decoder_sparse_step``
grid use a dense SwiGLU MLP of ``intermediate_size``.

Knows nothing about files: see ``engine/hf_loading.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from moestream.convert.errors import UnsupportedModelError
from moestream.engine.models.base import BaseModelArgs, MoECausalLM
from moestream.engine.models.blocks import Attention, DenseMLP, MoEBlock, SoftmaxTopKRouter


@dataclass
class ModelArgs(BaseModelArgs):
    """Qwen3-MoE config (HF field names; ``num_local_experts`` accepted for ``num_experts``)."""

    ALIASES: ClassVar[dict[str, str]] = {"num_local_experts": "num_experts"}

    model_type: str = "qwen3_moe"
    intermediate_size: int = 6144
    moe_intermediate_size: int = 768
    num_experts: int = 128
    num_experts_per_tok: int = 8
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    attention_bias: bool = False
    use_sliding_window: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self.mlp_only_layers = list(self.mlp_only_layers or [])
        if self.use_sliding_window:
            raise UnsupportedModelError("qwen3_moe with use_sliding_window=true is not supported")

    @property
    def n_routed_experts(self) -> int:
        return self.num_experts

    @property
    def expert_intermediate_size(self) -> int:
        return self.moe_intermediate_size

    @property
    def top_k(self) -> int:
        return self.num_experts_per_tok

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Same rule as transformers: not in ``mlp_only_layers`` and on the sparse-step grid."""
        return (layer_idx not in self.mlp_only_layers and self.num_experts > 0
                and (layer_idx + 1) % self.decoder_sparse_step == 0)


class Model(MoECausalLM):
    """Qwen3-MoE causal LM."""

    args: ModelArgs

    def build_attention(self, layer_idx: int) -> nn.Module:
        a = self.args
        return Attention(a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim,
                         qkv_bias=a.attention_bias, o_bias=a.attention_bias, qk_norm="head", eps=a.rms_norm_eps)

    def build_mlp(self, layer_idx: int) -> nn.Module:
        a = self.args
        if not a.is_moe_layer(layer_idx):
            return DenseMLP(a.hidden_size, a.intermediate_size)
        router = SoftmaxTopKRouter(a.hidden_size, a.experts_in_layer(layer_idx), a.top_k_in_layer(layer_idx),
                                   a.norm_topk_prob)
        return MoEBlock(layer_idx, router, self.runtime)
