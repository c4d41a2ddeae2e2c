"""Soak: 10,000 generated tokens over several conversations with experts streaming under the minimum budget.

Proves, for one :class:`Engine` kept alive for the whole run (a tiny
``qwen3_moe`` converted to shards, budget = the planner's minimum so nearly
every token streams experts through a 4-slot arena):

- resident memory does not drift: after a warm-up of 1,500 tokens the median
  RSS of the last requests is within 2 % of the median of the first ones;
- no file-descriptor or thread leak: the open descriptors and the thread count
  are the same after the run as after warm-up (streams closed early included);
- stats stay consistent: ``generated_tokens_total`` and ``requests`` equal
  what the client counted, every loader read moved exactly one expert range,
  no read failed or was retried, prefetches used + wasted <= issued, and the
  hit rate is hits / (hits + misses).

Marked ``slow``; ``.ci/run`` still runs it (about 2 minutes on one busy core).
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import threading
from pathlib import Path

import psutil
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from runtime_model import build_runtime_model  # noqa: E402

from moestream.convert.convert import convert_checkpoint  # noqa: E402
from moestream.convert.shard_reader import ShardedModel  # noqa: E402
from moestream.engine.api import Engine  # noqa: E402
from moestream.engine.planning import min_streaming_budget  # noqa: E402
from moestream.engine.streaming import shard_footprint  # noqa: E402

torch.set_num_threads(1)
pytestmark = pytest.mark.slow

CTX = 256
TARGET_TOKENS = 10_000
WARMUP_TOKENS = 1_500
MAX_REQUESTS = 2_000  # bound on the loop; 10,000 tokens take ~150 requests
TOPICS = [
    ("You are terse.", "Tell me about the quick brown fox."),
    ("You answer in lists.", "How do mixture of experts models route tokens?"),
    ("You are cheerful.", "Hello, how are you today?"),
    ("You like accents.", "Caf\u00e9 na\u00efve \u00fcber \u65e5\u672c\u8a9e?"),
    ("You are a memory planner.", "Which experts stay resident under a small budget?"),
    ("You repeat yourself.", "Say something about the lazy dog."),
]


def _fds() -> int:
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else psutil.Process().num_fds()


def _rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


class Client:
    """Drives conversations against the engine and counts what it got."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.tokens = 0
        self.requests = 0
        self.histories = [[{"role": "system", "content": s}] for s, _ in TOPICS]

    def turn(self, i: int) -> None:
        conv = self.histories[i % len(TOPICS)]
        conv.append({"role": "user", "content": TOPICS[i % len(TOPICS)][1] + f" (turn {i})"})
        max_tokens = 48 + (i * 37) % 64
        while self.engine.chat_prompt_tokens(conv) + max_tokens > CTX and len(conv) > 2:
            del conv[1:3]  # drop the oldest user/assistant pair, keep the system message
        kw = dict(max_tokens=max_tokens, temperature=0.9, top_p=0.95, seed=i)
        if i % 3 == 0:  # non-streaming
            r = self.engine.chat(conv, **kw)
            assert len(r.token_ids) == r.stats.generated_tokens <= max_tokens
            text, n = r.text, r.stats.generated_tokens
        else:  # streaming; every 7th stream is abandoned after a few chunks (a client going away)
            stream = self.engine.chat(conv, stream=True, **kw)
            parts, n = [], 0
            for k, chunk in enumerate(stream):
                parts.append(chunk.text)
                n += len(chunk.token_ids)
                if i % 7 == 1 and k == 4:
                    stream.close()
                    break
            text = "".join(parts)
        assert not self.engine.busy
        conv.append({"role": "assistant", "content": text})
        self.tokens += n
        self.requests += 1


@pytest.fixture(scope="module")
def shard_model(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("soak")
    out = root / "shards"
    convert_checkpoint(build_runtime_model(root / "hf"), out, dtype="f32", progress=False)
    return out


def test_soak_10k_tokens_no_drift_no_leaks(shard_model: Path) -> None:
    with ShardedModel.open(shard_model, verify="off") as r:
        budget = min_streaming_budget(shard_footprint(r, CTX))
    engine = Engine.load(str(shard_model), memory=budget, ctx=CTX)
    try:
        client = Client(engine)
        i = 0
        while client.tokens < WARMUP_TOKENS:
            client.turn(i)
            i += 1
        fds0, threads0, pythreads0 = _fds(), psutil.Process().num_threads(), threading.active_count()
        samples = []
        while client.tokens < TARGET_TOKENS and i < MAX_REQUESTS:
            client.turn(i)
            i += 1
            samples.append(_rss())
        assert client.tokens >= TARGET_TOKENS, f"only {client.tokens} tokens in {i} requests"
        assert len(samples) >= 20

        early, late = statistics.median(samples[:10]), statistics.median(samples[-10:])
        drift = (late - early) / early
        assert drift < 0.02, f"RSS drift {drift:.2%} after warm-up ({early} -> {late} bytes)"

        assert _fds() <= fds0, "file descriptors leaked"  # fewer is fine (an fd from warm-up closed)
        assert psutil.Process().num_threads() <= threads0 and threading.active_count() <= pythreads0, "threads leaked"

        s = engine.stats()
        assert s["requests"] == client.requests and s["generated_tokens_total"] == client.tokens
        assert s["memory_budget_bytes"] == budget and not s["busy"]
        ex = s["experts"]
        loader, totals = ex["loader"], ex["totals"]
        slot_bytes = ex["arena"]["slot_bytes"][0]
        assert loader["failures"] == 0 and loader["retries"] == 0
        assert loader["reads"] > 0 and loader["bytes_read"] == loader["reads"] * slot_bytes
        assert loader["reads"] <= totals["misses"] + totals["prefetch_issued"]
        assert totals["prefetch_used"] + totals["prefetch_wasted"] <= totals["prefetch_issued"]
        assert totals["hit_rate"] == pytest.approx(totals["hits"] / (totals["hits"] + totals["misses"]))
        assert ex["arena_slots"] < ex["experts_total"], "the budget must force streaming"
        assert ex["capacity_retries"] >= 0 and ex["acquires"] >= client.tokens
    finally:
        engine.close()
