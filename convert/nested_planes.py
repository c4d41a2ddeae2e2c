"""Nested expert codecs stored as shard planes, and their shard-reader decoders.

Owns how one routed expert encoded by a nested codec (``convert/codecs``)
becomes shard planes, and the inverse registered with the shard reader
(:func:`moestream.convert.shard_reader.register_expert_decoder`):

- **One tensor per plane.** Plane ``j`` of expert ``(L, E)`` is ONE GGUF
  tensor ``model.layers.{L}.mlp.experts.{E}.nested.p{j}_bytes`` (type I8,
  1-D): the arrays codec level ``j+1`` adds for ``gate_proj``, ``up_proj``,
  ``down_proj`` in that order, each padded to 64 bytes. One tensor per plane
  keeps the 4096-byte page padding to one page per plane, not one per array.
- **Self-describing.** Plane 0 starts with a 64-byte header (magic ``MSNQ``,
  codec id, level bits, scale width, group size, H, I), so the decoder needs
  nothing but the plane bytes (the reader's decoder interface passes planes
  only). The byte layout of every plane follows from the header alone
  (:func:`plane_layout`); the encoder checks the arrays it writes against it.
- **Levels.** Shard level ``j`` (0-based) = planes ``0..j`` = codec level
  ``j+1``; higher level = more bytes = more precision. An expert may store
  fewer planes than the codec has (bit allocation caps it).
- **Plain GGML codecs.** ``gguf_q8_0`` / ``gguf_q4_0`` store each projection
  as one standard GGML block tensor ``{proj}.p0_q8_0`` (one plane, one level):
  the uniform-quantization baseline at equal file size.

Knows nothing about Hugging Face checkpoints, the engine or the scheduler.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from moestream.convert import constants as C
from moestream.convert.codecs import EncodedTensor, get_codec
from moestream.convert.codecs.base import Codec
from moestream.convert.codecs.matryoshka import MatryoshkaCodec, decode_level
from moestream.convert.errors import ModelFormatError
from moestream.convert.shard_reader import register_expert_decoder
from moestream.convert.shard_writer import TensorDecl

log = logging.getLogger(__name__)
EXPERT_PROJS = C.EXPERT_PROJS
#: Part name of the per-plane blob tensor (``...experts.{E}.nested.p{j}_bytes``).
NESTED_PART = "nested"
NESTED_KIND = "bytes"
HEADER_BYTES = 64
ARRAY_ALIGN = 64
MAGIC = b"MSNQ"
HEADER_VERSION = 1
#: codec registry name -> header id
CODEC_IDS = {"matryoshka": 1, "matryoshka_floor": 2, "residual": 3}
CODEC_NAMES = {v: k for k, v in CODEC_IDS.items()}
_HEADER = struct.Struct("<4sBBBB8BIII")  # magic, version, codec id, scale bytes, n bits, bits[8], gs, H, I
#: Plain GGML expert codecs (one level).
GGML_CODECS = {"gguf_q8_0": GGMLQuantizationType.Q8_0, "gguf_q4_0": GGMLQuantizationType.Q4_0}


def effective_group_size(requested: int, cols: int) -> int:
    """The group length used for a matrix of ``cols`` columns: the largest of
    ``requested``, ``requested/2``, ... (down to 8) that divides ``cols``.

    Raises:
        ValueError: no multiple of 8 divides ``cols``.
    """
    gs = int(requested)
    while gs >= 8:
        if cols % gs == 0 and gs % 8 == 0:
            return gs
        gs //= 2
    raise ValueError(f"no group size (multiple of 8, <= {requested}) divides {cols} columns")


def codec_header_bits(codec: Codec) -> tuple[int, ...]:
    """The integers describing a codec's levels in the header (matryoshka: level bits; residual: base, planes)."""
    if codec.name == "residual":
        return (codec.base_bits, codec.n_planes)  # type: ignore[attr-defined]
    return tuple(codec.level_bits)


def codec_from_header(codec_id: int, bits: tuple[int, ...], scale_bytes: int) -> Codec:
    """Rebuild a decoding codec from header fields (range-search settings do not affect decoding)."""
    name = CODEC_NAMES.get(codec_id)
    if name is None:
        raise ModelFormatError(f"nested expert header names codec id {codec_id}, unknown to this moestream; upgrade it")
    sd = "f16" if scale_bytes == 2 else "f32"
    if name == "residual":
        return get_codec(name, base_bits=bits[0], n_planes=bits[1], scale_dtype=sd)
    return get_codec(name, level_bits=bits, scale_dtype=sd)


def pack_header(codec: Codec, group_size: int, hidden: int, inter: int) -> bytes:
    """The 64-byte plane-0 header."""
    bits = codec_header_bits(codec)
    sb = 2 if getattr(codec, "scale_dtype", "f16") == "f16" else 4
    raw = _HEADER.pack(MAGIC, HEADER_VERSION, CODEC_IDS[codec.name], sb, len(bits),
                       *(list(bits) + [0] * (8 - len(bits))), group_size, hidden, inter)
    return raw + b"\0" * (HEADER_BYTES - len(raw))


def unpack_header(buf: bytes) -> tuple[int, tuple[int, ...], int, int, int, int]:
    """``(codec_id, bits, scale_bytes, group_size, H, I)`` from plane 0's first bytes.

    Raises:
        ModelFormatError: bad magic or version.
    """
    magic, ver, cid, sb, nb, *rest = _HEADER.unpack(bytes(buf[:_HEADER.size]))
    if magic != MAGIC or ver != HEADER_VERSION:
        raise ModelFormatError("nested expert plane 0 has no valid MSNQ header; the shard is corrupt, re-run convert")
    bits = tuple(rest[:nb])
    gs, hidden, inter = rest[8:11]
    return cid, bits, sb, gs, hidden, inter


def _round_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def _segment_specs(codec: Codec, rows: int, cols: int, gs: int) -> list[list[tuple[str, np.dtype, tuple[int, ...]]]]:
    """(name, dtype, shape) of the arrays each codec level adds for one [rows, cols] matrix."""
    G = cols // gs
    sd = np.dtype(np.float16 if getattr(codec, "scale_dtype", "f16") == "f16" else np.float32)
    u8 = np.dtype(np.uint8)
    n = rows * cols
    if codec.name == "residual":
        segs = [[("scale", sd, (rows, G)), ("zero", u8, (rows, G)), ("plane1", u8, (n * codec.base_bits // 8,))]]
        for k in range(codec.n_planes):  # type: ignore[attr-defined]
            segs.append([("scale", sd, (rows, G)), (f"plane{k + 2}", u8, (n // 8,))])
        return segs
    pbits = codec.plane_bits  # type: ignore[attr-defined]
    segs = [[("scale", sd, (rows, G)), ("zero", u8, (rows, G)), ("plane1", u8, (n * pbits[0] // 8,))]]
    for j in range(1, len(pbits)):
        segs.append([(f"plane{j + 1}", u8, (n * pbits[j] // 8,))])
    return segs


@dataclass(frozen=True)
class PlaneLayout:
    """Where every array of every plane sits (offsets relative to the plane's first byte)."""

    arrays: tuple[tuple[tuple[str, str, np.dtype, tuple[int, ...], int], ...], ...]  # per plane: (proj, name, dtype, shape, offset)
    nbytes: tuple[int, ...]  # per plane
    group_sizes: Mapping[str, int] = field(default_factory=dict)


def plane_layout(codec: Codec, group_size: int, hidden: int, inter: int) -> PlaneLayout:
    """Byte layout of all planes of one expert (gate/up ``[I, H]``, down ``[H, I]``)."""
    return _plane_layout_cached(codec.name, codec_header_bits(codec), getattr(codec, "scale_dtype", "f16"),
                                group_size, hidden, inter)


@lru_cache(maxsize=64)
def _plane_layout_cached(name: str, bits: tuple[int, ...], scale_dtype: str, group_size: int, hidden: int,
                         inter: int) -> PlaneLayout:
    sb = 2 if scale_dtype == "f16" else 4
    codec = codec_from_header(CODEC_IDS[name], bits, sb)
    shapes = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    gss = {p: effective_group_size(group_size, shapes[p][1]) for p in EXPERT_PROJS}
    specs = {p: _segment_specs(codec, *shapes[p], gss[p]) for p in EXPERT_PROJS}
    n_planes = len(specs["gate_proj"])
    planes, sizes = [], []
    for j in range(n_planes):
        off = HEADER_BYTES if j == 0 else 0
        entries = []
        for p in EXPERT_PROJS:
            for aname, dt, shape in specs[p][j]:
                entries.append((p, aname, dt, shape, off))
                off += _round_up(int(np.prod(shape)) * dt.itemsize, ARRAY_ALIGN)
        planes.append(tuple(entries))
        sizes.append(off)
    return PlaneLayout(tuple(planes), tuple(sizes), gss)


# ------------------------------------------------------------------------------------ writer side
@dataclass
class NestedExpertCodec:
    """:class:`moestream.convert.convert.ExpertCodec` storing a nested codec's levels as planes.

    Attributes:
        codec: the nested codec (``get_codec("matryoshka_floor")``, ...).
        group_size: requested group length (see :func:`effective_group_size`).
        act_scales: optional ``{(layer, expert): {proj: [cols] diag(XᵀX)}}`` (converted ids)
            weighting each input channel's error in the codec's range search.
    """

    codec: Codec
    group_size: int = 128
    act_scales: dict[tuple[int, int], dict[str, np.ndarray]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.codec.name

    def level_names(self) -> list[str]:
        """``["2bit", "4bit", "8bit"]`` style names, lowest level first."""
        return [f"{b}bit" for b in self.codec.level_bits]

    def n_levels(self) -> int:
        return len(self.codec.level_bits)

    def layout(self, shapes: Mapping[str, tuple[int, ...]]) -> PlaneLayout:
        inter, hidden = shapes["gate_proj"]
        return plane_layout(self.codec, self.group_size, int(hidden), int(inter))

    def level_nbytes(self, shapes: Mapping[str, tuple[int, ...]]) -> list[int]:
        """Unpadded bytes of levels 0..L-1 (cumulative plane sizes)."""
        return list(np.cumsum(self.layout(shapes).nbytes))

    def plane_decls(self, layer: int, expert: int, shapes: Mapping[str, tuple[int, ...]]) -> list[list[TensorDecl]]:
        """One I8 tensor per plane."""
        lay = self.layout(shapes)
        return [[TensorDecl(blob_name(layer, expert, j), (n,), GGMLQuantizationType.I8)]
                for j, n in enumerate(lay.nbytes)]

    def encode_projs(self, tensors: Mapping[str, torch.Tensor],
                     act: Mapping[str, np.ndarray] | None = None) -> dict[str, EncodedTensor]:
        """Encode the three projections (all levels)."""
        out = {}
        for p in EXPERT_PROJS:
            w = tensors[p].detach().float().numpy()
            gs = effective_group_size(self.group_size, w.shape[1])
            out[p] = self.codec.encode(w, gs, None if act is None else act.get(p))
        return out

    def encode(self, layer: int, expert: int, tensors: Mapping[str, torch.Tensor]) -> list[list[np.ndarray]]:
        """Bytes of every plane (as int8 arrays), in :meth:`plane_decls` order."""
        enc = self.encode_projs(tensors, self.act_scales.get((layer, expert)))
        shapes = {p: tuple(tensors[p].shape) for p in EXPERT_PROJS}
        return [[b] for b in planes_from_encoded(self.codec, self.group_size, shapes, enc)]


def blob_name(layer: int, expert: int, plane: int) -> str:
    """Tensor name of one plane blob."""
    return C.expert_tensor_name(layer, expert, NESTED_PART, plane, NESTED_KIND)


def planes_from_encoded(codec: Codec, group_size: int, shapes: Mapping[str, tuple[int, ...]],
                        enc: Mapping[str, EncodedTensor]) -> list[np.ndarray]:
    """Lay encoded projections out as plane blobs (int8 arrays) following :func:`plane_layout`."""
    inter, hidden = shapes["gate_proj"]
    lay = plane_layout(codec, group_size, int(hidden), int(inter))
    blobs = []
    for j, entries in enumerate(lay.arrays):
        buf = np.zeros(lay.nbytes[j], dtype=np.uint8)
        if j == 0:
            buf[:HEADER_BYTES] = np.frombuffer(pack_header(codec, group_size, int(hidden), int(inter)), np.uint8)
        for proj, aname, dt, shape, off in entries:
            arr = np.ascontiguousarray(enc[proj].segments[j][aname])
            assert arr.dtype == dt and tuple(arr.shape) == tuple(shape), (proj, aname, arr.dtype, arr.shape, dt, shape)
            raw = arr.reshape(-1).view(np.uint8)
            buf[off:off + raw.size] = raw
        blobs.append(buf.view(np.int8))
    return blobs


#: One projection's static decode spec: ((plane j, offset, nbytes) per plane, zero points (offset, R, G)
#: and scales (offset, dtype, R, G) in plane 0, plane_bits, stored_bits, r, slicing).
ProjSpec = tuple[tuple[tuple[int, int, int], ...], tuple[int, int, int], tuple[int, torch.dtype, int, int],
                 tuple[int, ...], int, int, str]


def decode_expert_level(planes: Sequence[torch.Tensor], outs: Sequence[torch.Tensor],
                        spec: tuple[ProjSpec, ...]) -> None:
    """Decode every projection of one matryoshka expert level from its plane bytes into ``outs``.

    A pure tensor function of the planes (1-D uint8, any one device) with everything else static in
    ``spec`` (:meth:`PlaneDecoder.level_spec`), so ``torch.compile`` turns one expert into one call:
    the array views, unpacking and scaling are traced, not rebuilt in Python per use.
    """
    for out, (prefs, zref, sref, plane_bits, stored_bits, r, slicing) in zip(outs, spec):
        bits = [planes[j][off:off + n] for j, off, n in prefs]
        off, rows, groups = zref
        zero = planes[0][off:off + rows * groups].view(rows, groups)
        off, dt, rows, groups = sref
        width = 2 if dt == torch.float16 else 4
        scale = planes[0][off:off + rows * groups * width].view(dt).view(rows, groups)
        decode_level(bits, zero, scale, out, plane_bits=plane_bits, stored_bits=stored_bits, r=r, slicing=slicing)


_COMPILED: dict[str, Any] = {"fn": None, "failed": None}


def compiled_expert_decoder() -> Callable[..., None] | None:
    """``torch.compile(decode_expert_level)`` (built on first use), or None after a compiler failure."""
    if _COMPILED["failed"] is not None:
        return None
    if _COMPILED["fn"] is None:
        _COMPILED["fn"] = torch.compile(decode_expert_level, dynamic=False)
    return _COMPILED["fn"]


def compiled_decode_failure() -> str | None:
    """Why the compiled decode was switched off in this process (None while it works or was never tried)."""
    return _COMPILED["failed"]


def _disable_compiled(exc: BaseException) -> None:
    _COMPILED["failed"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    log.warning("compiled expert decode unavailable (%s); decoding eagerly", _COMPILED["failed"])


def _header_bytes(buf: Any) -> bytes:
    """The header fields (first ``_HEADER.size`` bytes) of plane-0 bytes (bytes, numpy array or CPU tensor)."""
    raw = buf.numpy() if isinstance(buf, torch.Tensor) else np.asarray(bytearray(buf) if isinstance(buf, bytes) else buf)
    return raw.reshape(-1).view(np.uint8)[:_HEADER.size].tobytes()


_TORCH_DTYPES = {np.dtype(np.uint8): torch.uint8, np.dtype(np.float16): torch.float16,
                 np.dtype(np.float32): torch.float32}


@dataclass(frozen=True)
class PlaneDecoder:
    """Decodes the planes of experts that share one header (codec, group size, H, I).

    Works on host arrays and on device tensors alike: :meth:`decode` takes uint8 tensors on any
    torch device (the arrays of each plane are viewed in place, nothing is copied to the host) and
    decodes with the codec's torch twin, so a device-resident arena decodes on its own device.
    The decode is exact integer arithmetic followed by one fp32 rounding per weight (one per
    added term for ``residual``), so every device yields the same bits as the host decode.
    """

    codec: Codec
    layout: PlaneLayout
    shapes: Mapping[str, tuple[int, int]]
    header: bytes  # the header fields this decoder was built from
    _specs: dict[int, tuple] = field(default_factory=dict, compare=False, repr=False)  # level -> level_spec

    @classmethod
    def from_header(cls, header: Any) -> "PlaneDecoder":
        """Build from plane 0's first :data:`HEADER_BYTES` (bytes, numpy array or CPU tensor).

        Raises:
            ModelFormatError: bad magic, version or codec id.
        """
        raw = _header_bytes(header)
        cid, bits, sb, gs, hidden, inter = unpack_header(raw)
        codec = codec_from_header(cid, bits, sb)
        shapes = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
        return cls(codec, plane_layout(codec, gs, hidden, inter), shapes, raw)

    @property
    def compilable(self) -> bool:
        """Whether ``decode(compiled=True)`` fuses this codec's decode (matryoshka levels: exact integer
        steps and one product per weight; ``residual`` adds terms, which a fused kernel could contract
        into FMAs, so it stays eager)."""
        return isinstance(self.codec, MatryoshkaCodec)

    def check_header(self, plane0: Any, what: str = "an expert") -> None:
        """Raise unless ``plane0`` (host bytes of an expert's plane 0) carries this decoder's header.

        Raises:
            ModelFormatError: the header differs (a corrupt shard, or a mix of conversions).
        """
        if _header_bytes(plane0) == self.header:
            return
        other = PlaneDecoder.from_header(plane0)  # raises on a header that is not one
        raise ModelFormatError(f"{what} has a nested header unlike the model's first expert "
                               f"({other.codec.name} vs {self.codec.name}, shapes {dict(other.shapes)} vs "
                               f"{dict(self.shapes)}); the shard set mixes conversions, re-run convert")

    def check_sizes(self, sizes: Sequence[int]) -> None:
        """Raise unless planes of these byte sizes make a level of this layout.

        Raises:
            ModelFormatError: more planes than the codec has levels, or a plane shorter than its layout.
        """
        lay = self.layout
        if len(sizes) > len(lay.nbytes):
            raise ModelFormatError(f"expert has {len(sizes)} planes but its codec has {len(lay.nbytes)} levels; "
                                   "re-run convert")
        for j, size in enumerate(sizes):
            if size < lay.nbytes[j]:
                raise ModelFormatError(f"nested plane {j} holds {size} bytes, its layout needs {lay.nbytes[j]}; "
                                       "the shard is truncated or corrupt, re-run convert")

    def records(self, mems: list[Any]) -> dict[str, EncodedTensor]:
        """Encoded records over planes ``mems`` (uint8 numpy arrays or tensors; views, no copies).

        Raises:
            ModelFormatError: more planes than the codec has levels, or a plane shorter than its layout.
        """
        lay = self.layout
        level = len(mems)
        self.check_sizes([mem.numel() if isinstance(mem, torch.Tensor) else mem.size for mem in mems])
        segs: dict[str, list[dict[str, Any]]] = {p: [{} for _ in range(level)] for p in EXPERT_PROJS}
        for j, mem in enumerate(mems):
            for proj, aname, dt, shape, off in lay.arrays[j]:
                n = int(np.prod(shape)) * dt.itemsize
                raw = mem[off:off + n]
                segs[proj][j][aname] = (raw.view(_TORCH_DTYPES[dt]) if isinstance(raw, torch.Tensor)
                                        else raw.view(dt)).reshape(shape)
        return {p: EncodedTensor(codec=self.codec.name, params=self.codec.params, shape=self.shapes[p],
                                 group_size=lay.group_sizes[p], segments=segs[p]) for p in EXPERT_PROJS}

    def decode(self, planes: list[torch.Tensor], out: Mapping[str, torch.Tensor] | None = None,
               compiled: bool = False) -> dict[str, torch.Tensor]:
        """Decode planes 0..j (uint8 tensors on one device) at level j into fp32 ``{proj: tensor}``.

        Args:
            planes: each plane's bytes (:meth:`ShardedModel.expert_plane_range`), on any device.
            out: optional ``{proj: fp32 tensor}`` of the projections' shapes on the planes' device,
                written in place (a reused scratch buffer); new tensors otherwise.
            compiled: decode matryoshka levels with the ``torch.compile``'d :func:`decode_expert_level`
                (one call per expert, a fused kernel per projection instead of a dozen kernels and
                the Python that sets them up: on a GPU the eager decode is bound by launches and
                host work). Same bits; falls back to the eager decode, with one warning, when the
                compiler is unavailable or fails.

        Returns:
            ``{proj: fp32 tensor}`` on the planes' device, bit-identical to :func:`decode_planes`.
        """
        flat = [p.reshape(-1).view(torch.uint8) for p in planes]
        fused = compiled_expert_decoder() if compiled and self.compilable else None
        if fused is not None:
            self.check_sizes([t.numel() for t in flat])
            outs = out if out is not None else {
                p: torch.empty(self.shapes[p], dtype=torch.float32, device=flat[0].device) for p in EXPERT_PROJS}
            try:
                fused(flat, [outs[p] for p in EXPERT_PROJS], self.level_spec(len(planes)))
                return dict(outs)
            except Exception as exc:  # noqa: BLE001 - any compiler failure: report once, decode eagerly
                _disable_compiled(exc)
        recs = self.records(flat)
        return {p: self.codec.torch_decode(recs[p], len(planes), out=None if out is None else out[p])
                for p in EXPERT_PROJS}

    def level_spec(self, level: int) -> tuple[ProjSpec, ...]:
        """The static spec of :func:`decode_expert_level` for ``level`` planes (matryoshka codecs)."""
        spec = self._specs.get(level)
        if spec is None:
            spec = self._specs[level] = _level_spec(self.layout, self.codec, level)
        return spec


def _level_spec(lay: PlaneLayout, codec: Codec, level: int) -> tuple[ProjSpec, ...]:
    kw = codec.level_spec(level)  # type: ignore[attr-defined]
    spec: list[ProjSpec] = []
    for proj in EXPERT_PROJS:
        where = {(j, aname): (off, dt, shape) for j in range(level) for p, aname, dt, shape, off in lay.arrays[j]
                 if p == proj}
        prefs = tuple((j, where[(j, f"plane{j + 1}")][0], int(np.prod(where[(j, f"plane{j + 1}")][2])))
                      for j in range(level))
        zoff, _, (rows, groups) = where[(0, "zero")]
        soff, sdt, _ = where[(0, "scale")]
        spec.append((prefs, (zoff, rows, groups), (soff, _TORCH_DTYPES[sdt], rows, groups),
                     tuple(kw["plane_bits"]), int(kw["stored_bits"]), int(kw["r"]), str(kw["slicing"])))
    return tuple(spec)


def decode_planes(blobs: list[Any]) -> dict[str, torch.Tensor]:
    """Decode planes 0..j (uint8/int8 arrays or CPU tensors) into fp32 ``{proj: tensor}`` at level j.

    Bit-identical to the codec's :meth:`EncodedTensor.reference_decode` at level j+1.

    Raises:
        ModelFormatError: bad header or planes shorter than the layout.
    """
    mems = [(b.reshape(-1).view(torch.uint8).numpy() if isinstance(b, torch.Tensor)
             else np.asarray(b).reshape(-1).view(np.uint8)) for b in blobs]
    dec = PlaneDecoder.from_header(mems[0][:HEADER_BYTES])
    recs = dec.records(mems)
    return {p: dec.codec.torch_decode(recs[p], len(mems)) for p in EXPERT_PROJS}


def _decoder(planes: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Shard-reader decoder: one blob tensor per plane."""
    return decode_planes([next(iter(p.values())) for p in planes])


# ------------------------------------------------------------------------------------ plain GGML codecs
@dataclass(frozen=True)
class GGMLExpertCodec:
    """Experts stored as one standard GGML block type (``gguf_q8_0`` / ``gguf_q4_0``): one plane, one level."""

    name: str = "gguf_q4_0"

    @property
    def ggml_type(self) -> GGMLQuantizationType:
        return GGML_CODECS[self.name]

    def level_names(self) -> list[str]:
        return [self.name.removeprefix("gguf_")]

    def n_levels(self) -> int:
        return 1

    def plane_decls(self, layer: int, expert: int, shapes: Mapping[str, tuple[int, ...]]) -> list[list[TensorDecl]]:
        kind = self.name.removeprefix("gguf_")
        return [[TensorDecl(C.expert_tensor_name(layer, expert, p, 0, kind), tuple(shapes[p]), self.ggml_type)
                 for p in EXPERT_PROJS]]

    def level_nbytes(self, shapes: Mapping[str, tuple[int, ...]]) -> list[int]:
        return [sum(d.nbytes for d in self.plane_decls(0, 0, shapes)[0])]

    def encode(self, layer: int, expert: int, tensors: Mapping[str, torch.Tensor]) -> list[list[np.ndarray]]:
        return [[gguf_quants.quantize(tensors[p].detach().float().numpy(), self.ggml_type) for p in EXPERT_PROJS]]


def _ggml_decoder(qtype: GGMLQuantizationType):
    def decode(planes: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if len(planes) != 1:
            raise ModelFormatError("GGML-quantized experts have exactly one plane; re-run convert")
        out = {}
        for name, t in planes[0].items():
            parsed = C.parse_expert_tensor_name(name)
            assert parsed is not None
            raw = t.view(torch.uint8).reshape(t.shape[0], -1).numpy()  # [rows, row bytes]
            out[parsed[2]] = torch.from_numpy(np.ascontiguousarray(gguf_quants.dequantize(raw, qtype),
                                                                   dtype=np.float32))
        return out
    return decode


for _name in CODEC_IDS:
    register_expert_decoder(_name, _decoder)
for _name, _qt in GGML_CODECS.items():
    register_expert_decoder(_name, _ggml_decoder(_qt))
