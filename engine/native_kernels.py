"""Native kernels that compute nested-level experts straight from their stored bit planes.

Owns the C kernel (source in ``native_kernels_src.py``): Y = X @ Ŵᵀ for one matryoshka /
matryoshka_floor / residual level, unpacking ``pack_bits`` planes inline, and a whole SwiGLU expert
in one call; its build (once per machine with the system C compiler into
``$MOESTREAM_CACHE_DIR/kernels``, default ``~/.cache/moestream/kernels``, loaded with ctypes;
``-march=native`` + OpenMP when they work, a portable scalar build otherwise; self-checked against
the codec's torch decode); the descriptors that tell it where a projection's arrays are; and
:class:`NestedPlaneView`, an ExpertView over one expert's plane buffers (arena slots) that runs the
kernel with nothing decoded to fp32.

Numerics: matryoshka levels are summed as α·Σ_k (m_k + centre − z)·x_k per group — the integer
m + centre − z is exact in fp32 and α·(m + centre − z) is exactly the decoded ŵ; residual levels
form ŵ with the decode's own fp32 operations in its order (s1·(q1 − z1), then ± s_k per plane), bit
for bit. Only the order of the fp32 sums over K (8 lanes, a few chains, one α per group) differs
from ``torch_decode`` + ``F.linear``: results agree within fp32 summation rounding, not bit for bit
(tests/test_native_kernels.py states the bound).

``MOESTREAM_NATIVE_KERNELS=0`` disables the kernels (callers fall back to decode + fp32 matmul).
When no C compiler works, the first use logs one warning and :func:`available` is False; a missing
toolchain never raises.

Knows nothing about the scheduler, files or model families: it is handed plane buffers and the
codec parameters (``convert/nested_planes.py`` header and layout).
"""
from __future__ import annotations

import ctypes
import logging
import os
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from moestream.convert.codecs import EncodedTensor, MatryoshkaCodec, ResidualCodec
from moestream.convert.codecs.base import Codec
from moestream.convert.errors import SettingError
from moestream.convert.nested_planes import CODEC_IDS
from moestream.convert.native_build import build_or_warn
from moestream.engine.native_kernels_src import C_SOURCE as _C_SOURCE

log = logging.getLogger("moestream")

#: Environment switch: "0" (or "off", "false", "no") disables the native kernels.
ENV_SWITCH = "MOESTREAM_NATIVE_KERNELS"
#: Environment switch for the nested kernels' activations: int8 (default) or fp32.
ACT_ENV = "MOESTREAM_NESTED_ACTIVATIONS"
#: Codecs the kernel computes (GGML block codecs keep their decode path).
NESTED_CODECS = tuple(CODEC_IDS)  # expert codecs stored as nested planes
MAXP = 8
#: Descriptor fields of one projection (must match the C enum).
D_N, D_K, D_GS, D_KIND, D_NP, D_SHIFT, D_CAP, D_CENTRE, D_SF32, D_ZBUF, D_ZOFF, D_SBUF, D_SOFF, D_PLANES = range(14)
P_STRIDE = 5
D_STRIDE = D_PLANES + P_STRIDE * MAXP
KIND_FLOOR, KIND_ROUND, KIND_RESIDUAL = 0, 1, 2
_CFLAGS = ["-O3", "-std=c11", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared"]
#: Builds tried in order; the first that compiles, loads and passes the self-check is used.
_VARIANTS = (["-march=native", "-fopenmp"], ["-march=native"], ["-fopenmp"], [])

# Legend: M tokens, K input features of a projection, N output features, G groups along K.


# ------------------------------------------------------------------------------------ build and load
def enabled() -> bool:
    """False when ``MOESTREAM_NATIVE_KERNELS`` turns the kernels off (read on every call)."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "off", "false", "no")


def available() -> bool:
    """True when the kernels are enabled and built (the first call compiles them, ~10 s once per machine)."""
    return enabled() and library() is not None


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    P, I64, I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.nq_abi.argtypes, lib.nq_abi.restype = [], I32
    lib.nq_linear.argtypes, lib.nq_linear.restype = [P, P, P, I64, P, I32], I32
    lib.nq_linear_portable.argtypes, lib.nq_linear_portable.restype = [P, P, P, I64, P], I32
    lib.nq_ffn.argtypes, lib.nq_ffn.restype = [P, P, P, I64, P, I32], I32
    lib.nq_set_act.argtypes, lib.nq_set_act.restype = [I32], I32
    lib.nq_moe.argtypes, lib.nq_moe.restype = [P, P, P, I64, P, I64, P, I32], I32
    return lib


_build_lock = threading.Lock()


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled kernel library, or None (one warning) when no build works on this machine."""
    def accept(lib: ctypes.CDLL) -> str | None:
        if lib.nq_abi() // 10 != D_STRIDE * 10 + MAXP:
            return "descriptor layout mismatch"
        if not _self_check(lib) or not _self_check_int8(lib):
            return "self-check against the torch decode failed"
        return None

    with _build_lock:
        lib = build_or_warn("nested_kernel", _C_SOURCE, _CFLAGS, _VARIANTS, _load, accept,
                            what="native nested-expert kernels",
                            fallback="nested experts are decoded to fp32 on every use (slower)")
        if lib is not None:
            lib.nq_set_act(int(activation_mode() == "int8"))
        return lib


_act_override: str | None = None


class ActivationModeError(SettingError):
    """A bad ``MOESTREAM_NESTED_ACTIVATIONS`` value (the CLI reports it in one line)."""


def activation_mode() -> str:
    """``int8`` (default: activations quantized per 128 inputs, integer dot products, like llama.cpp) or
    ``fp32`` (exact activations): :func:`set_activation_mode`, else ``MOESTREAM_NESTED_ACTIVATIONS``.

    int8 applies to matryoshka_floor levels with 2/4-bit planes and group size % 128 == 0
    (:func:`int8_applies`); anything else runs with fp32 activations whatever the mode.
    """
    mode = _act_override or os.environ.get(ACT_ENV, "int8").strip().lower()
    if mode not in ("int8", "fp32"):
        raise ActivationModeError(f"{ACT_ENV}={mode!r}: choose int8 or fp32")
    return mode


def set_activation_mode(mode: str | None) -> None:
    """Switch the kernels between ``int8`` and ``fp32`` activations (None: back to the environment's choice)."""
    global _act_override
    if mode not in ("int8", "fp32", None):
        raise ValueError(f"activation mode {mode!r}: choose int8 or fp32")
    _act_override = mode
    lib = library() if enabled() else None
    if lib is not None:
        lib.nq_set_act(int((mode or activation_mode()) == "int8"))


def quantize_activations_perm128(x: torch.Tensor) -> torch.Tensor:
    """The int8-path activations of x [M, K] dequantized back to fp32 (what the kernel multiplies by).

    One scale per 128-chunk, d = max|x| / 127 (fp32), codes round-half-even(x · (1/d)) clipped to ±127
    (0 when d == 0): llama.cpp's Q8_K scheme with 128-element blocks. (The kernel stores the codes in a
    strided order; the values are these.)
    """
    m, k = x.shape
    xc = x.float().reshape(m, k // 128, 128)
    d = xc.abs().amax(dim=-1) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(xc * inv.unsqueeze(-1)).clamp_(-127, 127)
    return (q * d.unsqueeze(-1)).view(m, k)


def int8_applies(codec: Codec, level: int, group_size: int) -> bool:
    """True when the int8-activation path computes this codec level (see :func:`activation_mode`)."""
    if not isinstance(codec, MatryoshkaCodec) or codec.slicing != "floor" or group_size % 128:
        return False
    bits = codec.plane_bits[:level]
    return all(b in (2, 4) for b in bits) and sum(bits) <= 8


def random_encoded(codec: Codec, rows: int, cols: int, group_size: int, rng: np.random.Generator,
                   scale_dtype: Any = np.float16) -> EncodedTensor:
    """An :class:`EncodedTensor` with random planes, scales and zeros (every bit pattern is a valid code).

    Exercises every code value and zero point, independent of any encoder (self-check and tests).
    """
    G = cols // group_size
    n = rows * cols

    def scales() -> np.ndarray:
        return (rng.uniform(0.5, 2.0, (rows, G)) * 10.0 ** rng.integers(-4, -1, (rows, G))).astype(scale_dtype)

    def plane(bits: int) -> np.ndarray:
        return rng.integers(0, 256, n * bits // 8, dtype=np.uint8)

    zero = rng.integers(0, 256, (rows, G), dtype=np.uint8)
    if isinstance(codec, ResidualCodec):
        segs = [{"scale": scales(), "zero": zero, "plane1": plane(codec.base_bits)}]
        segs += [{"scale": scales(), f"plane{k + 2}": plane(1)} for k in range(codec.n_planes)]
    else:
        pb = codec.plane_bits  # type: ignore[attr-defined]
        segs = [{"scale": scales(), "zero": zero, "plane1": plane(pb[0])}]
        segs += [{f"plane{j + 1}": plane(pb[j])} for j in range(1, len(pb))]
    return EncodedTensor(codec=codec.name, params=codec.params, shape=(rows, cols), group_size=group_size,
                         segments=segs)


def _self_check(lib: ctypes.CDLL) -> bool:
    """The built kernel against the codec's torch decode + fp64 matmul on random planes (every codec, level)."""
    from moestream.convert.codecs import get_codec

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((3, 64)).astype(np.float32))
    for name in NESTED_CODECS:
        enc = random_encoded(get_codec(name), 16, 64, 32, rng)
        for level in range(1, enc.n_levels + 1):
            w = enc.torch_decode(level).double()
            ref = x.double() @ w.T
            op = encoded_operand(enc, level)
            for portable in (False, True):
                got = _linear_raw(lib, op, x, portable).double()
                if not bool(((got - ref).abs() <= 1e-5 * (x.double().abs() @ w.abs().T) + 1e-30).all()):
                    return False
    return True


def _self_check_int8(lib: ctypes.CDLL) -> bool:
    """The int8-activation path against decode + fp64 matmul on the kernel's own quantized activations."""
    from moestream.convert.codecs import get_codec

    if not lib.nq_set_act(1):  # a build without the AVX2 int8 path computes fp32 (checked by _self_check)
        lib.nq_set_act(0)
        return True
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.standard_normal((5, 256)).astype(np.float32))
    xq = quantize_activations_perm128(x).double()
    codec = get_codec("matryoshka_floor")
    try:
        for scale_dtype in (np.float16, np.float32):
            enc = random_encoded(codec, 24, 256, 128, rng, scale_dtype)
            for level in range(1, enc.n_levels + 1):
                w = enc.torch_decode(level).double()
                op = encoded_operand(enc, level)
                got = _linear_raw(lib, op, x).double()
                if not bool(((got - xq @ w.T).abs() <= 1e-5 * (xq.abs() @ w.abs().T) + 1e-30).all()):
                    return False
    finally:
        lib.nq_set_act(0)
    return True


# ------------------------------------------------------------------------------------ descriptors
@dataclass(frozen=True)
class LevelParams:
    """How the kernel forms ŵ at one codec level (see the module docstring)."""

    kind: int
    bits: tuple[int, ...]  # bits of each plane used, plane 1 first
    shift: int = 0
    cap: int = 0
    centre: int = 0


def level_params(codec: Codec, level: int) -> LevelParams:
    """Kernel parameters of codec level ``level`` (1..L).

    Raises:
        NotImplementedError: a codec the kernel does not compute (names the supported ones).
    """
    if isinstance(codec, ResidualCodec):
        return LevelParams(KIND_RESIDUAL, (codec.base_bits,) + (1,) * (level - 1))
    if isinstance(codec, MatryoshkaCodec):
        r = codec.level_bits[level - 1]
        bits = tuple(codec.plane_bits[:level])
        if len(bits) > MAXP:
            raise NotImplementedError(f"the native kernel takes at most {MAXP} planes, level {level} has {len(bits)}")
        if codec.slicing == "round" and r < 8:  # stored r+1 bits: S = min((q+1) >> 1, 2^r − 1)
            return LevelParams(KIND_ROUND, bits, shift=8 - r, cap=(1 << r) - 1)
        return LevelParams(KIND_FLOOR, bits, shift=8 - r, centre=(1 << (7 - r)) if r < 8 else 0)
    raise NotImplementedError(f"no native kernel for codec {codec.name!r}; supported: {', '.join(NESTED_CODECS)}")


def projection_desc(codec: Codec, level: int, shape: tuple[int, int], group_size: int, scale_f32: bool,
                    refs: Mapping[str, tuple[int, int]]) -> np.ndarray:
    """The int64 descriptor of one projection at codec level ``level``.

    Args:
        codec: the projection's codec; shape: (N, K); group_size: its group length along K.
        scale_f32: scales stored as f32 (else f16).
        refs: array name -> (buffer index, byte offset): ``scale``, ``zero``, ``plane{j}`` (j = 1..level)
            and, for residual, ``scale{j}`` (j = 2..level, the scale each sign plane adds).

    Returns:
        int64 [D_STRIDE].
    """
    lp = level_params(codec, level)
    d = np.full(D_STRIDE, -1, dtype=np.int64)
    d[[D_N, D_K, D_GS, D_KIND, D_NP, D_SHIFT, D_CAP, D_CENTRE, D_SF32]] = (
        shape[0], shape[1], group_size, lp.kind, len(lp.bits), lp.shift, lp.cap, lp.centre, int(scale_f32))
    d[[D_ZBUF, D_ZOFF]] = refs["zero"]
    d[[D_SBUF, D_SOFF]] = refs["scale"]
    for j, b in enumerate(lp.bits):
        base = D_PLANES + P_STRIDE * j
        d[base:base + 3] = (*refs[f"plane{j + 1}"], b)
        if j and lp.kind == KIND_RESIDUAL:
            d[base + 3:base + 5] = refs[f"scale{j + 1}"]
    return d


@dataclass
class Operand:
    """One projection ready for :func:`linear`: descriptor, buffer addresses and the arrays they point into."""

    desc: np.ndarray  # int64 [D_STRIDE]
    bases: np.ndarray  # int64 [buffers]
    arrays: list[np.ndarray]  # kept alive while the operand is used
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        # the addresses, read once: numpy's ``.ctypes.data`` costs microseconds per call
        self.desc_ptr = self.desc.ctypes.data
        self.bases_ptr = self.bases.ctypes.data

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)


def encoded_operand(enc: EncodedTensor, level: int) -> Operand:
    """An operand over an :class:`EncodedTensor`'s arrays at codec level ``level`` (copies them C-contiguous).

    Raises:
        NotImplementedError: unsupported codec. ValueError: level not stored.
    """
    t = enc.truncate(level)
    codec = t.codec_obj()
    arrays: list[np.ndarray] = []
    refs: dict[str, tuple[int, int]] = {}
    for j, seg in enumerate(t.segments):
        for name, arr in seg.items():
            key = f"scale{j + 1}" if name == "scale" and j else name
            refs[key] = (len(arrays), 0)
            arrays.append(np.array(arr, copy=True, order="C"))
    scale_f32 = arrays[refs["scale"][0]].dtype == np.float32
    desc = projection_desc(codec, level, tuple(t.shape), t.group_size, scale_f32, refs)
    bases = np.array([a.ctypes.data for a in arrays], dtype=np.int64)
    return Operand(desc, bases, arrays, tuple(t.shape))


# ------------------------------------------------------------------------------------ calls
def _as_input(x: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.float32 or not x.is_cpu:
        raise ValueError(f"native kernels take fp32 CPU activations, got {x.dtype} on {x.device}")
    return x if x.is_contiguous() else x.contiguous()


def _check(rc: int) -> None:
    if rc:
        raise ValueError(f"native kernel rejected its descriptor (code {rc}); the plane layout does not match the "
                         "expert (a bug, or shards written by another moestream)")


def _linear_raw(lib: ctypes.CDLL, op: Operand, x: torch.Tensor, portable: bool = False) -> torch.Tensor:
    x = _as_input(x)
    y = torch.empty(x.shape[0], op.shape[0], dtype=torch.float32)
    if x.shape[0] == 0:
        return y
    if portable:
        rc = lib.nq_linear_portable(op.desc_ptr, op.bases_ptr, x.data_ptr(), x.shape[0], y.data_ptr())
    else:
        rc = lib.nq_linear(op.desc_ptr, op.bases_ptr, x.data_ptr(), x.shape[0], y.data_ptr(), torch.get_num_threads())
    _check(rc)
    return y


def linear(op: Operand, x: torch.Tensor, portable: bool = False) -> torch.Tensor:
    """``x [M, K] @ Ŵᵀ -> [M, N]`` for one projection (``portable``: the scalar loop, for tests).

    Raises:
        RuntimeError: the kernels are not available (check :func:`available` first).
        ValueError: activations not fp32 on the CPU, or a descriptor the kernel rejects.
    """
    lib = library() if enabled() else None
    if lib is None:
        raise RuntimeError("native nested kernels are not available; check native_kernels.available() first")
    if x.shape[-1] != op.shape[1]:
        raise ValueError(f"activations have {x.shape[-1]} features, the projection takes {op.shape[1]}")
    return _linear_raw(lib, op, x, portable)


# ------------------------------------------------------------------------------------ expert views
class NestedPlaneView:
    """An ExpertView over one nested expert's plane buffers (duck-types ``engine.experts.ExpertView``).

    Holds only references to the buffers (arena slots: valid until the expert is released) and a
    shared descriptor; ``ffn`` runs gate, up, SwiGLU and down in one native call.

    Attributes:
        level: stored (shard) level = number of planes − 1.
        nbytes: plane bytes the view reads.
    """

    __slots__ = ("level", "nbytes", "_desc", "_bases", "_buffers", "_inter", "_hidden")

    def __init__(self, desc: np.ndarray, buffers: Sequence[np.ndarray], level: int, hidden: int, inter: int) -> None:
        self.level = level
        self._desc = desc
        self._buffers = buffers
        self._bases = np.fromiter((b.ctypes.data for b in buffers), dtype=np.int64, count=len(buffers))
        self.nbytes = sum(int(b.nbytes) for b in buffers)
        self._hidden, self._inter = hidden, inter

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        """``down(silu(gate x) * up x)``: x ``[M, H]`` fp32 -> ``[M, H]``."""
        x = _as_input(x)
        m = x.shape[0]
        y = torch.empty((m, self._hidden), dtype=torch.float32)
        if m == 0:
            return y
        _check(library().nq_ffn(self._desc.ctypes.data, self._bases.ctypes.data, x.data_ptr(), m, y.data_ptr(),
                                torch.get_num_threads()))
        return y


def moe_ffn(views: Sequence[NestedPlaneView], weights: Sequence[float], x: torch.Tensor) -> torch.Tensor:
    """``Σ_e weights[e] · views[e].ffn(x)`` in one native call, summed in the given order (x ``[M, H]`` fp32).

    Equals the per-view loop (``ffn`` then multiply and add in fp32) bit for bit; with int8 activations
    x is quantized once for all experts instead of once per expert.
    """
    x = _as_input(x)
    m = x.shape[0]
    e = len(views)
    y = torch.empty((m, x.shape[1]), dtype=torch.float32)
    if m == 0 or e == 0:
        return y.zero_()
    descs = np.concatenate([v._desc for v in views])  # [3E, D_STRIDE]
    bases = np.zeros((e, MAXP), dtype=np.int64)
    for i, v in enumerate(views):
        bases[i, :len(v._bases)] = v._bases
    w = np.repeat(np.asarray(weights, dtype=np.float32), m)  # [E, M] row-major
    _check(library().nq_moe(descs.ctypes.data, bases.ctypes.data, w.ctypes.data, e, x.data_ptr(), m,
                            y.data_ptr(), torch.get_num_threads()))
    return y


class PlaneKernels:
    """Descriptors of one nested plane layout (codec, group size, H, I from plane 0's header), per level.

    ``view(buffers)`` makes a :class:`NestedPlaneView` over planes 0..j in microseconds.
    """

    def __init__(self, header: bytes) -> None:
        from moestream.convert.nested_planes import (EXPERT_PROJS as PROJS, codec_from_header, plane_layout,
                                                     unpack_header)

        cid, bits, sb, gs, hidden, inter = unpack_header(header)
        self.header = bytes(header)
        self.codec = codec_from_header(cid, bits, sb)
        self.hidden, self.inter = hidden, inter
        lay = plane_layout(self.codec, gs, hidden, inter)
        shapes = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
        self.descs: list[np.ndarray] = []
        for level in range(1, len(lay.nbytes) + 1):
            rows = []
            for p in PROJS:
                refs: dict[str, tuple[int, int]] = {}
                for j in range(level):
                    for proj, aname, _dt, _shape, off in lay.arrays[j]:
                        if proj == p:
                            refs[f"scale{j + 1}" if aname == "scale" and j else aname] = (j, off)
                rows.append(projection_desc(self.codec, level, shapes[p], lay.group_sizes[p], sb == 4, refs))
            self.descs.append(np.ascontiguousarray(np.stack(rows)))  # [3, D_STRIDE] gate, up, down

    def view(self, buffers: Sequence[np.ndarray], level: int) -> NestedPlaneView:
        """A view over ``buffers`` (plane 0..len-1 bytes, numpy uint8, host memory) at shard level ``level``."""
        if len(buffers) > len(self.descs):
            raise ValueError(f"{len(buffers)} planes given, the codec has {len(self.descs)} levels")
        return NestedPlaneView(self.descs[len(buffers) - 1], buffers, level, self.hidden, self.inter)


class NestedViews:
    """Makes native views for one shard model's nested experts (one :class:`PlaneKernels` per header seen)."""

    def __init__(self) -> None:
        self._by_header: dict[bytes, PlaneKernels] = {}

    def view(self, buffers: Sequence[np.ndarray], level: int) -> NestedPlaneView:
        """A :class:`NestedPlaneView` over an expert's plane buffers (header checked on every call).

        Raises:
            ModelFormatError: plane 0 has no valid header.
        """
        from moestream.convert.nested_planes import HEADER_BYTES

        header = buffers[0][:HEADER_BYTES].tobytes()
        kern = self._by_header.get(header)
        if kern is None:
            kern = self._by_header[header] = PlaneKernels(header)
        return kern.view(buffers, level)


def serves(codec: str, device: torch.device | str = "cpu") -> bool:
    """True when the native kernels compute experts of ``codec`` on ``device`` (builds them on first call)."""
    return codec in NESTED_CODECS and torch.device(device).type == "cpu" and available()


def nested_views_for(codec: str, device: torch.device | str = "cpu") -> NestedViews | None:
    """A :class:`NestedViews` when the native kernels serve experts of ``codec`` on ``device``, else None."""
    return NestedViews() if serves(codec, device) else None
