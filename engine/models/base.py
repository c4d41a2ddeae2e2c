"""Config dataclass base and the shared decoder-only MoE model skeleton.

Owns :class:`BaseModelArgs` (built from an HF ``config.json`` dict with the
HF field names; unknown keys dropped; Hub and transformers-5 spellings both
accepted) and :class:`MoECausalLM` (embeddings, decoder layers, final norm,
LM head, KV cache creation, canonical weight loading, expert provider and
routing hooks, cost figures). A family subclasses both and implements
``build_attention`` / ``build_mlp`` (and ``build_rope`` if its RoPE differs).

Knows nothing about files, checkpoints or the shard format: weights arrive
as a mapping of canonical names to tensors, experts through a provider.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from moestream.convert.errors import ModelFormatError, UnsupportedModelError
from moestream.engine.experts import ExpertProvider, parse_expert_name
from moestream.engine.kv_cache import KVCache
from moestream.engine.models.blocks import DecoderLayer, MoEBlock, MoERuntime, RMSNorm, RotaryEmbedding, RoutingHook

# Legend: B batch, T new tokens, H hidden, V vocab.


def _normalise_config(config: Mapping[str, Any], aliases: Mapping[str, str]) -> dict[str, Any]:
    """Map alternative spellings onto the dataclass field names.

    - ``aliases``: ``{other_spelling: field}`` (e.g. ``num_local_experts -> num_experts``);
      the field's own spelling wins when both are present.
    - ``rope_parameters`` (transformers 5) -> ``rope_theta`` + ``rope_scaling``
      (``None`` for default RoPE).
    - ``dtype`` (transformers 5) -> ``torch_dtype``.
    """
    cfg = dict(config)
    for other, field in aliases.items():
        if other in cfg and field not in cfg:
            cfg[field] = cfg[other]
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict):
        if "rope_theta" in rp and "rope_theta" not in cfg:
            cfg["rope_theta"] = rp["rope_theta"]
        if "rope_scaling" not in cfg:
            rtype = rp.get("rope_type", rp.get("type", "default"))
            cfg["rope_scaling"] = None if rtype in (None, "default") else dict(rp)
    rs = cfg.get("rope_scaling")
    if isinstance(rs, dict) and rs.get("rope_type", rs.get("type", "default")) in (None, "default"):
        cfg["rope_scaling"] = None
    if "dtype" in cfg and "torch_dtype" not in cfg:
        cfg["torch_dtype"] = cfg["dtype"]
    return cfg


@dataclass
class BaseModelArgs:
    """Fields every decoder-only family shares (HF names). Subclasses add theirs.

    Subclasses set ``ALIASES`` for alternative key spellings and implement the
    three MoE-shape properties.
    """

    ALIASES: ClassVar[dict[str, str]] = {}

    model_type: str = ""
    vocab_size: int = 0
    hidden_size: int = 0
    num_hidden_layers: int = 0
    num_attention_heads: int = 0
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    torch_dtype: str | None = None
    bos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None
    #: Per-layer routing written by ``moestream convert`` (adaptive pruning, per-layer ``--top-k``):
    #: one entry per decoder layer (0 for dense layers); None = the family's single value everywhere.
    moestream_num_experts_per_layer: list[int] | None = None
    moestream_top_k_per_layer: list[int] | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "BaseModelArgs":
        """Build from a ``config.json`` dict.

        Args:
            config: the parsed JSON (Hub or transformers-5 spelling).

        Returns:
            The dataclass with derived fields filled.

        Raises:
            ModelFormatError: when a required size is missing or zero.
        """
        cfg = _normalise_config(config, cls.ALIASES)
        names = {f.name for f in dataclasses.fields(cls)}
        args = cls(**{k: v for k, v in cfg.items() if k in names})
        return args

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            if not getattr(self, name):
                raise ModelFormatError(f"config.json has no usable '{name}'; is this a complete HF model config?")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.hidden_act != "silu":
            raise UnsupportedModelError(f"hidden_act '{self.hidden_act}' is not supported (only 'silu')")
        for key in ("moestream_num_experts_per_layer", "moestream_top_k_per_layer"):
            per = getattr(self, key)
            if per is None:
                continue
            if (not isinstance(per, list) or len(per) != self.num_hidden_layers
                    or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in per)):
                raise ModelFormatError(f"config.json: '{key}' must list one non-negative integer per decoder layer "
                                       f"({self.num_hidden_layers}), got {per!r}; re-run moestream convert")

    # --- per-layer routing (moestream extension) -----------------------------------------------
    def experts_in_layer(self, layer_idx: int) -> int:
        """Routed experts of MoE layer ``layer_idx`` (``moestream_num_experts_per_layer`` or the family's count).

        Raises:
            ModelFormatError: the per-layer list gives this MoE layer no experts.
        """
        per = self.moestream_num_experts_per_layer
        if per is None:
            return int(self.n_routed_experts)
        if per[layer_idx] < 1:
            raise ModelFormatError(f"config.json: moestream_num_experts_per_layer gives MoE layer {layer_idx} "
                                   f"{per[layer_idx]} experts; re-run moestream convert")
        return int(per[layer_idx])

    def top_k_in_layer(self, layer_idx: int) -> int:
        """Experts per token in MoE layer ``layer_idx`` (``moestream_top_k_per_layer`` or the family's top-k).

        Raises:
            ModelFormatError: a per-layer top-k outside ``1..experts_in_layer(layer_idx)``.
        """
        per = self.moestream_top_k_per_layer
        k = int(self.top_k) if per is None else int(per[layer_idx])
        n = self.experts_in_layer(layer_idx)
        if not 1 <= k <= n:
            raise ModelFormatError(f"config.json: MoE layer {layer_idx} routes to top-k={k} of its {n} experts; "
                                   "top-k must be in 1..experts; re-run moestream convert with a valid --top-k")
        return k

    # --- MoE shape, defined per family -------------------------------------------------------
    @property
    def n_routed_experts(self) -> int:
        """Routed experts per MoE layer."""
        raise NotImplementedError

    @property
    def expert_intermediate_size(self) -> int:
        """Intermediate size ``I`` of one routed expert."""
        raise NotImplementedError

    @property
    def top_k(self) -> int:
        """Experts each token uses per MoE layer."""
        raise NotImplementedError


@dataclass(frozen=True)
class ModelCosts:
    """What one forward costs in weights (bytes at the given element size)."""

    dense_bytes: int  # every non-routed-expert weight (embeddings, attention, norms, routers, shared/dense MLPs)
    expert_bytes: int  # one routed expert (gate + up + down)
    experts_per_layer: int  # the largest MoE layer's count (layers may differ after adaptive pruning)
    moe_layers: int
    top_k: int  # the largest per-layer top-k
    layer_experts: tuple[int, ...] = ()  # routed experts of each MoE layer (empty: experts_per_layer everywhere)
    layer_top_k: tuple[int, ...] = ()  # top-k of each MoE layer (empty: top_k everywhere)

    @property
    def routed_experts(self) -> int:
        """Routed experts over all MoE layers."""
        return sum(self.layer_experts) if self.layer_experts else self.experts_per_layer * self.moe_layers

    @property
    def active_experts_per_token(self) -> int:
        """Routed experts touched per token (over all MoE layers)."""
        return sum(self.layer_top_k) if self.layer_top_k else self.moe_layers * self.top_k

    @property
    def total_expert_bytes(self) -> int:
        return self.expert_bytes * self.routed_experts

    @property
    def active_bytes_per_token(self) -> int:
        """Dense bytes plus the routed experts one token reads."""
        return self.dense_bytes + self.active_experts_per_token * self.expert_bytes


class _Backbone(nn.Module):
    """Holds ``embed_tokens``, ``layers`` and ``norm`` so state-dict keys read ``model.*``."""

    def __init__(self, embed: nn.Embedding, layers: list[nn.Module], norm: RMSNorm) -> None:
        super().__init__()
        self.embed_tokens = embed
        self.layers = nn.ModuleList(layers)
        self.norm = norm


class MoECausalLM(nn.Module):
    """Decoder-only MoE language model; families subclass and build their layers.

    Subclasses implement :meth:`build_attention` and :meth:`build_mlp` and may
    override :meth:`build_rope`. Routed experts are not parameters: they come
    from the provider set with :meth:`set_expert_provider`.
    """

    def __init__(self, args: BaseModelArgs) -> None:
        super().__init__()
        self.args = args
        self.runtime = MoERuntime()
        self.rope = self.build_rope()
        layers = [
            DecoderLayer(self.build_attention(i), self.build_mlp(i), args.hidden_size, args.rms_norm_eps)
            for i in range(args.num_hidden_layers)
        ]
        self.model = _Backbone(nn.Embedding(args.vocab_size, args.hidden_size), layers,
                               RMSNorm(args.hidden_size, args.rms_norm_eps))
        self.lm_head = None if args.tie_word_embeddings else nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    # --- family hooks ------------------------------------------------------------------------
    def build_rope(self) -> nn.Module:
        """Rotary module called as ``rope(start, T) -> (cos, sin)``; default RoPE on ``head_dim``.

        Raises:
            UnsupportedModelError: for RoPE scaling types this family does not implement.
        """
        if self.args.rope_scaling is not None:
            rtype = self.args.rope_scaling.get("rope_type", self.args.rope_scaling.get("type"))
            raise UnsupportedModelError(f"rope scaling '{rtype}' is not supported for {self.args.model_type} yet")
        return RotaryEmbedding(self.args.head_dim, self.args.rope_theta)

    def build_attention(self, layer_idx: int) -> nn.Module:
        """The attention module of decoder layer ``layer_idx``."""
        raise NotImplementedError

    def build_mlp(self, layer_idx: int) -> nn.Module:
        """A :class:`DenseMLP` or :class:`MoEBlock` (built with ``self.runtime``) for ``layer_idx``."""
        raise NotImplementedError

    # --- runtime -------------------------------------------------------------------------------
    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype activations and the KV cache use: the final norm's (a matrix may be held quantized)."""
        return self.model.norm.weight.dtype

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Run the model on new tokens.

        Args:
            input_ids: ``[B, T]`` token ids.
            cache: ``None`` for a one-shot forward from position 0, else the cache;
                its ``seq_len`` is the start position and it advances by ``T``.

        Returns:
            ``[B, T, V]`` fp32 logits.
        """
        start = cache.seq_len if cache is not None else 0
        t = input_ids.shape[1]
        cos, sin = self.rope(start, t)  # [T, Dr] each
        x = self.model.embed_tokens(input_ids)  # [B, T, H]
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, start, cache.layer(i) if cache is not None else None)
        x = self.model.norm(x)
        if cache is not None:
            cache.advance(t)
        if self.lm_head is None:
            return nn.functional.linear(x, self.model.embed_tokens.weight).float()
        return self.lm_head(x).float()  # [B, T, V]

    def make_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None,
                   device: torch.device | str = "cpu") -> KVCache:
        """Preallocate a KV cache for ``batch`` sequences of up to ``max_len`` positions."""
        dtype = dtype or self.compute_dtype
        entries = [layer.self_attn.new_cache_entry(batch, max_len, dtype, device) for layer in self.model.layers]
        return KVCache(entries, max_len)

    def set_expert_provider(self, provider: ExpertProvider) -> None:
        """Route every MoE layer's expert requests to ``provider``."""
        self.runtime.provider = provider

    @property
    def expert_provider(self) -> ExpertProvider | None:
        return self.runtime.provider

    def add_routing_hook(self, fn: RoutingHook) -> None:
        """Call ``fn(layer, expert_ids [N, k], gate_weights [N, k])`` in every MoE layer on every forward."""
        self.runtime.hooks.append(fn)

    def remove_routing_hook(self, fn: RoutingHook) -> None:
        """Undo :meth:`add_routing_hook`."""
        self.runtime.hooks.remove(fn)

    def moe_layers(self) -> list[int]:
        """Indices of decoder layers whose MLP is a :class:`MoEBlock`."""
        return [i for i, layer in enumerate(self.model.layers) if isinstance(layer.mlp, MoEBlock)]

    def check_expert_counts(self, counts: Mapping[int, int], where: str) -> None:
        """Refuse stored routed experts that do not match the routers.

        Args:
            counts: MoE layer -> number of stored experts (ids ``0..n-1``).
            where: the model path, for the message.

        Raises:
            ModelFormatError: experts stored for other layers than the MoE layers, or a layer whose count
                differs from its router's rows (``moestream_num_experts_per_layer`` or the family's count).
        """
        moe = self.moe_layers()
        if sorted(counts) != moe:
            raise ModelFormatError(f"{where}: routed experts stored for layers {sorted(counts)}, the config "
                                   f"expects MoE layers {moe}")
        for layer in moe:
            want = self.model.layers[layer].mlp.num_experts
            if counts[layer] != want:
                raise ModelFormatError(f"{where}: layer {layer} has {counts[layer]} experts, its router (config) "
                                       f"has {want}; re-run moestream convert")

    # --- weights ---------------------------------------------------------------------------------
    def load_canonical(self, tensors: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        """Load every non-routed-expert weight from canonical names.

        Args:
            tensors: canonical name -> tensor; routed-expert names are skipped
                (they belong to the provider), ``lm_head.weight`` is ignored when tied.
            strict: raise when a parameter is missing or a name is unknown.

        Raises:
            ModelFormatError: on missing/unexpected tensors or shape mismatches.
        """
        own = self.state_dict()
        dense = {}
        for name, t in tensors.items():
            if parse_expert_name(name) is not None:
                continue
            if name == "lm_head.weight" and self.lm_head is None:
                continue
            dense[name] = t
        missing = sorted(set(own) - set(dense))
        unexpected = sorted(set(dense) - set(own))
        if strict and (missing or unexpected):
            raise ModelFormatError(
                f"checkpoint does not match {self.args.model_type}: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        for name, t in dense.items():
            if name in own and own[name].shape != t.shape:
                raise ModelFormatError(f"tensor {name}: shape {tuple(t.shape)} in checkpoint, "
                                       f"model expects {tuple(own[name].shape)}")
        dtype = self.compute_dtype
        self.load_state_dict({k: v.to(dtype) for k, v in dense.items() if k in own}, strict=strict)

    def costs(self, bytes_per_param: int | None = None) -> ModelCosts:
        """Bytes of dense weights, bytes per routed expert, and routing shape.

        Args:
            bytes_per_param: element size to count at; default is the model's dtype.

        Returns:
            A :class:`ModelCosts`; a matrix held packed (a module with ``weight_numel``, e.g.
            ``engine/quantized_dense.py``) counts as its elements at ``bytes_per_param`` too.
        """
        a = self.args
        bpp = bytes_per_param or torch.empty(0, dtype=self.compute_dtype).element_size()
        packed = sum(int(getattr(m, "weight_numel", 0)) for m in self.modules())
        dense = (sum(p.numel() for p in self.parameters()) + packed) * bpp
        expert = 3 * a.hidden_size * a.expert_intermediate_size * bpp
        blocks = [self.model.layers[i].mlp for i in self.moe_layers()]
        counts = tuple(int(b.num_experts) for b in blocks)
        ks = tuple(int(b.top_k) for b in blocks)
        return ModelCosts(dense_bytes=dense, expert_bytes=expert,
                          experts_per_layer=max(counts, default=a.n_routed_experts), moe_layers=len(blocks),
                          top_k=max(ks, default=a.top_k), layer_experts=counts, layer_top_k=ks)

    def dense_nbytes(self) -> int:
        """Bytes of every non-routed-expert weight at the model's dtype."""
        return self.costs().dense_bytes

    def expert_nbytes(self) -> int:
        """Bytes of one routed expert at the model's dtype."""
        return self.costs().expert_bytes

    def active_experts_per_token(self) -> int:
        """Routed experts one token uses across all MoE layers."""
        return self.costs().active_experts_per_token
