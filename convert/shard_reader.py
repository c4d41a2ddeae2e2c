"""Reader of the moestream shard format: metadata, dense tensors and per-expert byte ranges.

Owns :class:`ShardedModel` (open a shard set, check its structure, answer
where each expert level lives, read and decode ranges with positioned reads)
and the codec decoder table. Layout and checksum rules are those written by
``shard_writer.py`` (read its module docstring first).

Checks, from cheap to lazy:

- at open: GGUF magic and header of every shard, shard count and naming,
  ``split.no``, the conversion id shared by all shards, format version,
  ``general.alignment``, every tensor's range inside its file (file sizes:
  catches truncation), expert planes contiguous and inside one shard,
  digest count = unit count;
- on read: the SHA-256 of each checksum unit (dense tensor or expert plane)
  the read covers; ``verify="once"`` (default) checks a unit the first time
  it is read in this process, ``"always"`` on every read, ``"off"`` never.
  Dense tensors come decoded (:meth:`ShardedModel.read_dense`, GGML blocks
  widened to fp32) or as stored (:meth:`ShardedModel.read_dense_raw`).

Level numbering: level ``j`` (0-based) of an expert = planes ``0..j``; codec
``none`` has exactly one level (0), full precision.

Knows nothing about Hugging Face checkpoints, the engine or the scheduler:
it hands out :class:`ByteRange` records and tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader

from moestream.convert import constants as C
from moestream.convert.errors import ChecksumError, ModelFormatError
from moestream.convert.shard_writer import padded

TORCH_DTYPES: dict[GGMLQuantizationType, torch.dtype] = {
    GGMLQuantizationType.F32: torch.float32,
    GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16,
    GGMLQuantizationType.F64: torch.float64,
    GGMLQuantizationType.I8: torch.int8,
    GGMLQuantizationType.I16: torch.int16,
    GGMLQuantizationType.I32: torch.int32,
    GGMLQuantizationType.I64: torch.int64,
}

VERIFY_MODES = ("once", "always", "off")
#: GGML block-quantized types a dense tensor or a ``gguf_*`` expert plane may use (read as raw bytes,
#: dequantized to fp32 by :meth:`ShardedModel.read_dense` / the codec's decoder, kept as blocks by
#: :meth:`ShardedModel.read_dense_raw`).
QUANTIZED_TYPES = (GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0)


def _row_count(rec: "TensorRecord") -> int:
    """Rows of a tensor (product of all but the last dimension)."""
    n = 1
    for d in rec.shape[:-1]:
        n *= int(d)
    return n


class ByteRange(NamedTuple):
    """One contiguous range of one file (same fields as ``scheduler.loader.ByteRange``).

    ``offset`` and ``nbytes`` are multiples of the format's 4096-byte alignment.
    """

    path: str
    offset: int
    nbytes: int


@dataclass(frozen=True)
class TensorRecord:
    """Where one stored tensor lives.

    Attributes:
        name: GGUF tensor name.
        ggml_type: storage type.
        shape: numpy-order shape.
        path: shard file.
        offset: absolute byte offset of the data in ``path``.
        nbytes: data bytes (the on-disk slot is :attr:`padded_nbytes`).
    """

    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]
    path: str
    offset: int
    nbytes: int

    @property
    def padded_nbytes(self) -> int:
        """Bytes the tensor occupies on disk including alignment padding."""
        return padded(self.nbytes)


class RawDense(NamedTuple):
    """A dense tensor's stored bytes as read (:meth:`ShardedModel.read_dense_raw`)."""

    data: np.ndarray  # uint8 [nbytes]: the tensor's bytes, padding excluded
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]  # element shape, numpy order (rows first)


@dataclass
class ChecksumUnit:
    """A dense tensor or one expert plane, hashed as one range."""

    tensors: tuple[TensorRecord, ...]
    digest: str = ""
    expert: tuple[int, int] | None = None
    plane: int | None = None

    @property
    def range(self) -> ByteRange:
        """The unit's byte range (data plus padding of each tensor)."""
        first, last = self.tensors[0], self.tensors[-1]
        return ByteRange(first.path, first.offset, last.offset + last.padded_nbytes - first.offset)

    def describe(self) -> str:
        """Human words for messages."""
        if self.expert is None:
            return f"tensor {self.tensors[0].name}"
        return f"expert {self.expert[1]} of layer {self.expert[0]} (plane {self.plane})"


# codec name -> decoder(planes: list[dict[tensor_name, Tensor]], records) -> {proj: Tensor}
ExpertDecoder = Callable[[list[dict[str, torch.Tensor]]], dict[str, torch.Tensor]]
EXPERT_DECODERS: dict[str, ExpertDecoder] = {}


def register_expert_decoder(codec: str, decoder: ExpertDecoder) -> None:
    """Register how a codec turns the tensors of planes 0..j into the expert's tensors.

    Args:
        codec: value of ``moestream.expert.codec``.
        decoder: called with one ``{tensor_name: tensor}`` dict per plane
            (views into the read buffer); returns ``{proj: tensor}``.
    """
    EXPERT_DECODERS[codec] = decoder


def _decode_none(planes: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Codec ``none``: plane 0 holds ``{proj}.weight`` tensors as stored (no copy)."""
    if len(planes) != 1:
        raise ValueError("codec 'none' has exactly one plane")
    out = {}
    for name, t in planes[0].items():
        parsed = C.parse_expert_tensor_name(name)
        assert parsed is not None
        out[parsed[2]] = t
    return out


register_expert_decoder(C.CODEC_NONE, _decode_none)


def read_range(fd: int, offset: int, nbytes: int, path: str) -> bytearray:
    """Positioned read of exactly ``nbytes`` at ``offset`` into a new writable buffer.

    Raises:
        ModelFormatError: the file ends early (truncated).
    """
    buf = bytearray(nbytes)
    view = memoryview(buf)
    got = 0
    while got < nbytes:
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            raise ModelFormatError(f"{path}: file ends at byte {offset + got}, expected data up to "
                                   f"{offset + nbytes}; the shard is truncated, re-run convert or re-copy it")
        got += n
    return buf


def _as_uint8_tensor(buf: Any) -> torch.Tensor:
    """A flat uint8 tensor over ``buf`` without copying when ``buf`` is writable."""
    if isinstance(buf, torch.Tensor):
        return buf.reshape(-1).view(torch.uint8)
    mv = memoryview(buf)
    if mv.readonly:
        mv = memoryview(bytearray(mv))  # torch needs writable memory; one copy for read-only input
    return torch.frombuffer(mv.cast("B"), dtype=torch.uint8)


def tensor_from_buffer(raw: torch.Tensor, rec: TensorRecord, start: int) -> torch.Tensor:
    """View ``rec``'s data at ``start`` of the flat uint8 tensor ``raw`` as a typed tensor."""
    dtype = TORCH_DTYPES.get(rec.ggml_type)
    if dtype is None and rec.ggml_type in QUANTIZED_TYPES:  # GGML block types: raw bytes [rows, row_bytes]
        return raw[start:start + rec.nbytes].view(_row_count(rec), -1)
    if dtype is None:
        raise NotImplementedError(f"tensor {rec.name}: storage type {rec.ggml_type.name} has no torch decoder yet")
    return raw[start:start + rec.nbytes].view(dtype).view(rec.shape)


class ShardedModel:
    """An opened moestream shard set. Use :meth:`open`.

    Attributes:
        paths: shard files, shard 1 first.
        metadata: every scalar/string key of shard 1 (digests excluded).
        config: the HF config dict.
        model_type: HF ``model_type``.
        tokenizer_json: the HF ``tokenizer.json`` text, or ``None``.
        chat_template: the chat template, or ``None``.
        codec: expert codec (``none`` in format v1).
    """

    def __init__(self, paths: list[Path], metadata: dict[str, Any], tensors: list[TensorRecord],
                 units: list[ChecksumUnit], verify: str) -> None:
        """Use :meth:`open`."""
        self.paths = paths
        self.metadata = metadata
        self.verify = verify
        self._tensors = {t.name: t for t in tensors}
        self._units = units
        self._dense: dict[str, ChecksumUnit] = {}
        self._planes: dict[tuple[int, int], list[ChecksumUnit]] = {}
        for u in units:
            if u.expert is None:
                self._dense[u.tensors[0].name] = u
            else:
                self._planes.setdefault(u.expert, []).append(u)
        self._verified: set[int] = set()
        self._fds: dict[str, int] = {}
        shard1 = paths[0]
        for key in (C.KEY_HF_CONFIG, C.KEY_MODEL_TYPE, C.KEY_TOKENIZER_HF_JSON, C.KEY_CHAT_TEMPLATE,
                    C.KEY_EXPERT_CODEC):
            if key in metadata and not isinstance(metadata[key], str):
                raise ModelFormatError(f"{shard1}: metadata {key} is not a UTF-8 string; the file is corrupt, "
                                       "re-run convert or re-copy it")
        try:
            self.config: dict[str, Any] = json.loads(metadata[C.KEY_HF_CONFIG])
        except KeyError:
            raise ModelFormatError(f"{shard1}: no {C.KEY_HF_CONFIG} metadata (the model config); "
                                   "this file was not written by `moestream convert`, re-run it") from None
        except (json.JSONDecodeError, RecursionError) as exc:
            raise ModelFormatError(f"{shard1}: {C.KEY_HF_CONFIG} is not valid JSON ({exc}); re-run convert") from exc
        if not isinstance(self.config, dict):
            raise ModelFormatError(f"{shard1}: {C.KEY_HF_CONFIG} is not a JSON object; re-run convert")
        self.model_type: str = metadata.get(C.KEY_MODEL_TYPE) or self.config.get("model_type", "")
        if not self.model_type or not isinstance(self.model_type, str):
            raise ModelFormatError(f"{shard1}: no model_type in metadata or config; re-run convert")
        self.tokenizer_json: str | None = metadata.get(C.KEY_TOKENIZER_HF_JSON)
        self.chat_template: str | None = metadata.get(C.KEY_CHAT_TEMPLATE)
        self.codec: str = metadata.get(C.KEY_EXPERT_CODEC, C.CODEC_NONE)
        if self.codec not in EXPERT_DECODERS:
            raise ModelFormatError(f"{shard1}: expert codec {self.codec!r} is not supported by this moestream "
                                   f"(supported: {sorted(EXPERT_DECODERS)}); upgrade moestream")

    # --- opening ---------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, verify: str = "once") -> "ShardedModel":
        """Open a converted model.

        Args:
            path: the output folder of ``moestream convert`` or its shard-1 file
                (any shard of the set is accepted and redirected to shard 1).
            verify: checksum policy on reads: ``once`` | ``always`` | ``off``.

        Returns:
            The opened model (only headers were read).

        Raises:
            ModelFormatError: missing/truncated/foreign shard, bad magic,
                inconsistent metadata, or an incomplete conversion; the message
                names the file and what to do.
            ValueError: unknown ``verify`` mode.
        """
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
        paths = _shard_paths(Path(path))
        metadata, tensors = _read_shard(paths[0])
        _check_shard_meta(paths[0], metadata, 0, len(paths), None)
        model_id = metadata.get(C.KEY_MODEL_ID)
        for i, p in enumerate(paths[1:], start=1):
            meta_i, tensors_i = _read_shard(p)
            _check_shard_meta(p, meta_i, i, len(paths), model_id)
            tensors += tensors_i
        expected = metadata.get(C.KEY_SPLIT_TENSORS_COUNT, len(tensors))
        if expected != len(tensors):
            raise ModelFormatError(f"{paths[0]}: metadata says {expected} tensors, the shards hold {len(tensors)}; "
                                   "the shard set is inconsistent, re-run convert")
        units = _build_units(tensors)
        _attach_digests(paths[0], metadata, units)
        metadata.pop(C.KEY_CHECKSUM_DIGESTS, None)
        return cls(paths, metadata, tensors, units, verify)

    def close(self) -> None:
        """Close file descriptors (reads reopen them)."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "ShardedModel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: os may already be gone
            pass

    # --- catalogue -------------------------------------------------------------------
    def tensor_records(self) -> list[TensorRecord]:
        """Every stored tensor, in file order."""
        return list(self._tensors.values())

    def dense_names(self) -> list[str]:
        """Names of dense (non-routed-expert) tensors, in file order."""
        return list(self._dense)

    def dense_record(self, name: str) -> TensorRecord:
        """Where dense tensor ``name`` lives.

        Raises:
            KeyError: no such dense tensor.
        """
        return self._dense[name].tensors[0]

    def expert_keys(self) -> list[tuple[int, int]]:
        """``(layer, expert)`` of every stored routed expert, in file order."""
        return list(self._planes)

    def experts_by_layer(self) -> dict[int, list[int]]:
        """Stored expert ids per MoE layer."""
        out: dict[int, list[int]] = {}
        for layer, expert in self._planes:
            out.setdefault(layer, []).append(expert)
        return out

    def n_levels(self, layer: int, expert: int) -> int:
        """How many levels (= planes) expert ``(layer, expert)`` has stored."""
        return len(self._expert_planes(layer, expert))

    def _expert_planes(self, layer: int, expert: int) -> list[ChecksumUnit]:
        try:
            return self._planes[(layer, expert)]
        except KeyError:
            raise KeyError(f"no routed expert {expert} in layer {layer} in {self.paths[0]}") from None

    def _level_planes(self, layer: int, expert: int, level: int) -> list[ChecksumUnit]:
        planes = self._expert_planes(layer, expert)
        if not 0 <= level < len(planes):
            raise ValueError(f"expert {expert} of layer {layer} has levels 0..{len(planes) - 1}, asked for {level}")
        return planes[:level + 1]

    def expert_range(self, layer: int, expert: int, level: int = 0) -> ByteRange:
        """The ONE contiguous byte range holding expert ``(layer, expert)`` at ``level``.

        Offset and length are page (4096) multiples, ready for O_DIRECT.

        Raises:
            KeyError: no such expert. ValueError: no such level.
        """
        planes = self._level_planes(layer, expert, level)
        first, last = planes[0].range, planes[-1].range
        return ByteRange(first.path, first.offset, last.offset + last.nbytes - first.offset)

    def expert_plane_range(self, layer: int, expert: int, plane: int) -> ByteRange:
        """Byte range of one plane (what upgrading from level plane-1 to plane reads)."""
        return self._level_planes(layer, expert, plane)[-1].range

    def expert_nbytes(self, layer: int, expert: int, level: int = 0) -> int:
        """Bytes of the expert's level range (what one read of it transfers)."""
        return self.expert_range(layer, expert, level).nbytes

    def dense_nbytes(self) -> int:
        """Bytes of all dense tensors on disk (padding included)."""
        return sum(u.range.nbytes for u in self._dense.values())

    # --- reading ---------------------------------------------------------------------
    def _fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise ModelFormatError(f"{path}: shard disappeared after open; re-copy the model") from None
            self._fds[path] = fd
        return fd

    def _read(self, rng: ByteRange) -> bytearray:
        return read_range(self._fd(rng.path), rng.offset, rng.nbytes, rng.path)

    def _verify_unit(self, unit: ChecksumUnit, data: memoryview) -> None:
        if self.verify == "off" or (self.verify == "once" and id(unit) in self._verified):
            return
        got = hashlib.sha256(data).hexdigest()
        if got != unit.digest:
            rng = unit.range
            raise ChecksumError(f"{rng.path}: checksum mismatch in {unit.describe()} (bytes {rng.offset}.."
                                f"{rng.offset + rng.nbytes}); the file is corrupt, re-run convert or re-copy it")
        self._verified.add(id(unit))

    def _read_dense_unit(self, name: str) -> tuple[bytearray, TensorRecord]:
        """One positioned read of dense tensor ``name``'s checksum unit (data + padding), verified."""
        unit = self._dense[name]
        buf = self._read(unit.range)
        self._verify_unit(unit, memoryview(buf))
        return buf, unit.tensors[0]

    def read_dense_raw(self, name: str) -> RawDense:
        """Read one dense tensor's stored bytes as they are (GGML blocks stay blocks), checksum-verified.

        One positioned read, like :meth:`read_dense`, but nothing is decoded or widened: a Q8_0 / Q4_0
        matrix comes back as its block bytes, ready for ``engine/dense_kernels.pack_ggml``.

        Returns:
            A :class:`RawDense`: ``data`` (uint8, exactly the tensor's bytes, padding excluded), its
            GGML type and its element shape (numpy order).

        Raises:
            KeyError: no such dense tensor. ChecksumError: corrupt bytes.
            ModelFormatError: truncated file.
        """
        buf, rec = self._read_dense_unit(name)
        return RawDense(np.frombuffer(buf, dtype=np.uint8, count=rec.nbytes), rec.ggml_type, rec.shape)

    def read_dense(self, name: str) -> torch.Tensor:
        """Read one dense tensor (stored dtype, numpy-order shape) with one positioned read.

        GGML block types (Q8_0 / Q4_0) are dequantized to fp32; :meth:`read_dense_raw` keeps them.

        Raises:
            KeyError: no such dense tensor. ChecksumError: corrupt bytes.
            ModelFormatError: truncated file.
        """
        buf, rec = self._read_dense_unit(name)
        t = tensor_from_buffer(_as_uint8_tensor(buf), rec, 0)
        if rec.ggml_type in QUANTIZED_TYPES:  # block types: dequantize with gguf-py (fp32, element shape)
            from gguf import quants as gguf_quants

            return torch.from_numpy(gguf_quants.dequantize(t.numpy(), rec.ggml_type).astype("float32")
                                    .reshape(rec.shape))
        return t

    def read_expert_bytes(self, layer: int, expert: int, level: int = 0) -> bytearray:
        """Raw bytes of the expert's level range, read with one positioned read (no decoding)."""
        return self._read(self.expert_range(layer, expert, level))

    def verify_expert_bytes(self, layer: int, expert: int, level: int, buf: Any) -> None:
        """Check the digests of planes ``0..level`` against ``buf`` (the level range's bytes).

        Raises:
            ChecksumError: a plane's bytes do not match (names file, layer, expert, plane).
        """
        planes = self._level_planes(layer, expert, level)
        base = planes[0].range.offset
        mv = memoryview(buf).cast("B") if not isinstance(buf, torch.Tensor) else memoryview(buf.numpy()).cast("B")
        for unit in planes:
            r = unit.range
            self._verify_unit(unit, mv[r.offset - base:r.offset - base + r.nbytes])

    def verify_expert_plane(self, layer: int, expert: int, plane: int, buf: Any) -> None:
        """Check the digest of ONE plane against ``buf`` (the bytes of :meth:`expert_plane_range`).

        Raises:
            ChecksumError: the bytes do not match (names file, layer, expert, plane).
        """
        unit = self._level_planes(layer, expert, plane)[-1]
        mv = memoryview(buf).cast("B") if not isinstance(buf, torch.Tensor) else memoryview(buf.numpy()).cast("B")
        self._verify_unit(unit, mv[:unit.range.nbytes])

    def decode_expert_planes(self, layer: int, expert: int, buffers: Sequence[Any]) -> dict[str, torch.Tensor]:
        """Decode an expert at level ``len(buffers) - 1`` from its planes held in separate buffers.

        Args:
            layer, expert: which expert.
            buffers: plane ``j``'s bytes (:meth:`expert_plane_range`) for j = 0..level, each writable
                (numpy arrays or uint8 tensors; views are made without copying). Not verified here.

        Returns:
            ``{proj: tensor}`` exactly as :meth:`decode_expert_bytes` returns for that level.

        Raises:
            ValueError: more buffers than stored planes, or a buffer shorter than its plane.
        """
        units = self._level_planes(layer, expert, len(buffers) - 1)
        planes = []
        for unit, buf in zip(units, buffers):
            raw = _as_uint8_tensor(buf)
            if raw.numel() < unit.range.nbytes:
                raise ValueError(f"plane buffer holds {raw.numel()} bytes, the plane is {unit.range.nbytes}")
            planes.append({t.name: tensor_from_buffer(raw, t, t.offset - unit.range.offset) for t in unit.tensors})
        return EXPERT_DECODERS[self.codec](planes)

    def decode_expert_bytes(self, layer: int, expert: int, level: int, buf: Any,
                            verify: bool = True) -> dict[str, torch.Tensor]:
        """Turn the bytes of :meth:`expert_range` into the expert's tensors.

        Tensors are views into ``buf`` (no copy) when ``buf`` is writable
        (bytearray, numpy array, uint8 torch tensor); a read-only buffer is
        copied once.

        Args:
            layer, expert, level: which expert level ``buf`` holds.
            buf: exactly the bytes of ``expert_range(layer, expert, level)``
                (longer is allowed: extra bytes are ignored).
            verify: check digests per the model's ``verify`` policy.

        Returns:
            ``{proj: tensor}``; for codec ``none`` ``gate_proj``/``up_proj``
            ``[I, H]`` and ``down_proj`` ``[H, I]`` in the stored dtype.

        Raises:
            ChecksumError: corrupt bytes. ValueError: ``buf`` is too short.
        """
        rng = self.expert_range(layer, expert, level)
        raw = _as_uint8_tensor(buf)
        if raw.numel() < rng.nbytes:
            raise ValueError(f"buffer holds {raw.numel()} bytes, expert level range is {rng.nbytes}")
        if verify:
            self.verify_expert_bytes(layer, expert, level, raw[:rng.nbytes])
        planes = []
        for unit in self._level_planes(layer, expert, level):
            planes.append({t.name: tensor_from_buffer(raw, t, t.offset - rng.offset) for t in unit.tensors})
        return EXPERT_DECODERS[self.codec](planes)

    decode_expert = decode_expert_bytes  # the name docs/DESIGN.md uses

    def read_expert(self, layer: int, expert: int, level: int = 0) -> dict[str, torch.Tensor]:
        """Read and decode one expert level with ONE positioned read of exactly its range.

        Returns:
            ``{proj: tensor}`` as :meth:`decode_expert_bytes`.
        """
        return self.decode_expert_bytes(layer, expert, level, self.read_expert_bytes(layer, expert, level))

    # --- summary ---------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """A JSON-ready description: shards, tensor counts, bytes per expert, metadata."""
        per_file: dict[str, int] = {}
        for t in self._tensors.values():
            per_file[t.path] = per_file.get(t.path, 0) + 1
        shards = [{"path": str(p), "file_bytes": os.path.getsize(p), "tensors": per_file.get(str(p), 0)}
                  for p in self.paths]
        per_layer = self.experts_by_layer()
        level_bytes: dict[int, list[int]] = {}
        for (layer, expert), planes in self._planes.items():
            for j in range(len(planes)):
                level_bytes.setdefault(j, []).append(self.expert_nbytes(layer, expert, j))
        meta = {k: v for k, v in self.metadata.items()
                if k not in (C.KEY_HF_CONFIG, C.KEY_TOKENIZER_HF_JSON, C.KEY_CHAT_TEMPLATE)}
        return {
            "model_type": self.model_type,
            "codec": self.codec,
            "shards": shards,
            "tensor_count": len(self._tensors),
            "dense_tensor_count": len(self._dense),
            "dense_bytes": self.dense_nbytes(),
            "moe_layers": len(per_layer),
            "experts_per_layer": {str(k): len(v) for k, v in per_layer.items()},
            "expert_count": len(self._planes),
            "expert_level_bytes": {str(j): {"min": min(b), "max": max(b), "total": sum(b)}
                                   for j, b in level_bytes.items()},
            "has_tokenizer": self.tokenizer_json is not None,
            "has_chat_template": self.chat_template is not None,
            "metadata": meta,
        }


# --- opening helpers -----------------------------------------------------------------------
def _shard_paths(path: Path) -> list[Path]:
    """Find the shard set that ``path`` (folder or shard file) names; shard 1 first."""
    if path.is_dir():
        return _shard_paths_in_folder(path)
    if not path.exists():
        partial = path.with_name(path.name + C.PARTIAL_SUFFIX)
        if partial.exists():
            raise ModelFormatError(f"{path}: conversion incomplete, re-run convert (only {partial.name} exists)")
        raise ModelFormatError(f"{path}: no such file or folder; pass a converted model folder or its shard-1 .gguf")
    m = C.SHARD_NAME_RE.match(path.name)
    if m is None:
        return [path]  # a single GGUF without split naming
    return _expand_set(path.parent, m.group("stem"), int(m.group("count")))


def _shard_paths_in_folder(folder: Path) -> list[Path]:
    stems = {}
    for p in sorted(folder.glob("*.gguf")):
        m = C.SHARD_NAME_RE.match(p.name)
        if m is not None:
            stems.setdefault(m.group("stem"), int(m.group("count")))
    if not stems:
        partials = sorted(folder.glob("*.gguf" + C.PARTIAL_SUFFIX))
        if partials:
            raise ModelFormatError(f"{folder}: conversion incomplete, re-run convert (only .partial files such as "
                                   f"{partials[0].name})")
        if (folder / C.CONVERT_STATE_FILE).is_file():
            raise ModelFormatError(f"{folder}: conversion incomplete, re-run convert to resume it")
        singles = sorted(folder.glob("*.gguf"))
        if len(singles) == 1:
            return singles
        raise ModelFormatError(f"{folder}: no moestream model (*-00001-of-NNNNN.gguf); run `moestream convert` first")
    if len(stems) > 1:
        raise ModelFormatError(f"{folder}: holds several shard sets ({sorted(stems)}); pass the shard-1 file you want")
    stem, count = next(iter(stems.items()))
    return _expand_set(folder, stem, count)


def _expand_set(folder: Path, stem: str, count: int) -> list[Path]:
    paths = [folder / C.shard_name(stem, i + 1, count) for i in range(count)]
    for p in paths:
        if not p.is_file():
            partial = p.with_name(p.name + C.PARTIAL_SUFFIX)
            if partial.exists():
                raise ModelFormatError(f"{p}: conversion incomplete, re-run convert ({partial.name} exists, the shard does not)")
            if (folder / C.CONVERT_STATE_FILE).is_file():
                raise ModelFormatError(f"{p}: conversion incomplete (interrupted), re-run convert to resume it")
            raise ModelFormatError(f"{p}: shard missing (the model has {count} shards); re-copy it or re-run convert")
    return paths


def _field_value(field_: Any) -> Any:
    try:
        return field_.contents()
    except (ValueError, IndexError, UnicodeDecodeError):
        return None


def _read_shard(path: Path) -> tuple[dict[str, Any], list[TensorRecord]]:
    """Parse one shard's header; check every tensor's range is inside the file."""
    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError, TypeError, UnicodeDecodeError) as exc:
        raise ModelFormatError(f"{path}: not a valid GGUF file ({exc}); it is corrupt or truncated, "
                               "re-run convert or re-copy it") from exc
    except OSError as exc:
        raise ModelFormatError(f"{path}: cannot be read ({exc})") from exc
    metadata = {name: _field_value(f) for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    size = os.path.getsize(path)
    records = []
    for t in reader.tensors:
        rec = TensorRecord(t.name, GGMLQuantizationType(t.tensor_type), tuple(int(d) for d in reversed(t.shape)),
                           str(path), int(t.data_offset), int(t.n_bytes))
        if rec.offset + rec.nbytes > size:
            raise ModelFormatError(f"{path}: truncated ({size} bytes, tensor {rec.name} needs up to byte "
                                   f"{rec.offset + rec.nbytes}); re-run convert or re-copy the file")
        records.append(rec)
    del reader
    return metadata, records


def _check_shard_meta(path: Path, meta: Mapping[str, Any], index: int, count: int, model_id: str | None) -> None:
    arch = meta.get(C.KEY_ARCHITECTURE)
    if arch != C.ARCH:
        raise ModelFormatError(f"{path}: architecture {arch!r} is not a moestream model; "
                               "convert the Hugging Face checkpoint with `moestream convert`")
    version = meta.get(C.KEY_FORMAT_VERSION)
    if not isinstance(version, int) or version > C.FORMAT_VERSION or version < 1:
        raise ModelFormatError(f"{path}: format version {version!r}, this moestream reads 1..{C.FORMAT_VERSION}; "
                               "upgrade moestream or re-run convert")
    if meta.get(C.KEY_ALIGNMENT) != C.ALIGNMENT:
        raise ModelFormatError(f"{path}: alignment {meta.get(C.KEY_ALIGNMENT)!r}, expected {C.ALIGNMENT}; re-run convert")
    no, n = meta.get(C.KEY_SPLIT_NO, 0), meta.get(C.KEY_SPLIT_COUNT, 1)
    if no != index or n != count:
        raise ModelFormatError(f"{path}: says it is shard {no + 1 if isinstance(no, int) else no} of {n}, expected "
                               f"{index + 1} of {count}; the shard set is mixed up, re-copy it or re-run convert")
    if model_id is not None and meta.get(C.KEY_MODEL_ID) != model_id:
        raise ModelFormatError(f"{path}: belongs to a different conversion than shard 1; "
                               "re-copy all shards of one conversion")


def _build_units(tensors: list[TensorRecord]) -> list[ChecksumUnit]:
    """Group tensors (file order) into checksum units; check expert planes are contiguous."""
    units: list[ChecksumUnit] = []
    last_plane: dict[tuple[int, int], int] = {}
    for t in tensors:
        parsed = C.parse_expert_tensor_name(t.name)
        if parsed is None:
            units.append(ChecksumUnit((t,)))
            continue
        layer, expert, _proj, plane, _kind = parsed
        key = (layer, expert)
        prev = units[-1] if units else None
        if prev is not None and prev.expert == key and prev.plane == plane:
            end = prev.tensors[-1]
            if t.path != end.path or t.offset != end.offset + end.padded_nbytes:
                raise ModelFormatError(f"{t.path}: tensor {t.name} does not follow the rest of its plane; "
                                       "the file was not written by moestream, re-run convert")
            prev.tensors += (t,)
            continue
        expected_plane = last_plane.get(key, -1) + 1
        continues = prev is not None and prev.expert == key
        if plane != expected_plane or (plane > 0 and not continues):
            raise ModelFormatError(f"{t.path}: planes of expert {expert} of layer {layer} are not stored "
                                   "consecutively in level order; re-run convert")
        if continues:
            end = prev.tensors[-1]
            if t.path != end.path or t.offset != end.offset + end.padded_nbytes:
                raise ModelFormatError(f"{t.path}: expert {expert} of layer {layer} is not one contiguous range; "
                                       "re-run convert")
        units.append(ChecksumUnit((t,), expert=key, plane=plane))
        last_plane[key] = plane
    return units


def _attach_digests(shard1: Path, metadata: Mapping[str, Any], units: list[ChecksumUnit]) -> None:
    algo = metadata.get(C.KEY_CHECKSUM_ALGO)
    digests = metadata.get(C.KEY_CHECKSUM_DIGESTS)
    if algo != C.CHECKSUM_ALGO or not isinstance(digests, str):
        raise ModelFormatError(f"{shard1}: no {C.CHECKSUM_ALGO} checksums in metadata; re-run convert")
    n = C.CHECKSUM_HEX_LEN
    if len(digests) != n * len(units):
        raise ModelFormatError(f"{shard1}: {len(digests) // n} checksums for {len(units)} tensor groups; "
                               "the shard set is inconsistent, re-run convert")
    if digests.startswith("0" * n):
        raise ModelFormatError(f"{shard1}: conversion incomplete, re-run convert (checksums were never filled in)")
    for i, u in enumerate(units):
        u.digest = digests[i * n:(i + 1) * n]


# Nested and GGML expert codecs (convert/nested_planes.py) register their decoders on import;
# imported last so that module finds register_expert_decoder defined.
from moestream.convert import nested_planes as _nested_planes  # noqa: E402,F401
