"""Integer-dot kernels for dense matrices stored as GGML Q8_0 / Q4_0 blocks (attention, LM head, shared experts).

Owns :class:`PackedDense` (a matrix kept in its quantized form: int8 or int4 codes plus one fp32
scale per 32 weights, repacked once from the GGUF blocks), the activation quantization that pairs
with it (blocks of 32 along K, scale max|x|/127, round to nearest: llama.cpp's Q8_0 activations),
the reference computation (dequantize both, fp64 matmul) and :func:`linear`, which runs the native
AVX2 kernel (``dense_kernels_src.py``, built once per machine like ``engine/native_kernels.py``)
and falls back to the reference when no C compiler works or ``MOESTREAM_NATIVE_KERNELS=0``.

Numerics: y[m, n] = Σ_b dw[n, b]·dx[m, b]·Σ_{k∈b} qw[n, k]·qx[m, k]; the inner sums are exact
integers, so the kernel equals :func:`reference_linear` within fp32 rounding of the Σ_b. Against
unquantized activations the error is the int8 rounding of x (relative ≈ 0.4 % per block), the
same trade llama.cpp makes.

Layouts (row-major, N output rows, K inputs, K % 32 == 0):
- ``q8_0``: ``qs`` int8 [N, K], value k of row n = qs[n, k];
- ``q4_0``: ``qs`` uint8 [N, K/2], 16 bytes per block of 32 in GGML order (byte i: low nibble =
  value i, high nibble = value i + 16), value = nibble − 8;
- ``d`` fp32 [N, K/32] for both.

Knows nothing about models or files: callers hand it GGUF block bytes or fp32 weights.
"""
from __future__ import annotations

import ctypes
import logging
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from moestream.convert.native_build import build_or_warn
from moestream.engine.native_kernels import enabled

log = logging.getLogger("moestream")

BLOCK = 32
#: Dense storage kinds these kernels compute.
DENSE_KINDS = ("q8_0", "q4_0")
#: Bytes of one GGML block: fp16 scale + codes.
GGML_BLOCK_BYTES = {"q8_0": 2 + 32, "q4_0": 2 + 16}


@dataclass
class PackedDense:
    """One dense matrix in kernel layout (module docstring); ``shape`` is (N, K) in elements."""

    kind: str
    qs: torch.Tensor
    d: torch.Tensor
    shape: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return int(self.qs.numel() * self.qs.element_size() + self.d.numel() * 4)


def _check_shape(kind: str, shape: tuple[int, int]) -> None:
    if kind not in DENSE_KINDS:
        raise ValueError(f"unknown dense kind {kind!r}; the kernels take {', '.join(DENSE_KINDS)}")
    if len(shape) != 2 or shape[1] % BLOCK or shape[0] <= 0:
        raise ValueError(f"{kind} matrices need shape (N, K) with K a multiple of {BLOCK}, got {shape}")


def pack_ggml(raw: np.ndarray | bytes | bytearray | memoryview, kind: str, shape: tuple[int, int]) -> PackedDense:
    """Repack GGUF Q8_0 / Q4_0 block bytes of an (N, K) matrix into kernel layout (one copy).

    Raises:
        ValueError: unknown kind, K not a multiple of 32, or a byte count that does not match.
    """
    _check_shape(kind, shape)
    n, k = shape
    blocks = np.frombuffer(raw, dtype=np.uint8) if not isinstance(raw, np.ndarray) else raw.reshape(-1).view(np.uint8)
    per = GGML_BLOCK_BYTES[kind]
    if blocks.size != n * (k // BLOCK) * per:
        raise ValueError(f"{kind} {shape}: expected {n * (k // BLOCK) * per} block bytes, got {blocks.size}")
    b = blocks.reshape(n, k // BLOCK, per)
    d = torch.from_numpy(np.ascontiguousarray(b[:, :, :2]).view(np.float16).reshape(n, k // BLOCK).astype(np.float32))
    codes = np.ascontiguousarray(b[:, :, 2:]).reshape(n, -1)
    qs = torch.from_numpy(codes.view(np.int8) if kind == "q8_0" else codes)
    return PackedDense(kind, qs, d, (n, k))


def quantize(w: torch.Tensor, kind: str) -> PackedDense:
    """Quantize an fp32 (N, K) matrix the way gguf-py / llama.cpp do, into kernel layout."""
    from gguf import GGMLQuantizationType, quants

    shape = (int(w.shape[0]), int(w.shape[1]))
    _check_shape(kind, shape)
    qtype = GGMLQuantizationType.Q8_0 if kind == "q8_0" else GGMLQuantizationType.Q4_0
    raw = quants.quantize(w.detach().float().cpu().numpy(), qtype)
    return pack_ggml(raw, kind, shape)


def codes(p: PackedDense) -> torch.Tensor:
    """Signed integer codes [N, K] (int16) of a packed matrix."""
    if p.kind == "q8_0":
        return p.qs.to(torch.int16)
    n, k = p.shape
    b = p.qs.view(n, k // BLOCK, 16).to(torch.int16)
    return (torch.cat([b & 15, b >> 4], dim=2) - 8).view(n, k)


def dequantize(p: PackedDense) -> torch.Tensor:
    """fp32 [N, K] weights (equals gguf-py's dequantize of the source blocks)."""
    n, k = p.shape
    return (codes(p).view(n, k // BLOCK, BLOCK).float() * p.d.unsqueeze(-1)).view(n, k)


def dequantize_rows(p: PackedDense, rows: torch.Tensor) -> torch.Tensor:
    """fp32 rows ``rows`` (any shape of indices) of the matrix: an embedding lookup without widening it all."""
    n, k = p.shape
    flat = rows.reshape(-1).long()
    if p.kind == "q8_0":
        c = p.qs[flat].to(torch.float32).view(-1, k // BLOCK, BLOCK)
    else:
        b = p.qs[flat].view(-1, k // BLOCK, 16).to(torch.int16)
        c = (torch.cat([b & 15, b >> 4], dim=2) - 8).to(torch.float32)
    return (c * p.d[flat].unsqueeze(-1)).view(*rows.shape, k)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 activations of x [M, K]: int8 codes [M, K] and fp32 scales [M, K/32] (what the kernel forms).

    d = max|x|/127 per block of 32, q = round-half-even(x / d) (0 where d == 0).
    """
    m, k = x.shape
    xb = x.float().reshape(m, k // BLOCK, BLOCK)
    d = xb.abs().amax(dim=-1) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(xb * inv.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q.view(m, k), d


def reference_linear(x: torch.Tensor, p: PackedDense) -> torch.Tensor:
    """``x [M, K] -> [M, N]`` as dequantize(W) @ dequantize(quantize_activations(x))ᵀ in fp64 (returns fp32)."""
    m, k = x.shape
    xq, dx = quantize_activations(x)
    xd = (xq.view(m, k // BLOCK, BLOCK).double() * dx.double().unsqueeze(-1)).view(m, k)
    return (xd @ dequantize(p).double().T).float()


# ------------------------------------------------------------------------------------ native kernel
_build_lock = threading.Lock()
_VARIANTS = (["-march=native", "-fopenmp"], ["-march=native"])
_CFLAGS = ["-O3", "-std=c11", "-fno-math-errno", "-fPIC", "-shared"]


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    P, I64, I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.dq_abi.argtypes, lib.dq_abi.restype = [], I32
    lib.dq_linear.argtypes, lib.dq_linear.restype = [I32, P, P, I64, I64, P, I64, P, I32], I32
    return lib


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled dense kernels, or None (one warning) when no AVX2 build works here."""
    from moestream.engine.dense_kernels_src import C_SOURCE

    def accept(lib: ctypes.CDLL) -> str | None:
        if lib.dq_abi() != 1:  # built without AVX2: the reference is as fast and simpler
            return "no AVX2 on this build"
        return None if _self_check(lib) else "self-check against the reference failed"

    with _build_lock:
        return build_or_warn("dense_kernel", C_SOURCE, _CFLAGS, _VARIANTS, _load, accept,
                             what="quantized dense kernels", fallback="using the torch reference (slower)")


def available() -> bool:
    """True when the native dense kernels are enabled and built."""
    return enabled() and library() is not None


def _native(lib: ctypes.CDLL, x: torch.Tensor, p: PackedDense, nthreads: int) -> torch.Tensor:
    m, k = x.shape
    y = torch.empty((m, p.shape[0]), dtype=torch.float32)
    if m == 0:
        return y
    rc = lib.dq_linear(DENSE_KINDS.index(p.kind), p.qs.data_ptr(), p.d.data_ptr(), p.shape[0], k,
                       x.data_ptr(), m, y.data_ptr(), nthreads)
    if rc:
        raise ValueError(f"dense kernel rejected a {p.kind} {p.shape} matrix (code {rc})")
    return y


def _self_check(lib: ctypes.CDLL) -> bool:
    g = torch.Generator().manual_seed(0)
    for kind in DENSE_KINDS:
        p = quantize(torch.randn(40, 96, generator=g), kind)
        for m in (1, 3, 9):
            x = torch.randn(m, 96, generator=g)
            ref = reference_linear(x, p).double()
            got = _native(lib, x, p, 1).double()
            bound = 1e-5 * (x.abs().double() @ dequantize(p).abs().double().T) + 1e-6
            if not bool(((got - ref).abs() <= bound).all()):
                return False
    return True


def linear(x: torch.Tensor, p: PackedDense) -> torch.Tensor:
    """``x [M, K] fp32 -> [M, N] fp32`` with int8 activations (native kernel, else the reference).

    Raises:
        ValueError: x does not have K features.
    """
    if x.shape[-1] != p.shape[1]:
        raise ValueError(f"activations have {x.shape[-1]} features, the {p.kind} matrix takes {p.shape[1]}")
    if x.dtype != torch.float32 or not x.is_contiguous():
        x = x.float().contiguous()
    lib = library() if enabled() else None
    if lib is None:
        return reference_linear(x, p)
    return _native(lib, x, p, torch.get_num_threads())
