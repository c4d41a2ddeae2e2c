"""Lazy reading of Hugging Face checkpoints and the ONE canonical tensor naming.

Owns :class:`HFCheckpoint` (``config.json`` + safetensors, single file or
sharded via ``model.safetensors.index.json``, read tensor by tensor with
``safe_open``) and the canonical naming of docs/DESIGN.md, which the engine
and the shard format both use:

- non-expert tensors keep their HF name, except Mixtral's
  ``block_sparse_moe.`` which becomes ``mlp.``;
- routed experts are ``model.layers.{L}.mlp.experts.{E}.{gate_proj,up_proj,down_proj}.weight``
  with gate/up ``[I, H]`` and down ``[H, I]`` (Mixtral ``w1/w3/w2`` renamed;
  fused 3-D ``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]`` split per expert);
- rotary ``inv_freq`` buffers and layers past ``num_hidden_layers`` (e.g.
  DeepSeek-V3's multi-token-prediction layer) are not part of the model and
  are skipped.

Typical use (what ``convert/shards.py`` and ``engine/hf_loading.py`` do)::

    ckpt = HFCheckpoint.open("path/to/hf_dir")
    for canonical, hf_name in ckpt.canonical_items():
        tensor = ckpt.read_canonical(canonical)     # stored dtype, canonical shape
        key = parse_expert_name(canonical)           # ExpertKey or None

With ``drop_cache=True`` (what the converters use) tensors are read with
``pread`` instead of through safetensors' memory map, and the file's pages are
dropped from the page cache every :data:`DROP_CACHE_EVERY` bytes read
(``POSIX_FADV_DONTNEED`` on the whole file: a range would leave the large
folios and readahead at its edges): reading a checkpoint then costs one tensor
of memory plus a bounded cache whatever its size, also as the kernel counts it
(a cgroup's usage includes the page cache and mapped files).

Knows nothing about model math, the engine, or the shard format.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import torch

from moestream.convert.errors import ModelFormatError
from moestream.convert.page_cache import drop_cached_pages

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
#: Files besides the weights whose content a conversion carries (hashed whole by :meth:`HFCheckpoint.fingerprint`).
SIDE_FILES = (CONFIG_FILE, INDEX_FILE, "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header
#: Bytes read from one file between two drops of its pages from the page cache (``drop_cache``).
DROP_CACHE_EVERY = 64 << 20
#: safetensors dtype -> torch dtype, for the ``pread`` path (others fall back to safetensors).
_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}

#: Canonical routed-expert tensor name.
EXPERT_NAME = "model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"
#: Projections of one routed expert, in the order they are stored/written.
EXPERT_PROJS: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")

_EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
_MIXTRAL_EXPERT_RE = re.compile(r"^(model\.layers\.\d+\.mlp\.experts\.\d+)\.(w1|w2|w3)\.weight$")
_MIXTRAL_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_FUSED_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)(\.weight)?$")
#: Bytes per element of the safetensors dtypes (header ``dtype`` strings).
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


class ExpertKey(NamedTuple):
    """Where a canonical routed-expert tensor belongs."""

    layer: int
    expert: int
    proj: str  # gate_proj | up_proj | down_proj


def parse_expert_name(name: str) -> ExpertKey | None:
    """Parse a canonical routed-expert name.

    Args:
        name: canonical tensor name.

    Returns:
        ``ExpertKey(layer, expert, proj)``, or ``None`` when ``name`` is not a routed expert.
    """
    m = _EXPERT_RE.match(name)
    return None if m is None else ExpertKey(int(m.group(1)), int(m.group(2)), m.group(3))


def is_expert_name(name: str) -> bool:
    """True when ``name`` is a canonical routed-expert tensor."""
    return _EXPERT_RE.match(name) is not None


def expert_name(layer: int, expert: int, proj: str) -> str:
    """The canonical name of one routed-expert projection."""
    return EXPERT_NAME.format(layer=layer, expert=expert, proj=proj)


@dataclass(frozen=True)
class _Source:
    """How to produce one canonical tensor from the file: a whole tensor or a fused slice."""

    hf_name: str
    expert: int | None = None  # index into a fused [E, ...] tensor
    part: str | None = None  # "gate" | "up" | "down" for fused tensors


def _canonical_plain(hf_name: str) -> str:
    """Canonical name of a non-fused tensor (Mixtral renames applied)."""
    name = hf_name.replace(".block_sparse_moe.", ".mlp.")
    m = _MIXTRAL_EXPERT_RE.match(name)
    if m:
        name = f"{m.group(1)}.{_MIXTRAL_PROJ[m.group(2)]}.weight"
    return name


class HFCheckpoint:
    """An HF model folder opened for lazy, per-tensor reads.

    Attributes:
        path: the folder.
        config: parsed ``config.json``.
        model_type: ``config["model_type"]``.
    """

    def __init__(self, path: Path, config: dict[str, Any], weight_map: dict[str, str],
                 drop_cache: bool = False) -> None:
        """Use :meth:`open`."""
        self.path = path
        self.config = config
        self.model_type: str = config["model_type"]
        self.drop_cache = drop_cache
        self._weight_map = weight_map  # hf tensor name -> file name
        self._handles: dict[str, Any] = {}
        self._sources: dict[str, _Source] | None = None
        self._fds: dict[str, int] = {}
        self._undropped: dict[str, int] = {}  # file -> bytes read since its pages were last dropped
        self._entries: dict[str, tuple[int, dict[str, Any]]] = {}  # file -> (data start, header)

    # --- opening ---------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, drop_cache: bool = False) -> "HFCheckpoint":
        """Open an HF model folder.

        Args:
            path: folder with ``config.json`` and ``model.safetensors`` or
                ``model.safetensors.index.json`` + shards.
            drop_cache: read tensors with ``pread`` and drop what was read from the
                page cache (module docstring); default: safetensors' memory map.

        Returns:
            The opened checkpoint (files are opened lazily on first read, all
            shard headers are checked here).

        Raises:
            ModelFormatError: missing folder, missing/invalid ``config.json``, no
                safetensors weights, a missing shard, or a truncated/corrupt file
                (the message names the file).
        """
        folder = Path(path)
        if not folder.is_dir():
            raise ModelFormatError(f"{folder}: not a folder; pass a Hugging Face model folder with config.json")
        config = _read_config(folder / CONFIG_FILE)
        weight_map = _read_weight_map(folder)
        ckpt = cls(folder, config, weight_map, drop_cache)
        for file in sorted(set(weight_map.values())):
            ckpt._handle(file)  # validate every header now: fail early, naming the file
        return ckpt

    def _handle(self, file: str) -> Any:
        h = self._handles.get(file)
        if h is None:
            from safetensors import SafetensorError, safe_open

            full = self.path / file
            if not full.is_file():
                raise ModelFormatError(f"{full}: weight file listed in {INDEX_FILE} is missing; re-download the model")
            try:
                h = safe_open(str(full), framework="pt")
            except (SafetensorError, OSError, ValueError) as exc:
                raise ModelFormatError(f"{full}: not a readable safetensors file ({exc}); "
                                       "it may be truncated, re-download it") from exc
            self._handles[file] = h
        return h

    def close(self) -> None:
        """Drop open file handles (reads reopen them); with ``drop_cache``, also the files' cached pages."""
        self._handles.clear()
        for fd in self._fds.values():
            drop_cached_pages(fd)
            os.close(fd)
        self._fds.clear()
        self._undropped.clear()

    # --- uncached reads (drop_cache) ----------------------------------------------------------------
    def _header(self, file: str) -> tuple[int, dict[str, Any]]:
        """``(data start, header dict)`` of a safetensors file, parsed once."""
        got = self._entries.get(file)
        if got is None:
            full = self.path / file
            with open(full, "rb") as f:
                head = f.read(8)
                n = int.from_bytes(head, "little") if len(head) == 8 else -1
                raw = f.read(n) if 0 <= n <= _MAX_HEADER else b""
            try:
                header = json.loads(raw)
                if not isinstance(header, dict):
                    raise ValueError("not a JSON object")
            except (ValueError, UnicodeDecodeError) as exc:
                raise ModelFormatError(f"{full}: not a readable safetensors header ({exc}); "
                                       "it may be truncated, re-download it") from exc
            got = self._entries[file] = (8 + n, header)
        return got

    def _pread(self, hf_name: str, index: int | None = None) -> torch.Tensor | None:
        """Read a tensor (or its sub-tensor ``index`` along dim 0) with ``pread``, then drop its pages.

        Returns:
            The tensor, or None when this path cannot read it (unknown dtype, big-endian host):
            the caller falls back to safetensors.

        Raises:
            ModelFormatError: the file is shorter than its header says.
        """
        file = self._weight_map[hf_name]
        base, header = self._header(file)
        info = header.get(hf_name)
        dtype = _ST_DTYPES.get(info.get("dtype")) if isinstance(info, dict) else None
        if dtype is None or sys.byteorder != "little" or not hasattr(os, "posix_fadvise"):
            return None
        shape = [int(d) for d in info["shape"]]
        start, end = (int(x) for x in info["data_offsets"])
        if index is not None:
            row = (end - start) // max(shape[0], 1)
            start, end, shape = start + index * row, start + (index + 1) * row, shape[1:]
        out = torch.empty(shape, dtype=dtype)
        buf = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        full = self.path / file
        if buf.nbytes != end - start:
            raise ModelFormatError(f"{full}: tensor {hf_name} spans {end - start} bytes, its shape needs "
                                   f"{buf.nbytes}; the file is corrupt, re-download it")
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds[file] = os.open(full, os.O_RDONLY)
        done = 0
        while done < buf.nbytes:
            n = os.preadv(fd, [buf[done:]], base + start + done)
            if n <= 0:
                raise ModelFormatError(f"{full}: truncated (tensor {hf_name} ends past the end of the file); "
                                       "re-download it")
            done += n
        self._undropped[file] = self._undropped.get(file, 0) + done
        if self._undropped[file] >= DROP_CACHE_EVERY:
            drop_cached_pages(fd)
            self._undropped[file] = 0
        return out

    # --- HF names ----------------------------------------------------------------------------------
    def tensor_names(self) -> list[str]:
        """Every tensor name as stored on disk (HF naming), sorted."""
        return sorted(self._weight_map)

    def read(self, hf_name: str) -> torch.Tensor:
        """Read one tensor by its on-disk name, in its stored dtype.

        Raises:
            KeyError: unknown name.
            ModelFormatError: the file cannot be read (names the file).
        """
        if self.drop_cache:
            t = self._pread(hf_name)
            if t is not None:
                return t
        file = self._weight_map[hf_name]
        handle = self._handle(file)
        try:
            return handle.get_tensor(hf_name)
        except Exception as exc:  # safetensors raises its own error types for bad data
            raise ModelFormatError(f"{self.path / file}: cannot read tensor {hf_name} ({exc}); "
                                   "the file may be truncated, re-download it") from exc

    def shape(self, hf_name: str) -> tuple[int, ...]:
        """Stored shape of a tensor without reading its data."""
        return tuple(self._handle(self._weight_map[hf_name]).get_slice(hf_name).get_shape())

    def nbytes(self, hf_name: str) -> int:
        """Stored bytes of a tensor (shape x dtype from the safetensors header; nothing is read).

        Raises:
            KeyError: unknown name.
            ModelFormatError: a dtype this reader does not know.
        """
        sl = self._handle(self._weight_map[hf_name]).get_slice(hf_name)
        dtype = sl.get_dtype()
        if dtype not in _DTYPE_BYTES:
            raise ModelFormatError(f"{self.path / self._weight_map[hf_name]}: tensor {hf_name} has dtype {dtype}, "
                                   f"which moestream does not read (known: {', '.join(sorted(_DTYPE_BYTES))})")
        n = _DTYPE_BYTES[dtype]
        for d in sl.get_shape():
            n *= int(d)
        return n

    def canonical_nbytes(self) -> int:
        """Stored bytes that reading every canonical tensor once transfers (skipped tensors excluded)."""
        return sum(self.nbytes(h) for h in {src.hf_name for src in self._source_map().values()})

    # --- canonical names ----------------------------------------------------------------------------
    def _build_sources(self) -> dict[str, _Source]:
        n_layers = self.config.get("num_hidden_layers")
        hidden = self.config.get("hidden_size")
        sources: dict[str, _Source] = {}
        for hf_name in self.tensor_names():
            if hf_name.endswith("rotary_emb.inv_freq"):
                continue
            m = _LAYER_RE.match(hf_name)
            if m and n_layers is not None and int(m.group(1)) >= int(n_layers):
                continue  # e.g. DeepSeek-V3 MTP layer: not part of the causal LM
            name = _canonical_plain(hf_name)
            fused = _FUSED_RE.match(name)
            if fused is None:
                sources[name] = _Source(hf_name)
                continue
            layer, kind = int(fused.group(1)), fused.group(2)
            shape = self.shape(hf_name)
            if len(shape) != 3 or (hidden is not None and hidden not in shape[1:]):
                raise ModelFormatError(f"{self.path}: fused expert tensor {hf_name} has unexpected shape {shape}")
            parts = ("gate", "up") if kind == "gate_up_proj" else ("down",)
            for e in range(shape[0]):
                for part in parts:
                    sources[expert_name(layer, e, f"{part}_proj")] = _Source(hf_name, e, part)
        return sources

    def _source_map(self) -> dict[str, _Source]:
        if self._sources is None:
            self._sources = self._build_sources()
        return self._sources

    def canonical_names(self) -> list[str]:
        """Canonical names: non-expert tensors sorted, then experts by (layer, expert, gate/up/down)."""
        names = list(self._source_map())
        dense = sorted(n for n in names if not is_expert_name(n))
        experts = sorted((n for n in names if is_expert_name(n)),
                         key=lambda n: (lambda k: (k.layer, k.expert, EXPERT_PROJS.index(k.proj)))(parse_expert_name(n)))
        return dense + experts

    def canonical_items(self) -> Iterator[tuple[str, str]]:
        """Yield ``(canonical_name, hf_name)`` in :meth:`canonical_names` order.

        For fused 3-D expert tensors several canonical names share one HF
        name; use :meth:`read_canonical` to get the right slice.
        """
        sources = self._source_map()
        for name in self.canonical_names():
            yield name, sources[name].hf_name

    def read_canonical(self, name: str) -> torch.Tensor:
        """Read one tensor by canonical name, in its stored dtype and canonical shape.

        Raises:
            KeyError: unknown canonical name.
            ModelFormatError: unreadable file.
        """
        src = self._source_map()[name]
        if src.expert is None:
            return self.read(src.hf_name)
        t = self._pread(src.hf_name, src.expert) if self.drop_cache else None
        if t is None:
            handle = self._handle(self._weight_map[src.hf_name])
            t = handle.get_slice(src.hf_name)[src.expert]
        # t: [2I, H] for gate_up, [H, I] for down (transformers layout)
        hidden = self.config.get("hidden_size")
        if src.part == "down":
            return t if hidden is None or t.shape[0] == hidden else t.t().contiguous()
        if hidden is not None and t.shape[1] != hidden:
            t = t.t().contiguous()  # stored [H, 2I]
        inter = t.shape[0] // 2
        return (t[:inter] if src.part == "gate" else t[inter:]).contiguous()

    def is_fused(self) -> bool:
        """True when routed experts are stored as fused 3-D tensors."""
        return any(s.expert is not None for s in self._source_map().values())

    def fingerprint(self) -> dict[str, dict[str, Any]]:
        """What identifies the checkpoint's bytes without reading its weights (for resuming a conversion).

        Returns:
            ``{file name: {"size", "mtime_ns", "sha256"}}`` for every weight file (SHA-256 of
            its safetensors header: names, dtypes, shapes, offsets) and every present
            :data:`SIDE_FILES` entry (SHA-256 of the whole file).
        """
        out: dict[str, dict[str, Any]] = {}
        for name in sorted(set(self._weight_map.values())):
            out[name] = _file_fingerprint(self.path / name, header_only=True)
        for name in SIDE_FILES:
            if (self.path / name).is_file():
                out[name] = _file_fingerprint(self.path / name, header_only=False)
        return out


def _file_fingerprint(path: Path, header_only: bool) -> dict[str, Any]:
    """Size, mtime and a SHA-256 of the whole file or (safetensors) of its 8-byte length + JSON header."""
    import hashlib

    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if header_only:
            head = f.read(8)
            h.update(head)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            h.update(f.read(min(n, _MAX_HEADER)))
        else:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": h.hexdigest()}


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelFormatError(f"{path}: missing; a Hugging Face model folder needs its config.json")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFormatError(f"{path}: not valid JSON ({exc}); re-download or fix the file") from exc
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ModelFormatError(f"{path}: has no 'model_type' string; is this a transformers model config?")
    return config


def _read_weight_map(folder: Path) -> dict[str, str]:
    index = folder / INDEX_FILE
    single = folder / SINGLE_FILE
    if index.is_file():
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
            weight_map = dict(data["weight_map"])
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ModelFormatError(f"{index}: not a valid safetensors index ({exc}); re-download it") from exc
        for file in sorted(set(weight_map.values())):
            if not (folder / file).is_file():
                raise ModelFormatError(f"{folder / file}: shard listed in {INDEX_FILE} is missing; re-download it")
        return weight_map
    if single.is_file():
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(single), framework="pt") as f:
                return {k: SINGLE_FILE for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelFormatError(f"{single}: not a readable safetensors file ({exc}); "
                                   "it may be truncated, re-download it") from exc
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise ModelFormatError(f"{folder}: only PyTorch .bin weights found; moestream reads safetensors "
                               "(re-save with save_pretrained(safe_serialization=True))")
    raise ModelFormatError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}; the model weights are missing")
