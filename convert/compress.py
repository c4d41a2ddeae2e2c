"""The compressing converter: calibration -> pruning -> bit allocation -> planned shards.

Owns :class:`CompressOptions` and :func:`compress_checkpoint`, the pipeline
that feeds :func:`moestream.convert.convert.plan_conversion`:

1. calibration statistics (:mod:`.calibration`) when pruning, a size budget or
   an activation-weighted codec needs them (a given :class:`CalibrationResult`
   is reused);
2. kept experts per layer (:mod:`.pruning`), router rows/biases sliced by the plan;
3. the expert codec: ``none`` (f16/bf16/f32), nested ``matryoshka_floor`` /
   ``matryoshka`` / ``residual`` (levels stored as planes, :mod:`.nested_planes`),
   or plain ``gguf_q8_0`` / ``gguf_q4_0``;
4. each kept expert's max stored level: the MC# multiple-choice knapsack
   (:func:`moestream.convert.allocation.allocate_experts`) on importance × ε per
   level under ``--size-budget`` (``N bpw`` = average bits per stored routed-expert
   weight, page padding included; ``N GB`` = the whole model's tensor bytes, dense
   included);
5. dense precision (``f16``/``bf16``/``q8_0``/``q4_0``) with CC-MoE's favouring:
   embeddings, LM head, shared experts and the first/last eighth of the layers
   (at least one each) get one step more (q4_0 -> q8_0 -> f16); norms and
   routers stay f32.

The compression record (options, kept ids, levels) goes into shard-1 metadata
under ``moestream.compression`` (JSON).

Knows nothing about the engine: the calibration forward runs on a model the
caller provides (``model_loader``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from gguf import GGMLQuantizationType

from moestream.convert import constants as C
from moestream.convert.allocation import allocate_experts, parse_size_budget
from moestream.convert.calibration import CalibrationResult, collect_stats, measure_level_errors
from moestream.convert.codecs import get_codec
from moestream.convert.convert import (
    DEFAULT_MAX_SHARD_SIZE, DENSE_PRECISIONS, DTYPES, F32_NAME_SUFFIXES, ConversionPlan, UnquantizedCodec, _prepare_out_dir,
    _canonical_shapes, conversion_key, plan_conversion, write_plan,
)
from moestream.convert.errors import BudgetError, MoestreamError
from moestream.convert.hf_checkpoint import EXPERT_PROJS, HFCheckpoint
from moestream.convert.nested_planes import CODEC_IDS, GGML_CODECS, GGMLExpertCodec, NestedExpertCodec
from moestream.convert.pruning import choose_kept, pruned_config, routing_groups
from moestream.convert.shard_writer import padded

log = logging.getLogger("moestream")

KEY_COMPRESSION = "moestream.compression"
EXPERT_CODECS = ("none", *CODEC_IDS, *GGML_CODECS)
DEFAULT_CODEC = "matryoshka_floor"
_UPGRADE = {"q4_0": "q8_0", "q8_0": "f16", "f16": "f16", "bf16": "bf16", "f32": "f32"}


@dataclass
class CompressOptions:
    """Converter options beyond the v1 ones (see the module docstring).

    Attributes:
        codec: expert codec name (:data:`EXPERT_CODECS`).
        group_size: nested codec group length.
        prune: fraction of routed experts to drop per layer.
        criterion: ``reap`` | ``frequency`` | ``ean`` | ``cc``.
        prune_mode: ``uniform`` | ``adaptive`` (adaptive records ``moestream_num_experts_per_layer``).
        top_k: new experts per token: one value, or one per MoE layer in layer order (None = unchanged).
        size_budget: ``"4bpw"``, ``"0.05GB"`` ... (None = every level stored).
        dense: dense matrix precision ``f16`` | ``bf16`` | ``f32`` | ``q8_0`` | ``q4_0``.
        favour: give embeddings, LM head, shared experts and first/last layers one step more.
        dtype: storage dtype for codec ``none`` experts.
    """

    codec: str = "none"
    group_size: int = 128
    prune: float = 0.0
    criterion: str = "reap"
    prune_mode: str = "uniform"
    top_k: int | list[int] | None = None
    size_budget: str | None = None
    dense: str = "f16"
    favour: bool = True
    dtype: str = "f16"

    def validate(self) -> None:
        """Raises ValueError naming the bad option."""
        from moestream.convert.calibration import CRITERIA
        from moestream.convert.pruning import PRUNE_MODES

        if self.codec not in EXPERT_CODECS:
            raise ValueError(f"unknown --codec {self.codec!r}; choose one of {', '.join(EXPERT_CODECS)}")
        if self.criterion not in CRITERIA:
            raise ValueError(f"unknown --criterion {self.criterion!r}; choose one of {', '.join(CRITERIA)}")
        if self.prune_mode not in PRUNE_MODES:
            raise ValueError(f"unknown --prune-mode {self.prune_mode!r}; choose one of {', '.join(PRUNE_MODES)}")
        if not 0 <= self.prune < 1:
            raise ValueError(f"--prune must be in [0, 1), got {self.prune}")
        if self.dense not in DENSE_PRECISIONS:
            raise ValueError(f"unknown --dense {self.dense!r}; choose one of {', '.join(DENSE_PRECISIONS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown --dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.top_k is not None:
            vals = [self.top_k] if isinstance(self.top_k, int) else list(self.top_k)
            if not vals or not all(isinstance(v, int) and v >= 1 for v in vals):
                raise ValueError(f"--top-k must be positive integers (one, or one per MoE layer), got {self.top_k}")
        if self.size_budget is not None and self.codec not in CODEC_IDS:
            raise ValueError("--size-budget chooses levels of a nested codec; use --codec "
                             f"{' | '.join(CODEC_IDS)}")

    @property
    def needs_calibration(self) -> bool:
        return self.prune > 0 or self.size_budget is not None


def dense_precision_policy(config: dict, base: str, favour: bool) -> Callable[[str, tuple[int, ...]], GGMLQuantizationType]:
    """Storage type of each dense tensor under ``base`` with CC-MoE favouring (module docstring)."""
    n_layers = int(config.get("num_hidden_layers") or 1)
    edge = max(1, n_layers // 8)
    favoured_layers = set(range(edge)) | set(range(n_layers - edge, n_layers))

    def policy(name: str, shape: tuple[int, ...]) -> GGMLQuantizationType:
        if len(shape) <= 1 or name.endswith(F32_NAME_SUFFIXES):
            return GGMLQuantizationType.F32
        prec = base
        if favour:
            layer = _layer_of(name)
            if layer is None or layer in favoured_layers or ".shared_expert" in name:
                prec = _UPGRADE[base]
        if prec in ("q8_0", "q4_0") and shape[-1] % 32:
            prec = "f16"
        return DENSE_PRECISIONS[prec]
    return policy


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "model" and parts[1] == "layers":
        try:
            return int(parts[2])
        except ValueError:
            return None
    return None


def build_codec(opts: CompressOptions):
    """The ExpertCodec for ``opts.codec``."""
    if opts.codec == "none":
        return UnquantizedCodec(opts.dtype)
    if opts.codec in GGML_CODECS:
        return GGMLExpertCodec(opts.codec)
    return NestedExpertCodec(get_codec(opts.codec), opts.group_size)


def calibrate(ckpt: HFCheckpoint, model_loader: Callable[[Path], Any], windows: Sequence[Sequence[int]],
              progress: bool = False, level_codec: NestedExpertCodec | None = None) -> CalibrationResult:
    """Load the model with ``model_loader(path)`` and collect routing statistics on ``windows``.

    With ``level_codec`` (bit allocation needs ε per level) each MoE layer's level errors are measured
    as soon as its statistics are complete and its sampled inputs dropped; without it no input samples
    are kept (they are only used for the level errors).
    """
    model = model_loader(ckpt.path)
    try:
        if level_codec is None:
            return collect_stats(model, windows, max_samples=0)

        def measure(result: CalibrationResult, layer: int) -> None:
            measure_level_errors(result, _expert_reader(ckpt), level_codec, layers=[layer], drop_samples=True)

        return collect_stats(model, windows, on_layer=measure)
    finally:
        del model


def _expert_reader(ckpt: HFCheckpoint) -> Callable[[int, int], dict[str, torch.Tensor]]:
    def read(layer: int, expert: int) -> dict[str, torch.Tensor]:
        return {p: ckpt.read_canonical(C.expert_tensor_name(layer, expert, p)) for p in EXPERT_PROJS}
    return read


def plan_compression(ckpt: HFCheckpoint, opts: CompressOptions,
                     calibration: CalibrationResult | None) -> tuple[ConversionPlan, dict[str, Any]]:
    """Decide kept experts, levels and dense types; returns the plan and the compression record.

    Raises:
        ValueError: bad options. BudgetError: a size budget below the smallest possible model.
        MoestreamError: pruning or a size budget without calibration statistics.
    """
    opts.validate()
    if opts.needs_calibration and calibration is None:
        raise MoestreamError("pruning and --size-budget need calibration statistics; pass --calib FILE")
    cfg = dict(ckpt.config)
    kept = None
    if opts.prune > 0:
        n_group, topk_group = routing_groups(cfg)
        kept = choose_kept(calibration.scores(opts.criterion), opts.prune, opts.prune_mode,
                           top_k=int(cfg.get("num_experts_per_tok") or 1), n_group=n_group, topk_group=topk_group,
                           min_per_group=2 if cfg.get("topk_method") == "noaux_tc" else 1)
    if kept is not None or opts.top_k is not None:
        cfg = pruned_config(cfg, kept or {}, opts.top_k, moe_layers=_moe_layers(ckpt, cfg))
    codec = build_codec(opts)
    if isinstance(codec, NestedExpertCodec) and calibration is not None:
        for layer, st in calibration.layers.items():
            for new_id, src in enumerate(kept[layer] if kept and layer in kept else range(st.n_experts)):
                codec.act_scales[(layer, new_id)] = calibration.act_scales(layer, src)
    dense_type = dense_precision_policy(cfg, opts.dense, opts.favour)
    record: dict[str, Any] = {"options": asdict(opts), "codec": codec.name,
                              "kept": {str(k): v for k, v in (kept or {}).items()}}
    for key in ("moestream_num_experts_per_layer", "moestream_top_k_per_layer"):
        if key in cfg:
            record[key] = cfg[key]
    if opts.prune > 0 and cfg.get("model_type") in ("qwen2_moe", "olmoe") and not cfg.get("norm_topk_prob"):
        record["note"] = ("top-k weights are not renormalised in this family: kept experts' weights are the "
                          "softmax over the kept set (scaled by 1/(1 - removed mass))")
    plan = plan_conversion(ckpt, opts.dtype, codec, kept=kept, dense_type=dense_type, config=cfg)
    if opts.size_budget is not None:
        planes = _allocate(ckpt, plan, codec, opts, calibration, kept, record)
        plan = plan_conversion(ckpt, opts.dtype, codec, kept=kept, planes=planes, dense_type=dense_type, config=cfg)
    record["expert_bytes"] = sum(padded(d.nbytes) for e in plan.experts for p in e.planes for d in p)
    record["dense_bytes"] = sum(padded(d.decl.nbytes) for d in plan.dense)
    record["levels"] = {}
    for e in plan.experts:
        record["levels"].setdefault(str(e.layer), []).append(len(e.planes) - 1)
    plan.metadata[KEY_COMPRESSION] = json.dumps(record, sort_keys=True)
    return plan, record


def _moe_layers(ckpt: HFCheckpoint, cfg: dict[str, Any]) -> list[int]:
    """Decoder layers with routed experts in the checkpoint (below ``num_hidden_layers``: no MTP layers)."""
    n_layers = int(cfg.get("num_hidden_layers") or 0)
    layers = set()
    for name in ckpt.canonical_names():
        parsed = C.parse_expert_tensor_name(name)
        if parsed is not None and (not n_layers or parsed[0] < n_layers):
            layers.add(parsed[0])
    return sorted(layers)


def _allocate(ckpt: HFCheckpoint, plan: ConversionPlan, codec: NestedExpertCodec, opts: CompressOptions,
              calibration: CalibrationResult, kept: dict[int, list[int]] | None,
              record: dict[str, Any]) -> dict[tuple[int, int], int]:
    """Max stored planes per expert under the size budget (MC# knapsack)."""
    experts = plan.experts
    L = codec.n_levels()
    level_bytes = np.array([[sum(padded(d.nbytes) for p in e.planes[:j + 1] for d in p) for j in range(L)]
                            for e in experts], dtype=np.int64)  # [N, L]
    shapes = _canonical_shapes(ckpt)
    n_weights = sum(int(np.prod(shapes[C.expert_tensor_name(e.layer, e.source_expert, p)]))
                    for e in experts for p in EXPERT_PROJS)
    dense_bytes = sum(padded(d.decl.nbytes) for d in plan.dense)
    try:
        budget = parse_size_budget(opts.size_budget, n_weights)
    except ValueError as exc:
        raise BudgetError(str(exc)) from exc
    text = opts.size_budget.strip().lower()
    if "bpw" not in text:
        if budget - dense_bytes < int(level_bytes[:, 0].sum()):
            raise BudgetError(f"--size-budget {opts.size_budget} is below the smallest possible model: dense tensors "
                              f"take {dense_bytes} bytes and the experts at their lowest level {int(level_bytes[:, 0].sum())} "
                              f"(total {dense_bytes + int(level_bytes[:, 0].sum())} bytes); raise the budget or lower "
                              "--dense precision")
        budget -= dense_bytes
    elif budget < int(level_bytes[:, 0].sum()):
        min_bpw = 8 * int(level_bytes[:, 0].sum()) / n_weights
        raise BudgetError(f"--size-budget {opts.size_budget} is below the smallest possible experts "
                          f"({min_bpw:.2f} bpw at the lowest level, page padding included); raise it to at least that")
    if not calibration.errors or calibration.errors_codec != codec.name:  # every expert: reusable for any kept set
        measure_level_errors(calibration, _expert_reader(ckpt), codec)
    # One pseudo-token per expert (Laplace smoothing, gate 1/top_k): an expert calibration never routed to
    # keeps a small importance instead of dropping to the lowest level for free (held-out text may use it).
    freq = np.array([calibration.layers[e.layer].freq[e.source_expert] for e in experts]) + 1.0
    gate = np.array([calibration.layers[e.layer].gate_sum[e.source_expert] for e in experts]) + 1.0 / max(
        calibration.top_k, 1)
    err = np.stack([calibration.errors[e.layer][e.source_expert] for e in experts])
    groups = np.array([e.layer for e in experts])
    alloc = allocate_experts(freq, gate, err, level_bytes, budget, groups=groups)
    record["allocation"] = {"budget_bytes": int(budget), "expert_bytes": alloc.total_bytes, "method": alloc.method,
                            "optimal": alloc.optimal, "objective": alloc.objective,
                            "bpw": 8 * alloc.total_bytes / n_weights,
                            "level_histogram": np.bincount(alloc.choice, minlength=L).tolist()}
    return {(e.layer, e.expert): int(c) + 1 for e, c in zip(experts, alloc.choice)}


def compress_checkpoint(hf_dir: str | Path, out_dir: str | Path, opts: CompressOptions, *,
                        calibration: CalibrationResult | None = None,
                        model_loader: Callable[[Path], Any] | None = None,
                        windows: Sequence[Sequence[int]] | None = None,
                        max_shard_size: int = DEFAULT_MAX_SHARD_SIZE, progress: bool = True,
                        overwrite: bool = False, stem: str = C.DEFAULT_STEM,
                        resume: bool = True) -> tuple[list[Path], dict[str, Any]]:
    """Convert an HF MoE checkpoint with pruning, nested codecs and bit allocation.

    Args:
        hf_dir: Hugging Face model folder.
        out_dir: output folder.
        opts: the compression options.
        calibration: precomputed statistics (reused; errors re-measured if for another codec).
        model_loader: ``path -> model`` (engine ``MoECausalLM`` with resident experts) used to
            calibrate when ``calibration`` is None and windows are given.
        windows: calibration token windows (:func:`moestream.convert.calibration.split_windows`).
        max_shard_size / progress / overwrite / stem / resume: as
            :func:`moestream.convert.convert.convert_checkpoint` (the resume key adds the
            options and a digest of the calibration's activation scales, so a re-run whose
            calibration came out differently starts clean).

    Returns:
        (shard paths, compression record).

    Raises:
        ValueError / BudgetError / MoestreamError: bad options, budget too small, missing calibration.
    """
    opts.validate()
    ckpt = HFCheckpoint.open(hf_dir, drop_cache=True)  # memory: one tensor, page cache included
    try:
        if calibration is None and windows is not None and (opts.needs_calibration or opts.codec in CODEC_IDS):
            if model_loader is None:
                raise MoestreamError("calibration needs a model loader (the CLI passes the engine's)")
            codec = build_codec(opts) if opts.size_budget is not None else None
            calibration = calibrate(ckpt, model_loader, windows, progress,
                                    level_codec=codec if isinstance(codec, NestedExpertCodec) else None)
        plan, record = plan_compression(ckpt, opts, calibration)
        out = Path(out_dir)
        _prepare_out_dir(out, stem, overwrite)
        key = conversion_key(ckpt, converter="compress", compress=asdict(opts),
                             act_scales=_act_scales_digest(plan.codec))
        paths = write_plan(ckpt, plan, out, max_shard_size, progress, stem, resume_key=key, resume=resume)
        record["file_bytes"] = sum(p.stat().st_size for p in paths)
        return paths, record
    finally:
        ckpt.close()


def _act_scales_digest(codec: Any) -> str | None:
    """SHA-256 of a nested codec's activation scales (they shape the bytes but are not in the metadata)."""
    scales = getattr(codec, "act_scales", None)
    if not scales:
        return None
    import hashlib

    h = hashlib.sha256()
    for key in sorted(scales):
        for proj in sorted(scales[key]):
            arr = np.ascontiguousarray(np.asarray(scales[key][proj]))
            h.update(f"{key}:{proj}:{arr.dtype}:{arr.shape}".encode())
            h.update(arr.tobytes())
    return h.hexdigest()
