"""Mixtral (``model_type: mixtral``): plain GQA, softmax top-k router renormalised over the k.

Every layer is MoE. On disk the block is ``block_sparse_moe`` with experts
``w1/w3/w2``; the canonical names (``mlp.``, ``gate_proj/up_proj/down_proj``)
come from ``convert/hf_checkpoint.py``.

Knows nothing about files: see ``engine/hf_loading.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from moestream.convert.errors import UnsupportedModelError
from moestream.engine.models.base import BaseModelArgs, MoECausalLM
from moestream.engine.models.blocks import Attention, MoEBlock, SoftmaxTopKRouter


@dataclass
class ModelArgs(BaseModelArgs):
    """Mixtral config (HF field names; ``num_experts`` accepted for ``num_local_experts``)."""

    ALIASES: ClassVar[dict[str, str]] = {"num_experts": "num_local_experts"}

    model_type: str = "mixtral"
    intermediate_size: int = 14336
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-5
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sliding_window is not None and self.sliding_window < self.max_position_embeddings:
            raise UnsupportedModelError(f"mixtral with sliding_window={self.sliding_window} is not supported")

    @property
    def n_routed_experts(self) -> int:
        return self.num_local_experts

    @property
    def expert_intermediate_size(self) -> int:
        return self.intermediate_size

    @property
    def top_k(self) -> int:
        return self.num_experts_per_tok


class Model(MoECausalLM):
    """Mixtral causal LM."""

    args: ModelArgs

    def build_attention(self, layer_idx: int) -> nn.Module:
        a = self.args
        return Attention(a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim,
                         qkv_bias=False, o_bias=False, qk_norm=None, eps=a.rms_norm_eps)

    def build_mlp(self, layer_idx: int) -> nn.Module:
        a = self.args
        router = SoftmaxTopKRouter(a.hidden_size, a.experts_in_layer(layer_idx), a.top_k_in_layer(layer_idx),
                                   norm_topk_prob=True)
        return MoEBlock(layer_idx, router, self.runtime)
