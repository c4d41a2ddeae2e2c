"""Shared building blocks for every model family.

Owns RMSNorm, rotary position embeddings, grouped-query attention (optional
q/k RMSNorm per head or over the full projection, optional qkv clipping),
the dense SwiGLU MLP, the softmax top-k router, :class:`MoERuntime` (the
expert provider + routing hooks a model shares with its MoE blocks),
:class:`MoEBlock` (pluggable router, optional shared expert(s), experts
fetched ONLY through the provider) and the pre-norm :class:`DecoderLayer`.

Module attribute names follow the HF/canonical tensor names so that
``Model.load_canonical`` is a plain ``load_state_dict``.

Knows nothing about files, checkpoints, the shard format or the scheduler.

Legend for shape comments: B batch, T new tokens, S cached+new positions,
N = B*T flattened tokens, H hidden, h query heads, g kv heads, D head dim,
E routed experts, k experts per token, I intermediate size.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from moestream.engine import decode_kernels
from moestream.engine.experts import ExpertProvider, weighted_expert_sum
from moestream.engine.kv_cache import LayerCache

RoutingHook = Callable[[int, torch.Tensor, torch.Tensor], None]

#: The lean single-token decode path: :meth:`Attention._decode_one` (native q/k norm + RoPE + cache write from
#: ``engine/decode_kernels.py`` where it applies), the one-token routing of :class:`MoEBlock`, and for fp32
#: :class:`RMSNorm` the native row norm on small inputs, else ``F.rms_norm``. False selects the general path
#: everywhere (same math within fp32 rounding; ``bench/decode_overhead.py`` A/B, ``tests/test_decode_fast_path.py``).
FAST_DECODE = True
#: Largest input (elements) :class:`RMSNorm` hands the single-threaded native norm (decode-sized rows).
NATIVE_NORM_MAX = 1 << 16
#: :meth:`Attention._decode_one` tries the native norm/RoPE/cache-write first (tests switch it off to check torch's).
NATIVE_ATTENTION = True


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last axis (computed in fp32)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self._shape = (dim,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if FAST_DECODE and x.dtype == torch.float32 and w.dtype == torch.float32:
            y = decode_kernels.rms_norm(x, w, self.eps) if x.numel() <= NATIVE_NORM_MAX else None
            # F.rms_norm: one op, bit-identical to the lines below in fp32; the native norm sums in double
            return y if y is not None else F.rms_norm(x, self._shape, w, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def default_inv_freq(dim: int, base: float) -> torch.Tensor:
    """Standard RoPE inverse frequencies ``1 / base^(2i/dim)`` (``[dim/2]`` fp32)."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))


class RotaryEmbedding(nn.Module):
    """Cos/sin tables for "rotate-half" RoPE, grown on demand and sliced per forward.

    Families with other RoPE variants (YaRN, linear scaling) pass their own
    ``inv_freq`` and ``attention_scaling``.
    """

    def __init__(self, dim: int, base: float = 10000.0, inv_freq: torch.Tensor | None = None,
                 attention_scaling: float = 1.0) -> None:
        """Args:
        dim: rotary dimension (usually the head dim).
        base: RoPE theta, used when ``inv_freq`` is not given.
        inv_freq: ``[dim/2]`` inverse frequencies overriding the default.
        attention_scaling: factor applied to cos and sin (1.0 for default RoPE).
        """
        super().__init__()
        inv = default_inv_freq(dim, base) if inv_freq is None else inv_freq.float()
        self.register_buffer("inv_freq", inv, persistent=False)
        self.attention_scaling = attention_scaling
        self.register_buffer("_cos", torch.empty(0, dim), persistent=False)
        self.register_buffer("_sin", torch.empty(0, dim), persistent=False)

    def _grow(self, n: int) -> None:
        n = max(n, 2 * self._cos.shape[0], 64)
        pos = torch.arange(n, dtype=torch.float, device=self.inv_freq.device)
        freqs = pos[:, None] * self.inv_freq[None, :]  # [n, dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [n, dim]
        self._cos = emb.cos() * self.attention_scaling
        self._sin = emb.sin() * self.attention_scaling

    def forward(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(cos, sin)``, each ``[length, dim]``, for positions ``start..start+length``."""
        if start + length > self._cos.shape[0]:
            self._grow(start + length)
        return self._cos[start:start + length], self._sin[start:start + length]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` on the last axis."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, heads, T, D]`` by ``cos/sin [T, D]`` (rotate-half convention)."""
    return x * cos + rotate_half(x) * sin


def attention_mask(start: int, length: int, device: torch.device) -> torch.Tensor | None:
    """Causal mask for ``length`` new queries at ``start`` over ``start+length`` keys.

    Returns:
        ``None`` when no mask is needed (a single new token), else a bool
        ``[length, start+length]`` mask (True = attend).
    """
    if length == 1:
        return None
    q = torch.arange(start, start + length, device=device)[:, None]
    k = torch.arange(start + length, device=device)[None, :]
    return k <= q


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scale: float) -> torch.Tensor:
    """Causal scaled-dot-product attention with GQA.

    Args:
        q: ``[B, h, T, D]`` queries for positions ``start..start+T``.
        k: ``[B, g, S, D]`` keys, ``S = start + T``.
        v: ``[B, g, S, Dv]`` values.
        start: position of the first query.
        scale: softmax scale.

    Returns:
        ``[B, h, T, Dv]``.
    """
    t = q.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if start == 0 and t > 1:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    mask = attention_mask(start, t, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


class Attention(nn.Module):
    """Grouped-query attention with RoPE and a preallocated KV cache entry.

    ``qk_norm`` selects q/k RMSNorm: ``None`` (Mixtral, Qwen2-MoE), ``"head"``
    (Qwen3-MoE: per head over D) or ``"full"`` (OLMoE: over the whole
    projection before splitting into heads).
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
                 qkv_bias: bool = False, o_bias: bool = False, qk_norm: str | None = None,
                 eps: float = 1e-6, clip_qkv: float | None = None) -> None:
        super().__init__()
        if qk_norm not in (None, "head", "full"):
            raise ValueError(f"qk_norm must be None, 'head' or 'full', got {qk_norm!r}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        self.qk_norm = qk_norm
        self.clip_qkv = clip_qkv
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=o_bias)
        if qk_norm == "head":
            self.q_norm = RMSNorm(head_dim, eps)
            self.k_norm = RMSNorm(head_dim, eps)
        elif qk_norm == "full":
            self.q_norm = RMSNorm(num_heads * head_dim, eps)
            self.k_norm = RMSNorm(num_kv_heads * head_dim, eps)

    def new_cache_entry(self, batch: int, max_len: int, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu") -> LayerCache:
        """A ``k, v`` entry of ``[B, g, max_len, D]`` each (time axis 2)."""
        shape = (batch, self.num_kv_heads, max_len, self.head_dim)
        return LayerCache([shape, shape], time_dim=2, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int,
                cache: LayerCache | None) -> torch.Tensor:
        """Args:
        x: ``[B, T, H]`` normed hidden states.
        cos, sin: ``[T, D]`` rotary tables for positions ``start..start+T``.
        start: position of the first new token.
        cache: this layer's entry, or ``None`` for a cache-less full forward (``start`` must be 0).

        Returns:
            ``[B, T, H]``.
        """
        if FAST_DECODE and cache is not None and x.shape[1] == 1:
            return self._decode_one(x, cos, sin, start, cache)
        return self._forward_general(x, cos, sin, start, cache)

    def _forward_general(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int,
                         cache: LayerCache | None) -> torch.Tensor:
        """Any ``T``, with or without a cache (see :meth:`forward`)."""
        b, t, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [B, T, h*D], [B, T, g*D] x2
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (z.clamp(-self.clip_qkv, self.clip_qkv) for z in (q, k, v))
        q = q.view(b, t, self.num_heads, self.head_dim)
        k = k.view(b, t, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)  # [B, h, T, D]
        k = apply_rope(k.transpose(1, 2), cos, sin)  # [B, g, T, D]
        v = v.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, g, T, D]
        if cache is not None:
            k, v = cache.update(start, k, v)  # [B, g, S, D]
        out = sdpa(q, k, v, start, self.scale)  # [B, h, T, D]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    def _decode_one(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int,
                    cache: LayerCache) -> torch.Tensor:
        """One new token per sequence (``x [B, 1, H]``, ``cos/sin [1, D]``): the general math in fewer ops.

        After the projections (and a full-width q/k norm or clipping): per-head q/k norm, RoPE and
        the k/v cache write in one native call where it applies (:func:`decode_kernels.prep_one`), else
        in torch with heads as rows ``[B, h, D]`` (q and k roped together, ``LayerCache.append_one``);
        then attention for the one query per head as SDPA over each kv head's ``h/g`` query rows
        without a mask (no GQA expansion). Equal to :meth:`_forward_general` within fp32 rounding (the
        attention sums run in another order); ``tests/test_decode_fast_path.py``.
        """
        b = x.shape[0]
        h, g, d = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [B, 1, h*D], [B, 1, g*D] x2
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (z.clamp(-self.clip_qkv, self.clip_qkv) for z in (q, k, v))
        head = self.qk_norm == "head"
        qr = decode_kernels.prep_one(q, k, v, self.q_norm.weight if head else None,
                                     self.k_norm.weight if head else None, self.q_norm.eps if head else 0.0,
                                     cos, sin, *cache.buffers, start, h) if NATIVE_ATTENTION else None
        if qr is not None:  # [B, h, D]; position ``start`` of the cache written
            k_all, v_all = (buf.narrow(2, 0, start + 1) for buf in cache.buffers)  # [B, g, S, D] each
        else:
            q, k = q.view(b, h, d), k.view(b, g, d)
            if head:
                q, k = self.q_norm(q), self.k_norm(k)
            qk = apply_rope(torch.cat((q, k), dim=1), cos, sin)  # [B, h+g, D]
            k_all, v_all = cache.append_one(start, qk[:, h:], v.view(b, g, d))  # [B, g, S, D] each
            qr = qk[:, :h]
        out = F.scaled_dot_product_attention(qr.view(b, g, h // g, d), k_all, v_all, scale=self.scale)
        return self.o_proj(out.reshape(b, 1, h * d))  # out [B, g, h/g, D]: kv head j's queries are heads j*h/g..


class DenseMLP(nn.Module):
    """SwiGLU MLP ``down(silu(gate x) * up x)``: dense layers and shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(Protocol):
    """What :class:`MoEBlock` needs from a router (an ``nn.Module`` stored as ``mlp.gate``).

    ``router(x [N, H]) -> (expert_ids [N, k] int64, gate_weights [N, k] fp32)``;
    the weights are the final multipliers of each expert's output (any
    renormalisation or routed scaling factor already applied).
    """

    num_experts: int
    top_k: int

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class SoftmaxTopKRouter(nn.Module):
    """Softmax over all experts, then top-k; optionally renormalise the k weights.

    Mixtral: ``norm_topk_prob=True``; Qwen3-MoE: config (usually True);
    Qwen2-MoE and OLMoE: config (default False).
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, norm_topk_prob: bool) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.norm_topk_prob = num_experts, top_k, norm_topk_prob
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x, self.weight)  # [N, E]
        probs = torch.softmax(logits if logits.dtype == torch.float32 else logits.float(), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)  # [N, k]
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return ids, weights


class MoERuntime:
    """What a model shares with all its MoE blocks: the expert provider and routing hooks."""

    def __init__(self) -> None:
        self.provider: ExpertProvider | None = None
        self.hooks: list[RoutingHook] = []
        self.blocks: dict[int, "MoEBlock"] = {}  # layer index -> MoE block (for next-layer prefetch hints)

    def next_block(self, layer: int) -> "MoEBlock | None":
        """The MoE block of the first MoE layer after ``layer``, or None."""
        later = [i for i in self.blocks if i > layer]
        return self.blocks[min(later)] if later else None

    def hint_after(self, layer: int, x: torch.Tensor) -> None:
        """Prefetch hint from decoder layer ``layer``'s output ``x [B, T, H]``.

        Applies the next MoE layer's pre-MoE norm and router to ``x`` (pre-gating) and passes the
        predicted ids to ``provider.hint``. Only for providers that set ``wants_hints`` (the resident
        reference skips the extra router call). Pure with respect to the forward: no routing hooks
        run and nothing feeds back into the output.
        """
        provider = self.provider
        if provider is None or not getattr(provider, "wants_hints", False):
            return
        nxt = self.next_block(layer)
        if nxt is None or nxt.pre_norm is None:
            return
        h = nxt.pre_norm(x).reshape(-1, x.shape[-1])  # [N, H]
        pred_ids, pred_w = nxt.gate(h)  # [N, k] each
        provider.hint(nxt.layer_idx, pred_ids, pred_w)

    def require_provider(self) -> ExpertProvider:
        """The provider, or a clear error when none was set."""
        if self.provider is None:
            raise RuntimeError("no expert provider set: call model.set_expert_provider(...) before forward")
        return self.provider


class MoEBlock(nn.Module):
    """Routed experts (from the provider) plus optional shared expert(s).

    ``out = sum_j w_j * expert_{id_j}(x) [+ sigmoid(shared_gate(x)) * shared(x)]``;
    without a ``shared_gate`` the shared output is added ungated (DeepSeek).
    The router is stored as ``self.gate`` (canonical ``mlp.gate.*``); the
    shared module under ``shared_name`` (``shared_expert`` for Qwen2-MoE,
    ``shared_experts`` for DeepSeek) and its gate as ``shared_expert_gate``.

    Prefill groups tokens by expert: each chosen expert runs once on all its
    tokens. A single token takes a lean path without sorting.
    """

    def __init__(self, layer_idx: int, router: nn.Module, runtime: MoERuntime, *,
                 shared: nn.Module | None = None, shared_gate: nn.Module | None = None,
                 shared_name: str = "shared_expert") -> None:
        """Args:
        layer_idx: decoder layer index (the provider's and the hooks' layer key).
        router: module following :class:`Router`.
        runtime: the model's shared :class:`MoERuntime`.
        shared: optional always-on expert (e.g. :class:`DenseMLP`).
        shared_gate: optional ``Linear(H, 1)``; its sigmoid scales the shared output.
        shared_name: attribute name of ``shared`` (its canonical name).
        """
        super().__init__()
        self.layer_idx = layer_idx
        self.gate = router
        self._runtime = runtime
        self._shared_name = shared_name if shared is not None else None
        if shared is not None:
            setattr(self, shared_name, shared)
        if shared_gate is not None:
            if shared is None:
                raise ValueError("shared_gate given without a shared expert")
            self.shared_expert_gate = shared_gate
        else:
            self.shared_expert_gate = None
        runtime.blocks[layer_idx] = self
        self._pre_norm: tuple[nn.Module, ...] = ()  # the decoder layer's post-attention norm (not a submodule)

    @property
    def pre_norm(self) -> nn.Module | None:
        """The norm applied to this block's input (set by :class:`DecoderLayer`; used for prefetch hints)."""
        return self._pre_norm[0] if self._pre_norm else None

    @property
    def num_experts(self) -> int:
        return self.gate.num_experts

    @property
    def top_k(self) -> int:
        return self.gate.top_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, T, H] -> [B, T, H]``."""
        shape = x.shape
        xf = x.reshape(-1, shape[-1])  # [N, H]
        ids, weights = self.gate(xf)  # [N, k], [N, k]
        for hook in self._runtime.hooks:
            hook(self.layer_idx, ids, weights)
        if xf.shape[0] == 1:
            out = self._routed_one(xf, ids, weights)
        else:
            out = self._routed_grouped(xf, ids, weights)
        if self._shared_name is not None:
            s = getattr(self, self._shared_name)(xf)  # [N, H]
            if self.shared_expert_gate is not None:
                s = torch.sigmoid(self.shared_expert_gate(xf)) * s
            out = out + s
        return out.view(shape)

    def _routed_one(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """One token: ``x [1, H]``, ``ids/weights [1, k]`` -> ``[1, H]``, experts in id order."""
        if FAST_DECODE:  # sort the k pairs in Python: two tolist calls instead of argsort + gathers
            id_list, w_list = ids.tolist()[0], weights.tolist()[0]
            order = sorted(range(len(id_list)), key=id_list.__getitem__)
            id_list, w_list = [id_list[j] for j in order], [w_list[j] for j in order]
        else:
            order = torch.argsort(ids[0])
            id_list = ids[0][order].tolist()
            w_list = weights[0][order].tolist()
        provider = self._runtime.require_provider()
        views = provider.acquire(self.layer_idx, id_list, w_list)
        try:
            return weighted_expert_sum([views[e] for e in id_list], w_list, x)  # [1, H]
        finally:
            provider.release(self.layer_idx, id_list)

    def _routed_grouped(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Many tokens: ``x [N, H]``, ``ids/weights [N, k]`` -> ``[N, H]``, one call per chosen expert."""
        n, k = ids.shape
        flat_ids = ids.reshape(-1)  # [N*k]
        flat_w = weights.reshape(-1)  # [N*k]
        order = torch.argsort(flat_ids, stable=True)  # group slots by expert
        counts = torch.bincount(flat_ids, minlength=self.num_experts)  # [E]
        wsum = torch.zeros(self.num_experts, dtype=flat_w.dtype, device=flat_w.device).index_add_(0, flat_ids, flat_w)  # [E]
        chosen = torch.nonzero(counts).flatten()
        id_list = chosen.tolist()
        count_list = counts[chosen].tolist()
        token_of_slot = order // k  # [N*k] token index of each sorted slot
        w_sorted = flat_w[order]  # [N*k]
        wsum_list = wsum[chosen].tolist()
        provider = self._runtime.require_provider()
        # A provider with a fixed arena takes at most ``max_experts_per_acquire`` ids per call; chunks keep
        # the per-expert arithmetic and its order unchanged, so the result is the same as one call.
        limit = getattr(provider, "max_experts_per_acquire", None) or len(id_list)
        prefetch = getattr(provider, "prefetch", None)
        out = torch.zeros_like(x)
        offset = 0
        for c0 in range(0, len(id_list), limit):
            ids_c = id_list[c0:c0 + limit]
            views = provider.acquire(self.layer_idx, ids_c, wsum_list[c0:c0 + limit])
            if prefetch is not None and c0 + limit < len(id_list):
                prefetch(self.layer_idx, id_list[c0 + limit:c0 + 2 * limit])  # next chunk loads while this computes
            try:
                for e, c in zip(ids_c, count_list[c0:c0 + limit]):
                    tok = token_of_slot[offset:offset + c]  # [c]
                    y = views[e].ffn(x[tok]) * w_sorted[offset:offset + c, None]  # [c, H]
                    out.index_add_(0, tok, y)
                    offset += c
            finally:
                provider.release(self.layer_idx, ids_c)
        return out


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``.

    ``self_attn`` must accept ``(x, cos, sin, start, cache_entry)`` and
    provide ``new_cache_entry(batch, max_len, dtype, device)``; ``mlp`` maps
    ``[B, T, H] -> [B, T, H]`` (:class:`DenseMLP` or :class:`MoEBlock`).
    """

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps)
        if isinstance(mlp, MoEBlock):
            mlp._pre_norm = (self.post_attention_layernorm,)  # a tuple: no second state-dict entry

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int,
                cache: LayerCache | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, start, cache)
        x = x + self.mlp(self.post_attention_layernorm(x))
        if isinstance(self.mlp, MoEBlock):  # prefetch: the next MoE layer's router on this layer's output
            self.mlp._runtime.hint_after(self.mlp.layer_idx, x)
        return x
