"""Multi-head Latent Attention (MLA), the attention of DeepSeek-V2 and V3.

Owns :class:`MLAttention` (low-rank query, compressed key/value latent,
decoupled RoPE key shared by all heads), its KV cache entry (the normalised
latent ``c_kv [B, max_len, C]`` plus the roped shared key
``k_rope [B, max_len, R]`` — never the expanded per-head keys and values),
the DeepSeek RoPE layouts (interleaved pairs or rotate-half) and the softmax
scale with the YaRN ``mscale`` correction.

Two mathematically equal attention paths are used, picked per call by an
operation count (:func:`prefer_absorbed`):

* expanded: ``kv_b_proj`` turns every cached latent into per-head keys and
  values, then plain attention (cheap for a long prefill);
* absorbed: ``kv_b_proj`` is folded into the query and the output, attention
  runs directly on the latent (cheap for decoding: nothing per cached position
  is expanded).

Knows nothing about experts, routing, checkpoints or files.

Legend for shape comments: B batch, T new tokens, S cached+new positions,
H hidden, h heads, C kv_lora_rank, Q q_lora_rank, N qk_nope_head_dim,
R qk_rope_head_dim, V v_head_dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from moestream.convert.errors import UnsupportedModelError
from moestream.engine.kv_cache import LayerCache
from moestream.engine.models.blocks import RMSNorm, attention_mask, default_inv_freq

# HF (and the original DeepSeek code) build q_a_layernorm / kv_a_layernorm with
# the RMSNorm default eps, not config.rms_norm_eps.
LATENT_NORM_EPS = 1e-6


@dataclass(frozen=True)
class MLADims:
    """Sizes of one MLA layer (HF config names).

    Attributes:
        hidden_size: model width H.
        num_heads: attention heads h.
        q_lora_rank: Q, or ``None`` for a plain ``q_proj`` (DeepSeek-V2-Lite).
        kv_lora_rank: C.
        qk_nope_head_dim: N, the per-head key/query part without RoPE.
        qk_rope_head_dim: R, the RoPE part (one key shared by all heads).
        v_head_dim: V.
        attention_bias: bias on ``q_a_proj``, ``kv_a_proj_with_mqa`` and ``o_proj``.
    """

    hidden_size: int
    num_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    attention_bias: bool = False

    @property
    def qk_head_dim(self) -> int:
        """N + R, the query/key head size the softmax scale is derived from."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim


# ---------------------------------------------------------------------------
# RoPE: frequencies (default / YaRN), softmax scale, the two layouts
# ---------------------------------------------------------------------------

SUPPORTED_ROPE_TYPES = ("default", "yarn")


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN magnitude correction ``0.1 * mscale * ln(scale) + 1`` (1 when ``scale <= 1``)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def rope_type_of(rope: Mapping[str, Any] | None) -> str:
    """The RoPE type named by a ``rope_parameters``/``rope_scaling`` dict (``"default"`` when absent)."""
    if not rope:
        return "default"
    return str(rope.get("rope_type", rope.get("type", "default")))


def yarn_factor(rope: Mapping[str, Any], max_position_embeddings: int) -> float:
    """The YaRN ``factor``; when absent, ``max_position_embeddings / original_max_position_embeddings``."""
    factor = rope.get("factor")
    if factor is None:
        original_max = rope.get("original_max_position_embeddings") or max_position_embeddings
        factor = max_position_embeddings / original_max
    return float(factor)


def _yarn_inv_freq(rope: Mapping[str, Any], dim: int, base: float,
                   max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """YaRN inverse frequencies and cos/sin factor, as transformers 5.24 ``_compute_yarn_parameters``."""
    original_max = int(rope.get("original_max_position_embeddings") or max_position_embeddings)
    factor = yarn_factor(rope, max_position_embeddings)
    attention_factor = rope.get("attention_factor")
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_get_mscale(factor)
    beta_fast = rope.get("beta_fast") or 32
    beta_slow = rope.get("beta_slow") or 1
    truncate = rope.get("truncate", True)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original_max / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)  # [R/2]
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)  # [R/2]
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # share of the extrapolated (unscaled) frequency
    inv_freq = interpolation * (1 - keep) + extrapolation * keep
    return inv_freq, float(attention_factor)


def rope_frequencies(rope: Mapping[str, Any] | None, dim: int, base: float,
                     max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the cos/sin factor for the RoPE part of MLA.

    Args:
        rope: the config's ``rope_parameters`` (or Hub ``rope_scaling``) dict, or ``None``.
        dim: rotary dimension R (``qk_rope_head_dim``).
        base: RoPE theta.
        max_position_embeddings: from the config (YaRN defaults).

    Returns:
        ``(inv_freq [R/2] fp32, attention_scaling)``.

    Raises:
        UnsupportedModelError: for RoPE types other than ``default`` and ``yarn``.
    """
    kind = rope_type_of(rope)
    if kind == "default":
        return default_inv_freq(dim, base), 1.0
    if kind == "yarn":
        assert rope is not None
        return _yarn_inv_freq(rope, dim, base, max_position_embeddings)
    raise UnsupportedModelError(
        f"DeepSeek RoPE type {kind!r} is not implemented; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
    )


def softmax_scale(qk_head_dim: int, rope: Mapping[str, Any] | None, max_position_embeddings: int) -> float:
    """``qk_head_dim ** -0.5``, times ``mscale(factor, mscale_all_dim)^2`` for scaled RoPE.

    Args:
        qk_head_dim: N + R.
        rope: the config's RoPE dict (or ``None``).
        max_position_embeddings: from the config (YaRN ``factor`` fallback).

    Returns:
        The attention softmax scale (as transformers' ``yarn_apply_mscale``).
    """
    scale = qk_head_dim ** -0.5
    if rope_type_of(rope) != "default":
        mscale_all_dim = rope.get("mscale_all_dim", 0) if rope else 0
        if mscale_all_dim:
            m = yarn_get_mscale(yarn_factor(rope, max_position_embeddings), mscale_all_dim)
            scale = scale * m * m
    return scale


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs ``(x0, x1), (x2, x3), ...`` (DeepSeek's native layout).

    The output keeps the interleaved layout. Queries and keys both go through
    this function, so their dot products equal transformers' (which
    de-interleaves both).

    Args:
        x: ``[..., T, R]``.
        cos, sin: ``[T, R]`` rotate-half style tables (``cat(freqs, freqs)``);
            only the first half is used.

    Returns:
        ``[..., T, R]``.
    """
    half = cos.shape[-1] // 2
    c, s = cos[..., :half], sin[..., :half]  # [T, R/2]
    x1, x2 = x[..., 0::2], x[..., 1::2]  # [..., T, R/2]
    return torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)


def apply_rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (``rope_interleave: false``): ``x * cos + rotate_half(x) * sin``."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


# ---------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------


def prefer_absorbed(new_tokens: int, positions: int, dims: MLADims) -> bool:
    """Whether the absorbed path costs fewer multiply-adds per head than the expanded one.

    Args:
        new_tokens: T.
        positions: S (cached + new).
        dims: layer sizes.

    Returns:
        True for the absorbed (latent-space) path.
    """
    c, n, r, v = dims.kv_lora_rank, dims.qk_nope_head_dim, dims.qk_rope_head_dim, dims.v_head_dim
    expanded = positions * c * (n + v) + new_tokens * positions * (n + r + v)
    absorbed = new_tokens * c * (n + v) + new_tokens * positions * (2 * c + r)
    return absorbed < expanded


class MLAttention(nn.Module):
    """DeepSeek MLA with a latent KV cache entry.

    Attribute names follow the HF tensor names (``q_proj`` or ``q_a_proj`` /
    ``q_a_layernorm`` / ``q_b_proj``, ``kv_a_proj_with_mqa``,
    ``kv_a_layernorm``, ``kv_b_proj``, ``o_proj``), so loading is a plain
    ``load_state_dict``. Matches the :class:`~blocks.DecoderLayer` attention
    contract: ``forward(x, cos, sin, start, cache)`` and ``new_cache_entry``.
    """

    #: Submodules whose ``.weight`` this module reads directly (the absorbed path splits ``kv_b_proj``
    #: per head): loaders keep them as ``nn.Linear`` instead of a packed quantized matrix.
    direct_weight_modules: tuple[str, ...] = ("kv_b_proj",)

    def __init__(self, dims: MLADims, scale: float, rope_interleave: bool = True) -> None:
        """Args:
        dims: layer sizes.
        scale: softmax scale (see :func:`softmax_scale`).
        rope_interleave: True for DeepSeek's interleaved-pair RoPE, False for rotate-half.
        """
        super().__init__()
        self.dims = dims
        self.scale = scale
        self.rope_interleave = rope_interleave
        h, hd = dims.num_heads, dims.qk_head_dim
        bias = dims.attention_bias
        if dims.q_lora_rank is None:
            self.q_proj = nn.Linear(dims.hidden_size, h * hd, bias=False)
        else:
            self.q_a_proj = nn.Linear(dims.hidden_size, dims.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(dims.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(dims.q_lora_rank, h * hd, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(dims.hidden_size, dims.kv_lora_rank + dims.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(dims.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(dims.kv_lora_rank, h * (dims.qk_nope_head_dim + dims.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * dims.v_head_dim, dims.hidden_size, bias=bias)

    def new_cache_entry(self, batch: int, max_len: int, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu") -> LayerCache:
        """A latent entry: ``c_kv [B, max_len, C]`` and ``k_rope [B, max_len, R]`` (time axis 1).

        Per position this holds ``C + R`` numbers for all heads together,
        instead of ``h * (N + R + V)`` for expanded keys and values.
        """
        d = self.dims
        return LayerCache([(batch, max_len, d.kv_lora_rank), (batch, max_len, d.qk_rope_head_dim)],
                          time_dim=1, dtype=dtype, device=device)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.rope_interleave:
            return apply_rope_interleaved(x, cos, sin)
        return apply_rope_half(x, cos, sin)

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, T, H] -> q [B, h, T, N+R]``."""
        b, t, _ = x.shape
        if self.dims.q_lora_rank is None:
            q = self.q_proj(x)  # [B, T, h*(N+R)]
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))  # [B, T, Q] -> [B, T, h*(N+R)]
        return q.view(b, t, self.dims.num_heads, self.dims.qk_head_dim).transpose(1, 2)

    def _kv_b(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``kv_b_proj`` split per head: ``w_uk [h, N, C]`` and ``w_uv [h, V, C]``."""
        d = self.dims
        w = self.kv_b_proj.weight.view(d.num_heads, d.qk_nope_head_dim + d.v_head_dim, d.kv_lora_rank)
        return w[:, :d.qk_nope_head_dim], w[:, d.qk_nope_head_dim:]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int,
                cache: LayerCache | None) -> torch.Tensor:
        """Args:
        x: ``[B, T, H]`` normed hidden states.
        cos, sin: ``[T, R]`` rotary tables for positions ``start..start+T``.
        start: position of the first new token.
        cache: this layer's latent entry, or ``None`` for a cache-less forward (``start`` must be 0).

        Returns:
            ``[B, T, H]``.
        """
        d = self.dims
        b, t, _ = x.shape
        q = self._query(x)  # [B, h, T, N+R]
        q_nope, q_rope = q.split([d.qk_nope_head_dim, d.qk_rope_head_dim], dim=-1)  # [B, h, T, N], [B, h, T, R]
        q_rope = self._rope(q_rope, cos, sin)
        ckv = self.kv_a_proj_with_mqa(x)  # [B, T, C+R]
        c_kv, k_rope = ckv.split([d.kv_lora_rank, d.qk_rope_head_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)  # [B, T, C]
        k_rope = self._rope(k_rope, cos, sin)  # [B, T, R]
        if cache is not None:
            c_kv, k_rope = cache.update(start, c_kv, k_rope)  # [B, S, C], [B, S, R]
        elif start != 0:
            raise ValueError("a forward without a KV cache must start at position 0")
        if prefer_absorbed(t, c_kv.shape[1], d):
            out = self._attend_absorbed(q_nope, q_rope, c_kv, k_rope, start)
        else:
            out = self._attend_expanded(q_nope, q_rope, c_kv, k_rope, start)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, d.num_heads * d.v_head_dim))

    def _attend_expanded(self, q_nope: torch.Tensor, q_rope: torch.Tensor, c_kv: torch.Tensor,
                         k_rope: torch.Tensor, start: int) -> torch.Tensor:
        """Expand the latent to per-head keys/values, then causal SDPA. Returns ``[B, h, T, V]``."""
        d = self.dims
        b, s, _ = c_kv.shape
        t = q_nope.shape[2]
        kv = self.kv_b_proj(c_kv).view(b, s, d.num_heads, d.qk_nope_head_dim + d.v_head_dim).transpose(1, 2)
        k_nope, v = kv.split([d.qk_nope_head_dim, d.v_head_dim], dim=-1)  # [B, h, S, N], [B, h, S, V]
        k = torch.cat((k_nope, k_rope[:, None].expand(b, d.num_heads, s, d.qk_rope_head_dim)), dim=-1)
        q = torch.cat((q_nope, q_rope), dim=-1)  # [B, h, T, N+R]
        if start == 0 and t > 1:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        mask = attention_mask(start, t, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)

    def _attend_absorbed(self, q_nope: torch.Tensor, q_rope: torch.Tensor, c_kv: torch.Tensor,
                         k_rope: torch.Tensor, start: int) -> torch.Tensor:
        """Attention in latent space (``kv_b_proj`` folded in). Returns ``[B, h, T, V]``."""
        w_uk, w_uv = self._kv_b()  # [h, N, C], [h, V, C]
        t = q_nope.shape[2]
        q_lat = torch.einsum("bhtn,hnc->bhtc", q_nope, w_uk)  # [B, h, T, C]
        scores = torch.einsum("bhtc,bsc->bhts", q_lat, c_kv)  # [B, h, T, S]
        scores = scores + torch.einsum("bhtr,bsr->bhts", q_rope, k_rope)
        scores = scores * self.scale
        mask = attention_mask(start, t, scores.device)  # [T, S] or None
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1)  # [B, h, T, S]
        out_lat = torch.einsum("bhts,bsc->bhtc", probs, c_kv)  # [B, h, T, C]
        return torch.einsum("bhtc,hvc->bhtv", out_lat, w_uv)  # [B, h, T, V]
