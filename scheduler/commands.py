"""CLI sub-commands of the scheduler package (thin wrappers over library functions).

Owns ``register(subparsers)``, which adds ``analyze-trace`` style commands to
the single ``moestream`` CLI; the engine's CLI calls it. Knows nothing about
models: ``analyze`` here reads a recorded trace file (the engine records
traces with ``TraceRecorder`` and may wrap this command to add model loading).
"""

from __future__ import annotations

import argparse
import sys

from .analysis import DEFAULT_POLICIES, DEFAULT_SEGMENT_LENGTHS, analyze, format_report, save_report
from .simulate import RoutingTrace


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``analyze`` sub-command (reads a trace ``.npz``, prints the report).

    Args:
        subparsers: from ``ArgumentParser.add_subparsers()``.
    """
    p = subparsers.add_parser("analyze", help="routing-consistency report (SRP, cache hit rates) of a routing trace",
                              description="Read a routing trace (.npz, see moestream.scheduler.simulate) and report "
                                          "SRP, hit-rate curves of LRU/LFU/consistency/SCH/Belady and a cache size.")
    p.add_argument("trace", help="routing trace file (.npz)")
    p.add_argument("--out", help="folder for report.json and hit_rate.png")
    add_analysis_options(p)
    p.set_defaults(func=run_analyze)


def add_analysis_options(p: argparse.ArgumentParser) -> None:
    """The analysis settings shared by every ``analyze`` front end (trace file or model + text)."""
    p.add_argument("--segment-lengths", type=int, nargs="+", default=list(DEFAULT_SEGMENT_LENGTHS))
    p.add_argument("--sch-m", type=int, default=16, help="SCH segment length (default 16)")
    p.add_argument("--rho", type=int, nargs="+", help="cache sizes in active experts (default 1..E/k)")
    p.add_argument("--policies", nargs="+", default=list(DEFAULT_POLICIES))
    p.add_argument("--scope", nargs="+", choices=["layer", "model"], default=["layer", "model"])
    p.add_argument("--window-tokens", type=int, default=4, help="consistency policy window in tokens (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the time-shuffled baseline")
    p.add_argument("--no-plot", action="store_true")


def run_analyze(args: argparse.Namespace) -> int:
    """Run ``analyze`` for parsed arguments; prints the text report.

    Returns:
        Exit status 0.
    """
    trace = RoutingTrace.load(args.trace)
    report = analyze(trace, segment_lengths=args.segment_lengths, sch_m=args.sch_m, rhos=args.rho,
                     policies=args.policies, scopes=args.scope, window_tokens=args.window_tokens,
                     shuffle_seed=args.seed)
    sys.stdout.write(format_report(report) + "\n")
    if args.out:
        for path in save_report(report, args.out, plot=not args.no_plot):
            sys.stdout.write(f"wrote {path}\n")
    return 0
