"""What both benchmark children share: the token file, the step timer and the one-line JSON report.

Owns :func:`read_tokens` (``{"prompt": [ids], "forced": [ids]}`` written once by
the harness so both engines see the same ids), :func:`time_passes` (prefill,
then ``n`` decode steps of one token each — the forced text's next id when
teacher forcing, else the argmax — repeated per pass with a fresh KV cache;
the first pass is the cold one, later passes run with whatever cache the
first left behind, i.e. warm) and :func:`emit` (prints the one JSON line the
harness parses).

Knows nothing about either engine: each child passes two callables,
``prefill(ids) -> logits [V]`` and ``step(id) -> logits [V]``.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np

MARKER = "BENCH_RESULT "


def read_tokens(path: str) -> tuple[list[int], list[int]]:
    """The prompt ids and the forced continuation ids from the harness's token file."""
    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    return [int(i) for i in d["prompt"]], [int(i) for i in d.get("forced", [])]


def peak_rss_bytes() -> int:
    """Peak RSS of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def io_counters() -> dict:
    """This process's storage reads so far: ``read_bytes`` (/proc/self/io, includes mmap page-fault
    reads and O_DIRECT reads of every thread) and ``majflt`` (major page faults); None where unknown."""
    out: dict = {"read_bytes": None, "majflt": resource.getrusage(resource.RUSAGE_SELF).ru_majflt}
    try:
        with open("/proc/self/io", encoding="ascii") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    out["read_bytes"] = int(line.split()[1])
    except OSError:
        pass
    return out


def time_pass(prefill: Callable[[Sequence[int]], Any], step: Callable[[int], Any], reset: Callable[[], None],
              prompt: Sequence[int], forced: Sequence[int], n: int, mode: str,
              stats: Callable[[], dict] | None = None) -> dict:
    """One pass: prefill ``prompt`` then ``n`` single-token decode steps.

    Args:
        prefill: runs the prompt, returns the last position's logits (array-like ``[V]``).
        step: runs one token, returns its logits.
        reset: empties the KV cache.
        prompt: prompt ids.
        forced: teacher-forced continuation (used when ``mode == "teacher"``; needs ``n`` ids).
        n: decode steps.
        mode: ``teacher`` or ``greedy``.
        stats: optional engine counters, sampled before and after (the difference is reported).

    Returns:
        A JSON-ready dict: ``prompt_tokens``, ``prefill_s``, ``prefill_tok_s``, ``ttft_s``,
        ``decode_steps``, ``decode_s``, ``decode_tok_s``, ``decode_tok_s_steady`` (second half of
        the steps), ``step_s``, ``tokens`` (the ids fed after the prompt), engine counters and
        :func:`io_counters` before the pass, after prefill and after decode.
    """
    if mode == "teacher" and len(forced) < n:
        raise ValueError(f"teacher forcing needs {n} forced ids, the token file has {len(forced)}")
    before = stats() if stats else None
    io0 = io_counters()
    reset()
    t0 = time.perf_counter()
    logits = prefill(prompt)
    nxt = int(np.argmax(np.asarray(logits)))
    t1 = time.perf_counter()
    mid = stats() if stats else None
    io1 = io_counters()
    fed, steps = [], []
    for i in range(n):
        tok = int(forced[i]) if mode == "teacher" else nxt
        s0 = time.perf_counter()
        logits = step(tok)
        nxt = int(np.argmax(np.asarray(logits)))
        steps.append(time.perf_counter() - s0)
        fed.append(tok)
    after = stats() if stats else None
    io2 = io_counters()
    decode_s = float(sum(steps))
    half = steps[len(steps) // 2:]
    return {"prompt_tokens": len(prompt), "prefill_s": t1 - t0,
            "prefill_tok_s": len(prompt) / (t1 - t0) if t1 > t0 else None, "ttft_s": t1 - t0,
            "decode_steps": n, "decode_s": decode_s, "decode_tok_s": n / decode_s if decode_s > 0 else None,
            "decode_tok_s_steady": len(half) / sum(half) if half and sum(half) > 0 else None,
            "step_s": [round(s, 6) for s in steps], "tokens": fed, "last_argmax": nxt,
            "stats_before": before, "stats_after_prefill": mid, "stats_after": after,
            "io_before": io0, "io_after_prefill": io1, "io_after": io2}


def emit(result: dict) -> None:
    """Print the result as one line ``BENCH_RESULT {json}`` on stdout (the harness looks for the marker)."""
    result.setdefault("pid", os.getpid())
    result.setdefault("peak_rss_bytes", peak_rss_bytes())
    result.setdefault("loadavg", list(os.getloadavg()) if hasattr(os, "getloadavg") else None)
    sys.stdout.write(MARKER + json.dumps(result) + "\n")
    sys.stdout.flush()


def parse_result(stdout: str) -> dict | None:
    """The last ``BENCH_RESULT`` line of a child's stdout, or None."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER):])
    return None
