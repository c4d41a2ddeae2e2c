"""Resuming an interrupted conversion: the ``.convert-state.json`` record beside the shards.

Owns :class:`ResumeState` (what an unfinished conversion is and which of its
shards are complete), its atomic write (temporary file, fsync, rename, fsync
of the folder), :func:`conversion_fingerprint` / :func:`model_id_for`, and
:func:`record_shard` / :func:`verify_shard` (a completed shard is kept only
when its size, its header bytes and every checksum unit still hash to what
was recorded when it was renamed into place).

The rules, applied by :class:`moestream.convert.shard_writer.ShardSetWriter`:

- a conversion is identified by a *fingerprint*: SHA-256 over the caller's
  resume key (a fingerprint of the source files and the options) and the
  writer's own layout (every tensor's shard, name, shape and type, all
  shard-1 metadata, the stem and the shard size). The ``moestream.model_id``
  of every shard is derived from it, so a conversion that was interrupted and
  resumed is byte-identical to one that was not;
- shards 2..N are renamed into place as soon as each is complete and then
  recorded here; shard 1 carries every checksum, is patched and renamed last
  and is therefore always rewritten by a resumed run;
- a re-run with the same fingerprint verifies the recorded shards and skips
  them; everything else of the set (``.partial`` files, shards that were never
  recorded or fail verification) is deleted and redone; a different
  fingerprint (another input, other options, another layout) or
  ``resume=False`` starts clean — shards of two conversions are never mixed;
- the record is removed once shard 1 is in place (the model is complete).

Knows nothing about Hugging Face checkpoints, codecs or the engine.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from moestream.convert import constants as C
from moestream.convert.page_cache import drop_cached_pages

STATE_VERSION = 1
_READ_CHUNK = 8 << 20


@dataclass
class ShardRecord:
    """A completed shard as it was renamed into place.

    Attributes:
        name: file name (final, not ``.partial``).
        nbytes: file size.
        data_offset: where tensor data starts (header and its padding before it).
        header_sha256: SHA-256 of bytes ``[0, data_offset)``.
        digests: the shard's checksum-unit digests, in file order (as in shard 1's digest key).
    """

    name: str
    nbytes: int
    data_offset: int
    header_sha256: str
    digests: list[str]


@dataclass
class ResumeState:
    """What an unfinished conversion in ``out_dir`` is and which shards (0-based index) are complete."""

    out_dir: Path
    fingerprint: str
    model_id: str
    stem: str
    shard_count: int
    complete: dict[int, ShardRecord] = field(default_factory=dict)

    @staticmethod
    def path_in(out_dir: Path) -> Path:
        """Where the record lives."""
        return Path(out_dir) / C.CONVERT_STATE_FILE

    @classmethod
    def load(cls, out_dir: Path) -> "ResumeState | None":
        """The record in ``out_dir``; None when there is none or it cannot be parsed (then: start clean)."""
        path = cls.path_in(out_dir)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            if doc.get("version") != STATE_VERSION:
                return None
            complete = {int(k): ShardRecord(**v) for k, v in doc["complete"].items()}
            return cls(Path(out_dir), str(doc["fingerprint"]), str(doc["model_id"]), str(doc["stem"]),
                       int(doc["shard_count"]), complete)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            return None  # torn or foreign: the caller starts clean

    def save(self) -> None:
        """Write the record atomically (temporary file, fsync, rename, fsync of the folder)."""
        doc = {"version": STATE_VERSION, "fingerprint": self.fingerprint, "model_id": self.model_id,
               "stem": self.stem, "shard_count": self.shard_count,
               "complete": {str(k): asdict(v) for k, v in sorted(self.complete.items())}}
        path = self.path_in(self.out_dir)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(self.out_dir)

    @classmethod
    def remove(cls, out_dir: Path) -> None:
        """Delete the record (and a torn temporary copy)."""
        path = cls.path_in(out_dir)
        path.with_name(path.name + ".tmp").unlink(missing_ok=True)
        path.unlink(missing_ok=True)


def conversion_fingerprint(resume_key: Mapping[str, Any], layout: Sequence[Sequence[Any]],
                           metadata: Mapping[str, Any], stem: str, max_shard_size: int) -> str:
    """SHA-256 (hex) identifying one conversion: caller's key, tensor layout, metadata, naming, shard size.

    Args:
        resume_key: JSON-ready description of the input and options (e.g. file sizes, mtimes, header hashes, dtype).
        layout: one ``(shard, name, shape, type name)`` row per tensor, in file order.
        metadata: shard-1 metadata.
        stem: file-name stem.
        max_shard_size: the split size.
    """
    doc = {"format": C.FORMAT_VERSION, "alignment": C.ALIGNMENT, "key": resume_key, "layout": layout,
           "metadata": dict(metadata), "stem": stem, "max_shard_size": int(max_shard_size)}
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def model_id_for(fingerprint: str) -> str:
    """The ``moestream.model_id`` of a resumable conversion: a UUID derived from its fingerprint."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"moestream-conversion:{fingerprint}"))


def _sha256_range(fd: int, offset: int, nbytes: int) -> str:
    h = hashlib.sha256()
    done = 0
    while done < nbytes:
        chunk = os.pread(fd, min(_READ_CHUNK, nbytes - done), offset + done)
        if not chunk:
            raise OSError(f"unexpected end of file at byte {offset + done}")
        h.update(chunk)
        done += len(chunk)
    return h.hexdigest()


def record_shard(path: Path, unit_bytes: Sequence[int], digests: Sequence[str]) -> ShardRecord:
    """Describe a shard just completed: its size, where its data starts and the hash of its header.

    Args:
        path: the complete shard file.
        unit_bytes: padded byte size of each checksum unit of the shard, in file order
            (the data region is exactly their concatenation, at the end of the file).
        digests: those units' SHA-256 digests (hex).
    """
    size = path.stat().st_size
    data_offset = size - sum(unit_bytes)
    fd = os.open(path, os.O_RDONLY)
    try:
        header = _sha256_range(fd, 0, data_offset)
    finally:
        os.close(fd)
    return ShardRecord(path.name, size, data_offset, header, list(digests))


def verify_shard(path: Path, record: ShardRecord, unit_bytes: Sequence[int]) -> str | None:
    """Check a recorded shard against its file: size, header hash and every unit digest.

    Returns:
        None when the shard is intact; otherwise why not (for the log).
    """
    if path.name != record.name or not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != record.nbytes or record.data_offset != size - sum(unit_bytes) or len(record.digests) != len(unit_bytes):
        return f"size {size} differs from the {record.nbytes} bytes recorded"
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        return f"unreadable ({exc})"
    try:
        if _sha256_range(fd, 0, record.data_offset) != record.header_sha256:
            return "header checksum mismatch"
        offset = record.data_offset
        for k, (nbytes, want) in enumerate(zip(unit_bytes, record.digests)):
            if _sha256_range(fd, offset, nbytes) != want:
                return f"checksum mismatch in unit {k} (bytes {offset}..{offset + nbytes})"
            offset += nbytes
        return None
    except OSError as exc:
        return f"unreadable ({exc})"
    finally:
        drop_cached_pages(fd)  # the pages just hashed
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make renames in ``path`` durable (best effort: not every platform can open a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
