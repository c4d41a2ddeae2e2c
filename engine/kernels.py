"""Expert FFN kernels per stored level (one registry table).

Owns: the kernel table :data:`KERNELS`, :func:`prepare` (turns an encoded
expert at one level into a :class:`KernelView` in the kernel's layout — done
once when the expert enters the cache, its cost recorded in
``view.prepare_s``), :func:`run_expert` (``down(silu(gate x) * up x)``) and
:func:`default_kernel` (the measured choice per codec and level).

Kernels (all CPU; each equals dequantize-then-matmul within fp32 rounding):

* ``fp32``        — weights decoded to fp32 once (the reference; 4 B/weight held).
* ``dequant``     — codes unpacked once to 1 byte per weight (per term for residual);
                    each call decodes a projection into a reused per-thread scratch
                    buffer (bit-identical to the reference decode) and runs an fp32 matmul.
* ``int4``        — matryoshka levels of ≤ 4 bits on ``aten._weight_int4pack_mm_for_cpu``
                    (uniform grid: scale α·2^(8−r), zero α·(8·2^(8−r) + c − z), as the
                    op computes ŵ = (q − 8)·scale + zero per group).
* ``int8``        — matryoshka levels on ``aten._weight_int8pack_mm`` (per-channel
                    scales only, so one call per K-group with the group's α, plus a
                    rank-G correction for the zero points).
* ``int4_planes`` — residual levels as Σ over the base and each sign plane of an int4
                    matmul (a sign plane is codes {0,1}, scale 2s, zero −s).
* ``native``      — the C kernel of ``engine/native_kernels.py``: computes straight from the
                    stored planes, scales and zeros (no unpacked copy; the bytes held are the
                    stored bytes), any matryoshka / residual level; available when a C compiler
                    built it (``MOESTREAM_NATIVE_KERNELS=0`` turns it off). matryoshka_floor levels
                    with 2/4-bit planes and groups % 128 run with int8 activations by default
                    (integer dot products, the llama.cpp trade: equal to the decode times the
                    quantized activations within fp32 rounding); ``MOESTREAM_NESTED_ACTIVATIONS=fp32``
                    keeps activations exact. Chosen by ``bench/native_gemv.py`` (int8-act vs
                    fp32-act vs ggml per level, committed in bench/results).

Dense matrices stored as Q8_0 / Q4_0 (``convert --dense``) have their own kernels in
``engine/dense_kernels.py`` (same activation quantization), used by ``engine/quantized_dense.py``.

Knows nothing about files, the scheduler or model families: it consumes
``moestream.convert.codecs`` records and fp32 activations.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from moestream.convert.codecs import EXPERT_PROJS, EncodedTensor, MatryoshkaCodec, ResidualCodec
from moestream.engine import native_kernels

# Legend: M tokens, K input features of a projection, N output features, G groups along K.

_ops = torch.ops.aten
HAS_INT4 = hasattr(_ops, "_weight_int4pack_mm_for_cpu") and hasattr(_ops, "_convert_weight_to_int4pack_for_cpu")
HAS_INT8 = hasattr(_ops, "_weight_int8pack_mm")
INT4_GROUP_SIZES = (32, 64, 128, 256)


@dataclasses.dataclass
class KernelView:
    """One expert prepared for one kernel at one stored level.

    Duck-types the engine's ExpertView: ``ffn(x)``, ``level`` and ``nbytes``.

    Attributes:
        kernel: registry name.
        level: stored level (1..L) the data came from.
        bits: compute bits of that level.
        shapes: projection -> (N, K).
        data: projection -> kernel-specific tensors.
        prepare_s: wall seconds spent converting into this layout (counted cost).
    """

    kernel: str
    level: int
    bits: int
    shapes: dict[str, tuple[int, int]]
    data: dict[str, Any]
    prepare_s: float = 0.0

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        """``down(silu(gate x) * up x)`` for x [M, H] fp32."""
        return run_expert(self, x)

    @property
    def nbytes(self) -> int:
        """Bytes held by the prepared tensors (what the cache pays for this view)."""
        total = 0
        for d in self.data.values():
            for t in _tensors(d):
                total += t.numel() * t.element_size()
        return total


def _tensors(obj: Any):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, np.ndarray):
        yield torch.from_numpy(np.ascontiguousarray(obj))
    elif isinstance(obj, native_kernels.Operand):
        yield from _tensors(obj.arrays)
    elif isinstance(obj, EncodedTensor):
        for seg in obj.segments:
            for a in seg.values():
                yield torch.from_numpy(np.ascontiguousarray(a))
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A registered kernel: ``supports`` says why not (None = yes), ``prepare`` one projection, ``linear`` runs it."""

    name: str
    supports: Callable[[EncodedTensor, int], str | None]
    prepare: Callable[[EncodedTensor, int], Any]
    linear: Callable[[Any, torch.Tensor], torch.Tensor]


KERNELS: dict[str, Kernel] = {}


def register_kernel(kernel: Kernel) -> None:
    """Add a kernel to the table (names are unique)."""
    if kernel.name in KERNELS:
        raise ValueError(f"kernel {kernel.name!r} already registered")
    KERNELS[kernel.name] = kernel


# --------------------------------------------------------------------------- scratch
_scratch = threading.local()


def scratch(numel: int) -> torch.Tensor:
    """A per-thread fp32 buffer of at least ``numel`` elements, reused across calls."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=torch.float32)
        _scratch.buf = buf
    return buf[:numel]


def _owned(enc: EncodedTensor, level: int) -> EncodedTensor:
    """The record truncated to ``level`` with writable contiguous arrays (zero-copy torch views later)."""
    t = enc.truncate(level)
    t.segments = [{k: np.array(v, copy=True, order="C") for k, v in seg.items()} for seg in t.segments]
    return t


def _codec(enc: EncodedTensor):
    return enc.codec_obj()


# --------------------------------------------------------------------------- fp32 / dequant
def _any_level(enc: EncodedTensor, level: int) -> str | None:
    return None if 1 <= level <= enc.n_levels else f"level {level} not stored (1..{enc.n_levels})"


def _prep_fp32(enc: EncodedTensor, level: int) -> torch.Tensor:
    return enc.torch_decode(level)  # [N, K]


def _lin_fp32(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w)


def _prep_dequant(enc: EncodedTensor, level: int) -> dict[str, Any]:
    """Hold 1 byte per weight per term (unpacked once) so each call is a few vectorised passes."""
    N, K = enc.shape
    G = K // enc.group_size
    codec = _codec(enc)
    if isinstance(codec, MatryoshkaCodec):
        codes, alpha, shift, offset = codec.level_codes(enc, level)
        m8 = (codes.astype(np.int32) << shift).astype(np.uint8)  # 0..255
        return {"kind": "uniform", "m8": torch.from_numpy(m8.reshape(N, G, -1)),
                "offset": torch.from_numpy(offset.astype(np.float32))[:, :, None],  # exact integers
                "alpha": torch.from_numpy(alpha)[:, :, None], "shape": (N, K)}
    if isinstance(codec, ResidualCodec):
        terms = codec.plane_terms(enc, level)
        q1, s1, z1 = terms[0]
        planes = [(torch.from_numpy(bits.astype(bool).reshape(N, G, -1)),
                   torch.from_numpy(s2 / 2)[:, :, None]) for bits, s2, _ in terms[1:]]
        return {"kind": "residual", "q1": torch.from_numpy(q1.reshape(N, G, -1)),
                "z1": torch.from_numpy(z1)[:, :, None], "s1": torch.from_numpy(s1)[:, :, None],
                "planes": planes, "shape": (N, K)}
    return {"kind": "generic", "enc": _owned(enc, level), "level": level, "shape": enc.shape}


def _lin_dequant(d: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
    N, K = d["shape"]
    w = scratch(N * K).view(N, K)
    wg = w.view(d["m8"].shape if d["kind"] == "uniform" else (N, -1, K) if d["kind"] == "generic"
                else d["q1"].shape)
    if d["kind"] == "uniform":  # ŵ = α·((q << shift) + offset), same single rounding as the reference
        wg.copy_(d["m8"]).add_(d["offset"]).mul_(d["alpha"])
    elif d["kind"] == "residual":  # Ŵ1 = s1·(Q1 − z1); Ŵ += ±s_k — the reference's order
        wg.copy_(d["q1"]).sub_(d["z1"]).mul_(d["s1"])
        for bits, sk in d["planes"]:
            wg.add_(torch.where(bits, sk, -sk))
    else:
        d["enc"].torch_decode(d["level"], out=w)
    return F.linear(x, w)


# --------------------------------------------------------------------------- int4 (matryoshka)
def _int4_shape_reason(enc: EncodedTensor) -> str | None:
    if not HAS_INT4:
        return "torch lacks aten._weight_int4pack_mm_for_cpu"
    N, K = enc.shape
    if N % 16:
        return f"int4 pack needs N % 16 == 0, got N={N}"
    if enc.group_size not in INT4_GROUP_SIZES:
        return f"int4 mm needs group size in {INT4_GROUP_SIZES}, got {enc.group_size}"
    return None


def _sup_int4(enc: EncodedTensor, level: int) -> str | None:
    if (why := _any_level(enc, level)) is not None:
        return why
    codec = _codec(enc)
    if not isinstance(codec, MatryoshkaCodec):
        return "int4 runs matryoshka levels (residual uses int4_planes)"
    if codec.level_bits[level - 1] > 4:
        return f"level {level} has {codec.level_bits[level - 1]} bits > 4"
    return _int4_shape_reason(enc)


def _int4_pack(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """codes uint8 [N, K] (0..15), scale/zero fp32 [N, G] -> (packed, qScaleAndZeros [G, N, 2])."""
    packed = _ops._convert_weight_to_int4pack_for_cpu(torch.from_numpy(codes.astype(np.int32)), 1)
    sz = torch.stack([torch.from_numpy(scale.T.copy()), torch.from_numpy(zero.T.copy())], dim=-1)
    return packed, sz.contiguous()


def _prep_int4(enc: EncodedTensor, level: int) -> dict[str, Any]:
    codes, alpha, shift, offset = _codec(enc).level_codes(enc, level)
    scale = alpha * np.float32(1 << shift)  # exact (power of two)
    zero = alpha * ((8 << shift) + offset).astype(np.float32)  # ŵ = (q − 8)·scale + zero
    packed, sz = _int4_pack(codes, scale, zero)
    return {"packed": packed, "sz": sz, "gs": enc.group_size}


def _lin_int4(d: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
    return _ops._weight_int4pack_mm_for_cpu(x.contiguous(), d["packed"], d["gs"], d["sz"])


# --------------------------------------------------------------------------- int8 (matryoshka)
def _sup_int8(enc: EncodedTensor, level: int) -> str | None:
    if (why := _any_level(enc, level)) is not None:
        return why
    if not HAS_INT8:
        return "torch lacks aten._weight_int8pack_mm"
    if not isinstance(_codec(enc), MatryoshkaCodec):
        return "int8 runs matryoshka levels"
    return None


def _prep_int8(enc: EncodedTensor, level: int) -> dict[str, Any]:
    codes, alpha, shift, offset = _codec(enc).level_codes(enc, level)
    N, K = enc.shape
    G = K // enc.group_size
    # ŵ = α·((q << shift) − 128) + α·(128 + offset): int8 part per group + a zero-point correction
    w8 = ((codes.astype(np.int32) << shift) - 128).astype(np.int8).reshape(N, G, -1)
    return {
        "w8": [torch.from_numpy(np.ascontiguousarray(w8[:, g])) for g in range(G)],
        "alpha": [torch.from_numpy(np.ascontiguousarray(alpha[:, g])) for g in range(G)],
        "corr": torch.from_numpy(alpha * (128 + offset).astype(np.float32)),  # [N, G]
        "G": G,
    }


def _lin_int8(d: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
    M, K = x.shape
    G = d["G"]
    xg = x.view(M, G, K // G)
    xt = xg.transpose(0, 1).contiguous()  # [G, M, gs]
    y = F.linear(xg.sum(dim=2), d["corr"])  # [M, N] zero-point term
    for g in range(G):
        y += _ops._weight_int8pack_mm(xt[g], d["w8"][g], d["alpha"][g])
    return y


# --------------------------------------------------------------------------- int4 planes (residual)
def _sup_int4_planes(enc: EncodedTensor, level: int) -> str | None:
    if (why := _any_level(enc, level)) is not None:
        return why
    codec = _codec(enc)
    if not isinstance(codec, ResidualCodec):
        return "int4_planes runs residual levels"
    if codec.base_bits > 4:
        return f"residual base has {codec.base_bits} bits > 4"
    return _int4_shape_reason(enc)


def _prep_int4_planes(enc: EncodedTensor, level: int) -> dict[str, Any]:
    terms = []
    for codes, scale, zero in _codec(enc).plane_terms(enc, level):
        # scale·(q − zero) = (q − 8)·scale + scale·(8 − zero)
        terms.append(_int4_pack(codes, scale, scale * (np.float32(8.0) - zero)))
    return {"terms": terms, "gs": enc.group_size}


def _lin_int4_planes(d: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    y = None
    for packed, sz in d["terms"]:
        t = _ops._weight_int4pack_mm_for_cpu(x, packed, d["gs"], sz)
        y = t if y is None else y.add_(t)
    return y


# --------------------------------------------------------------------------- native (C, from the stored planes)
def _sup_native(enc: EncodedTensor, level: int) -> str | None:
    if (why := _any_level(enc, level)) is not None:
        return why
    if enc.codec not in native_kernels.NESTED_CODECS:
        return f"native runs {', '.join(native_kernels.NESTED_CODECS)}, not {enc.codec}"
    if not native_kernels.available():
        return f"native kernels not built (no C compiler, or {native_kernels.ENV_SWITCH}=0)"
    return None


def _prep_native(enc: EncodedTensor, level: int) -> native_kernels.Operand:
    return native_kernels.encoded_operand(enc, level)


def _lin_native(op: native_kernels.Operand, x: torch.Tensor) -> torch.Tensor:
    return native_kernels.linear(op, x)


register_kernel(Kernel("fp32", _any_level, _prep_fp32, _lin_fp32))
register_kernel(Kernel("dequant", _any_level, _prep_dequant, _lin_dequant))
register_kernel(Kernel("int4", _sup_int4, _prep_int4, _lin_int4))
register_kernel(Kernel("int8", _sup_int8, _prep_int8, _lin_int8))
register_kernel(Kernel("int4_planes", _sup_int4_planes, _prep_int4_planes, _lin_int4_planes))
register_kernel(Kernel("native", _sup_native, _prep_native, _lin_native))

#: Measured preference per codec family for decode (batch < PREFILL_BATCH) and prefill;
#: the first supported entry wins. From bench/results/kernels_microbench.md (AMD EPYC, AVX2,
#: torch 2.13, 2 threads, shared CPU): at batch 1 the int4 op is the fastest compact kernel
#: (median 26-50 ms vs dequant 40-140 ms per expert), at batch 32 it is 5-10x slower than
#: dequantize + fp32 matmul. int8 (one call per K-group) never wins; kept for 8-bit parity tests.
#: NOTE: an fp32-inflated expert ("fp32") is faster still (median 5.7 ms) but holds 4 B/weight.
#: "native" (bench/results/native_gemv.md, same CPU, 1 thread, weights from memory): per projection
#: at M=1 0.14-0.45 ms for 2/4/8 bits, 1.1-2.5x faster than fp32 F.linear and 2-4x faster than
#: dequant, holding only the stored bytes; at M=16 MKL's fp32 GEMM on a dequantized copy still wins
#: (native 0.45-0.66x fp32, dequant 0.6-0.86x), so prefill keeps dequant.
PREFERENCE: dict[tuple[str, str], tuple[str, ...]] = {
    ("matryoshka", "decode"): ("native", "int4", "dequant"),
    ("matryoshka", "prefill"): ("dequant",),
    ("residual", "decode"): ("native", "int4_planes", "dequant"),
    ("residual", "prefill"): ("dequant",),
}
#: Token count from which the prefill preference applies.
PREFILL_BATCH = 8


def kernel_reason(kernel: str, encoded: Mapping[str, EncodedTensor], level: int) -> str | None:
    """Why ``kernel`` cannot run this expert at ``level`` (None when it can).

    Raises:
        NotImplementedError: unknown kernel name (lists the registered ones).
    """
    if kernel not in KERNELS:
        raise NotImplementedError(f"unknown kernel {kernel!r}; registered: {', '.join(sorted(KERNELS))}")
    for p, enc in encoded.items():
        why = KERNELS[kernel].supports(enc, level)
        if why is not None:
            return f"{p}: {why}"
    return None


def default_kernel(encoded: Mapping[str, EncodedTensor], level: int, batch: int = 1) -> str:
    """The preferred supported kernel for this expert, level and typical token count.

    Args:
        encoded: the expert's projections.
        level: stored level to run.
        batch: tokens per call the view will mostly see (decode 1; prefill many).
    """
    codec = next(iter(encoded.values())).codec
    family = "residual" if codec == "residual" else "matryoshka"
    phase = "prefill" if batch >= PREFILL_BATCH else "decode"
    for k in PREFERENCE.get((family, phase), ()) + ("dequant",):
        if kernel_reason(k, encoded, level) is None:
            return k
    return "dequant"


def prepare(encoded: Mapping[str, EncodedTensor], level: int, kernel: str = "auto",
            batch: int = 1) -> KernelView:
    """Convert an expert's encoded projections into ``kernel``'s layout (once, at cache entry).

    Args:
        encoded: {"gate_proj": [I, H], "up_proj": [I, H], "down_proj": [H, I]} EncodedTensors.
        level: stored level 1..L to run.
        kernel: registry name or "auto" (:func:`default_kernel`).
        batch: typical tokens per call, for "auto".

    Returns:
        KernelView whose ``prepare_s`` records the conversion time.

    Raises:
        NotImplementedError: unknown kernel, or the kernel cannot run this expert (says why).
        ValueError: missing projections.
    """
    missing = [p for p in EXPERT_PROJS if p not in encoded]
    if missing:
        raise ValueError(f"expert lacks projections {missing}; expected {list(EXPERT_PROJS)}")
    name = default_kernel(encoded, level, batch) if kernel == "auto" else kernel
    why = kernel_reason(name, encoded, level)
    if why is not None:
        raise NotImplementedError(f"kernel {name!r} cannot run this expert at level {level}: {why}")
    t0 = time.perf_counter()
    k = KERNELS[name]
    data = {p: k.prepare(encoded[p], level) for p in EXPERT_PROJS}
    bits = encoded["gate_proj"].codec_obj().level_bits[level - 1]
    return KernelView(kernel=name, level=level, bits=bits,
                      shapes={p: tuple(encoded[p].shape) for p in EXPERT_PROJS}, data=data,
                      prepare_s=time.perf_counter() - t0)


def linear(view: KernelView, proj: str, x: torch.Tensor) -> torch.Tensor:
    """One projection of a prepared expert: x [M, K] -> [M, N] (≈ x @ Ŵᵀ)."""
    return KERNELS[view.kernel].linear(view.data[proj], x)


def run_expert(view: KernelView, x: torch.Tensor) -> torch.Tensor:
    """SwiGLU expert ``down(silu(gate x) * up x)``.

    Args:
        view: from :func:`prepare`.
        x: [M, H] fp32 activations.

    Returns:
        [M, H] fp32 expert output (before gate weighting).
    """
    k = KERNELS[view.kernel]
    h = F.silu(k.linear(view.data["gate_proj"], x)) * k.linear(view.data["up_proj"], x)  # [M, I]
    return k.linear(view.data["down_proj"], h)  # [M, H]
