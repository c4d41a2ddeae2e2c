"""``moestream chat [MODEL]``: an interactive, streaming, multi-turn chat in the terminal.

Owns the chat loop (:class:`ChatSession`): the history rendered with the
model's chat template, streaming output, the commands ``/stats``, ``/reset``,
``/exit`` (and ``/help``), Ctrl-C stopping the current answer without
ending the session (a flag checked between tokens, so a forward pass is
never torn), Ctrl-D / end of input exiting cleanly, and trimming the oldest
turns when the conversation outgrows the context.

Knows nothing about model internals or HTTP; it drives :class:`Engine`.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import Any, Callable, TextIO

from moestream.convert.errors import MoestreamError
from moestream.engine.generate import ContextOverflowError

HELP = """commands:
  /stats   engine and last-answer statistics
  /reset   forget the conversation (keeps --system)
  /exit    leave (also /quit, Ctrl-D)
  /help    this text
Ctrl-C stops the current answer; the session goes on."""


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``chat`` verb to the ``moestream`` parser."""
    from moestream.engine.cli import add_model_options, add_sampling_options

    p = sub.add_parser(
        "chat", help="interactive chat with streaming output",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Chat with MODEL in the terminal using the model's chat template. Answers stream as they "
                    "are generated; the conversation is kept until /reset.\n\n" + HELP)
    add_model_options(p, model_optional=True)
    add_sampling_options(p, temperature=0.7, max_tokens=512)
    p.add_argument("--system", metavar="TEXT", help="a system message that starts every conversation")
    p.set_defaults(func=cmd_chat)


def cmd_chat(args: argparse.Namespace) -> int:
    """``moestream chat``: load the model and run the session.

    Returns:
        0 when the user leaves.
    """
    from moestream.engine.cli import check_sampling, load_engine, sampling_kwargs

    check_sampling(args)
    engine = load_engine(args)
    try:
        session = ChatSession(engine, sampling_kwargs(args), system=args.system)
        if not args.quiet:
            print(f"moestream chat: {engine.name} on {engine.device}, context {engine.ctx} tokens. "
                  "Type /help for commands, Ctrl-D to leave.", file=sys.stderr)
        session.loop(sys.stdin, sys.stdout)
        return 0
    finally:
        engine.close()


class _StopFlag:
    """SIGINT handler that only sets a flag while an answer streams."""

    def __init__(self) -> None:
        self.set = False
        self._previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        self.set = True

    def __enter__(self) -> "_StopFlag":
        self.set = False
        try:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread: Ctrl-C keeps its default meaning
            self._previous = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class ChatSession:
    """A conversation with one engine: history, commands and streaming answers."""

    def __init__(self, engine: Any, sampling: dict[str, Any], system: str | None = None) -> None:
        """Args:
        engine: a loaded :class:`~moestream.engine.api.Engine`.
        sampling: keyword arguments for ``engine.chat`` (max_tokens, temperature, ...).
        system: optional system message kept across /reset.
        """
        self.engine = engine
        self.sampling = dict(sampling)
        self.system = system
        self.history: list[dict[str, str]] = []
        self.last_stats: dict[str, Any] | None = None
        self.reset()

    def reset(self) -> None:
        """Forget every turn except the system message."""
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def _fit_history(self) -> None:
        """Drop the oldest user/assistant turns until the prompt leaves room to answer.

        Raises:
            ContextOverflowError: when even the latest message alone does not fit.
        """
        budget = self.engine.ctx - 1
        first = 1 if self.system else 0
        while self.engine.chat_prompt_tokens(self.history) > budget:
            if len(self.history) - first <= 1:
                raise ContextOverflowError(
                    f"this message alone is longer than the context ({self.engine.ctx} tokens); "
                    "shorten it or restart with a larger --ctx")
            del self.history[first]

    def answer(self, text: str, out: TextIO) -> None:
        """Add a user turn, stream the answer to ``out``, keep it in the history.

        Ctrl-C stops the answer; what was generated so far is kept.
        """
        self.history.append({"role": "user", "content": text})
        try:
            self._fit_history()
            stream = self.engine.chat(self.history, stream=True, **self.sampling)
        except MoestreamError:
            self.history.pop()
            raise
        stopped = False
        with _StopFlag() as flag, stream:
            for chunk in stream:
                out.write(chunk.text)
                out.flush()
                if flag.set:
                    stopped = True
                    break
        if stopped:
            out.write(" [stopped]")
        out.write("\n")
        out.flush()
        self.history.append({"role": "assistant", "content": stream.text})
        self.last_stats = stream.stats.to_dict()

    def command(self, line: str, out: TextIO) -> bool:
        """Run a ``/command``.

        Returns:
            False when the session should end.
        """
        name = line.split()[0].lower()
        if name in ("/exit", "/quit", "/bye"):
            return False
        if name == "/reset":
            self.reset()
            out.write("(conversation cleared)\n")
        elif name == "/stats":
            stats = self.engine.stats()
            stats["last_answer"] = self.last_stats
            stats["history_messages"] = len(self.history)
            out.write(json.dumps(stats, indent=2, default=str) + "\n")
        elif name in ("/help", "/?"):
            out.write(HELP + "\n")
        else:
            out.write(f"unknown command {name}; /help lists the commands\n")
        out.flush()
        return True

    def loop(self, inp: TextIO, out: TextIO, prompt: str = ">>> ") -> None:
        """Read lines until /exit or end of input.

        Args:
            inp: where user lines come from.
            out: where prompts and answers go.
            prompt: shown before each user line.
        """
        read: Callable[[], str] = (lambda: input(prompt)) if inp is sys.stdin and out is sys.stdout else \
            (lambda: _read_line(inp, out, prompt))
        while True:
            try:
                line = read()
            except EOFError:
                out.write("\n")
                out.flush()
                return
            except KeyboardInterrupt:
                out.write("\n(Ctrl-C: answer nothing to stop; /exit or Ctrl-D leaves)\n")
                out.flush()
                continue
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line, out):
                    return
                continue
            try:
                self.answer(line, out)
            except MoestreamError as exc:
                out.write(f"error: {exc}\n")
                out.flush()


def _read_line(inp: TextIO, out: TextIO, prompt: str) -> str:
    """``input()`` for arbitrary streams.

    Raises:
        EOFError: at end of input.
    """
    out.write(prompt)
    out.flush()
    line = inp.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")
