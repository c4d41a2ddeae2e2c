"""The Python API: ``Engine.load(...)``, ``generate``, ``chat``, ``stats``, ``close``.

Owns :class:`Engine` (one loaded model + tokenizer + KV cache; one request at
a time, a second concurrent call raises :class:`EngineBusyError`), model
resolution (``"default"`` -> the embedded ``engine/default_model/`` folder,
HF folders via :mod:`moestream.engine.hf_loading`, moestream shard folders or
files via :mod:`moestream.convert.shards`) and device selection.

Knows nothing about the CLI or HTTP. Example::

    from moestream.engine.api import Engine

    with Engine.load("path/to/model", memory="6GB") as engine:
        print(engine.generate("Once upon a time", max_tokens=32).text)
        for chunk in engine.chat([{"role": "user", "content": "hi"}], stream=True):
            print(chunk.text, end="", flush=True)
"""

from __future__ import annotations

import logging
import resource
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import psutil
import torch

from moestream.convert.errors import (BudgetError, ChecksumError, ModelFormatError, MoestreamError,
                                      UnsupportedModelError)
from moestream.engine.generate import (ContextOverflowError, GenerationChunk, GenerationResult, GenerationStats,
                                       TextGeneration, check_fits, generate_ids)
from moestream.engine.sampling import InvalidRequestError, Sampler, SamplingParams
from moestream.engine.tokenizer import ChatTemplateError, Tokenizer

__all__ = [
    "Engine", "EngineBusyError", "EngineClosedError", "GenerationChunk", "GenerationResult", "GenerationStats",
    "TextGeneration", "MoestreamError", "ModelFormatError", "ChecksumError", "UnsupportedModelError", "BudgetError",
    "InvalidRequestError", "ContextOverflowError", "ChatTemplateError", "DEFAULT_MODEL_DIR", "resolve_model_path",
]

log = logging.getLogger("moestream")

#: The embedded default model's folder (HF files: config.json, model.safetensors, tokenizer files).
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"
#: Context length when none is given.
DEFAULT_CTX = 2048
DEVICES = ("auto", "cpu", "cuda", "mps")


class EngineBusyError(MoestreamError):
    """The engine is already running a request (it serves one at a time)."""


class EngineClosedError(MoestreamError):
    """The engine was closed; load a new one."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: ``kind`` is ``"hf"``, ``"shards"`` (moestream) or ``"llamacpp"`` (stock GGUF)."""

    kind: str
    path: Path
    name: str


def resolve_model_path(path_or_name: str | Path) -> ModelSource:
    """Find the model a user named.

    Args:
        path_or_name: ``"default"`` (the embedded model), an HF folder
            (``config.json`` + safetensors), a moestream shard folder, or a
            ``.gguf`` shard file.

    Returns:
        The :class:`ModelSource`.

    Raises:
        ModelFormatError: nothing usable at that path (the message says what was expected).
    """
    if str(path_or_name) == "default":
        if not (DEFAULT_MODEL_DIR / "config.json").is_file():
            raise ModelFormatError(
                f"the embedded default model is missing from this install ({DEFAULT_MODEL_DIR} has no config.json); "
                "pass a model path instead, e.g. `moestream run path/to/hf_model -p ...`")
        return ModelSource("hf", DEFAULT_MODEL_DIR, "default")
    path = Path(path_or_name).expanduser()
    if not path.exists():
        raise ModelFormatError(f"no model at '{path}': the path does not exist; give an HF model folder "
                               "(config.json + *.safetensors), a moestream shard folder or .gguf file, or 'default'")
    name = path.stem if path.is_file() else path.resolve().name
    if path.is_file():
        if path.suffix == ".gguf":
            return ModelSource("llamacpp" if _is_llamacpp_gguf(path) else "shards", path, name)
        raise ModelFormatError(f"'{path}' is a file but not a .gguf shard; give the model folder instead")
    if (path / "config.json").is_file():
        return ModelSource("hf", path, name)
    if any(path.glob("*.gguf")):
        return ModelSource("shards", path, name)
    raise ModelFormatError(f"'{path}' holds neither config.json (HF model) nor *.gguf shards (moestream model)")


def _is_llamacpp_gguf(path: Path) -> bool:
    """True for a GGUF whose ``general.architecture`` is not moestream's own shard format."""
    from moestream.convert.constants import ARCH

    try:
        from gguf import GGUFReader

        field = GGUFReader(str(path)).fields.get("general.architecture")
        arch = bytes(field.parts[field.data[0]]).decode() if field is not None else None
    except Exception:  # unreadable: let the shard reader raise its clear ModelFormatError
        return False
    return arch is not None and arch != ARCH


def resolve_device(device: str) -> torch.device:
    """Map ``auto``/``cpu``/``cuda``/``mps`` to an available torch device.

    Raises:
        MoestreamError: unknown name, or the requested accelerator is not available.
    """
    if device not in DEVICES:
        raise MoestreamError(f"unknown device '{device}'; choose one of {', '.join(DEVICES)}")
    cuda = torch.cuda.is_available()
    mps = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    if device == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if device == "cuda" and not cuda:
        raise MoestreamError("--device cuda was requested but this torch build sees no CUDA GPU; use --device cpu")
    if device == "mps" and not mps:
        raise MoestreamError("--device mps was requested but Metal (MPS) is not available; use --device cpu")
    return torch.device(device)


def _parse_memory(memory: str | int | None) -> int | None:
    """The budget in bytes (parsed once, by ``scheduler/budget.py``)."""
    if memory is None:
        return None
    from moestream.scheduler.budget import parse_memory

    try:
        return int(parse_memory(memory))
    except ValueError as exc:
        raise BudgetError(f"cannot use --memory {memory!r}: {exc}") from exc


def _load_hf(folder: Path, progress: bool = False) -> tuple[torch.nn.Module, Tokenizer, dict]:
    """Load an HF folder: model with resident experts, tokenizer, config (``progress``: a bar on stderr)."""
    from moestream.engine.hf_loading import load_hf_model

    tokenizer = Tokenizer.from_folder(folder)
    model, args = load_hf_model(folder, progress=progress)
    return model, tokenizer, {"model_type": args.model_type, "max_position_embeddings": args.max_position_embeddings}


def _check_hf_budget(folder: Path, memory_bytes: int | None, ctx: int | None) -> None:
    """Refuse (before reading weights) an HF folder whose fully resident load exceeds the budget."""
    if memory_bytes is None:
        return
    import json

    from moestream.engine.planning import check_resident_budget, model_footprint
    from moestream.engine.streaming import default_ctx

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"{folder / 'config.json'}: cannot be read ({exc})") from exc
    fp = model_footprint(config.get("model_type", ""), config, [1], default_ctx(config, ctx, DEFAULT_CTX))
    check_resident_budget(fp, memory_bytes, str(folder))


def _load_shards_streaming(path: Path, memory: str | int | None, ctx: int | None, precision_policy: str,
                           cache_policy: str, device: torch.device, *, progress: bool = False,
                           level: int | None = None) -> tuple[torch.nn.Module, Tokenizer, dict]:
    """Plan the budget, then load a shard model whose experts stream through the arena.

    ``progress`` shows a bar on stderr while the dense weights load; ``level`` caps nested levels.

    Raises:
        BudgetError: the budget is below the minimum (names it), before any weight is read.
        ModelFormatError: bad shards, or shards without a tokenizer.
    """
    from moestream.convert.shards import ShardedModel
    from moestream.engine.streaming import load_streaming_model

    with ShardedModel.open(path, verify="off") as reader:
        tokenizer, codec = Tokenizer.from_shards(reader), reader.codec
    try:
        loaded = load_streaming_model(path, memory=memory, ctx=ctx if ctx is None else max(int(ctx), 2),
                                      precision_policy=precision_policy, cache_policy=cache_policy,
                                      device=device, progress=progress, level=level)
    except ValueError as exc:  # unknown policy names, a negative level
        raise MoestreamError(str(exc)) from exc
    args = loaded.args
    return loaded.model, tokenizer, {"model_type": args.model_type,
                                     "max_position_embeddings": args.max_position_embeddings,
                                     "memory_plan": loaded.plan.as_dict(), "precision_policy": precision_policy,
                                     "cache_policy": cache_policy, "expert_codec": codec,
                                     "expert_level": "max" if level is None else level}


def _move_to(model: torch.nn.Module, device: torch.device, requested: str) -> torch.device:
    """Put the model (and its expert provider) on ``device``; ``auto`` falls back to CPU if it cannot."""
    if device.type == "cpu":
        return device
    provider = getattr(model, "expert_provider", None)
    if provider is not None and not hasattr(provider, "to"):
        if requested == "auto":
            log.warning("expert provider %s cannot move to %s yet; running on cpu", type(provider).__name__, device)
            return torch.device("cpu")
        raise MoestreamError(f"running on {device.type} needs an expert provider that can move to it "
                             f"({type(provider).__name__} cannot yet); use --device cpu")
    model.to(device)
    if provider is not None:
        provider.to(device)
    return device


def _peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class Engine:
    """One loaded model, ready to generate. Thread-safe for one request at a time.

    Build it with :meth:`Engine.load`. ``generate``/``chat`` return a
    :class:`GenerationResult`, or with ``stream=True`` a :class:`TextGeneration`
    iterator of :class:`GenerationChunk` (close it, or exhaust it, to free the
    engine for the next request).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, *, name: str, source: ModelSource | None,
                 device: torch.device, ctx: int, memory_bytes: int | None, info: Mapping[str, Any] | None = None,
                 load_s: float = 0.0) -> None:
        """Wrap an already-loaded model (most callers want :meth:`load`).

        Args:
            model: callable ``(input_ids [1,T], cache) -> logits [1,T,V]`` with ``make_cache``.
            tokenizer: the model's tokenizer.
            name: the model's display name (also the server's model id).
            source: where it was loaded from.
            device: where it runs.
            ctx: context length (KV cache positions).
            memory_bytes: the memory budget, if one was given.
            info: extra facts for :meth:`stats` (``model_type``, ...).
            load_s: seconds the load took.
        """
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.source = source
        self.device = device
        self.ctx = int(ctx)
        self.memory_bytes = memory_bytes
        self.info = dict(info or {})
        self.load_s = load_s
        self.cache = model.make_cache(1, self.ctx, device=device)
        self._lock = threading.Lock()
        self._closed = False
        self._requests = 0
        self._generated_total = 0
        self._last: GenerationStats | None = None

    # ---------------------------------------------------------------- loading
    @classmethod
    def load(cls, path_or_name: str | Path = "default", memory: str | int | None = None, device: str = "auto",
             ctx: int | None = None, precision_policy: str = "exact", cache_policy: str = "lru",
             progress: bool = False, level: int | None = None) -> "Engine":
        """Load a model.

        Args:
            path_or_name: ``"default"`` (embedded model), an HF folder, a shard folder or ``.gguf`` file.
            memory: memory budget (``"6GB"``, ``"75%"``, bytes); parsed once and reported in
                :meth:`stats` (the planner applies it where the model supports streaming).
            device: ``auto``, ``cpu``, ``cuda`` or ``mps``.
            ctx: context length in tokens (default: min(2048, the model's maximum)).
            precision_policy: ``exact`` (bit-identical to the resident model) or ``adaptive``
                (run a late expert at a resident lower level); shard models only.
            cache_policy: expert cache eviction, ``lru`` | ``lfu`` | ``consistency``; shard models only.
            progress: show a tqdm bar on stderr while weights load (HF folders and streamed shard
                models; off by default here, on in the CLI when stderr is a terminal).
            level: nested-codec shard models: the highest level to use (0 = the lowest precision;
                None = each expert's highest stored level). Planes above it are never read.

        A moestream shard model is planned BEFORE anything is read (``engine/planning.py``;
        default budget: a safe fraction of available RAM) and its experts always stream
        through one fixed arena (``engine/streaming.py``); an HF folder loads fully resident,
        checked against ``memory`` when one is given.

        Returns:
            A ready :class:`Engine`.

        Raises:
            ModelFormatError: missing/corrupt model files (names the file).
            UnsupportedModelError: unknown architecture (names the supported ones).
            BudgetError: an unparseable memory size.
            MoestreamError: an unavailable device or a bad ``ctx``.
        """
        t0 = time.perf_counter()
        memory_bytes = _parse_memory(memory)
        target = resolve_device(device)
        src = resolve_model_path(path_or_name)
        log.info("loading %s (%s) from %s", src.name, src.kind, src.path)
        if src.kind == "hf":
            _check_hf_budget(src.path, memory_bytes, ctx)
            model, tokenizer, info = _load_hf(src.path, progress)
        elif src.kind == "llamacpp":  # stock llama.cpp MoE GGUF: experts decoded resident (no streaming yet)
            from moestream.engine.gguf_loading import load_llamacpp_gguf_with_tokenizer

            model, tokenizer, info = load_llamacpp_gguf_with_tokenizer(src.path)
        else:
            model, tokenizer, info = _load_shards_streaming(src.path, memory, ctx, precision_policy, cache_policy,
                                                            target, progress=progress, level=level)
            memory_bytes = info["memory_plan"]["budget_bytes"]
        limit = int(info.get("max_position_embeddings") or DEFAULT_CTX)
        ctx = min(DEFAULT_CTX, limit) if ctx is None else int(ctx)
        if ctx < 2:
            raise MoestreamError(f"--ctx must be at least 2 tokens, got {ctx}")
        if ctx > limit:
            log.warning("context %d exceeds the model's max_position_embeddings %d", ctx, limit)
        vocab = getattr(getattr(model, "args", None), "vocab_size", None)
        if vocab is not None and tokenizer.vocab_size > vocab:
            log.warning("tokenizer has %d tokens but the model only %d", tokenizer.vocab_size, vocab)
        target = _move_to(model, target, device)
        info["format"] = src.kind
        engine = cls(model, tokenizer, name=src.name, source=src, device=target, ctx=ctx, memory_bytes=memory_bytes,
                     info=info, load_s=time.perf_counter() - t0)
        log.info("loaded %s in %.2f s on %s (context %d)", src.name, engine.load_s, target, ctx)
        return engine

    # ---------------------------------------------------------------- requests
    def count_tokens(self, text: str) -> int:
        """Tokens ``text`` encodes to (as a plain prompt)."""
        return len(self.tokenizer.encode(text, add_special_tokens=True))

    def generate(self, prompt: str | Sequence[int], *, max_tokens: int | None = 256, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None, stop: str | Sequence[str] | None = None,
                 repetition_penalty: float = 1.0, stream: bool = False) -> GenerationResult | TextGeneration:
        """Continue a prompt.

        Args:
            prompt: text (or token ids) to continue.
            max_tokens: most new tokens (None: until EOS or the context is full).
            temperature: 0 = greedy.
            top_p: nucleus sampling mass (1 = off).
            top_k: keep the k most likely tokens (0 = off).
            seed: makes sampling reproducible.
            stop: string(s) that end the text (not included).
            repetition_penalty: > 1 discourages repeats.
            stream: return an iterator of chunks instead of the finished result.

        Returns:
            :class:`GenerationResult`, or :class:`TextGeneration` when ``stream``.

        Raises:
            EngineBusyError: another request is running.
            EngineClosedError: after :meth:`close`.
            InvalidRequestError: a bad setting; ContextOverflowError when the prompt does not fit.
        """
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        else:
            ids = [int(i) for i in prompt]
        return self._run(ids, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                         stop=stop, repetition_penalty=repetition_penalty, stream=stream)

    def chat(self, messages: Sequence[Mapping[str, Any]], *, max_tokens: int | None = 512, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, seed: int | None = None, stop: str | Sequence[str] | None = None,
             repetition_penalty: float = 1.0, stream: bool = False) -> GenerationResult | TextGeneration:
        """Answer a conversation using the model's chat template.

        Args:
            messages: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``.
            (others as in :meth:`generate`)

        Returns:
            The assistant's reply as a result or a stream.

        Raises:
            ChatTemplateError: the model has no chat template or the messages are malformed.
            (others as in :meth:`generate`)
        """
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return self._run(ids, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                         stop=stop, repetition_penalty=repetition_penalty, stream=stream)

    def chat_prompt_tokens(self, messages: Sequence[Mapping[str, Any]]) -> int:
        """Tokens the templated ``messages`` take (to trim history before :meth:`chat`)."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def _run(self, ids: list[int], *, max_tokens: int | None, temperature: float, top_p: float, top_k: int,
             seed: int | None, stop: str | Sequence[str] | None, repetition_penalty: float,
             stream: bool) -> GenerationResult | TextGeneration:
        """Validate, take the lock, and start the generation."""
        if self._closed:
            raise EngineClosedError("this engine was closed; create a new one with Engine.load(...)")
        params = SamplingParams(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p), seed=seed,
                                repetition_penalty=float(repetition_penalty))
        stops = _stop_list(stop)
        if max_tokens is None:
            max_tokens = self.ctx
        if isinstance(max_tokens, bool) or int(max_tokens) < 1:
            raise InvalidRequestError(f"max_tokens must be a positive integer, got {max_tokens}")
        vocab = int(getattr(getattr(self.model, "args", None), "vocab_size", 0) or 0)
        if vocab and any(not (0 <= i < vocab) for i in ids):
            raise InvalidRequestError(f"token ids must be in [0, {vocab})")
        check_fits(len(ids), self.ctx)
        if not self._lock.acquire(blocking=False):
            raise EngineBusyError("the engine is busy with another request; it runs one at a time — "
                                  "wait for it to finish (or close its stream) and retry")
        try:
            stats = GenerationStats()
            token_ids = generate_ids(self.model, self.cache, ids, Sampler(params), max_tokens=int(max_tokens),
                                     eos_ids=frozenset(self.tokenizer.eos_token_ids), stats=stats, device=self.device)
            gen = TextGeneration(token_ids, self.tokenizer.stream_decoder(), stops, stats, on_finish=self._finished)
        except BaseException:
            self._lock.release()
            raise
        return gen if stream else gen.result()

    def _finished(self, stats: GenerationStats) -> None:
        """Record a finished (or cancelled) request and free the engine."""
        self._requests += 1
        self._generated_total += stats.generated_tokens
        self._last = stats
        self._lock.release()

    # ---------------------------------------------------------------- state
    @property
    def busy(self) -> bool:
        """True while a request runs."""
        return self._lock.locked()

    def stats(self) -> dict[str, Any]:
        """Engine-wide numbers (safe to call while a request runs).

        Returns:
            ``model``, ``format``, ``model_type``, ``device``, ``context_length``,
            ``memory_budget_bytes``, ``rss_bytes``, ``peak_rss_bytes``, ``kv_cache_bytes``,
            ``load_s``, ``requests``, ``generated_tokens_total``, ``busy``,
            ``last_request`` (a :class:`GenerationStats` dict or None) and
            ``experts`` (the expert provider's stats, e.g. cache hits).
        """
        provider = getattr(self.model, "expert_provider", None)
        return {
            "model": self.name,
            "source": str(self.source.path) if self.source else None,
            "format": self.info.get("format"),
            "model_type": self.info.get("model_type"),
            "device": str(self.device),
            "context_length": self.ctx,
            "memory_budget_bytes": self.memory_bytes,
            "rss_bytes": psutil.Process().memory_info().rss,
            "peak_rss_bytes": _peak_rss(),
            "kv_cache_bytes": int(getattr(self.cache, "nbytes", 0)),
            "load_s": round(self.load_s, 4),
            "requests": self._requests,
            "generated_tokens_total": self._generated_total,
            "busy": self.busy,
            "closed": self._closed,
            "last_request": self._last.to_dict() if self._last else None,
            "experts": provider.stats() if provider is not None and hasattr(provider, "stats") else None,
            "memory_plan": self.info.get("memory_plan"),
        }

    def close(self) -> None:
        """Free the model and cache; later calls raise :class:`EngineClosedError`.

        Raises:
            EngineBusyError: while a request is still running (close its stream first).
        """
        if self._closed:
            return
        if not self._lock.acquire(blocking=False):
            raise EngineBusyError("cannot close the engine while a request runs; close the stream first")
        try:
            self._closed = True
            provider = getattr(self.model, "expert_provider", None)
            if provider is not None and hasattr(provider, "close"):
                provider.close()
            self.cache = None  # type: ignore[assignment]
            self.model = None  # type: ignore[assignment]
        finally:
            self._lock.release()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Engine(model={self.name!r}, device={self.device}, ctx={self.ctx})"


def _stop_list(stop: str | Sequence[str] | None) -> list[str]:
    """Normalise ``stop`` to a list of non-empty strings.

    Raises:
        InvalidRequestError: for non-strings or more than 16 sequences.
    """
    if stop is None:
        return []
    items = [stop] if isinstance(stop, str) else list(stop)
    if len(items) > 16 or not all(isinstance(s, str) for s in items):
        raise InvalidRequestError("stop must be a string or a list of at most 16 strings")
    return [s for s in items if s]


def iter_text(chunks: Iterator[GenerationChunk]) -> Iterator[str]:
    """Just the text of a chunk stream (convenience for apps)."""
    for chunk in chunks:
        if chunk.text:
            yield chunk.text
