"""The ``convert`` and ``info`` verbs of the ``moestream`` command (thin wrappers).

Owns argument parsing for these two verbs: :func:`register` adds them to the
dispatcher's sub-parsers (``engine/cli.py``), each handler calls a library
function (:func:`moestream.convert.convert.convert_checkpoint`,
:func:`moestream.convert.shards.model_info`) and returns an exit code. User
errors are raised as :class:`MoestreamError` for the dispatcher to print.
``python -m moestream.convert.commands convert|info ...`` runs them without
the dispatcher. Knows nothing about the engine.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Sequence

from moestream.convert.errors import MoestreamError

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?B?)\s*$", re.IGNORECASE)
_POWERS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}


def parse_size(text: str) -> int:
    """Parse a file size: ``2GB`` (10^9), ``1.5GiB`` (2^30), ``500M``, ``4096``; ``0`` = no limit.

    Raises:
        argparse.ArgumentTypeError: not a size.
    """
    m = _SIZE_RE.match(text)
    if m is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; use e.g. 2GB, 500MB, 1.5GiB or a byte count")
    number, prefix, suffix = float(m.group(1)), m.group(2).upper(), m.group(3).upper()
    base = 1024 if suffix.startswith("I") else 1000
    return int(number * base ** _POWERS[prefix])


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``convert`` and ``info`` to the ``moestream`` sub-commands."""
    from moestream.convert.convert import DTYPES

    p = subparsers.add_parser(
        "convert", help="convert a Hugging Face MoE checkpoint to moestream shards",
        description="Convert a Hugging Face MoE checkpoint (config.json + safetensors) into moestream "
                    "GGUF shards: one contiguous, page-aligned byte range per expert, checksums, "
                    "tokenizer and chat template carried along. Writes *.partial files and renames "
                    "them when complete.")
    p.add_argument("hf_dir", metavar="HF_DIR", help="Hugging Face model folder")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output folder (created if missing)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="f16",
                   help="storage dtype of weight matrices (default f16; norms and routers stay f32)")
    p.add_argument("--max-shard-size", type=parse_size, default="2GB", metavar="SIZE",
                   help="tensor bytes per shard file, e.g. 2GB, 500MB, 1.5GiB; 0 = one file (default 2GB)")
    p.add_argument("--force", action="store_true", help="replace a model already in OUT_DIR")
    p.set_defaults(func=cmd_convert)

    p = subparsers.add_parser("info", help="describe a converted model (shards, tensors, bytes per expert)",
                              description="Print shards, tensor counts, bytes per expert level, dense bytes "
                                          "and metadata of a moestream model without reading weights.")
    p.add_argument("model", metavar="MODEL", help="moestream model folder or its shard-1 .gguf file")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=cmd_info)


def cmd_convert(args: argparse.Namespace) -> int:
    """Handler of ``moestream convert``."""
    from moestream.convert.convert import convert_checkpoint
    from moestream.convert.shards import format_bytes

    paths = convert_checkpoint(args.hf_dir, args.out_dir, dtype=args.dtype, max_shard_size=args.max_shard_size,
                               progress=not getattr(args, "quiet", False), overwrite=args.force)
    total = sum(p.stat().st_size for p in paths)
    print(f"wrote {len(paths)} shard(s), {format_bytes(total)}: {paths[0]}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """Handler of ``moestream info``."""
    from moestream.convert.shards import format_model_info, model_info

    info = model_info(args.model)
    print(json.dumps(info, indent=2) if args.json else format_model_info(info))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry: ``python -m moestream.convert.commands {convert,info} ...``.

    Returns:
        0 on success, 2 on a user error (message on stderr, no traceback).
    """
    parser = argparse.ArgumentParser(prog="moestream")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except MoestreamError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
