"""Native helpers for the single-token decode step: fp32 RMSNorm rows and the attention prologue.

Owns :func:`rms_norm` and :func:`prep_one` (one ctypes call each instead of ~8 and ~25 torch ops,
whose dispatch dominates a decode step's glue on one CPU thread), built once per machine from
``decode_kernels_src.py`` like ``engine/dense_kernels.py``. Both return None when they cannot run
(no compiler, ``MOESTREAM_NATIVE_KERNELS=0``, a non-CPU / non-fp32 / non-contiguous operand, autograd
recording), and the caller keeps its torch path. Results equal the torch path within fp32 rounding (sums in another
order; the RoPE products and the cache writes are bit-identical): ``tests/test_decode_fast_path.py``.

Knows nothing about models: tensors and sizes in, tensors out.

Legend: B sequences, h query heads, g kv heads, D head dim, L cache positions, R rotary dims.
"""
from __future__ import annotations

import ctypes
import logging
import threading
from functools import lru_cache
from pathlib import Path

import torch

from moestream.convert.native_build import build_or_warn
from moestream.engine.native_kernels import enabled

log = logging.getLogger("moestream")

_build_lock = threading.Lock()
_VARIANTS = (["-march=native"], [])
_CFLAGS = ["-O3", "-std=c11", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared"]
_F32 = torch.float32


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    P, I64, F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    lib.dk_abi.argtypes, lib.dk_abi.restype = [], ctypes.c_int
    lib.dk_rms_norm.argtypes, lib.dk_rms_norm.restype = [P, P, P, I64, I64, F], None
    lib.dk_prep_one.argtypes = [P, I64, P, I64, P, I64, P, P, F, P, P, I64, P, P, I64, I64, I64,
                                I64, I64, I64, I64, P]
    lib.dk_prep_one.restype = ctypes.c_int
    return lib


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled helpers, or None (one warning) when no build works here."""
    from moestream.engine.decode_kernels_src import C_SOURCE

    with _build_lock:
        return build_or_warn("decode_kernels", C_SOURCE, _CFLAGS, _VARIANTS, _load,
                             lambda lib: None if lib.dk_abi() == 1 else "ABI mismatch",
                             what="native decode helpers", fallback="using torch ops")


def available() -> bool:
    """True when the helpers are enabled and built."""
    return enabled() and library() is not None


def _lib() -> ctypes.CDLL | None:
    return library() if enabled() else None


def _needs_grad(*ts: torch.Tensor | None) -> bool:
    """True when autograd would record these operands (the native calls are invisible to it)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def _dense(t: torch.Tensor) -> bool:
    """fp32, on the CPU, contiguous (the cheap attribute reads: this runs several times per layer and token)."""
    return t.dtype is _F32 and t.is_cpu and t.is_contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """``weight * x / sqrt(mean(x^2, -1) + eps)`` for contiguous fp32 CPU ``x [..., n]``, else None.

    Args:
        x: activations; weight: ``[n]`` fp32; eps: added to the mean square.

    Returns:
        A new tensor shaped like ``x``, or None when the native helper does not apply.
    """
    if not (_dense(x) and _dense(weight)) or _needs_grad(x, weight):
        return None
    n = x.shape[-1]
    lib = _lib()
    if lib is None or n == 0 or weight.numel() != n:
        return None
    y = torch.empty_like(x)
    lib.dk_rms_norm(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.numel() // n, n, eps)
    return y


def _row_stride(t: torch.Tensor, rows: int, d: int) -> int | None:
    """Batch stride of ``t [B, 1, rows*d]`` activations whose row of one sequence is contiguous, else None."""
    if t.dtype is not _F32 or not t.is_cpu or t.dim() != 3 or t.shape[1] != 1:
        return None
    stride = t.stride()
    return stride[0] if stride[2] == 1 and t.shape[2] == rows * d else None


def prep_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_w: torch.Tensor | None,
             k_w: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor,
             k_cache: torch.Tensor, v_cache: torch.Tensor, pos: int, num_heads: int) -> torch.Tensor | None:
    """Per-head q/k RMSNorm, RoPE and the cache write of one new token per sequence, or None when not native.

    Args:
        q: ``[B, 1, h*D]`` projected queries; k, v: ``[B, 1, g*D]`` (each sequence's row contiguous).
        q_w, k_w: per-head RMSNorm weights ``[D]`` (``qk_norm="head"``) or None.
        eps: their epsilon.
        cos, sin: ``[1, R]`` rotate-half RoPE rows for position ``pos`` (R <= D, even).
        k_cache, v_cache: contiguous ``[B, g, L, D]`` buffers; the roped k and the v are written at ``pos``.
        pos: the new token's position (``< L``).
        num_heads: h (a multiple of g).

    Returns:
        ``[B, h, D]`` normed and roped queries, or None (nothing written).
    """
    if not (_dense(k_cache) and _dense(v_cache)) or k_cache.dim() != 4 or _needs_grad(q, k, v, q_w, k_w):
        return None
    lib = _lib()
    if lib is None:
        return None
    shape = k_cache.shape
    b, g, L, d = shape
    h = num_heads
    qb, kb, vb = _row_stride(q, h, d), _row_stride(k, g, d), _row_stride(v, g, d)
    r = cos.shape[-1]
    if (qb is None or kb is None or vb is None or v_cache.shape != shape or q.shape[0] != b
            or k.shape[0] != b or v.shape[0] != b or d > 1024 or r > d or r % 2 or h % g or not 0 <= pos < L
            or not (_dense(cos) and _dense(sin)) or cos.numel() != r or sin.numel() != r):
        return None
    for w in (q_w, k_w):
        if w is not None and not (_dense(w) and w.numel() == d):
            return None
    qo = torch.empty((b, h, d), dtype=_F32)
    rc = lib.dk_prep_one(q.data_ptr(), qb, k.data_ptr(), kb, v.data_ptr(), vb,
                         None if q_w is None else q_w.data_ptr(), None if k_w is None else k_w.data_ptr(), eps,
                         cos.data_ptr(), sin.data_ptr(), r, k_cache.data_ptr(), v_cache.data_ptr(), g * L * d, L,
                         pos, b, h, g, d, qo.data_ptr())
    return None if rc else qo
