"""Loading models for calibration and quality evaluation, at a chosen nested level.

Owns :func:`load_eval_model` (an HF folder, or a moestream shard model of any
codec — ``none``, nested ``matryoshka*``/``residual``, ``gguf_q8_0``/``gguf_q4_0`` —
with every expert decoded to fp32 and resident, each capped at a level) and
:func:`load_calibration_model` (the HF reference, every expert resident) and
:func:`load_calibration_stream` (the same model run layer by layer: what the
converter calibrates on).
These are the model loaders the converter's library functions
(``convert/compress.py``, ``convert/quality.py``) take as arguments: convert/
imports nothing of the engine, the CLI wrappers pass these in.

Level numbering: level ``j`` = planes ``0..j`` (higher = more bytes = more
precision); an expert stored with fewer levels than asked runs at its highest.

Knows nothing about the scheduler: this is the resident reference path (the
streaming path decodes the same planes through the same registered decoders).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch

from moestream.convert.errors import ModelFormatError
from moestream.engine.experts import ResidentExperts
from moestream.engine.models.base import MoECausalLM

if TYPE_CHECKING:  # pragma: no cover
    from moestream.engine.streamed_calibration import LayerStreamedModel


def load_calibration_model(path: str | Path) -> MoECausalLM:
    """The HF model with every expert resident in fp32 (for ``collect_stats``; memory: the whole model)."""
    from moestream.engine.hf_loading import load_hf_model

    return load_hf_model(path)[0]


def load_calibration_stream(path: str | Path) -> "LayerStreamedModel":
    """The converter's calibration loader: the HF model run layer by layer (``collect_stats`` streams it).

    Holds one decoder layer's dense weights and one routed expert at a time, plus the calibration
    windows' hidden states; statistics are identical to :func:`load_calibration_model`'s
    (engine/streamed_calibration.py).

    Raises:
        ModelFormatError / UnsupportedModelError: unreadable or unsupported model.
    """
    from moestream.engine.streamed_calibration import LayerStreamedModel

    return LayerStreamedModel(path)


def is_shard_model(path: str | Path) -> bool:
    """True for a moestream shard folder or ``.gguf`` file."""
    p = Path(path)
    return p.suffix == ".gguf" or (p.is_dir() and not (p / "config.json").is_file() and any(p.glob("*.gguf")))


def stored_levels(path: str | Path) -> int:
    """Most levels any expert of a shard model stores (1 for HF folders)."""
    if not is_shard_model(path):
        return 1
    from moestream.convert.shards import ShardedModel

    with ShardedModel.open(path, verify="off") as reader:
        return max(reader.n_levels(l, e) for l, e in reader.expert_keys())


def load_eval_model(path: str | Path, level: int | None = None) -> tuple[MoECausalLM, str | None]:
    """Load a model with resident fp32 experts, each at ``min(level, its highest stored level)``.

    Args:
        path: HF folder, or moestream shard folder / shard-1 file.
        level: nested level cap (None = each expert's highest stored level).

    Returns:
        ``(model, tokenizer_json_text_or_None)``.

    Raises:
        ModelFormatError: unreadable model. ValueError: a negative level.
    """
    if level is not None and level < 0:
        raise ValueError(f"--level must be >= 0, got {level}")
    if not is_shard_model(path):
        from moestream.engine.hf_loading import load_hf_model

        tok = Path(path) / "tokenizer.json"
        return load_hf_model(path)[0], tok.read_text(encoding="utf-8") if tok.is_file() else None
    from moestream.convert.shards import ShardedModel
    from moestream.engine.hf_loading import build_model

    reader = ShardedModel.open(path, verify="once")
    try:
        model, _args = build_model(reader.model_type, reader.config)
        model.load_canonical({n: reader.read_dense(n).float() for n in reader.dense_names()})

        def items() -> Iterator[tuple[str, torch.Tensor]]:
            for layer, expert in reader.expert_keys():
                top = reader.n_levels(layer, expert) - 1
                lvl = top if level is None else min(level, top)
                for proj, t in reader.read_expert(layer, expert, lvl).items():
                    yield f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight", t.float().clone()

        experts = ResidentExperts.from_canonical(items(), torch.float32)
        moe = model.moe_layers()
        if experts.layers != moe:
            raise ModelFormatError(f"{reader.paths[0]}: experts stored for layers {experts.layers}, the config "
                                   f"expects MoE layers {moe}; re-run convert")
        model.set_expert_provider(experts)
        return model, reader.tokenizer_json
    finally:
        reader.close()
