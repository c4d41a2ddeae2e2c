"""Embedding moestream in an application: load once, stream answers, read stats.

Usage:
    python examples/embed_in_app.py [MODEL] [--memory 6GB]

MODEL defaults to the embedded default model. The script shows the four calls
an app needs: ``Engine.load``, ``engine.generate`` (finished text),
``engine.chat(..., stream=True)`` (tokens as they arrive, e.g. for a UI) and
``engine.stats()``; the ``with`` block frees the model at the end. One engine
runs one request at a time: a second concurrent call raises
``EngineBusyError``, so an app with several threads should queue its requests
(as ``moestream serve`` does).
"""

from __future__ import annotations

import argparse
import json
import sys

from moestream.engine.api import Engine, EngineBusyError, MoestreamError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="default")
    parser.add_argument("--memory", default=None, help="memory budget, e.g. 6GB")
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args()
    try:
        with Engine.load(args.model, memory=args.memory, device="auto") as engine:
            # 1. Plain continuation, finished text plus statistics.
            result = engine.generate("The quick brown fox", max_tokens=args.max_tokens, temperature=0.0)
            print("generate:", repr(result.text))
            print("  ", result.stats.summary())

            # 2. A chat answer streamed piece by piece (what a UI would append to a text view).
            messages = [{"role": "user", "content": "Say hello."}]
            stream = engine.chat(messages, max_tokens=args.max_tokens, temperature=0.7, seed=42, stream=True)
            print("chat: ", end="")
            with stream:  # closing early (e.g. a Stop button) frees the engine
                for chunk in stream:
                    print(chunk.text, end="", flush=True)
            print()

            # 3. One request at a time: an open stream makes the engine busy.
            busy = engine.generate("x", max_tokens=4, stream=True)
            try:
                engine.generate("y", max_tokens=4)
            except EngineBusyError as exc:
                print("busy:", exc)
            busy.close()

            # 4. Engine-wide numbers for a status bar.
            stats = engine.stats()
            print("stats:", json.dumps({k: stats[k] for k in ("model", "device", "rss_bytes", "requests")}))
    except MoestreamError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
