"""DeepSeek-V2 family (``model_type: deepseek_v2``) and the DeepSeek machinery V3 reuses.

Owns the DeepSeek config dataclass (HF field names), :class:`GroupedTopKRouter`
(softmax or sigmoid scoring; ``greedy``, ``group_limited_greedy`` or
``noaux_tc`` selection with ``e_score_correction_bias``; optional
renormalisation; ``routed_scaling_factor``) and the causal LM: MLA attention
(``engine/models/mla.py``), leading dense layers (``first_k_dense_replace``,
``moe_layer_freq``), MoE layers with ungated shared experts.

Semantics follow transformers 5.24 ``models/deepseek_v2``:

* scoring is softmax; the k weights are NOT renormalised (``norm_topk_prob``
  is ignored by transformers; ``true`` is refused here because the original
  DeepSeek code then normalises *instead of* scaling — the two references
  disagree), then multiplied by ``routed_scaling_factor``;
* ``group_limited_greedy`` ranks groups by their best expert score;
* RoPE rotates interleaved pairs of the ``qk_rope_head_dim`` part; YaRN
  scaling is supported (``mla.rope_frequencies``), with the softmax scale
  corrected by ``mscale(factor, mscale_all_dim)^2``.

``moe_layer_freq`` follows the original DeepSeek code (transformers ignores
it; all published checkpoints use 1, where both agree).

Knows nothing about files: see ``engine/hf_loading.py``.

Legend for shape comments: N tokens, H hidden, E routed experts, G groups, k experts per token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from moestream.convert.errors import ModelFormatError, UnsupportedModelError
from moestream.engine.models.base import BaseModelArgs, MoECausalLM
from moestream.engine.models.blocks import DenseMLP, MoEBlock, RotaryEmbedding
from moestream.engine.models.mla import MLADims, MLAttention, rope_frequencies, softmax_scale

SCORING_FUNCS = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


class GroupedTopKRouter(nn.Module):
    """DeepSeek router: score every expert, optionally restrict to the best groups, pick k.

    Follows the :class:`~blocks.Router` contract: ``router(x [N, H]) ->
    (expert_ids [N, k] int64, gate_weights [N, k] fp32)``, weights final
    (renormalisation and ``routed_scaling_factor`` applied). Stored as
    ``mlp.gate``: ``weight [E, H]`` and, for ``noaux_tc``,
    ``e_score_correction_bias [E]`` (a persistent buffer).
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *, scoring_func: str,
                 topk_method: str, n_group: int | None, topk_group: int | None, norm_topk_prob: bool,
                 routed_scaling_factor: float) -> None:
        """Args:
        hidden_size: H.
        num_experts: E.
        top_k: k.
        scoring_func: ``softmax`` (V2) or ``sigmoid`` (V3).
        topk_method: ``greedy``, ``group_limited_greedy`` (V2) or ``noaux_tc`` (V3).
        n_group: G (grouped methods only; E must be a multiple of G).
        topk_group: groups kept per token (grouped methods only).
        norm_topk_prob: renormalise the k weights to sum to 1 before scaling.
        routed_scaling_factor: multiplier of the final weights.

        Raises:
            UnsupportedModelError: unknown scoring or method, or group sizes that do not fit.
        """
        super().__init__()
        if scoring_func not in SCORING_FUNCS:
            raise UnsupportedModelError(f"DeepSeek scoring_func {scoring_func!r} is not supported; "
                                        f"supported: {', '.join(SCORING_FUNCS)}")
        if topk_method not in TOPK_METHODS:
            raise UnsupportedModelError(f"DeepSeek topk_method {topk_method!r} is not supported; "
                                        f"supported: {', '.join(TOPK_METHODS)}")
        grouped = topk_method != "greedy"
        if grouped:
            if not n_group or not topk_group or num_experts % n_group or not 0 < topk_group <= n_group:
                raise UnsupportedModelError(
                    f"topk_method {topk_method!r} needs n_group dividing n_routed_experts ({num_experts}) "
                    f"and 0 < topk_group <= n_group; got n_group={n_group}, topk_group={topk_group}")
            if topk_method == "noaux_tc" and num_experts // n_group < 2:
                raise UnsupportedModelError("noaux_tc ranks groups by their top-2 experts: "
                                            "each group needs at least 2 experts")
        self.num_experts, self.top_k = num_experts, top_k
        self.scoring_func, self.topk_method = scoring_func, topk_method
        self.n_group = n_group if grouped else 1
        self.topk_group = topk_group if grouped else 1
        self.norm_topk_prob = norm_topk_prob
        self.routed_scaling_factor = float(routed_scaling_factor)
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size))
        if topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(num_experts))
        else:
            self.e_score_correction_bias = None

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Per-expert affinities ``[N, E]`` (fp32): softmax or sigmoid of the router logits."""
        logits = F.linear(x.float(), self.weight.float())  # [N, E]
        if self.scoring_func == "softmax":
            return logits.softmax(dim=-1)
        return logits.sigmoid()

    def _group_mask(self, group_scores: torch.Tensor) -> torch.Tensor:
        """``group_scores [N, G]`` -> bool ``[N, E]``: True for experts in the ``topk_group`` best groups."""
        top = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False).indices  # [N, topk_group]
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top, True)  # [N, G]
        per_group = self.num_experts // self.n_group
        return keep.unsqueeze(-1).expand(-1, self.n_group, per_group).reshape(-1, self.num_experts)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [N, H] -> (expert_ids [N, k], gate_weights [N, k])``."""
        scores = self.scores(x)  # [N, E]
        n = scores.shape[0]
        per_group = self.num_experts // self.n_group
        if self.topk_method == "greedy":
            weights, ids = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)  # [N, k]
        elif self.topk_method == "group_limited_greedy":
            group_scores = scores.view(n, self.n_group, per_group).max(dim=-1).values  # [N, G]
            masked = scores.masked_fill(~self._group_mask(group_scores), 0.0)  # [N, E]
            weights, ids = torch.topk(masked, k=self.top_k, dim=-1, sorted=False)
        else:  # noaux_tc: the bias steers the choice only; weights come from the unbiased scores
            choice = scores + self.e_score_correction_bias  # [N, E]
            group_scores = choice.view(n, self.n_group, per_group).topk(2, dim=-1).values.sum(dim=-1)  # [N, G]
            choice = choice.masked_fill(~self._group_mask(group_scores), float("-inf"))
            ids = torch.topk(choice, k=self.top_k, dim=-1, sorted=False).indices  # [N, k]
            weights = scores.gather(1, ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return ids, weights * self.routed_scaling_factor


@dataclass
class ModelArgs(BaseModelArgs):
    """DeepSeek-V2 config (HF field names; defaults are transformers 5.24's ``DeepseekV2Config``).

    ``n_routed_experts`` also reads ``num_local_experts`` / ``num_experts``.
    ``num_key_value_heads`` is ignored: MLA has one shared latent for all heads.
    """

    ALIASES: ClassVar[dict[str, str]] = {"num_local_experts": "n_routed_experts", "num_experts": "n_routed_experts"}
    #: scoring used when the config does not name one; transformers hard-codes it per family.
    DEFAULT_SCORING: ClassVar[str] = "softmax"

    model_type: str = "deepseek_v2"
    intermediate_size: int = 11008
    moe_intermediate_size: int = 1407
    n_routed_experts: int | None = 64  # type: ignore[assignment]  # HF field; replaces the base property
    n_shared_experts: int | None = 2
    num_experts_per_tok: int | None = None
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    n_group: int | None = None
    topk_group: int | None = None
    topk_method: str | None = "greedy"
    scoring_func: str | None = None
    norm_topk_prob: bool | None = False
    routed_scaling_factor: float = 1.0
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    attention_bias: bool = False
    mlp_bias: bool = False
    quantization_config: dict | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.n_routed_experts = int(self.n_routed_experts or 0)
        self.n_shared_experts = int(self.n_shared_experts or 0)
        self.scoring_func = self.scoring_func or self.DEFAULT_SCORING
        self.topk_method = self.topk_method or "greedy"
        self.norm_topk_prob = bool(self.norm_topk_prob)
        if self.quantization_config:
            method = self.quantization_config.get("quant_method", "?")
            raise UnsupportedModelError(
                f"{self.model_type} checkpoint is quantized ({method}); moestream reads bf16/fp16/fp32 "
                "checkpoints: dequantize it first (e.g. DeepSeek's fp8_cast_bf16.py)")
        if self.mlp_bias:
            raise UnsupportedModelError(f"{self.model_type} with mlp_bias=true is not supported")
        if self.moe_layer_freq < 1:
            raise ModelFormatError(f"config.json: moe_layer_freq must be >= 1, got {self.moe_layer_freq}")
        if self.n_routed_experts and any(self.is_moe_layer(i) for i in range(self.num_hidden_layers)):
            if not self.num_experts_per_tok:
                raise ModelFormatError("config.json has MoE layers but no 'num_experts_per_tok'")
        self.validate_routing()

    def validate_routing(self) -> None:
        """Refuse routing settings whose reference semantics this family does not reproduce.

        Raises:
            UnsupportedModelError: for DeepSeek-V2 ``norm_topk_prob: true`` (the
                original code and transformers disagree), ``noaux_tc``, or non-softmax scoring.
        """
        if self.norm_topk_prob:
            raise UnsupportedModelError(
                "deepseek_v2 with norm_topk_prob=true is not supported: transformers ignores it while the "
                "original DeepSeek code renormalises instead of applying routed_scaling_factor")
        if self.topk_method not in ("greedy", "group_limited_greedy"):
            raise UnsupportedModelError(f"deepseek_v2 topk_method {self.topk_method!r} is not supported; "
                                        "supported: greedy, group_limited_greedy")
        if self.scoring_func != "softmax":
            raise UnsupportedModelError(f"deepseek_v2 scoring_func {self.scoring_func!r} is not supported "
                                        "(DeepSeek-V2 scores with softmax)")

    @property
    def expert_intermediate_size(self) -> int:
        return self.moe_intermediate_size

    @property
    def top_k(self) -> int:
        return int(self.num_experts_per_tok or 0)

    @property
    def rope_interleaved(self) -> bool:
        """DeepSeek-V2 always rotates interleaved pairs."""
        return True

    @property
    def renormalise_topk(self) -> bool:
        """Whether the router renormalises its k weights (never for V2, see :meth:`validate_routing`)."""
        return False

    def is_moe_layer(self, layer_idx: int) -> bool:
        """MoE from ``first_k_dense_replace`` on, every ``moe_layer_freq`` layers (original DeepSeek rule)."""
        return (self.n_routed_experts > 0 and layer_idx >= self.first_k_dense_replace
                and layer_idx % self.moe_layer_freq == 0)

    def mla_dims(self) -> MLADims:
        """Sizes of the MLA layers."""
        return MLADims(hidden_size=self.hidden_size, num_heads=self.num_attention_heads,
                       q_lora_rank=self.q_lora_rank, kv_lora_rank=self.kv_lora_rank,
                       qk_nope_head_dim=self.qk_nope_head_dim, qk_rope_head_dim=self.qk_rope_head_dim,
                       v_head_dim=self.v_head_dim, attention_bias=self.attention_bias)


def drop_extra_layers(tensors: Mapping[str, Any], num_hidden_layers: int) -> dict[str, Any]:
    """Drop tensors of layers ``>= num_hidden_layers`` (DeepSeek-V3's multi-token-prediction layers).

    Args:
        tensors: canonical name -> tensor.
        num_hidden_layers: decoder layers the model runs.

    Returns:
        The mapping without those layers.
    """
    out = {}
    for name, t in tensors.items():
        m = _LAYER_RE.match(name)
        if m is not None and int(m.group(1)) >= num_hidden_layers:
            continue
        out[name] = t
    return out


def build_router(args: ModelArgs, layer_idx: int | None = None) -> GroupedTopKRouter:
    """The routed-expert gate of MoE layer ``layer_idx`` for these config args.

    With per-layer expert counts (adaptive pruning) each layer's count must still split into
    ``n_group`` equal contiguous groups (the converter drops the same number in every group).

    Args:
        args: the config.
        layer_idx: decoder layer (per-layer counts / top-k); None = the config's single values.

    Raises:
        ModelFormatError: a layer's count not divisible by ``n_group`` under grouped routing.
        UnsupportedModelError: see :class:`GroupedTopKRouter`.
    """
    n = args.n_routed_experts if layer_idx is None else args.experts_in_layer(layer_idx)
    k = args.top_k if layer_idx is None else args.top_k_in_layer(layer_idx)
    if (layer_idx is not None and args.moestream_num_experts_per_layer is not None
            and args.topk_method != "greedy" and args.n_group and n % args.n_group):
        raise ModelFormatError(f"config.json: MoE layer {layer_idx} keeps {n} routed experts, which do not split "
                               f"into n_group={args.n_group} routing groups; re-run moestream convert (it prunes "
                               "the same number in every group)")
    return GroupedTopKRouter(args.hidden_size, n, k, scoring_func=args.scoring_func,
                             topk_method=args.topk_method, n_group=args.n_group, topk_group=args.topk_group,
                             norm_topk_prob=args.renormalise_topk, routed_scaling_factor=args.routed_scaling_factor)


class Model(MoECausalLM):
    """DeepSeek-V2 causal LM (also the base of DeepSeek-V3)."""

    args: ModelArgs

    def build_rope(self) -> nn.Module:
        """RoPE on the ``qk_rope_head_dim`` part: default or YaRN (raises for other types)."""
        a = self.args
        inv_freq, scaling = rope_frequencies(a.rope_scaling, a.qk_rope_head_dim, a.rope_theta,
                                             a.max_position_embeddings)
        return RotaryEmbedding(a.qk_rope_head_dim, inv_freq=inv_freq, attention_scaling=scaling)

    def build_attention(self, layer_idx: int) -> nn.Module:
        a = self.args
        scale = softmax_scale(a.qk_nope_head_dim + a.qk_rope_head_dim, a.rope_scaling, a.max_position_embeddings)
        return MLAttention(a.mla_dims(), scale, rope_interleave=a.rope_interleaved)

    def build_mlp(self, layer_idx: int) -> nn.Module:
        a = self.args
        if not a.is_moe_layer(layer_idx):
            return DenseMLP(a.hidden_size, a.intermediate_size)
        shared = None
        if a.n_shared_experts:
            shared = DenseMLP(a.hidden_size, a.moe_intermediate_size * a.n_shared_experts)
        return MoEBlock(layer_idx, build_router(a, layer_idx), self.runtime, shared=shared,
                        shared_name="shared_experts")

    def load_canonical(self, tensors: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        """As :meth:`MoECausalLM.load_canonical`, ignoring layers past ``num_hidden_layers`` (MTP heads)."""
        super().load_canonical(drop_extra_layers(tensors, self.args.num_hidden_layers), strict=strict)
