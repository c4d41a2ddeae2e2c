"""The generate loop: prefill, then decode one token at a time through the KV cache.

Owns :func:`generate_ids` (token ids in, token ids out, stopping on EOS /
max_tokens / a full cache), :class:`TextGeneration` (the text-level stream on
top: incremental detokenisation, stop sequences that never leak a partial
match, per-request :class:`GenerationStats`), and the records
:class:`GenerationChunk` and :class:`GenerationResult`.

Knows nothing about files, the CLI, HTTP or how experts are stored: the
model is anything with ``forward(input_ids [B,T], cache) -> logits [B,T,V]``.

Legend: T prompt tokens, V vocabulary.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Protocol, Sequence

import psutil
import torch

from moestream.engine.kv_cache import KVCache
from moestream.engine.sampling import InvalidRequestError, Sampler
from moestream.engine.tokenizer import StreamDecoder

#: Prompt tokens run per forward during prefill (bounds the [T, V] logits buffer).
PREFILL_CHUNK = 512


class ContextOverflowError(InvalidRequestError):
    """The prompt does not fit the context window."""


class CausalLM(Protocol):
    """What the loop needs from a model."""

    def __call__(self, input_ids: torch.Tensor, cache: KVCache | None) -> torch.Tensor: ...


@dataclass
class GenerationStats:
    """Numbers for one request (times in seconds, rates in tokens/s).

    ``decode_tok_s`` counts the tokens after the first (the first comes out of
    prefill); ``ttft_s`` is from the start of the request to the first token.
    """

    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    ttft_s: float = 0.0
    total_s: float = 0.0
    prefill_tok_s: float = 0.0
    decode_tok_s: float = 0.0
    peak_rss_bytes: int = 0
    finish_reason: str | None = None

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return asdict(self)

    def summary(self) -> str:
        """One line: ``prompt 12 tok @ 340.1 tok/s | 32 tok @ 25.3 tok/s | TTFT 0.04 s | peak RSS 512.0 MiB``."""
        return (f"prompt {self.prompt_tokens} tok @ {self.prefill_tok_s:.1f} tok/s | "
                f"generated {self.generated_tokens} tok @ {self.decode_tok_s:.1f} tok/s | "
                f"TTFT {self.ttft_s:.3f} s | peak RSS {self.peak_rss_bytes / 2**20:.1f} MiB | "
                f"finish {self.finish_reason}")


@dataclass
class GenerationChunk:
    """A piece of streamed output.

    Attributes:
        text: new text (may be empty while a multibyte character or a possible
            stop sequence is held back).
        token_ids: ids generated since the previous chunk.
        finish_reason: None until the last chunk, then ``"stop"`` (EOS or a stop
            sequence) or ``"length"`` (max_tokens or context full).
        stats: set on the last chunk.
    """

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stats: GenerationStats | None = None


@dataclass
class GenerationResult:
    """A finished, non-streamed generation."""

    text: str
    token_ids: list[int]
    finish_reason: str
    stats: GenerationStats

    def to_dict(self) -> dict:
        """``{"text", "tokens", "finish_reason", "stats"}`` (JSON-ready)."""
        return {"text": self.text, "tokens": list(self.token_ids), "finish_reason": self.finish_reason,
                "stats": self.stats.to_dict()}


_proc: psutil.Process | None = None


def _rss() -> int:
    """Current resident set size of this process in bytes (read every decode step: the handle is kept)."""
    global _proc
    if _proc is None or _proc.pid != os.getpid():  # a new handle after a fork
        _proc = psutil.Process()
    return _proc.memory_info().rss


def _last_logits(model: CausalLM, ids: Sequence[int], cache: KVCache, device: torch.device) -> torch.Tensor:
    """Run ``ids`` through the model in chunks and return the last position's ``[V]`` logits."""
    logits = None
    for i in range(0, len(ids), PREFILL_CHUNK):
        chunk = torch.tensor([list(ids[i:i + PREFILL_CHUNK])], dtype=torch.long, device=device)  # [1, T]
        logits = model(chunk, cache)[0, -1]  # [V]
    assert logits is not None, "prefill needs at least one token"
    return logits


def generate_ids(model: CausalLM, cache: KVCache, prompt_ids: Sequence[int], sampler: Sampler, *,
                 max_tokens: int, eos_ids: set[int] | frozenset[int], stats: GenerationStats,
                 device: torch.device | str = "cpu") -> Iterator[int]:
    """Prefill ``prompt_ids`` into a fresh cache, then yield sampled ids one by one.

    Stops (setting ``stats.finish_reason``) after an EOS id (which is not
    yielded; reason ``"stop"``), after ``max_tokens`` ids, or when the cache is
    full (reason ``"length"``). The caller may stop early by closing the
    generator.

    Args:
        model: the causal LM.
        cache: a KV cache; it is reset first.
        prompt_ids: at least one token id.
        sampler: picks each next id.
        max_tokens: most ids to yield (>= 1).
        eos_ids: ids that end generation.
        stats: filled in as the generation runs.
        device: where input ids go.

    Yields:
        Generated token ids.

    Raises:
        ContextOverflowError: when the prompt does not fit the cache.
        InvalidRequestError: for an empty prompt.
    """
    check_fits(len(prompt_ids), cache.max_len)
    device = torch.device(device)
    t0 = time.perf_counter()
    stats.prompt_tokens = len(prompt_ids)
    stats.peak_rss_bytes = max(stats.peak_rss_bytes, _rss())
    cache.reset()
    context = list(prompt_ids)
    with torch.inference_mode():
        logits = _last_logits(model, prompt_ids, cache, device)
        t1 = time.perf_counter()
        stats.prefill_s = t1 - t0
        stats.prefill_tok_s = len(prompt_ids) / stats.prefill_s if stats.prefill_s > 0 else 0.0
        stats.finish_reason = "length"
        t_first = t1
        for step in range(max_tokens):
            token = sampler(logits, context)
            now = time.perf_counter()
            if step == 0:
                stats.ttft_s, t_first = now - t0, now
            else:
                stats.decode_s = now - t_first
            stats.peak_rss_bytes = max(stats.peak_rss_bytes, _rss())
            if token in eos_ids:
                stats.finish_reason = "stop"
                return
            stats.generated_tokens += 1
            if stats.generated_tokens > 1 and stats.decode_s > 0:
                stats.decode_tok_s = (stats.generated_tokens - 1) / stats.decode_s
            yield token
            context.append(token)
            if step + 1 == max_tokens or cache.remaining == 0:
                return
            logits = model(torch.tensor([[token]], dtype=torch.long, device=device), cache)[0, -1]  # [V]


def check_fits(prompt_tokens: int, context_len: int) -> None:
    """Check that a prompt leaves room for at least one new token.

    Raises:
        InvalidRequestError: for an empty prompt.
        ContextOverflowError: naming both sizes and what to do.
    """
    if prompt_tokens == 0:
        raise InvalidRequestError("the prompt is empty; give at least one token of text")
    if prompt_tokens >= context_len:
        raise ContextOverflowError(
            f"the prompt has {prompt_tokens} tokens but the context window is {context_len}; "
            f"shorten the prompt or load the model with a larger context (--ctx)")


class _StopMatcher:
    """Finds stop sequences in streamed text and holds back any text that might start one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Add text; return ``(text safe to emit, stopped)``."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        cut = min((i for s in self.stops if (i := self.pending.find(s)) >= 0), default=-1)
        if cut >= 0:
            out, self.pending = self.pending[:cut], ""
            return out, True
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(s[:n]):
                    hold = n
                    break
        split = len(self.pending) - hold
        out, self.pending = self.pending[:split], self.pending[split:]
        return out, False

    def flush(self) -> str:
        """Release held-back text at the end."""
        out, self.pending = self.pending, ""
        return out


class TextGeneration:
    """One request's text stream: ids from :func:`generate_ids` -> :class:`GenerationChunk` s.

    Iterate it for chunks (the last one has ``finish_reason`` and ``stats``),
    or call :meth:`result` to run it to the end. :meth:`close` stops early.
    """

    def __init__(self, ids: Iterator[int], decoder: StreamDecoder, stops: Sequence[str], stats: GenerationStats,
                 on_finish: Callable[[GenerationStats], None] | None = None) -> None:
        """Args:
        ids: the running :func:`generate_ids` generator.
        decoder: incremental detokeniser for this request.
        stops: stop sequences (never included in the output).
        stats: the stats object ``ids`` fills.
        on_finish: called once with the final stats (also when closed early).
        """
        self._ids = ids
        self._decoder = decoder
        self._stop = _StopMatcher(stops)
        self.stats = stats
        self._on_finish = on_finish
        self._t0 = time.perf_counter()
        self._done = False
        self.text = ""
        self.token_ids: list[int] = []

    def __iter__(self) -> "TextGeneration":
        return self

    def __next__(self) -> GenerationChunk:
        if self._done:
            raise StopIteration
        try:
            token = next(self._ids)
        except StopIteration:
            tail = self._stop.feed(self._decoder.flush())[0] + self._stop.flush()
            return self._finish(tail, [], self.stats.finish_reason or "stop")
        except BaseException:
            self.stats.finish_reason = "error"
            self._close_ids()
            raise
        self.token_ids.append(token)
        text, stopped = self._stop.feed(self._decoder.push(token))
        if stopped:
            return self._finish(text, [token], "stop")
        self.text += text
        return GenerationChunk(text=text, token_ids=[token])

    def _finish(self, text: str, token_ids: list[int], reason: str) -> GenerationChunk:
        """Build the last chunk and run the finish callback."""
        self.text += text
        self.stats.finish_reason = reason
        self._close_ids()
        return GenerationChunk(text=text, token_ids=token_ids, finish_reason=reason, stats=self.stats)

    def _close_ids(self) -> None:
        """Stop the id generator and report the stats exactly once."""
        if self._done:
            return
        self._done = True
        self._ids.close()
        self.stats.total_s = time.perf_counter() - self._t0
        if self._on_finish is not None:
            self._on_finish(self.stats)

    def close(self) -> None:
        """Stop generating now (the text so far stays in :attr:`text`)."""
        if not self._done:
            self.stats.finish_reason = "cancelled"
        self._close_ids()

    def result(self) -> GenerationResult:
        """Run to the end and return the whole text, ids and stats."""
        try:
            for _ in self:
                pass
        finally:
            self.close()
        return GenerationResult(text=self.text, token_ids=list(self.token_ids),
                                finish_reason=self.stats.finish_reason or "stop", stats=self.stats)

    def __del__(self) -> None:
        # An abandoned stream must still free the engine it holds.
        if not getattr(self, "_done", True):
            self.close()

    def __enter__(self) -> "TextGeneration":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
