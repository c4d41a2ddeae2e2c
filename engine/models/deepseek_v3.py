"""DeepSeek-V3 family (``model_type: deepseek_v3``; Kimi-K2 uses it too).

Same skeleton as DeepSeek-V2 (``engine/models/deepseek_v2.py``: MLA, leading
dense layers, shared experts); what differs, following transformers 5.24
``models/deepseek_v3``:

* routing is always ``noaux_tc``: sigmoid scores, ``e_score_correction_bias``
  added for the choice only, groups ranked by the sum of their top-2 biased
  scores, ``topk_group`` of ``n_group`` groups kept; the chosen experts'
  unbiased scores are renormalised when ``norm_topk_prob`` and then
  multiplied by ``routed_scaling_factor``;
* ``rope_interleave`` (default true) picks interleaved-pair or rotate-half RoPE;
* usually a query LoRA (``q_a_proj`` / ``q_a_layernorm`` / ``q_b_proj``);
* checkpoint layers past ``num_hidden_layers`` (multi-token prediction) are ignored.

Configs naming another ``topk_method`` or ``scoring_func`` are refused rather
than silently routed differently (transformers ignores both keys).

Knows nothing about files: see ``engine/hf_loading.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from moestream.convert.errors import UnsupportedModelError
from moestream.engine.models import deepseek_v2


@dataclass
class ModelArgs(deepseek_v2.ModelArgs):
    """DeepSeek-V3 config (HF field names; defaults are transformers 5.24's ``DeepseekV3Config``)."""

    DEFAULT_SCORING: ClassVar[str] = "sigmoid"

    model_type: str = "deepseek_v3"
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    n_routed_experts: int | None = 256
    n_shared_experts: int | None = 1
    num_experts_per_tok: int | None = 8
    first_k_dense_replace: int = 3
    n_group: int | None = 8
    topk_group: int | None = 4
    topk_method: str | None = "noaux_tc"
    norm_topk_prob: bool | None = True
    routed_scaling_factor: float = 2.5
    q_lora_rank: int | None = 1536
    rope_interleave: bool = True
    num_nextn_predict_layers: int = 1

    def validate_routing(self) -> None:
        """Accept only what transformers' V3 router computes (``noaux_tc`` with sigmoid scores).

        Raises:
            UnsupportedModelError: for another ``topk_method`` or ``scoring_func``.
        """
        if self.topk_method != "noaux_tc":
            raise UnsupportedModelError(f"deepseek_v3 topk_method {self.topk_method!r} is not supported; "
                                        "supported: noaux_tc")
        if self.scoring_func != "sigmoid":
            raise UnsupportedModelError(f"deepseek_v3 scoring_func {self.scoring_func!r} is not supported; "
                                        "supported: sigmoid")
        if self.n_group is None or self.topk_group is None:
            self.n_group, self.topk_group = 1, 1  # one group: plain top-k over biased scores

    @property
    def rope_interleaved(self) -> bool:
        """From ``rope_interleave`` (true for published checkpoints)."""
        return bool(self.rope_interleave)

    @property
    def renormalise_topk(self) -> bool:
        """``norm_topk_prob``: V3 renormalises the k weights before ``routed_scaling_factor``."""
        return bool(self.norm_topk_prob)


class Model(deepseek_v2.Model):
    """DeepSeek-V3 causal LM."""

    args: ModelArgs
