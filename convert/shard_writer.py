"""Streaming writer of the moestream shard format (GGUF, page-aligned, split by size).

Owns the on-disk layout decisions of format v1:

- **Declare, then stream.** Every tensor is declared first (name, shape, GGML
  type) so each shard's header and tensor-info table can be written before
  any data; then the data is written one tensor at a time in declaration
  order, so a model is never all in memory. One gguf-py ``GGUFWriter`` per
  shard (gguf-py's own ``split_max_size`` splits between any two tensors and
  could cut an expert in half; ours never does).
- **Alignment 4096** (``general.alignment``): every tensor starts on a page
  and is zero-padded to a page, so every expert plane and every level range
  has a page-aligned offset and a page-multiple length (O_DIRECT-ready).
- **Experts as planes.** A routed expert is declared as planes 0..P-1, each a
  list of tensors; planes are written consecutively in increasing order, so
  *level j = planes 0..j* is ONE contiguous byte range. Codec ``none``
  (v1) has one plane holding ``gate_proj``, ``up_proj``, ``down_proj``.
- **Shards.** Files ``{stem}-{no:05d}-of-{count:05d}.gguf``; a new shard starts
  when the next *group* (one dense tensor, or one whole expert with all its
  planes) would push the current shard's tensor data past ``max_shard_size``;
  a group never straddles two shards. All model metadata lives in shard 1;
  every shard carries ``split.no`` (0-based), ``split.count``,
  ``split.tensors.count``, ``general.alignment``, the format version and the
  conversion's ``moestream.model_id`` (random, or derived from the resume
  fingerprint; so shards of two different conversions cannot be mixed).
- **Checksums.** One SHA-256 per *checksum unit*: a dense tensor, or one
  expert plane, hashed over its exact on-disk byte range (data plus zero
  padding, i.e. the bytes a positioned read of that range returns). The hex
  digests of all units, concatenated in file order (shard 1 first, tensors in
  order, a unit = a dense tensor or a run of consecutive tensors of the same
  ``(layer, expert, plane)``), are stored in shard 1 under
  ``moestream.checksum.digests``. Hashes are computed while the data
  streams; the key is written first as a fixed-length placeholder and filled
  in place at the end. The reader checks file sizes at open (cheap) and
  verifies a unit's digest when that range is read (lazily), never the whole
  multi-GB shard at open.
- **Atomic completion.** Shards are written as ``<name>.partial``; shards
  2..N are fsynced and renamed into place as soon as each is complete, shard 1
  (which holds every digest) only after all others, once its digests are in
  place. A folder without shard 1 never loads (the reader says "conversion
  incomplete, re-run convert").
- **Page cache.** Written data is handed to writeback and dropped from the
  page cache every :data:`DROP_CACHE_EVERY` bytes (``POSIX_FADV_DONTNEED``)
  and when a shard is complete, so writing a model holds a bounded amount of
  dirty and cached pages whatever its size (a cgroup counts them).
- **Resume.** Given a ``resume_key`` (the caller's fingerprint of its input
  and options), the writer keeps ``.convert-state.json`` beside the shards
  (``resume.py``): each completed shard is recorded after its rename, and a
  later writer with the same key and layout verifies those shards and skips
  them (:meth:`ShardSetWriter.resumed` tells the caller which tensors need no
  data); anything else is redone, a different key starts clean. The model id
  is then derived from the fingerprint, so a resumed set is byte-identical to
  an uninterrupted one.

Knows nothing about Hugging Face checkpoints, dtype policy or codecs: callers
hand it declared tensors and numpy arrays.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFWriter

from moestream.convert import constants as C
from moestream.convert.errors import ModelFormatError
from moestream.convert.page_cache import drop_cached_pages
from moestream.convert.resume import (
    ResumeState, ShardRecord, conversion_fingerprint, fsync_dir, model_id_for, record_shard, verify_shard,
)

log = logging.getLogger("moestream")
MetaValue = str | int | float | bool
#: Bytes written between two hand-offs of the written pages to writeback + page-cache drops.
DROP_CACHE_EVERY = 64 << 20


@dataclass(frozen=True)
class TensorDecl:
    """One tensor to be written.

    Attributes:
        name: GGUF tensor name (at most 63 bytes).
        shape: numpy-order shape (row-major, last dim contiguous).
        ggml_type: storage type (F32, F16, BF16, I8, ...).
    """

    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLQuantizationType

    @property
    def nbytes(self) -> int:
        """Exact data bytes (without padding)."""
        return tensor_nbytes(self.shape, self.ggml_type)


@dataclass
class _Unit:
    """A checksum unit: a dense tensor or one expert plane."""

    tensors: list[TensorDecl]
    group: int  # placement group (a dense tensor, or a whole expert)
    expert: tuple[int, int] | None = None  # (layer, expert) for expert planes
    plane: int | None = None
    digest: str | None = None


class WriterState(enum.Enum):
    """Lifecycle of a :class:`ShardSetWriter`."""

    DECLARING = enum.auto()  # add_dense / add_expert_plane allowed
    WRITING = enum.auto()  # headers written; write() in declaration order
    DONE = enum.auto()  # renamed into place
    ABORTED = enum.auto()  # partial files removed


def tensor_nbytes(shape: Sequence[int], ggml_type: GGMLQuantizationType) -> int:
    """Data bytes of a tensor of ``shape`` (numpy order) stored as ``ggml_type``.

    Raises:
        ValueError: the last dimension is not a multiple of the type's block size.
    """
    block, type_size = GGML_QUANT_SIZES[ggml_type]
    n = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
    if shape and shape[-1] % block != 0:
        raise ValueError(f"last dim {shape[-1]} is not a multiple of {ggml_type.name} block size {block}")
    return n // block * type_size


def padded(nbytes: int, alignment: int = C.ALIGNMENT) -> int:
    """``nbytes`` rounded up to a multiple of ``alignment``."""
    return (nbytes + alignment - 1) // alignment * alignment


def _check_name(name: str) -> None:
    if len(name.encode("utf-8")) > C.GGUF_MAX_NAME_BYTES:
        raise ModelFormatError(
            f"tensor name {name!r} is {len(name.encode())} bytes; GGUF allows at most "
            f"{C.GGUF_MAX_NAME_BYTES}. This checkpoint needs a shorter canonical name; please report it.")


class ShardSetWriter:
    """Writes one model as a set of GGUF shards; see the module docstring for the layout.

    Usage::

        w = ShardSetWriter(out_dir, metadata, max_shard_size=2 * 2**30)
        w.add_dense(TensorDecl(...)); w.add_expert_plane(layer, expert, 0, [...])
        w.begin()                      # writes headers of every shard
        for decl in w.pending(): w.write(decl.name, array)   # declaration order
        paths = w.finish()             # checksums in place, partial files renamed

    On any exception between ``begin`` and ``finish`` call :meth:`abort` (the
    context-manager form does it) so no partial files are left behind (a
    resumable writer keeps its completed shards and their record).
    """

    def __init__(self, out_dir: str | Path, metadata: Mapping[str, MetaValue], max_shard_size: int = 0,
                 stem: str = C.DEFAULT_STEM, resume_key: Mapping[str, Any] | None = None,
                 resume: bool = True) -> None:
        """Prepare a writer.

        Args:
            out_dir: existing output folder.
            metadata: keys for shard 1 (config JSON, tokenizer, hyper-parameters...).
                Python ``str``/``bool``/``int``/``float`` map to GGUF string/bool/
                u32 (or i64 when out of range)/f32.
            max_shard_size: tensor-data bytes per shard before starting a new
                one (0 = a single shard). One group larger than this gets a
                shard of its own.
            stem: file-name stem of the shards.
            resume_key: JSON-ready fingerprint of the input and options; makes the
                writer resumable (module docstring). None: not resumable, random model id.
            resume: with a ``resume_key``, reuse the verified shards of an interrupted
                conversion with the same fingerprint (False: start clean).
        """
        self.out_dir = Path(out_dir)
        self.metadata = dict(metadata)
        self.max_shard_size = int(max_shard_size)
        self.stem = stem
        self.model_id = str(uuid.uuid4())
        self.resume_key = dict(resume_key) if resume_key is not None else None
        self.resume = resume
        self.state = WriterState.DECLARING
        self._units: list[_Unit] = []
        self._names: set[str] = set()
        self._n_groups = 0
        self._last_expert: tuple[int, int] | None = None
        self._last_plane = -1
        self._seen_experts: set[tuple[int, int]] = set()
        # filled by begin()
        self._shard_of_group: list[int] = []
        self._writers: dict[int, GGUFWriter] = {}  # shards being written (not resumed)
        self._partials: list[Path] = []
        self._finals: list[Path] = []
        self._order: list[tuple[TensorDecl, _Unit, int]] = []  # (decl, unit, shard), resumed shards left out
        self._shard_units: list[list[_Unit]] = []
        self._resumed: dict[int, ShardRecord] = {}  # shard index -> verified record of an earlier run
        self._resumed_names: set[str] = set()
        self._renamed: list[Path] = []
        self._undropped = 0  # bytes written since the last page-cache drop
        self._resume_state: ResumeState | None = None
        self._cursor = 0
        self._hash: "hashlib._Hash | None" = None
        self._zeros = bytes(C.ALIGNMENT)

    # --- declaring -------------------------------------------------------------------
    def _declare(self, tensors: Sequence[TensorDecl]) -> None:
        if self.state is not WriterState.DECLARING:
            raise RuntimeError(f"cannot declare tensors in state {self.state.name}")
        for t in tensors:
            _check_name(t.name)
            if t.name in self._names:
                raise ValueError(f"tensor {t.name!r} declared twice")
            self._names.add(t.name)

    def add_dense(self, decl: TensorDecl) -> None:
        """Declare one dense (always-resident) tensor; it is its own group and unit."""
        self._declare([decl])
        self._units.append(_Unit([decl], self._n_groups))
        self._n_groups += 1
        self._last_expert = None

    def add_expert_plane(self, layer: int, expert: int, plane: int, tensors: Sequence[TensorDecl]) -> None:
        """Declare plane ``plane`` of routed expert ``(layer, expert)``.

        Planes of one expert must be declared right after each other, from 0
        up, so that level j (planes 0..j) is one contiguous byte range.

        Raises:
            ValueError: planes out of order, an expert declared twice, or an empty plane.
        """
        if not tensors:
            raise ValueError("an expert plane needs at least one tensor")
        key = (layer, expert)
        if key == self._last_expert:
            if plane != self._last_plane + 1:
                raise ValueError(f"expert {key}: plane {plane} declared after plane {self._last_plane}")
            group = self._n_groups - 1
        else:
            if key in self._seen_experts:
                raise ValueError(f"expert {key} declared in two places; its planes must be consecutive")
            if plane != 0:
                raise ValueError(f"expert {key}: first plane must be 0, got {plane}")
            group = self._n_groups
            self._n_groups += 1
            self._seen_experts.add(key)
        self._declare(tensors)
        self._units.append(_Unit(list(tensors), group, key, plane))
        self._last_expert, self._last_plane = key, plane

    # --- planning --------------------------------------------------------------------
    def _assign_shards(self) -> int:
        """Map each group to a shard; returns the shard count."""
        group_bytes = [0] * self._n_groups
        for u in self._units:
            group_bytes[u.group] += sum(padded(t.nbytes) for t in u.tensors)
        shard, used, out = 0, 0, []
        for g, nbytes in enumerate(group_bytes):
            if self.max_shard_size > 0 and used > 0 and used + nbytes > self.max_shard_size:
                shard, used = shard + 1, 0
            out.append(shard)
            used += nbytes
        self._shard_of_group = out
        return shard + 1 if out else 0

    def total_bytes(self) -> int:
        """Tensor-data bytes that will be written (padding included)."""
        return sum(padded(t.nbytes) for u in self._units for t in u.tensors)

    def pending(self) -> list[TensorDecl]:
        """Declared tensors not yet written, in the order :meth:`write` expects them."""
        return [d for d, _, _ in self._order[self._cursor:]]

    def begin(self) -> list[Path]:
        """Lay out shards, open ``.partial`` files and write every header and tensor table.

        Leftovers of an interrupted conversion with this stem (``.partial`` files,
        shards 2..N) are deleted, except, for a resumable writer, the verified
        shards of a conversion with the same fingerprint (see :meth:`resumed`).

        Returns:
            The final shard paths (they exist only after :meth:`finish`).

        Raises:
            ValueError: nothing was declared.
            FileExistsError: a finished model (a shard 1 of this stem) is already in the output folder.
        """
        if self.state is not WriterState.DECLARING:
            raise RuntimeError(f"begin() called in state {self.state.name}")
        if not self._units:
            raise ValueError("no tensors declared")
        count = self._assign_shards()
        self._finals = [self.out_dir / C.shard_name(self.stem, i + 1, count) for i in range(count)]
        self._partials = [p.with_name(p.name + C.PARTIAL_SUFFIX) for p in self._finals]
        leftovers = self._leftovers()
        for p in leftovers:
            m = C.SHARD_NAME_RE.match(p.name)
            if m is not None and int(m.group("no")) == 1:
                raise FileExistsError(f"{p} already exists")
        per_shard: list[list[tuple[TensorDecl, _Unit]]] = [[] for _ in range(count)]
        self._shard_units = [[] for _ in range(count)]
        for u in self._units:
            shard = self._shard_of_group[u.group]
            self._shard_units[shard].append(u)
            for t in u.tensors:
                per_shard[shard].append((t, u))
        if self.resume_key is not None:
            self._start_resumable(count, per_shard)
        keep = {self._finals[i] for i in self._resumed}
        for p in leftovers:
            if p not in keep:
                p.unlink(missing_ok=True)
        if self._resume_state is not None:
            self._resume_state.save()
        n_tensors = sum(len(s) for s in per_shard)
        self.state = WriterState.WRITING
        for i, items in enumerate(per_shard):
            if i in self._resumed:
                for u, digest in zip(self._shard_units[i], self._resumed[i].digests, strict=True):
                    u.digest = digest
                continue
            w = GGUFWriter(self._partials[i], C.ARCH)
            w.add_custom_alignment(C.ALIGNMENT)
            w.add_uint32(C.KEY_FORMAT_VERSION, C.FORMAT_VERSION)
            w.add_string(C.KEY_MODEL_ID, self.model_id)
            w.add_uint16(C.KEY_SPLIT_NO, i)
            w.add_uint16(C.KEY_SPLIT_COUNT, count)
            w.add_int32(C.KEY_SPLIT_TENSORS_COUNT, n_tensors)
            if i == 0:
                self._add_metadata(w)
            for t, u in items:
                # tensor_dtype only matters for uint8 byte shapes; we always pass element shapes
                w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.ggml_type)
                self._order.append((t, u, i))
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            self._writers[i] = w
        return list(self._finals)

    def _leftovers(self) -> list[Path]:
        """Shard files (final or ``.partial``) of this stem already in the output folder."""
        out = []
        for p in sorted(self.out_dir.glob(f"{self.stem}-*-of-*.gguf*")):
            name = p.name[:-len(C.PARTIAL_SUFFIX)] if p.name.endswith(C.PARTIAL_SUFFIX) else p.name
            m = C.SHARD_NAME_RE.match(name)
            if m is not None and m.group("stem") == self.stem and p.is_file():
                out.append(p)
        return out

    def _unit_bytes(self, shard: int) -> list[int]:
        return [sum(padded(t.nbytes) for t in u.tensors) for u in self._shard_units[shard]]

    def _start_resumable(self, count: int, per_shard: Sequence[Sequence[tuple[TensorDecl, _Unit]]]) -> None:
        """Fingerprint this conversion, derive the model id and pick the verified shards of an earlier run."""
        assert self.resume_key is not None
        layout = [[i, t.name, list(t.shape), t.ggml_type.name] for i, items in enumerate(per_shard) for t, _ in items]
        fingerprint = conversion_fingerprint(self.resume_key, layout, self.metadata, self.stem, self.max_shard_size)
        self.model_id = model_id_for(fingerprint)
        previous = ResumeState.load(self.out_dir)
        state_file = ResumeState.path_in(self.out_dir)
        self._resume_state = ResumeState(self.out_dir, fingerprint, self.model_id, self.stem, count)
        if previous is None:
            if state_file.exists():
                log.warning(f"{state_file}: unreadable record of an interrupted conversion; starting clean")
            return
        done = len(previous.complete)
        if not self.resume:
            log.warning(f"{self.out_dir}: not resuming the interrupted conversion found here (resume disabled, "
                        f"--no-resume); starting clean ({done} completed shard(s) deleted)")
            return
        if previous.fingerprint != fingerprint or previous.stem != self.stem:
            log.warning(f"{self.out_dir}: the interrupted conversion found here was made from a different input or "
                        f"with different options; starting clean ({done} completed shard(s) deleted, never mixed)")
            return
        for i, record in sorted(previous.complete.items()):
            if not 0 < i < count:  # shard 1 is always rewritten (it carries every digest)
                continue
            why = verify_shard(self._finals[i], record, self._unit_bytes(i))
            if why is None:
                self._resumed[i] = record
            else:
                log.warning(f"{self._finals[i].name}: {why}; converting it again")
        self._resume_state.complete = dict(self._resumed)
        self._resumed_names = {t.name for i in self._resumed for u in self._shard_units[i] for t in u.tensors}
        log.info(f"{self.out_dir}: resuming an interrupted conversion: {len(self._resumed)} of {count} shards "
                 "already complete and verified, skipped")

    def resumed(self, name: str) -> bool:
        """True when tensor ``name`` lies in a shard kept from an interrupted run: do not :meth:`write` it."""
        return name in self._resumed_names

    @property
    def resumed_shards(self) -> list[int]:
        """1-based numbers of the shards kept from an interrupted run (after :meth:`begin`)."""
        return [i + 1 for i in sorted(self._resumed)]

    def resumed_bytes(self) -> int:
        """Tensor-data bytes (padding included) of the kept shards."""
        return sum(sum(self._unit_bytes(i)) for i in self._resumed)

    def _add_metadata(self, w: GGUFWriter) -> None:
        for key, value in self.metadata.items():
            if isinstance(value, bool):
                w.add_bool(key, value)
            elif isinstance(value, int):
                if 0 <= value < 2**32:
                    w.add_uint32(key, value)
                else:
                    w.add_int64(key, value)
            elif isinstance(value, float):
                w.add_float32(key, value)
            elif isinstance(value, str):
                if value:
                    w.add_string(key, value)
            else:
                raise TypeError(f"metadata {key!r}: unsupported value type {type(value).__name__}")
        w.add_string(C.KEY_CHECKSUM_ALGO, C.CHECKSUM_ALGO)
        w.add_string(C.KEY_CHECKSUM_DIGESTS, "0" * (C.CHECKSUM_HEX_LEN * len(self._units)))

    # --- writing ---------------------------------------------------------------------
    def write(self, name: str, array: np.ndarray) -> None:
        """Write the next declared tensor's data.

        Args:
            name: must be the next name of :meth:`pending` (declaration order).
            array: C-contiguous data whose byte size matches the declaration
                (F16 -> float16, BF16 -> uint16/int16 bit patterns, F32 -> float32).

        Raises:
            ValueError: wrong order, or a byte size that does not match the declaration.
        """
        if self.state is not WriterState.WRITING:
            raise RuntimeError(f"write() called in state {self.state.name}")
        if self._cursor >= len(self._order):
            raise ValueError(f"{name!r}: every declared tensor has already been written")
        decl, unit, shard = self._order[self._cursor]
        if name != decl.name:
            raise ValueError(f"expected tensor {decl.name!r} next, got {name!r}")
        data = np.ascontiguousarray(array)
        if data.nbytes != decl.nbytes:
            raise ValueError(f"{name}: {data.nbytes} bytes given, {decl.nbytes} declared for "
                             f"{decl.ggml_type.name} {decl.shape}")
        self._writers[shard].write_tensor_data(data)
        if unit.tensors[0] is decl:
            self._hash = hashlib.sha256()
        assert self._hash is not None
        self._hash.update(data.reshape(-1).view(np.uint8))
        pad = padded(decl.nbytes) - decl.nbytes
        if pad:
            self._hash.update(self._zeros[:pad])
        self._undropped += decl.nbytes + pad
        if self._undropped >= DROP_CACHE_EVERY:
            self._drop_cache(self._writers[shard])
        if unit.tensors[-1] is decl:
            unit.digest = self._hash.hexdigest()
            self._hash = None
        self._cursor += 1
        if self._cursor == len(self._order) or self._order[self._cursor][2] != shard:
            self._complete_shard(shard)

    def _complete_shard(self, shard: int) -> None:
        """Every tensor of ``shard`` is written: close it; shards 2..N are fsynced, renamed and recorded now."""
        w = self._writers[shard]
        if shard == 0:  # digests are patched in by finish(), which renames it last
            w.close()
            return
        w.flush()
        assert w.fout is not None
        os.fsync(w.fout[0].fileno())
        self._drop_cache(w)
        w.close()
        os.replace(self._partials[shard], self._finals[shard])
        fsync_dir(self.out_dir)
        self._renamed.append(self._finals[shard])
        if self._resume_state is not None:
            digests = [u.digest or "" for u in self._shard_units[shard]]
            record = record_shard(self._finals[shard], self._unit_bytes(shard), digests)
            self._resume_state.complete[shard] = record
            self._resume_state.save()

    def _drop_cache(self, w: GGUFWriter) -> None:
        """Start writeback of ``w``'s dirty pages and drop its clean ones (written earlier) from the page cache."""
        w.flush()
        assert w.fout is not None
        drop_cached_pages(w.fout[0].fileno())
        self._undropped = 0

    def finish(self) -> list[Path]:
        """Close the shards, fill in the digests, rename shard 1 into place (the others already are).

        Returns:
            Final shard paths, shard 1 first.

        Raises:
            ValueError: some declared tensors were never written.
        """
        if self.state is not WriterState.WRITING:
            raise RuntimeError(f"finish() called in state {self.state.name}")
        if self._cursor != len(self._order):
            missing = [d.name for d in self.pending()[:3]]
            raise ValueError(f"{len(self._order) - self._cursor} declared tensors not written (first: {missing})")
        for w in self._writers.values():
            w.close()
        self._patch_digests()
        with open(self._partials[0], "rb") as f:
            os.fsync(f.fileno())
            drop_cached_pages(f.fileno())
        os.replace(self._partials[0], self._finals[0])  # shards 2..N are in place already: the model is complete
        fsync_dir(self.out_dir)
        if self._resume_state is not None:
            ResumeState.remove(self.out_dir)
        self.state = WriterState.DONE
        return list(self._finals)

    def _patch_digests(self) -> None:
        """Overwrite the placeholder digest string in shard 1 with the real digests."""
        digests = "".join(u.digest or "" for u in self._units)
        if len(digests) != C.CHECKSUM_HEX_LEN * len(self._units):
            raise RuntimeError("internal: a checksum unit has no digest")
        reader = GGUFReader(self._partials[0])
        field_ = reader.fields[C.KEY_CHECKSUM_DIGESTS]
        offset = field_.offset + sum(int(p.nbytes) for p in field_.parts[:-1])
        size = int(field_.parts[-1].nbytes)
        del reader, field_
        if size != len(digests):
            raise RuntimeError("internal: digest placeholder has the wrong size")
        fd = os.open(self._partials[0], os.O_WRONLY)
        try:
            os.pwrite(fd, digests.encode("ascii"), offset)
        finally:
            os.close(fd)

    def abort(self) -> None:
        """Close and delete every ``.partial`` file of this writer (safe to call twice).

        A resumable writer keeps the shards it completed (and their record) for the
        next run; a writer without a ``resume_key`` also deletes them: nothing is left.
        """
        if self.state is WriterState.DONE:
            return
        for w in self._writers.values():
            w.close()
        for p in self._partials:
            p.unlink(missing_ok=True)
        if self._resume_state is None:
            for p in self._renamed:
                p.unlink(missing_ok=True)
        self.state = WriterState.ABORTED

    def __enter__(self) -> "ShardSetWriter":
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None and self.state is not WriterState.DONE:
            self.abort()


