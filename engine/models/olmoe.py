"""OLMoE (``model_type: olmoe``): q/k RMSNorm over the full projection, optional qkv clipping.

Routing: softmax over experts, top-k, renormalised only when
``norm_topk_prob`` (default False). Every layer is MoE.

Knows nothing about files: see ``engine/hf_loading.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from moestream.engine.models.base import BaseModelArgs, MoECausalLM
from moestream.engine.models.blocks import Attention, MoEBlock, SoftmaxTopKRouter


@dataclass
class ModelArgs(BaseModelArgs):
    """OLMoE config (HF field names; ``num_local_experts`` accepted for ``num_experts``)."""

    ALIASES: ClassVar[dict[str, str]] = {"num_local_experts": "num_experts"}

    model_type: str = "olmoe"
    intermediate_size: int = 2048
    num_experts: int = 64
    num_experts_per_tok: int = 8
    norm_topk_prob: bool = False
    attention_bias: bool = False
    clip_qkv: float | None = None
    rms_norm_eps: float = 1e-5

    @property
    def n_routed_experts(self) -> int:
        return self.num_experts

    @property
    def expert_intermediate_size(self) -> int:
        return self.intermediate_size

    @property
    def top_k(self) -> int:
        return self.num_experts_per_tok


class Model(MoECausalLM):
    """OLMoE causal LM."""

    args: ModelArgs

    def build_attention(self, layer_idx: int) -> nn.Module:
        a = self.args
        return Attention(a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim,
                         qkv_bias=a.attention_bias, o_bias=a.attention_bias, qk_norm="full",
                         eps=a.rms_norm_eps, clip_qkv=a.clip_qkv)

    def build_mlp(self, layer_idx: int) -> nn.Module:
        a = self.args
        router = SoftmaxTopKRouter(a.hidden_size, a.experts_in_layer(layer_idx), a.top_k_in_layer(layer_idx),
                                   a.norm_topk_prob)
        return MoEBlock(layer_idx, router, self.runtime)
