"""Dense matrices kept in their stored GGML Q8_0 / Q4_0 form at run time.

Owns :class:`QuantizedLinear` and :class:`QuantizedEmbedding` (a :class:`~moestream.engine.dense_kernels.PackedDense`
held as the registered buffers ``qs`` and ``d``, so ``.to()``, ``state_dict`` and memory accounting see
them), and the rules deciding which modules of a built model hold their stored blocks:

- :func:`quantized_targets`: exactly the ``nn.Linear`` / ``nn.Embedding`` modules whose stored weight
  is Q8_0 / Q4_0, minus the modules whose ``.weight`` other code reads directly — those named in a
  parent's ``direct_weight_modules`` (MLA's ``kv_b_proj``) and, for tied embeddings (``lm_head is
  None``), ``model.embed_tokens`` (the LM head reads its table as a matrix): these stay fp32;
- blocks are kept only on the CPU with the native integer-dot kernels built (:func:`widen_reason`):
  elsewhere the reference path is correct but far slower than fp32, so the loader widens as before;
- :func:`install_quantized` swaps one module for its quantized form from the stored bytes (the
  ``nn.Linear``'s bias parameter, fp32, moves over unchanged);
- :func:`held_weight_bytes`: every parameter's bytes as the loader will hold them (packed bytes for
  kept matrices, the parameter's own size otherwise) — what memory planning counts as resident.

Everything else (norms, routers, f16/bf16/f32 matrices) is loaded as before by ``engine/streaming.py``.

Knows nothing about shard layout, planning or the scheduler: it asks the reader for tensor records
and raw bytes, and hands modules to the caller.

Legend: M tokens (leading dims flattened), K input features, N output features.
"""

from __future__ import annotations

import logging
from typing import Mapping

import torch
from gguf import GGMLQuantizationType
from torch import nn

from moestream.convert.errors import ModelFormatError
from moestream.convert.shard_reader import RawDense, ShardedModel
from moestream.engine import dense_kernels
from moestream.engine.dense_kernels import BLOCK, PackedDense

log = logging.getLogger("moestream")

#: Stored GGML types held packed, and the kernel kind of each.
KIND_OF_TYPE: Mapping[GGMLQuantizationType, str] = {
    GGMLQuantizationType.Q8_0: "q8_0",
    GGMLQuantizationType.Q4_0: "q4_0",
}


def packed_nbytes(kind: str, shape: tuple[int, int]) -> int:
    """Bytes of an (N, K) matrix in kernel layout: codes (1 byte per q8_0 weight, ½ per q4_0) + fp32 scale per 32."""
    n, k = shape
    codes = n * k if kind == "q8_0" else n * k // 2
    return codes + n * (k // BLOCK) * 4


class _Packed(nn.Module):
    """Holds one packed matrix as buffers ``qs`` and ``d`` (shared by the linear and the embedding)."""

    def __init__(self, packed: PackedDense) -> None:
        super().__init__()
        self.kind = packed.kind
        self.shape = packed.shape
        self.register_buffer("qs", packed.qs)
        self.register_buffer("d", packed.d)

    @property
    def packed(self) -> PackedDense:
        """The matrix over the current buffers (valid after ``.to()``)."""
        return PackedDense(self.kind, self.qs, self.d, self.shape)

    @property
    def weight_numel(self) -> int:
        """Elements of the matrix (``MoECausalLM.costs`` counts them like a parameter's)."""
        return self.shape[0] * self.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes held by the packed matrix."""
        return self.packed.nbytes


class QuantizedLinear(_Packed):
    """``y = x Wᵀ (+ b)`` with W kept as Q8_0 / Q4_0 blocks, computed by ``dense_kernels.linear``.

    Activations are quantized to int8 per block of 32 inside the kernel (llama.cpp's Q8_0 activations);
    the result equals ``dense_kernels.reference_linear`` within fp32 rounding. On a non-CPU device the
    reference (torch) computation runs instead.
    """

    def __init__(self, packed: PackedDense, bias: torch.Tensor | None = None) -> None:
        """Args:
        packed: the (N, K) matrix.
        bias: optional ``[N]`` bias (an existing ``nn.Parameter`` is kept as is, possibly on ``meta``
            until the loader assigns it).
        """
        super().__init__(packed)
        self.out_features, self.in_features = packed.shape
        self._cached: PackedDense | None = None  # self.packed for the current buffers (one per call costs µs)
        if bias is not None and not isinstance(bias, nn.Parameter):
            bias = nn.Parameter(bias.detach().float(), requires_grad=False)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., K] -> [..., N]`` in ``x.dtype``."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        qs, d = self.qs, self.d
        p = self._cached
        if p is None or p.qs is not qs or p.d is not d:  # rebuilt after .to() / load_state_dict swaps a buffer
            p = self._cached = PackedDense(self.kind, qs, d, self.shape)
        y = dense_kernels.linear(x2, p) if qs.device.type == "cpu" else dense_kernels.reference_linear(x2, p)
        if self.bias is not None:
            y = y + self.bias
        y = y.view(*lead, self.out_features)  # [..., N]
        return y if x.dtype == y.dtype else y.to(x.dtype)

    def _apply(self, fn, recurse=True):  # .to() / .float() / ...: drop the cached view of the old buffers
        self._cached = None
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}, " \
               f"bias={self.bias is not None}"


class QuantizedEmbedding(_Packed):
    """Token embedding over a Q8_0 / Q4_0 table: each lookup dequantizes only the rows it needs."""

    def __init__(self, packed: PackedDense) -> None:
        super().__init__(packed)
        self.num_embeddings, self.embedding_dim = packed.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids [...] -> [..., K]`` fp32 (the table is never widened)."""
        return dense_kernels.dequantize_rows(self.packed, ids)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, kind={self.kind}"


# ------------------------------------------------------------------------------------- selection
def _direct_weight_readers(model: nn.Module) -> set[str]:
    """Modules whose ``.weight`` other code reads as a matrix (kept fp32)."""
    out = set()
    for name, module in model.named_modules():
        for child in getattr(module, "direct_weight_modules", ()):
            out.add(f"{name}.{child}" if name else child)
    if hasattr(model, "lm_head") and model.lm_head is None:  # tied: the LM head is embed_tokens.weight
        out.add("model.embed_tokens")
    return out


def _candidates(model: nn.Module, reader: ShardedModel) -> dict[str, str]:
    """``{module name: kind}`` of modules whose stored weight is a block type (before the device gate)."""
    stored = set(reader.dense_names())
    skip = _direct_weight_readers(model)
    out = {}
    for name, module in model.named_modules():
        if type(module) not in (nn.Linear, nn.Embedding) or name in skip or f"{name}.weight" not in stored:
            continue
        rec = reader.dense_record(f"{name}.weight")
        kind = KIND_OF_TYPE.get(rec.ggml_type)
        if kind is not None and len(rec.shape) == 2 and rec.shape[1] % BLOCK == 0:
            out[name] = kind
    return out


def widen_reason(device: torch.device | str = "cpu") -> str | None:
    """Why block-typed dense matrices are widened to fp32 on ``device``, or None when they stay packed."""
    device = torch.device(device)
    if device.type != "cpu":
        return f"the integer-dot kernels run on the CPU and the model runs on {device}"
    if not dense_kernels.available():
        return "the native integer-dot kernels are not available here (the torch reference would be slow)"
    return None


def quantized_targets(model: nn.Module, reader: ShardedModel, device: torch.device | str = "cpu",
                      announce: bool = False) -> dict[str, str]:
    """Modules of ``model`` that hold their stored Q8_0 / Q4_0 blocks when loaded on ``device``.

    Args:
        model: the built model (its parameters may be on ``meta``).
        reader: the opened shards.
        device: where the model will run.
        announce: log one info line when block-typed matrices exist but are widened.

    Returns:
        ``{module name: "q8_0" | "q4_0"}``; empty when :func:`widen_reason` gives a reason.
    """
    found = _candidates(model, reader)
    reason = widen_reason(device) if found else None
    if reason is not None:
        if announce:
            log.info("dense Q8_0/Q4_0 matrices (%d) widened to fp32 at load: %s", len(found), reason)
        return {}
    return found


def held_weight_bytes(model: nn.Module, reader: ShardedModel, device: torch.device | str = "cpu") -> dict[str, int]:
    """Bytes of each parameter as the loader holds it on ``device`` (packed for :func:`quantized_targets`).

    Args:
        model: the built model (``meta`` parameters are fine: only shapes are read).
        reader: the opened shards.
        device: where the model will run.

    Returns:
        ``{parameter name: bytes}`` (a kept matrix's ``weight`` entry is its packed size).
    """
    targets = quantized_targets(model, reader, device)
    out = {}
    for name, p in model.named_parameters():
        module, _, attr = name.rpartition(".")
        if attr == "weight" and module in targets:
            out[name] = packed_nbytes(targets[module], (int(p.shape[0]), int(p.shape[1])))
        else:
            out[name] = p.numel() * p.element_size()
    return out


# ------------------------------------------------------------------------------------- loading
def install_quantized(model: nn.Module, name: str, raw: RawDense, where: str = "") -> nn.Module:
    """Replace module ``name`` (``nn.Linear`` / ``nn.Embedding``) by its quantized form built from ``raw``.

    Args:
        model: the model; the module's old weight (fp32 or ``meta``) is dropped with it.
        name: the module's dotted name (``model.layers.0.self_attn.q_proj``).
        raw: the stored weight (:meth:`ShardedModel.read_dense_raw`), a Q8_0 / Q4_0 matrix.
        where: the model path, for messages.

    Returns:
        The new :class:`QuantizedLinear` / :class:`QuantizedEmbedding`.

    Raises:
        ModelFormatError: the stored shape differs from the module's, or the type is not a block type.
    """
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    want = (old.num_embeddings, old.embedding_dim) if isinstance(old, nn.Embedding) else \
        (old.out_features, old.in_features)
    kind = KIND_OF_TYPE.get(raw.ggml_type)
    if kind is None:
        raise ModelFormatError(f"{where}: tensor {name}.weight is {raw.ggml_type.name}, not a Q8_0/Q4_0 block type")
    if tuple(raw.shape) != tuple(want):
        raise ModelFormatError(f"{where}: tensor {name}.weight is {tuple(raw.shape)}, the model expects {want}; "
                               "re-run convert")
    packed = dense_kernels.pack_ggml(raw.data, kind, want)
    new = QuantizedEmbedding(packed) if isinstance(old, nn.Embedding) else QuantizedLinear(packed, old.bias)
    setattr(parent, child, new)
    return new
