"""The ``convert``, ``info`` and ``eval`` verbs of the ``moestream`` command (thin wrappers).

Owns argument parsing for these verbs: :func:`register` adds them to the
dispatcher's sub-parsers (``engine/cli.py``), each handler calls a library
function (:func:`moestream.convert.convert.convert_checkpoint`,
:func:`moestream.convert.compress.compress_checkpoint`,
:func:`moestream.convert.shards.model_info`, :func:`moestream.convert.quality.evaluate`)
and returns an exit code. User errors are raised as :class:`MoestreamError`
for the dispatcher to print. ``python -m moestream.convert.commands ...`` runs
them without the dispatcher.

The library functions take the model (or a loader) as an argument and import
nothing of the engine; the calibration and ``eval`` handlers here are the one
place that passes the engine's loaders in (:mod:`moestream.engine.compressed_models`),
imported inside the handler at call time.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Sequence

from moestream.convert.errors import MoestreamError

#: The embedded default model's calibration sample (the default ``--calib``).
DEFAULT_CALIB = Path(__file__).resolve().parents[1] / "engine" / "default_model" / "calibration"

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
                    "each when complete (shard 1 last). Re-running the same command after an interruption "
                    "resumes: shards already complete (same input, same options, checksums verified) are "
                    "kept; a different input or different options start clean.")
    p.add_argument("hf_dir", metavar="HF_DIR", help="Hugging Face model folder")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output folder (created if missing)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="f16",
                   help="storage dtype of weight matrices (default f16; norms and routers stay f32)")
    p.add_argument("--max-shard-size", type=parse_size, default="2GB", metavar="SIZE",
                   help="tensor bytes per shard file, e.g. 2GB, 500MB, 1.5GiB; 0 = one file (default 2GB)")
    p.add_argument("--force", action="store_true", help="replace a model already in OUT_DIR")
    p.add_argument("--no-resume", dest="resume", action="store_false",
                   help="start clean even when OUT_DIR holds the completed shards of an interrupted conversion "
                        "of the same input with the same options (default: keep them)")
    p.add_argument("--target", choices=("moestream", "llama.cpp"), default="moestream",
                   help="moestream: streaming shards (default); llama.cpp: one stock GGUF file OUT_DIR/model-<qtype>.gguf "
                        "that llama.cpp / llama-cpp-python load (no compression options)")
    p.add_argument("--qtype", choices=("q8_0", "q4_0", "f16", "f32"), default="q8_0",
                   help="tensor type of the llama.cpp export (default q8_0)")
    _add_compression_args(p)
    p.set_defaults(func=cmd_convert)

    p = subparsers.add_parser(
        "eval", help="quality of a (compressed) model against a reference: ppl, KL, top-1 agreement",
        description="Perplexity of MODEL and REF on held-out text, mean KL(ref||model) of the next-token "
                    "distributions and top-1 agreement; for a nested-codec shard model, at every stored level "
                    "(or --level N). Prints a table and writes JSON.")
    p.add_argument("model", metavar="MODEL", help="moestream shard folder/.gguf or HF folder")
    p.add_argument("--reference", required=True, metavar="REF", help="the unmodified model (HF folder or shards)")
    p.add_argument("--text", required=True, nargs="+", metavar="FILE", help="held-out text file(s) or folder(s)")
    p.add_argument("--level", type=int, default=None, help="evaluate only this nested level (0 = lowest)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
    p.add_argument("--max-windows", type=int, default=32, help="windows evaluated (default 32, spread over the text)")
    p.add_argument("--json", dest="json_out", metavar="PATH", default=None,
                   help="write the JSON report here (default: print it after the table)")
    p.set_defaults(func=cmd_eval)

    p = subparsers.add_parser("info", help="describe a converted model (shards, tensors, bytes per expert)",
                              description="Print shards, tensor counts, bytes per expert level, dense bytes "
                                          "and metadata of a moestream model without reading weights.")
    p.add_argument("model", metavar="MODEL", help="moestream model folder or its shard-1 .gguf file")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=cmd_info)


def _add_compression_args(p: argparse.ArgumentParser) -> None:
    from moestream.convert.calibration import CRITERIA
    from moestream.convert.compress import DEFAULT_CODEC, EXPERT_CODECS
    from moestream.convert.convert import DENSE_PRECISIONS
    from moestream.convert.pruning import PRUNE_MODES

    g = p.add_argument_group("compression (issue 4)")
    g.add_argument("--codec", default=None, metavar="NAME",
                   help=f"expert codec: {', '.join(EXPERT_CODECS)} (default: none = --dtype, or {DEFAULT_CODEC} when "
                        "--size-budget is given); nested codecs store levels as planes (level j = planes 0..j)")
    g.add_argument("--group-size", type=int, default=128, help="nested codec group length (default 128)")
    g.add_argument("--prune", type=float, default=0.0, metavar="RATIO",
                   help="fraction of routed experts to drop per layer, e.g. 0.25 (default 0)")
    g.add_argument("--criterion", default="reap", metavar="NAME",
                   help=f"pruning criterion: {', '.join(CRITERIA)} (default reap)")
    g.add_argument("--prune-mode", default="uniform", metavar="MODE",
                   help=f"{' | '.join(PRUNE_MODES)}: same count per layer, or per-layer counts from global scores")
    g.add_argument("--top-k", default=None, metavar="N",
                   help="experts per token: one value for every MoE layer, or one per MoE layer in layer order "
                        "(e.g. 8,8,6,6); recorded as moestream_top_k_per_layer (default: unchanged)")
    g.add_argument("--size-budget", default=None, metavar="SIZE",
                   help="bit allocation budget: '4bpw' (average bits per stored expert weight) or '0.02GB' "
                        "(whole model); chooses each expert's max stored level")
    g.add_argument("--dense", default="f16", metavar="PREC",
                   help=f"dense matrix precision: {', '.join(DENSE_PRECISIONS)} (default f16; embeddings, LM head, "
                        "shared experts and first/last layers get one step more)")
    g.add_argument("--no-favour", dest="favour", action="store_false",
                   help="store every dense matrix at --dense (no favoured layers)")
    g.add_argument("--calib", nargs="+", default=None, metavar="FILE",
                   help="calibration text file(s)/folder(s) (default: the embedded model's calibration sample)")
    g.add_argument("--calib-windows", type=int, default=64, help="calibration windows of --calib-seq-len tokens")
    g.add_argument("--calib-seq-len", type=int, default=256, help="tokens per calibration window (default 256)")
    g.add_argument("--eval-text", nargs="+", default=None, metavar="FILE",
                   help="after converting, write quality.json (ppl, KL, top-1 per level vs HF_DIR) beside the shards")


def _parse_top_k(text: str | None) -> int | list[int] | None:
    from moestream.convert.pruning import parse_top_k

    try:
        return parse_top_k(text)
    except ValueError as exc:
        raise MoestreamError(str(exc)) from exc


def _compressing(args: argparse.Namespace) -> bool:
    if args.codec is None:
        from moestream.convert.compress import DEFAULT_CODEC

        args.codec = DEFAULT_CODEC if args.size_budget is not None else "none"
    return (args.codec != "none" or args.prune > 0 or args.size_budget is not None or args.dense != "f16"
            or args.top_k is not None or args.eval_text is not None or args.calib is not None)


def calibration_windows(hf_dir: str | Path, calib: Sequence[str] | None, n_windows: int, seq_len: int) -> list[list[int]]:
    """Token windows of the calibration text (default: the embedded model's sample).

    Raises:
        MoestreamError: missing text or tokenizer, or text too short.
    """
    from moestream.convert.calibration import read_calibration_text, tokenize_windows

    text = read_calibration_text(calib or [DEFAULT_CALIB])
    return tokenize_windows(text, Path(hf_dir) / "tokenizer.json", seq_len, max_windows=n_windows)


def _export_llamacpp(args: argparse.Namespace, progress: bool) -> int:
    """``moestream convert --target llama.cpp``: one stock GGUF in OUT_DIR."""
    from moestream.convert.llamacpp_export import export_llamacpp
    from moestream.convert.shards import format_bytes

    if args.prune_mode == "adaptive":
        raise MoestreamError("--target llama.cpp cannot use --prune-mode adaptive: llama.cpp has one expert count "
                             "for every layer; use the moestream target for adaptive pruning")
    if args.top_k is not None and "," in str(args.top_k):
        raise MoestreamError("--target llama.cpp cannot use a per-layer --top-k: llama.cpp has one expert_used_count "
                             "for every layer; use the moestream target")
    _refuse_moestream_shards_for_llamacpp(Path(args.hf_dir))
    if _compressing(args):
        raise MoestreamError("--target llama.cpp takes no compression options; prune or quantize with the "
                             "moestream target, or pick --qtype for the llama.cpp file")
    out = Path(args.out_dir) / f"model-{args.qtype}.gguf"
    if out.exists() and not args.force:
        raise MoestreamError(f"{out} exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    path = export_llamacpp(args.hf_dir, out, qtype=args.qtype, progress=progress)
    print(f"wrote llama.cpp GGUF, {format_bytes(Path(path).stat().st_size)}: {path}")
    return 0


def _refuse_moestream_shards_for_llamacpp(path: Path) -> None:
    """``--target llama.cpp`` exports HF folders; a moestream shard model gets a one-line reason.

    Raises:
        MoestreamError: ``path`` is a moestream shard model (adaptively pruned ones say so).
    """
    if not (path.suffix == ".gguf" or (path.is_dir() and not (path / "config.json").is_file()
                                       and any(path.glob("*.gguf")))):
        return
    from moestream.convert.errors import ModelFormatError
    from moestream.convert.shards import ShardedModel

    try:
        with ShardedModel.open(path, verify="off") as reader:
            cfg = reader.config
    except ModelFormatError:
        return  # not a moestream shard set: the HF reader names what is missing
    per = [v for v in cfg.get("moestream_num_experts_per_layer") or [] if v]
    if len(set(per)) > 1:
        raise MoestreamError(f"{path} is adaptively pruned ({min(per)}..{max(per)} experts per layer) and llama.cpp "
                             "needs one expert count for every layer; convert the HF folder with --prune-mode uniform")
    raise MoestreamError(f"{path} is a moestream shard model; --target llama.cpp exports from the HF folder")


def cmd_convert(args: argparse.Namespace) -> int:
    """Handler of ``moestream convert``."""
    from moestream.convert.convert import convert_checkpoint
    from moestream.convert.shards import format_bytes

    progress = not getattr(args, "quiet", False)
    if args.target == "llama.cpp":
        return _export_llamacpp(args, progress)
    if not _compressing(args):
        paths = convert_checkpoint(args.hf_dir, args.out_dir, dtype=args.dtype, max_shard_size=args.max_shard_size,
                                   progress=progress, overwrite=args.force, resume=getattr(args, "resume", True))
        total = sum(p.stat().st_size for p in paths)
        print(f"wrote {len(paths)} shard(s), {format_bytes(total)}: {paths[0]}")
        return 0
    from moestream.convert.compress import CompressOptions, compress_checkpoint
    from moestream.engine.compressed_models import load_calibration_stream

    opts = CompressOptions(codec=args.codec, group_size=args.group_size, prune=args.prune, criterion=args.criterion,
                           prune_mode=args.prune_mode, top_k=_parse_top_k(args.top_k), size_budget=args.size_budget,
                           dense=args.dense, favour=args.favour, dtype=args.dtype)
    try:
        opts.validate()
    except ValueError as exc:
        raise MoestreamError(str(exc)) from exc
    windows = None
    if opts.needs_calibration or opts.codec not in ("none", "gguf_q8_0", "gguf_q4_0"):
        windows = calibration_windows(args.hf_dir, args.calib, args.calib_windows, args.calib_seq_len)
    try:
        paths, record = compress_checkpoint(args.hf_dir, args.out_dir, opts, model_loader=load_calibration_stream,
                                            windows=windows, max_shard_size=args.max_shard_size, progress=progress,
                                            overwrite=args.force, resume=getattr(args, "resume", True))
    except ValueError as exc:
        raise MoestreamError(str(exc)) from exc
    total = sum(p.stat().st_size for p in paths)
    print(f"wrote {len(paths)} shard(s), {format_bytes(total)}: {paths[0]}")
    if "allocation" in record:
        a = record["allocation"]
        print(f"bit allocation ({a['method']}): {a['bpw']:.3f} bits per expert weight, experts per level "
              f"{a['level_histogram']}")
    if args.eval_text:
        report = run_eval(args.out_dir, args.hf_dir, args.eval_text, None, 256, 32)
        from moestream.convert.quality import format_report, write_report

        out = write_report(report, Path(args.out_dir) / "quality.json")
        print(format_report(report))
        print(f"quality report: {out}")
    return 0


def run_eval(model: str | Path, reference: str | Path, text: Sequence[str], level: int | None, seq_len: int,
             max_windows: int) -> dict:
    """Evaluate ``model`` (every stored level, or ``level``) against ``reference`` on ``text``.

    Raises:
        MoestreamError: no tokenizer, text too short, unreadable models.
    """

    import torch

    from moestream.convert.calibration import read_calibration_text, split_windows
    from moestream.convert.quality import evaluate
    from moestream.engine.compressed_models import load_eval_model, stored_levels

    torch.set_grad_enabled(False)
    ref_model, ref_tok = load_eval_model(reference)
    tok_text = ref_tok
    if tok_text is None:
        _m, tok_text = load_eval_model(model, 0)
    if tok_text is None:
        raise MoestreamError("neither MODEL nor REF carries a tokenizer.json; cannot tokenize --text")
    from tokenizers import Tokenizer

    ids = Tokenizer.from_str(tok_text).encode(read_calibration_text(text), add_special_tokens=False).ids
    windows = split_windows(ids, seq_len, max_windows, min_tokens=2 * seq_len if seq_len < 1024 else 2)
    n_levels = stored_levels(model)
    levels = [level] if level is not None else list(range(n_levels))
    models = {f"level{lv}": (lambda lv=lv: load_eval_model(model, lv)[0]) for lv in levels}
    report = evaluate(ref_model, models, windows)
    report.update({"model": str(model), "reference": str(reference), "levels": levels, "stored_levels": n_levels,
                   "seq_len": seq_len})
    return report


def cmd_eval(args: argparse.Namespace) -> int:
    """Handler of ``moestream eval``."""
    from moestream.convert.quality import format_report, write_report

    try:
        report = run_eval(args.model, args.reference, args.text, args.level, args.seq_len, args.max_windows)
    except ValueError as exc:
        raise MoestreamError(str(exc)) from exc
    print(format_report(report))
    if args.json_out:
        print(f"wrote {write_report(report, args.json_out)}")
    else:
        print(json.dumps(report, sort_keys=True))
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
