"""Child process of the benchmark: one llama.cpp arm through llama-cpp-python.

``python -m moestream.bench.llama_runner MODEL.gguf --tokens FILE --mode teacher|greedy
-n N [--threads T] [--ctx C] [--passes 2]`` loads a stock llama.cpp GGUF (mmap on,
as users run it: the OS page cache is its expert cache), then times prefill
and ``N`` single-token decode steps per pass with ``Llama.eval`` exactly as
:mod:`moestream.bench.run_arm` does for moestream (``bench/arm_common.py``).
Prints one ``BENCH_RESULT {json}`` line.

It is a child-process entry, not a library: the harness never imports it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from moestream.bench.arm_common import emit, read_tokens, time_pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="one llama.cpp benchmark arm (child process)")
    p.add_argument("model")
    p.add_argument("--tokens", required=True)
    p.add_argument("--mode", choices=("teacher", "greedy"), default="teacher")
    p.add_argument("-n", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("--no-mmap", action="store_true")
    args = p.parse_args(argv)

    import llama_cpp
    import numpy as np

    prompt, forced = read_tokens(args.tokens)
    t0 = time.perf_counter()
    try:
        llm = llama_cpp.Llama(model_path=args.model, n_ctx=args.ctx, n_threads=args.threads,
                              n_threads_batch=args.threads, n_batch=512, use_mmap=not args.no_mmap,
                              logits_all=False, verbose=False)
    except Exception as exc:
        emit({"engine": "llamacpp", "ok": False, "error_type": type(exc).__name__, "error": str(exc)})
        return 2
    load_s = time.perf_counter() - t0

    n_vocab = llm.n_vocab()

    def last_logits():  # logits of the batch's last token (logits_all=False keeps only those)
        ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(n_vocab,))

    def prefill(ids):
        llm.eval(list(ids))
        return last_logits()

    def step(tok: int):
        llm.eval([tok])
        return last_logits()

    passes = []
    for i in range(args.passes):
        r = time_pass(prefill, step, llm.reset, prompt, forced, args.n, args.mode)
        r["pass"] = "cold" if i == 0 else "warm"
        passes.append(r)
    emit({"engine": "llamacpp", "ok": True, "load_s": load_s, "threads": args.threads, "mode": args.mode,
          "passes": passes, "mmap": not args.no_mmap,
          "versions": {"llama_cpp_python": llama_cpp.__version__, "numpy": np.__version__}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
