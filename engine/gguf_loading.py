"""Load a stock llama.cpp MoE GGUF into an engine model.

Owns :func:`load_llamacpp_gguf` (family model built from the GGUF's
HF-style config, dense weights dequantized once) and
:class:`GGUFExpertProvider`, which decodes routed experts from their byte
ranges inside llama.cpp's stacked 3-D tensors: either all at load
(``resident=True``, the reference path) or on every ``acquire`` (no cache:
memory stays at the dense weights plus the experts in use).

Knows nothing about llama.cpp names or quant formats (``convert/llamacpp_gguf.py``
does) nor about the streaming scheduler.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from moestream.convert.hf_checkpoint import expert_name
from moestream.convert.llamacpp_gguf import LlamaCppGGUF
from moestream.engine.experts import ExpertView, ResidentExperts
from moestream.engine.hf_loading import build_model
from moestream.engine.models.base import BaseModelArgs, MoECausalLM


class GGUFExpertProvider:
    """Decodes each requested expert from its byte ranges on ``acquire`` (no caching).

    Follows the ``ExpertProvider`` protocol of ``engine/experts.py``.
    """

    def __init__(self, gguf: LlamaCppGGUF, dtype: torch.dtype = torch.float32) -> None:
        """Args:
        gguf: the opened file (kept open while the provider is used).
        dtype: dtype of the decoded views.
        """
        self._gguf = gguf
        self._dtype = dtype
        self._device = torch.device("cpu")
        self._live: dict[tuple[int, int], ExpertView] = {}
        self._decoded = 0
        self._bytes = 0

    def hint(self, layer: int, predicted_ids: torch.Tensor, predicted_weights: torch.Tensor) -> None:
        """No prefetch: experts are decoded when acquired."""

    def acquire(self, layer: int, expert_ids: Sequence[int], gate_weights: Sequence[float]) -> dict[int, ExpertView]:
        """Read and decode each expert's three byte ranges (see ``ExpertProvider.acquire``)."""
        out = {}
        for e in expert_ids:
            w = self._gguf.read_expert(layer, int(e))
            self._decoded += 1
            self._bytes += sum(self._gguf.expert_range(layer, int(e), p).nbytes for p in w)
            gate, up, down = (w[p].to(self._device, self._dtype) for p in ("gate_proj", "up_proj", "down_proj"))
            view = ExpertView(gate=gate, up=up, down=down)
            self._live[(layer, int(e))] = view
            out[int(e)] = view
        return out

    def to(self, device: torch.device | str) -> "GGUFExpertProvider":
        """Decode experts onto ``device`` from now on."""
        self._device = torch.device(device)
        return self

    def release(self, layer: int, expert_ids: Sequence[int]) -> None:
        """Drop the decoded views."""
        for e in expert_ids:
            self._live.pop((layer, int(e)), None)

    def stats(self) -> dict:
        """``{"provider": "gguf-on-demand", "decoded": n, "bytes_read": b}``."""
        return {"provider": "gguf-on-demand", "decoded": self._decoded, "bytes_read": self._bytes}


def load_llamacpp_gguf(path: str | Path, dtype: torch.dtype = torch.float32,
                       resident: bool = True) -> tuple[MoECausalLM, BaseModelArgs]:
    """Load a llama.cpp MoE GGUF (qwen3moe, qwen2moe, llama/Mixtral, olmoe, deepseek2).

    Args:
        path: the ``.gguf`` file.
        dtype: compute/storage dtype of the engine model (fp32 is the reference).
        resident: decode every expert now into a :class:`ResidentExperts` (True), or decode
            experts from their byte ranges on each use with :class:`GGUFExpertProvider` (False).

    Returns:
        ``(model, args)``; ``model.gguf`` holds the opened :class:`LlamaCppGGUF` (its config,
        tokenizer metadata and chat template).

    Raises:
        ModelFormatError: unreadable file or missing tensors/keys.
        UnsupportedModelError: a dense or unsupported architecture (names the supported ones).
    """
    gguf = LlamaCppGGUF.open(path)
    model, args = build_model(gguf.model_type, gguf.config, dtype)
    model.load_canonical({n: gguf.read_dense(n) for n in gguf.dense_names()})
    if resident:
        items = ((expert_name(layer, e, proj), t) for layer in gguf.moe_layers for e in range(gguf.num_experts)
                 for proj, t in gguf.read_expert(layer, e).items())
        model.set_expert_provider(ResidentExperts.from_canonical(items, dtype))
    else:
        model.set_expert_provider(GGUFExpertProvider(gguf, dtype))
    model.gguf = gguf  # type: ignore[attr-defined]
    return model, args


def tokenizer_json_from_gguf(meta: dict) -> str:
    """Rebuild a HF ``tokenizer.json`` from a GGUF's ``tokenizer.ggml.*`` fields (byte-level BPE).

    Args:
        meta: :meth:`LlamaCppGGUF.tokenizer_metadata` output.

    Returns:
        The ``tokenizer.json`` text.

    Raises:
        UnsupportedModelError: a tokenizer model other than ``gpt2`` (byte-level BPE).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from moestream.convert.errors import UnsupportedModelError

    if meta.get("model") != "gpt2":
        raise UnsupportedModelError(f"GGUF tokenizer model {meta.get('model')!r} is not supported; "
                                    "moestream reads byte-level BPE ('gpt2') GGUF tokenizers")
    tokens = [str(t) for t in meta["tokens"]]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges = [tuple(str(m).split(" ", 1)) for m in (meta.get("merges") or [])]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    token_types = meta.get("token_type") or []
    control = [tokens[i] for i, kind in enumerate(token_types) if int(kind) == 3]  # llama.cpp CONTROL tokens
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in control])
    return tokenizer.to_str()


def load_llamacpp_gguf_with_tokenizer(path: str | Path) -> tuple[MoECausalLM, "object", dict]:
    """Model (resident experts), tokenizer and info for a llama.cpp MoE GGUF, as ``Engine.load`` wants them.

    Raises:
        ModelFormatError: unreadable GGUF. UnsupportedModelError: architecture or tokenizer not supported.
    """
    from moestream.engine.tokenizer import Tokenizer

    model, args = load_llamacpp_gguf(path)
    meta = model.gguf.tokenizer_metadata()  # type: ignore[attr-defined]
    eos = [int(meta["eos_token_id"])] if meta.get("eos_token_id") is not None else []
    tokenizer = Tokenizer.from_str(tokenizer_json_from_gguf(meta), chat_template=model.gguf.chat_template(),  # type: ignore[attr-defined]
                                   eos_token_ids=eos)
    return model, tokenizer, {"model_type": args.model_type, "max_position_embeddings": args.max_position_embeddings}
