"""Dense-tensor quantization (attention, embeddings, shared experts, routers) via gguf-py.

Owns the mapping from the project's dense precision names (``f32``, ``f16``,
``bf16``, ``q8_0``, ``q4_0``) to gguf-py's quantizers, so dense tensors are
stored as standard GGML types (bit-exact with ggml for Q8_0) that stock
llama.cpp also reads. Not nested: a dense tensor has one precision.

Knows nothing about files or the engine.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

#: Project precision name -> GGML type.
DENSE_TYPES: dict[str, GGMLQuantizationType] = {
    "f32": GGMLQuantizationType.F32,
    "f16": GGMLQuantizationType.F16,
    "bf16": GGMLQuantizationType.BF16,
    "q8_0": GGMLQuantizationType.Q8_0,
    "q4_0": GGMLQuantizationType.Q4_0,
}


def dense_type(name: str) -> GGMLQuantizationType:
    """The GGML type of a dense precision name.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    try:
        return DENSE_TYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dense precision {name!r}; choose one of {sorted(DENSE_TYPES)}") from None


def quantize_dense(weight: np.ndarray, precision: str) -> np.ndarray:
    """Quantize a dense tensor; returns gguf-py's raw array (uint8 rows for block types).

    Args:
        weight: float array, last dimension a multiple of the type's block size (32 for q8_0/q4_0).
        precision: one of :data:`DENSE_TYPES`.

    Raises:
        ValueError: unknown precision, or a row length that is not a multiple of the block size.
    """
    qt = dense_type(precision)
    w = np.ascontiguousarray(weight, dtype=np.float32)
    block, _ = GGML_QUANT_SIZES[qt]
    if w.shape[-1] % block:
        raise ValueError(f"{precision} needs rows that are a multiple of {block} values; "
                         f"this tensor's rows have {w.shape[-1]} — keep it in f16")
    if qt == GGMLQuantizationType.F32:
        return w.copy()
    return gguf_quants.quantize(w, qt)


def dequantize_dense(raw: np.ndarray, precision: str) -> np.ndarray:
    """Inverse of :func:`quantize_dense`; returns fp32 with the original shape."""
    qt = dense_type(precision)
    if qt == GGMLQuantizationType.F32:
        return np.asarray(raw, dtype=np.float32)
    return np.asarray(gguf_quants.dequantize(raw, qt), dtype=np.float32)


def dense_bits_per_weight(precision: str) -> float:
    """Stored bits per weight of a dense precision (block scales included): q8_0 8.5, q4_0 4.5."""
    block, nbytes = GGML_QUANT_SIZES[dense_type(precision)]
    return 8.0 * nbytes / block
