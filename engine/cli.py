"""The single ``moestream`` command: one entry point, one sub-command per verb.

Owns :func:`main` (argument parsing, logging set-up, error reporting:
any :class:`MoestreamError` prints ``error: <message>`` on stderr and exits 2,
tracebacks only with ``--debug``), the ``run`` verb, the shared model/sampling
options, and the dispatch to ``chat`` (:mod:`moestream.engine.chat_cli`),
``serve`` (:mod:`moestream.engine.server`) and the verbs other packages
register (``moestream.convert.commands.register``,
``moestream.scheduler.commands.register``; each sub-parser sets
``func(args) -> int``).

Knows nothing about model internals; every verb is a thin wrapper over a
library function.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from typing import Any, Callable, Sequence

from moestream.convert.errors import MoestreamError

log = logging.getLogger("moestream")

#: Packages whose ``commands.register(subparsers)`` adds verbs, when importable.
#: ``engine.commands_streaming`` adds ``doctor`` and ``analyze``; its ``analyze`` wraps
#: ``scheduler.commands`` (a model + text, or a recorded trace file as before). ``bench.commands`` adds
#: ``bench`` (memory-budget benchmarks; its arms run as child processes, never in this one).
EXTERNAL_COMMANDS = ("moestream.convert.commands", "moestream.engine.commands_streaming",
                     "moestream.bench.commands")

EPILOG = """examples:
  moestream run MODEL -p "Once upon a time" -n 32      continuation to stdout, stats to stderr
  moestream run MODEL -p "2+2=" --json                 one JSON object (text, tokens, stats)
  moestream chat MODEL --memory 6GB                    interactive chat (/stats /reset /exit)
  moestream serve MODEL --port 8000                    OpenAI-compatible API on 127.0.0.1

MODEL is an HF folder (config.json + *.safetensors + tokenizer.json), a moestream
shard folder or .gguf file, or 'default' for the embedded model."""


def add_model_options(p: argparse.ArgumentParser, *, model_optional: bool = False) -> None:
    """MODEL plus ``--memory``, ``--device``, ``--ctx`` (shared by run, chat and serve)."""
    if model_optional:
        p.add_argument("model", nargs="?", default="default",
                       help="model folder, .gguf shard file, or 'default' (the embedded model; the default)")
    else:
        p.add_argument("model", help="model folder (HF or moestream shards), .gguf shard file, or 'default'")
    p.add_argument("--memory", metavar="SIZE",
                   help="memory budget for the whole process, e.g. 6GB, 512MiB, 75%% (default: no limit)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto",
                   help="where to compute (default: auto = cuda, then mps, then cpu)")
    p.add_argument("--ctx", type=int, metavar="N",
                   help="context length in tokens (KV cache size; default: min(2048, model maximum))")
    p.add_argument("--precision-policy", choices=("exact", "adaptive"), default="exact",
                   help="streamed experts: exact = wait for the stored bytes (bit-identical to resident); "
                        "adaptive = run a late expert at a lower resident level (default exact)")
    p.add_argument("--cache-policy", choices=("lru", "lfu", "consistency"), default="lru",
                   help="expert cache eviction policy for streamed (moestream shard) models (default lru)")
    p.add_argument("--level", type=int, metavar="L",
                   help="nested-codec shards (convert --codec/--size-budget): run experts at most at level L "
                        "(0 = lowest precision, e.g. 2-bit); higher planes are never read (default: highest)")


def add_sampling_options(p: argparse.ArgumentParser, *, temperature: float, max_tokens: int) -> None:
    """``-n``, ``--temperature``, ``--top-p``, ``--top-k``, ``--seed``, ``--repetition-penalty``, ``--stop``."""
    p.add_argument("-n", "--max-tokens", type=int, default=max_tokens, metavar="N",
                   help=f"most new tokens per answer (default {max_tokens})")
    p.add_argument("--temperature", "--temp", type=float, default=temperature,
                   help=f"sampling temperature, 0 = greedy (default {temperature})")
    p.add_argument("--top-p", type=float, default=1.0 if temperature == 0 else 0.95,
                   help="nucleus sampling: keep tokens up to this probability mass (1 = off)")
    p.add_argument("--top-k", type=int, default=0, help="keep only the k most likely tokens (0 = off)")
    p.add_argument("--seed", type=int, help="random seed for reproducible sampling")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 = off)")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop when this text appears (repeatable; not printed)")


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The Engine.generate/chat keyword arguments from parsed options."""
    return {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
            "top_k": args.top_k, "seed": args.seed, "repetition_penalty": args.repetition_penalty,
            "stop": args.stop}


def check_sampling(args: argparse.Namespace) -> None:
    """Validate sampling options before spending time on loading.

    Raises:
        InvalidRequestError: naming the bad option.
    """
    from moestream.engine.sampling import InvalidRequestError, SamplingParams

    SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                   repetition_penalty=args.repetition_penalty)
    if args.max_tokens < 1:
        raise InvalidRequestError(f"-n/--max-tokens must be at least 1, got {args.max_tokens}")


def show_progress(args: argparse.Namespace) -> bool:
    """Whether to draw loading bars on stderr: yes for a terminal, no with ``--quiet`` or ``TQDM_DISABLE`` set."""
    if getattr(args, "quiet", False) or os.environ.get("TQDM_DISABLE"):
        return False
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def load_engine(args: argparse.Namespace) -> Any:
    """Engine.load with the shared model options (a loading bar when :func:`show_progress`)."""
    from moestream.engine.api import Engine

    return Engine.load(args.model, memory=args.memory, device=args.device, ctx=args.ctx,
                       precision_policy=getattr(args, "precision_policy", "exact"),
                       cache_policy=getattr(args, "cache_policy", "lru"), progress=show_progress(args),
                       level=getattr(args, "level", None))


# ------------------------------------------------------------------------------------------- run
def _register_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="continue a prompt (for scripts and benchmarks)",
        description="Continue PROMPT with MODEL. The continuation streams to stdout; a one-line summary "
                    "(prefill and decode tok/s, TTFT, peak RSS) goes to stderr. With --json, one JSON object "
                    "{text, tokens, finish_reason, stats, engine} is printed to stdout instead.")
    add_model_options(p)
    p.add_argument("-p", "--prompt", help="prompt text; '-' or omitted reads it from stdin")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt as one user message with the model's chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object to stdout (no streaming)")
    add_sampling_options(p, temperature=0.0, max_tokens=32)
    p.set_defaults(func=cmd_run)


def _read_prompt(args: argparse.Namespace) -> str:
    """The prompt from ``-p`` or stdin.

    Raises:
        MoestreamError: when there is none.
    """
    if args.prompt is not None and args.prompt != "-":
        return args.prompt
    if args.prompt is None and sys.stdin.isatty():
        raise MoestreamError("no prompt: pass -p TEXT (or pipe the prompt on stdin)")
    text = sys.stdin.read()
    if not text:
        raise MoestreamError("the prompt read from stdin is empty; pass -p TEXT")
    return text


def cmd_run(args: argparse.Namespace) -> int:
    """``moestream run``: generate once and report.

    Returns:
        0 on success.
    """
    prompt = _read_prompt(args)
    check_sampling(args)
    engine = load_engine(args)
    try:
        kwargs = sampling_kwargs(args)
        messages = [{"role": "user", "content": prompt}]
        call: Callable[..., Any] = (lambda **kw: engine.chat(messages, **kw)) if args.chat else \
            (lambda **kw: engine.generate(prompt, **kw))
        if args.json:
            result = call(**kwargs)
            out = result.to_dict()
            out.update(model=engine.name, prompt=prompt, engine=engine.stats())
            print(json.dumps(out, ensure_ascii=False))
            return 0
        stream = call(stream=True, **kwargs)
        with stream:
            for chunk in stream:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        if not args.quiet:
            est = engine.stats()
            budget = est["memory_budget_bytes"]
            extra = f" | budget {budget / 2**30:.2f} GiB" if budget else ""
            print(f"[{engine.name}] {stream.stats.summary()}{extra}", file=sys.stderr)
        return 0
    finally:
        engine.close()


# ------------------------------------------------------------------------------------------- chat / serve
def _register_chat(sub: argparse._SubParsersAction) -> None:
    from moestream.engine import chat_cli

    chat_cli.register(sub)


def _register_serve(sub: argparse._SubParsersAction) -> None:
    """``serve``; without its web stack (fastapi, uvicorn) the verb stays listed and says what to install."""
    try:
        from moestream.engine import server
    except ModuleNotFoundError as exc:
        missing = exc.name or "fastapi"
        p = sub.add_parser("serve", help=f"OpenAI-compatible HTTP server (needs {missing}: not installed)",
                           description=f"moestream serve needs {missing}, which is not installed.")
        p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        p.set_defaults(func=lambda args: _missing_server_dependency(missing))
        return
    server.register(sub)


def _missing_server_dependency(name: str) -> int:
    raise MoestreamError(f"moestream serve needs the '{name}' package: pip install fastapi uvicorn "
                         "(or reinstall moestream with its dependencies)")


# ------------------------------------------------------------------------------------------- parser
def _add_global_flags(p: argparse.ArgumentParser, *, suppress: bool) -> None:
    """``--debug`` and ``--quiet``; on sub-parsers defaults are suppressed so either position works."""
    default = argparse.SUPPRESS if suppress else False
    p.add_argument("--debug", action="store_true", default=default,
                   help="show debug logging and full tracebacks on errors")
    p.add_argument("-q", "--quiet", action="store_true", default=default,
                   help="no progress bars, info logging or stats lines (errors still print)")


def build_parser() -> argparse.ArgumentParser:
    """The full ``moestream`` parser, with every verb that can be imported."""
    parser = argparse.ArgumentParser(
        prog="moestream", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Run Mixture-of-Experts language models under one memory budget.")
    _add_global_flags(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _register_run(sub)
    _register_chat(sub)
    _register_serve(sub)
    for module_name in EXTERNAL_COMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        module.register(sub)
    for sp in sub.choices.values():
        try:
            _add_global_flags(sp, suppress=True)
        except argparse.ArgumentError:
            pass  # a verb defined its own flag of the same name
    return parser


def _setup_logging(debug: bool, quiet: bool) -> None:
    """``moestream`` logger to stderr: DEBUG with --debug, WARNING with --quiet, else INFO."""
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("moestream").setLevel(level)
    if quiet:
        os.environ.setdefault("TQDM_DISABLE", "1")


def _user_error_types() -> tuple[type[BaseException], ...]:
    """Errors caused by input or files: MoestreamError, the scheduler's budget errors, unreadable expert bytes."""
    types: list[type[BaseException]] = [MoestreamError]
    try:
        from moestream.scheduler.budget import BudgetTooSmallError, MemorySpecError
        from moestream.scheduler.loader import ExpertReadError

        types += [BudgetTooSmallError, MemorySpecError, ExpertReadError]
    except ImportError:
        pass
    return tuple(types)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``moestream`` command.

    Args:
        argv: arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 success, 2 user error (bad input, missing files, ...), 130 interrupted.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    args.debug = bool(getattr(args, "debug", False))
    args.quiet = bool(getattr(args, "quiet", False))
    _setup_logging(args.debug, args.quiet)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except _user_error_types() as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # stdout closed early (e.g. `moestream run ... | head -c 10`): not an error worth a traceback.
        try:
            sys.stdout = open("/dev/null", "w")  # noqa: SIM115 -- avoid a second error at interpreter exit
        except OSError:
            pass
        return 0


if __name__ == "__main__":
    sys.exit(main())
