"""The moestream shard format v1: one import for its writer, reader and ``info``.

The format itself is described in ``shard_writer.py`` (layout, alignment,
splitting, checksums, atomic completion) and ``shard_reader.py`` (checks at
open and on read, level numbering); names and keys are in ``constants.py``.
This module re-exports the public pieces and owns :func:`model_info` /
:func:`format_model_info` behind ``moestream info``.

Checksum policy, in one sentence: a SHA-256 per dense tensor and per expert
plane (over its exact page-padded byte range) is stored in shard 1 and
verified lazily when that range is read; at open only headers and file sizes
are checked, so opening a 100 GB model stays cheap.

Knows nothing about Hugging Face checkpoints, the engine or the scheduler.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moestream.convert.shard_reader import (
    EXPERT_DECODERS,
    ByteRange,
    ChecksumUnit,
    RawDense,
    ShardedModel,
    TensorRecord,
    register_expert_decoder,
)
from moestream.convert.shard_writer import ShardSetWriter, TensorDecl, WriterState, padded, tensor_nbytes

__all__ = [
    "ByteRange", "ChecksumUnit", "EXPERT_DECODERS", "RawDense", "ShardSetWriter", "ShardedModel", "TensorDecl",
    "TensorRecord", "WriterState", "format_bytes", "format_model_info", "model_info", "padded",
    "register_expert_decoder", "tensor_nbytes",
]


def model_info(path: str | Path) -> dict[str, Any]:
    """Describe a converted model without reading tensor data.

    Args:
        path: model folder or shard-1 file.

    Returns:
        JSON-ready dict (see :meth:`ShardedModel.summary`).

    Raises:
        ModelFormatError: the model cannot be opened (names the file).
    """
    with ShardedModel.open(path, verify="off") as model:
        return model.summary()


def format_bytes(n: int) -> str:
    """``1536`` -> ``'1.50 KiB'``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_model_info(info: dict[str, Any]) -> str:
    """Human-readable text for :func:`model_info`'s dict."""
    lines = [f"model type:   {info['model_type']}", f"expert codec: {info['codec']}"]
    meta = info["metadata"]
    hparams = {k: v for k, v in meta.items() if _is_hparam(k, v)}
    for key in sorted(meta):
        if key.startswith(("moestream.", "general.")) and key not in hparams and key != "moestream.model_id":
            lines.append(f"  {key} = {meta[key]}")
    lines.append(f"shards ({len(info['shards'])}):")
    for s in info["shards"]:
        lines.append(f"  {Path(s['path']).name}  {format_bytes(s['file_bytes'])}  {s['tensors']} tensors")
    lines.append(f"tensors:      {info['tensor_count']} ({info['dense_tensor_count']} dense, "
                 f"{info['expert_count']} routed experts in {info['moe_layers']} MoE layers)")
    lines.append(f"dense bytes:  {format_bytes(info['dense_bytes'])}")
    per_layer = sorted({v for v in info["experts_per_layer"].values()})
    if per_layer:
        lines.append(f"experts/layer: {', '.join(map(str, per_layer))}")
    for level, b in sorted(info["expert_level_bytes"].items(), key=lambda kv: int(kv[0])):
        each = format_bytes(b["max"]) if b["min"] == b["max"] else f"{format_bytes(b['min'])}..{format_bytes(b['max'])}"
        lines.append(f"expert level {level}: {each} per expert, {format_bytes(b['total'])} in all")
    lines.append(f"tokenizer:    {'yes' if info['has_tokenizer'] else 'no'}; "
                 f"chat template: {'yes' if info['has_chat_template'] else 'no'}")
    if hparams:
        lines.append("hyper-parameters: " + ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in sorted(hparams.items())))
    return "\n".join(lines)


def _is_hparam(key: str, value: Any) -> bool:
    """Numeric ``moestream.<name>`` keys (gguf-py's ``{arch}.*`` hyper-parameters)."""
    return (key.startswith("moestream.") and isinstance(value, (int, float)) and not isinstance(value, bool)
            and key not in ("moestream.format_version",) and not key.startswith("moestream.expert."))
