"""Next-token sampling: greedy, temperature, top-k, top-p, repetition penalty, seeds.

Owns :class:`SamplingParams` (validated request settings),
:class:`Sampler` (turns one logits row into one token id, reproducibly for a
given seed via its own ``torch.Generator``) and :class:`InvalidRequestError`
(the error for any bad generation setting).

Knows nothing about models, tokenizers or the KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from moestream.convert.errors import MoestreamError


class InvalidRequestError(MoestreamError):
    """A generation request has a bad setting (the message names it and the valid range)."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token.

    Attributes:
        temperature: 0 means greedy (argmax); otherwise logits are divided by it.
        top_k: keep the k most likely tokens (0 = off).
        top_p: keep the smallest set whose probability reaches top_p (1.0 = off).
        seed: seeds this request's generator; None draws a random seed.
        repetition_penalty: >1 discourages tokens already seen (1.0 = off; CTRL-style).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        """Validate every field.

        Raises:
            InvalidRequestError: naming the bad field and its valid range.
        """
        if not (0.0 <= float(self.temperature) <= 100.0):
            raise InvalidRequestError(f"temperature must be between 0 and 100 (0 = greedy), got {self.temperature}")
        if int(self.top_k) < 0:
            raise InvalidRequestError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not (0.0 < float(self.top_p) <= 1.0):
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (0.0 < float(self.repetition_penalty) <= 10.0):
            raise InvalidRequestError(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}")
        if self.seed is not None and not (0 <= int(self.seed) < 2**63):
            raise InvalidRequestError(f"seed must be a non-negative integer below 2**63, got {self.seed}")

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax."""
        return self.temperature == 0.0 or self.top_k == 1


def apply_repetition_penalty(logits: torch.Tensor, seen: Iterable[int], penalty: float) -> torch.Tensor:
    """CTRL-style penalty: divide positive logits of seen tokens by ``penalty``, multiply negative ones.

    Args:
        logits: ``[V]`` fp32 logits (not modified).
        seen: ids already in the context.
        penalty: > 1 discourages repeats.

    Returns:
        Penalised ``[V]`` logits.
    """
    ids = torch.tensor(sorted(set(int(i) for i in seen)), dtype=torch.long, device=logits.device)
    if penalty == 1.0 or ids.numel() == 0:
        return logits
    out = logits.clone()
    picked = out[ids]
    out[ids] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return out


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit outside the k largest to -inf (``k <= 0`` keeps all).

    Args:
        logits: ``[V]``.
        k: how many to keep.

    Returns:
        ``[V]`` filtered logits.
    """
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of tokens whose probability reaches ``p``.

    The most likely token is always kept.

    Args:
        logits: ``[V]``.
        p: cumulative probability to keep, in (0, 1].

    Returns:
        ``[V]`` filtered logits.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    cum_before = torch.cumsum(probs, dim=-1) - probs  # mass strictly before each token
    drop_sorted = cum_before >= p
    drop_sorted[0] = False
    drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


class Sampler:
    """Picks next tokens for one request, reproducibly for a given seed."""

    def __init__(self, params: SamplingParams) -> None:
        """Args:
        params: validated settings; ``params.seed`` seeds a private CPU generator.
        """
        self.params = params
        self.generator = torch.Generator(device="cpu")
        if params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(int(params.seed))

    def __call__(self, logits: torch.Tensor, context_ids: Iterable[int] = ()) -> int:
        """Choose one token.

        Args:
            logits: ``[V]`` logits for the next position (any device).
            context_ids: prompt + generated ids so far (for the repetition penalty).

        Returns:
            The chosen token id.
        """
        p = self.params
        logits = logits.detach().float().cpu()
        if p.repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, context_ids, p.repetition_penalty)
        if p.greedy:
            return int(torch.argmax(logits))
        logits = filter_top_p(filter_top_k(logits / p.temperature, p.top_k), p.top_p)
        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))
