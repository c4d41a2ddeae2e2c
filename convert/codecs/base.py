"""The nested-codec interface, the encoded-tensor record and bit packing.

Owns: :class:`EncodedTensor` (one weight matrix encoded as per-level segments
of named arrays), :class:`Codec` (the interface every nested codec
implements), the k-bit plane packing used by all codecs, and the per-expert
serialisation (:func:`serialize_expert` / :func:`deserialize_expert`) whose
defining property is that level j's bytes are a prefix of level j+1's bytes.

Knows nothing about shards, GGUF files, the scheduler or the engine: it turns
arrays into bytes plus a JSON-able layout dict and back.

Levels are numbered 1..L. Segment j (0-based j-1) holds the arrays that level
j adds (its bit plane and any scales first needed at that level); level j is
decoded from segments 1..j only.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from moestream.convert.errors import ModelFormatError

#: Serialisation layout version written into every layout dict.
LAYOUT_VERSION = 1
#: Canonical projection order inside one expert's bytes.
EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")


# --------------------------------------------------------------------------- packing
def pack_bits(values: np.ndarray, k: int) -> np.ndarray:
    """Pack unsigned k-bit values (1 <= k <= 8) into bytes.

    Layout: consecutive runs of 8 values become k bytes; inside a run, value i
    occupies bits [k*i, k*i+k) of the little-endian k-byte word. For k that
    divides 8 this is the familiar "value i of a byte at bit k*(i % (8/k))".

    Args:
        values: integer array, any shape, size a multiple of 8, values < 2**k.
        k: bits per value.

    Returns:
        uint8 array of size ``values.size * k // 8``.

    Raises:
        ValueError: k out of range, size not a multiple of 8, value too large.
    """
    if not 1 <= k <= 8:
        raise ValueError(f"pack_bits: k must be in 1..8, got {k}")
    flat = np.ascontiguousarray(values, dtype=np.uint8).reshape(-1)
    if flat.size % 8:
        raise ValueError(f"pack_bits: value count {flat.size} is not a multiple of 8")
    if flat.size and int(flat.max()) >= (1 << k):
        raise ValueError(f"pack_bits: value {int(flat.max())} does not fit in {k} bits")
    if k == 8:
        return flat.copy()
    if 8 % k == 0:  # same layout, byte-wise: value i at bit k*(i % (8/k)) of byte i // (8/k)
        per = 8 // k
        vals = flat.reshape(-1, per)
        out = vals[:, 0].copy()
        for i in range(1, per):
            out |= vals[:, i] << np.uint8(k * i)
        return out
    runs = flat.reshape(-1, 8).astype(np.uint64)
    shifts = (np.arange(8, dtype=np.uint64) * np.uint64(k))
    word = np.bitwise_or.reduce(runs << shifts, axis=1)  # [n/8] uint64, low 8k bits used
    as_bytes = word.astype("<u8").view(np.uint8).reshape(-1, 8)[:, :k]
    return np.ascontiguousarray(as_bytes).reshape(-1)


def unpack_bits(packed: np.ndarray, k: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits` (numpy reference). Returns uint8 [count]."""
    if not 1 <= k <= 8:
        raise ValueError(f"unpack_bits: k must be in 1..8, got {k}")
    raw = np.ascontiguousarray(packed, dtype=np.uint8).reshape(-1)
    if raw.size * 8 != count * k:
        raise ModelFormatError(
            f"bit plane holds {raw.size} bytes but {count} values of {k} bits need {count * k // 8}; "
            "the expert bytes are truncated or the layout does not match them")
    if k == 8:
        return raw.copy()
    rows = raw.reshape(-1, k).astype(np.uint64)
    word = np.zeros(rows.shape[0], dtype=np.uint64)
    for j in range(k):
        word |= rows[:, j] << np.uint64(8 * j)
    shifts = np.arange(8, dtype=np.uint64) * np.uint64(k)
    vals = (word[:, None] >> shifts[None, :]) & np.uint64((1 << k) - 1)
    return vals.astype(np.uint8).reshape(-1)


def unpack_bits_torch(packed: torch.Tensor, k: int, count: int) -> torch.Tensor:
    """Torch twin of :func:`unpack_bits`; returns uint8 [count] (fast per-byte path when k | 8)."""
    if packed.numel() * 8 != count * k:
        raise ModelFormatError(
            f"bit plane holds {packed.numel()} bytes but {count} values of {k} bits need "
            f"{count * k // 8}; the expert bytes are truncated or the layout does not match them")
    raw = packed.reshape(-1)
    if k == 8:
        return raw.clone()
    if 8 % k == 0:
        shifts = torch.arange(0, 8, k, dtype=torch.uint8, device=raw.device)  # [per]
        vals = (raw[:, None] >> shifts[None, :]) & ((1 << k) - 1)  # [bytes, per]
        return vals.reshape(-1)
    rows = raw.reshape(-1, k).to(torch.int64)
    word = torch.zeros(rows.shape[0], dtype=torch.int64, device=raw.device)
    for j in range(k):
        word |= rows[:, j] << (8 * j)
    shifts64 = torch.arange(8, dtype=torch.int64, device=raw.device) * k
    vals = (word[:, None] >> shifts64[None, :]) & ((1 << k) - 1)
    return vals.to(torch.uint8).reshape(-1)


def as_torch(arr: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A torch tensor over ``arr`` (copied when the array is read-only, e.g. a file buffer); tensors pass through."""
    if isinstance(arr, torch.Tensor):
        return arr
    if not arr.flags.writeable or not arr.flags.c_contiguous:
        arr = np.array(arr, copy=True, order="C")
    return torch.from_numpy(arr)


# --------------------------------------------------------------------------- records
@dataclasses.dataclass
class EncodedTensor:
    """One weight matrix [rows, cols] encoded by a nested codec.

    Attributes:
        codec: registry name of the codec that wrote it.
        params: the codec's constructor parameters (JSON-able).
        shape: (rows, cols) of the original fp32 matrix.
        group_size: quantization group length along ``cols``.
        segments: one dict per stored level, in level order; segment j maps
            array names to the arrays level j+1 adds (planes packed uint8,
            scales float16/float32, zero points uint8).
    """

    codec: str
    params: dict[str, Any]
    shape: tuple[int, int]
    group_size: int
    segments: list[dict[str, np.ndarray]]

    @property
    def n_levels(self) -> int:
        """Number of levels stored in this record (may be fewer than the codec has)."""
        return len(self.segments)

    def codec_obj(self) -> "Codec":
        """The codec instance that decodes this record."""
        from moestream.convert.codecs import get_codec

        return get_codec(self.codec, **self.params)

    def _check_level(self, level: int) -> None:
        if not 1 <= level <= self.n_levels:
            raise ValueError(f"level {level} not stored: this tensor holds levels 1..{self.n_levels}")

    def planes_for_level(self, level: int) -> list[np.ndarray]:
        """The packed bit-plane arrays of levels 1..level (uint8), in order."""
        self._check_level(level)
        return [seg[name] for seg in self.segments[:level] for name in seg if name.startswith("plane")]

    def truncate(self, level: int) -> "EncodedTensor":
        """This record with only levels 1..level (what reading level ``level``'s bytes gives)."""
        self._check_level(level)
        return dataclasses.replace(self, segments=[dict(s) for s in self.segments[:level]])

    def to_bytes_per_level(self, align: int = 64) -> list[bytes]:
        """Bytes each level adds; level j's bytes are the concatenation of the first j entries."""
        out = []
        for seg in self.segments:
            out.append(b"".join(_padded(arr.tobytes(), align) for arr in seg.values()))
        return out

    def nbytes(self, level: int, align: int = 1) -> int:
        """Stored bytes of levels 1..level (planes plus scales), each array padded to ``align``."""
        self._check_level(level)
        return sum(_round_up(a.nbytes, align) for seg in self.segments[:level] for a in seg.values())

    def reference_decode(self, level: int) -> np.ndarray:
        """fp32 [rows, cols] straight from the spec formulas (numpy)."""
        self._check_level(level)
        return self.codec_obj().reference_decode(self, level)

    def torch_decode(self, level: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 [rows, cols] via the fast torch path; bit-identical to :meth:`reference_decode`."""
        self._check_level(level)
        return self.codec_obj().torch_decode(self, level, out=out)


class Codec(ABC):
    """A nested codec: ``encode`` once, decode any level from a prefix of the bytes."""

    #: registry name
    name: str = ""

    @property
    @abstractmethod
    def level_bits(self) -> tuple[int, ...]:
        """Compute bits per weight of levels 1..L (e.g. (2, 4, 8))."""

    @property
    @abstractmethod
    def params(self) -> dict[str, Any]:
        """JSON-able constructor parameters (recorded in every EncodedTensor)."""

    @abstractmethod
    def encode(self, weight: np.ndarray, group_size: int,
               act_scale: np.ndarray | None = None) -> EncodedTensor:
        """Encode an fp32 [rows, cols] matrix.

        Args:
            weight: fp32 [rows, cols]; cols a multiple of ``group_size``.
            group_size: group length along cols (multiple of 8).
            act_scale: optional [cols] calibration second moments diag(XᵀX)
                weighting each input channel's squared error.

        Returns:
            EncodedTensor with all levels.

        Raises:
            ValueError: bad shapes, group size or non-finite weights.
        """

    @abstractmethod
    def reference_decode(self, enc: EncodedTensor, level: int) -> np.ndarray:
        """Plain-numpy decode of ``level`` written from the spec formulas."""

    @abstractmethod
    def torch_decode(self, enc: EncodedTensor, level: int,
                     out: torch.Tensor | None = None) -> torch.Tensor:
        """Fast torch decode of ``level``; must equal :meth:`reference_decode` bit for bit."""

    def stored_bits_per_weight(self, level: int, group_size: int, scale_bytes: int = 2) -> float:
        """Bits per weight of levels 1..level including per-group scales/zeros (no padding)."""
        raise NotImplementedError(f"{type(self).__name__} does not report its storage cost")


def check_weight(weight: np.ndarray, group_size: int, act_scale: np.ndarray | None) -> np.ndarray:
    """Validate encode() inputs; returns the weight as C-contiguous fp32."""
    w = np.ascontiguousarray(weight, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight [rows, cols], got shape {w.shape}")
    if group_size <= 0 or group_size % 8:
        raise ValueError(f"group_size must be a positive multiple of 8, got {group_size}")
    if w.shape[1] % group_size:
        raise ValueError(
            f"cols {w.shape[1]} is not a multiple of group_size {group_size}; pick a divisor of cols")
    if not np.isfinite(w).all():
        raise ValueError("weight contains NaN or Inf; the checkpoint is corrupt")
    if act_scale is not None:
        a = np.asarray(act_scale)
        if a.shape != (w.shape[1],):
            raise ValueError(f"act_scale must have shape [cols]=({w.shape[1]},), got {a.shape}")
        if not np.isfinite(a).all() or (a < 0).any():
            raise ValueError("act_scale must be finite and non-negative (diag of XᵀX)")
    return w


def group_weights(act_scale: np.ndarray | None, rows: int, cols: int, group_size: int) -> np.ndarray:
    """Per-element error weights [rows, G, gs] (ones when no activations), broadcast-ready."""
    G = cols // group_size
    if act_scale is None:
        return np.ones((1, G, group_size), dtype=np.float64)
    a = np.asarray(act_scale, dtype=np.float64).reshape(1, G, group_size)
    mean = a.mean()
    return a / mean if mean > 0 else np.ones_like(a)


def store_scale(x: np.ndarray, scale_dtype: str) -> np.ndarray:
    """Round scales to their storage dtype (f16 or f32); zero scales become the smallest positive."""
    dt = {"f16": np.float16, "f32": np.float32}.get(scale_dtype)
    if dt is None:
        raise ValueError(f"scale_dtype must be 'f16' or 'f32', got {scale_dtype!r}")
    s = np.asarray(x, dtype=np.float64).astype(dt)
    if not np.isfinite(s).all():
        raise ValueError(f"a group scale overflows {scale_dtype}; use scale_dtype='f32'")
    tiny = np.array(np.finfo(dt).smallest_subnormal, dtype=dt)
    return np.where(s <= 0, tiny, s).astype(dt)


# --------------------------------------------------------------------------- serialisation
def _round_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def _padded(b: bytes, align: int) -> bytes:
    return b + b"\0" * (_round_up(len(b), align) - len(b))


def serialize_expert(encoded_by_proj: Mapping[str, EncodedTensor],
                     align: int = 64) -> tuple[bytes, dict[str, Any]]:
    """Lay one expert's encoded projections out level by level.

    Byte order: for level 1..L, for each projection (gate, up, down order when
    those names are used, else sorted), each array the level adds, every array
    padded to ``align`` bytes. Hence level j is the byte range
    ``[0, layout["level_nbytes"][j-1])`` and a prefix of level j+1.

    Args:
        encoded_by_proj: projection name -> EncodedTensor, all from the same
            codec with the same number of levels.
        align: padding of every array (64 keeps torch/numpy views aligned).

    Returns:
        (bytes of all levels, layout dict — JSON-able; pass it to
        :func:`deserialize_expert`).

    Raises:
        ValueError: empty input or projections from different codecs/levels.
    """
    if not encoded_by_proj:
        raise ValueError("serialize_expert: no projections given")
    projs = _proj_order(encoded_by_proj)
    first = encoded_by_proj[projs[0]]
    for p in projs:
        e = encoded_by_proj[p]
        if (e.codec, e.params, e.n_levels) != (first.codec, first.params, first.n_levels):
            raise ValueError(f"serialize_expert: {p} was encoded differently from {projs[0]}")
    chunks: list[bytes] = []
    arrays: list[dict[str, Any]] = []
    level_nbytes: list[int] = []
    offset = 0
    for lvl in range(first.n_levels):
        for p in projs:
            for name, arr in encoded_by_proj[p].segments[lvl].items():
                raw = _padded(np.ascontiguousarray(arr).tobytes(), align)
                arrays.append({"level": lvl + 1, "proj": p, "name": name, "dtype": arr.dtype.str,
                               "shape": list(arr.shape), "offset": offset, "nbytes": int(arr.nbytes)})
                chunks.append(raw)
                offset += len(raw)
        level_nbytes.append(offset)
    layout = {
        "version": LAYOUT_VERSION, "codec": first.codec, "params": first.params,
        "levels": first.n_levels, "align": align, "level_nbytes": level_nbytes,
        "projs": {p: {"shape": list(encoded_by_proj[p].shape),
                      "group_size": encoded_by_proj[p].group_size} for p in projs},
        "arrays": arrays,
    }
    return b"".join(chunks), layout


def deserialize_expert(buf: bytes | bytearray | memoryview | np.ndarray, layout: Mapping[str, Any],
                       level: int) -> dict[str, EncodedTensor]:
    """Rebuild an expert's projections at ``level`` from (a prefix of) its bytes.

    Args:
        buf: at least ``layout["level_nbytes"][level-1]`` bytes starting at the
            expert's first byte (more is fine). Arrays are zero-copy views.
        layout: the dict :func:`serialize_expert` returned.
        level: 1..layout["levels"].

    Returns:
        projection name -> EncodedTensor holding levels 1..level.

    Raises:
        ModelFormatError: unknown layout version, level not stored, buffer too short.
    """
    if layout.get("version") != LAYOUT_VERSION:
        raise ModelFormatError(
            f"expert layout version {layout.get('version')} is not {LAYOUT_VERSION}; "
            "re-convert the model with this moestream version")
    n_levels = int(layout["levels"])
    if not 1 <= level <= n_levels:
        raise ModelFormatError(f"level {level} not stored: the expert holds levels 1..{n_levels}")
    need = int(layout["level_nbytes"][level - 1])
    mem = np.frombuffer(buf, dtype=np.uint8) if not isinstance(buf, np.ndarray) else buf.view(np.uint8).reshape(-1)
    if mem.size < need:
        raise ModelFormatError(
            f"expert buffer has {mem.size} bytes but level {level} needs {need}; the read was short "
            "or the shard is truncated")
    segs: dict[str, list[dict[str, np.ndarray]]] = {p: [{} for _ in range(level)] for p in layout["projs"]}
    for a in layout["arrays"]:
        if a["level"] > level:
            continue
        dt = np.dtype(a["dtype"])
        raw = mem[a["offset"]: a["offset"] + a["nbytes"]]
        segs[a["proj"]][a["level"] - 1][a["name"]] = raw.view(dt).reshape(a["shape"])
    return {p: EncodedTensor(codec=layout["codec"], params=dict(layout["params"]),
                             shape=tuple(info["shape"]), group_size=int(info["group_size"]),
                             segments=segs[p])
            for p, info in layout["projs"].items()}


def _proj_order(d: Mapping[str, Any]) -> list[str]:
    known = [p for p in EXPERT_PROJS if p in d]
    return known + sorted(p for p in d if p not in EXPERT_PROJS)


def level_bits_of(enc_or_codec: EncodedTensor | Codec) -> Sequence[int]:
    """Compute bits of each level for a record or codec."""
    c = enc_or_codec.codec_obj() if isinstance(enc_or_codec, EncodedTensor) else enc_or_codec
    return c.level_bits
