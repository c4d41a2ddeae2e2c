"""``moestream convert``: a Hugging Face MoE checkpoint -> moestream shards (format v1).

Owns the conversion pipeline and its policies, as small steps a later
compressing converter (issue 4) extends rather than rewrites:

1. ``HFCheckpoint.open`` (lazy, canonical names) and :func:`build_metadata`
   (config JSON, key hyper-parameters, tokenizer, chat template);
2. :func:`plan_conversion` -> :class:`ConversionPlan`: which dense tensors are
   stored in which type (:func:`dense_storage_type`) and which routed experts
   are stored, each with its source expert id (identity here; pruning will
   drop and renumber experts and slice routers here) and the planes its
   codec declares;
3. the expert codec (:class:`ExpertCodec`): v1 has :class:`UnquantizedCodec`
   (one plane = one level, the three projections cast to the storage dtype);
   nested codecs declare several planes per expert and bit allocation chooses
   how many each expert keeps;
4. :func:`write_plan`: declare every tensor to :class:`ShardSetWriter`, then
   stream tensor by tensor (one expert's tensors in memory at a time) with a
   progress bar; partial files are removed on error. With a resume key (what
   :func:`convert_checkpoint` passes: the source files' fingerprint and the
   options) a re-run after an interruption keeps the shards already completed
   and skips their tensors (``resume.py``).

Knows nothing about the engine or the runtime scheduler.
"""

from __future__ import annotations

import errno
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np
import torch
from gguf import GGMLQuantizationType

from moestream.convert import constants as C
from moestream.convert.errors import ModelFormatError, MoestreamError
from moestream.convert.hf_checkpoint import EXPERT_PROJS, HFCheckpoint, parse_expert_name
from moestream.convert.resume import ResumeState
from moestream.convert.shard_writer import MetaValue, ShardSetWriter, TensorDecl, padded

DTYPES: dict[str, GGMLQuantizationType] = {
    "f32": GGMLQuantizationType.F32,
    "f16": GGMLQuantizationType.F16,
    "bf16": GGMLQuantizationType.BF16,
}
#: Dense precisions beyond the plain dtypes (gguf-py block quantizers; rows must be multiples of 32).
DENSE_QUANT_TYPES = (GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0)
DENSE_PRECISIONS: dict[str, GGMLQuantizationType] = {
    **DTYPES, "q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0}
DEFAULT_MAX_SHARD_SIZE = 2 * 10**9  # bytes of tensor data per shard

# Dense tensors kept in f32 whatever the requested dtype: routers decide which
# experts run, so they stay exact (llama.cpp keeps ffn_gate_inp in F32 too).
F32_NAME_SUFFIXES = ("mlp.gate.weight", "mlp.shared_expert_gate.weight", "mlp.gate.e_score_correction_bias")
#: Per-expert router tensors (one row per routed expert): sliced by pruning.
ROUTER_SUFFIXES = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")

# config.json spellings (Hub and transformers 5) of the key hyper-parameters.
_HPARAMS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (C.KEY_BLOCK_COUNT, ("num_hidden_layers",)),
    (C.KEY_EMBEDDING_LENGTH, ("hidden_size",)),
    (C.KEY_VOCAB_SIZE, ("vocab_size",)),
    (C.KEY_CONTEXT_LENGTH, ("max_position_embeddings",)),
    (C.KEY_FEED_FORWARD_LENGTH, ("intermediate_size",)),
    (C.KEY_EXPERT_FEED_FORWARD_LENGTH, ("moe_intermediate_size",)),
    (C.KEY_EXPERT_COUNT, ("num_experts", "num_local_experts", "n_routed_experts")),
    (C.KEY_EXPERT_USED_COUNT, ("num_experts_per_tok",)),
    (C.KEY_HEAD_COUNT, ("num_attention_heads",)),
    (C.KEY_HEAD_COUNT_KV, ("num_key_value_heads",)),
)


# --- dtype policy --------------------------------------------------------------------------
def dense_storage_type(name: str, shape: Sequence[int], dtype: str) -> GGMLQuantizationType:
    """Storage type of a dense tensor: 1-D tensors (norms, biases) and routers stay f32.

    Args:
        name: canonical tensor name.
        shape: its shape.
        dtype: requested storage dtype (``f16`` | ``bf16`` | ``f32``).
    """
    if len(shape) <= 1 or name.endswith(F32_NAME_SUFFIXES):
        return GGMLQuantizationType.F32
    return DTYPES[dtype]


def to_storage_array(t: torch.Tensor, ggml_type: GGMLQuantizationType, name: str) -> np.ndarray:
    """Cast a tensor to its storage type as a numpy array (BF16 as int16 bit patterns).

    Raises:
        ModelFormatError: a non floating-point tensor.
    """
    if not t.is_floating_point():
        raise ModelFormatError(f"tensor {name} has dtype {t.dtype}; moestream converts floating-point checkpoints only")
    t = t.detach().contiguous()
    if ggml_type == GGMLQuantizationType.F32:
        return t.to(torch.float32).numpy()
    if ggml_type == GGMLQuantizationType.F16:
        return t.to(torch.float16).numpy()
    if ggml_type == GGMLQuantizationType.BF16:
        return t.to(torch.bfloat16).view(torch.int16).numpy()
    if ggml_type in DENSE_QUANT_TYPES:
        from gguf import quants as gguf_quants

        return gguf_quants.quantize(t.to(torch.float32).numpy(), ggml_type)
    raise NotImplementedError(f"tensor {name}: storage type {ggml_type.name} needs a quantizer (issue 4)")


# --- expert codecs -------------------------------------------------------------------------
class ExpertCodec(Protocol):
    """How one routed expert becomes planes (level j = planes 0..j)."""

    name: str  # value of moestream.expert.codec

    def level_names(self) -> list[str]:
        """Human names of the levels, lowest first (e.g. ``["2bit", "4bit", "8bit"]``)."""
        ...

    def plane_decls(self, layer: int, expert: int, shapes: Mapping[str, tuple[int, ...]]) -> list[list[TensorDecl]]:
        """Declare the tensors of each plane, plane 0 first, before any data is read."""
        ...

    def encode(self, layer: int, expert: int, tensors: Mapping[str, torch.Tensor]) -> list[list[np.ndarray]]:
        """Arrays of each plane, in :meth:`plane_decls` order."""
        ...


@dataclass(frozen=True)
class UnquantizedCodec:
    """Codec ``none``: one plane holding ``gate_proj``/``up_proj``/``down_proj`` in ``dtype``."""

    dtype: str = "f16"
    name: str = C.CODEC_NONE

    def level_names(self) -> list[str]:
        """One level, named by the dtype."""
        return [self.dtype]

    def plane_decls(self, layer: int, expert: int, shapes: Mapping[str, tuple[int, ...]]) -> list[list[TensorDecl]]:
        """One plane: the canonical ``.weight`` tensors."""
        return [[TensorDecl(C.expert_tensor_name(layer, expert, p), tuple(shapes[p]), DTYPES[self.dtype])
                 for p in EXPERT_PROJS]]

    def encode(self, layer: int, expert: int, tensors: Mapping[str, torch.Tensor]) -> list[list[np.ndarray]]:
        """Cast each projection."""
        ggml_type = DTYPES[self.dtype]
        return [[to_storage_array(tensors[p], ggml_type, C.expert_tensor_name(layer, expert, p))
                 for p in EXPERT_PROJS]]


# --- plan ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class DenseEntry:
    """A dense tensor to store: canonical source name and how it is stored.

    ``rows`` (pruning): keep only these rows (dim 0) of the source, in this order
    (router weights ``[E, H]`` and router biases ``[E]`` sliced with the kept experts).
    """

    decl: TensorDecl
    source: str
    rows: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ExpertEntry:
    """A routed expert to store.

    Attributes:
        layer: decoder layer.
        expert: id in the converted model.
        source_expert: id in the checkpoint (differs once pruning renumbers).
        planes: declared tensors per plane (plane 0 first).
    """

    layer: int
    expert: int
    source_expert: int
    planes: list[list[TensorDecl]]


@dataclass
class ConversionPlan:
    """Everything decided before any tensor data is read."""

    dense: list[DenseEntry]
    experts: list[ExpertEntry]
    codec: ExpertCodec
    metadata: dict[str, MetaValue] = field(default_factory=dict)


def _canonical_shapes(ckpt: HFCheckpoint) -> dict[str, tuple[int, ...]]:
    """Canonical shape of every tensor, read from headers (fused experts: sliced)."""
    shapes: dict[str, tuple[int, ...]] = {}
    canonical_shape = getattr(ckpt, "canonical_shape", None)
    fused = ckpt.is_fused()
    for name, hf_name in ckpt.canonical_items():
        if canonical_shape is not None:
            shapes[name] = tuple(canonical_shape(name))
        elif not fused or parse_expert_name(name) is None:
            shapes[name] = tuple(ckpt.shape(hf_name))
        else:  # fused 3-D experts: read the slice to learn its canonical shape
            shapes[name] = tuple(ckpt.read_canonical(name).shape)
    return shapes


def plan_conversion(ckpt: HFCheckpoint, dtype: str = "f16", codec: ExpertCodec | None = None, *,
                    kept: Mapping[int, Sequence[int]] | None = None,
                    planes: Mapping[tuple[int, int], int] | None = None,
                    dense_type: Callable[[str, tuple[int, ...]], GGMLQuantizationType] | None = None,
                    config: Mapping[str, object] | None = None,
                    extra_metadata: Mapping[str, MetaValue] | None = None) -> ConversionPlan:
    """Decide names, types and plane layout of every stored tensor.

    Args:
        ckpt: the opened checkpoint.
        dtype: storage dtype of matrices (``f16`` | ``bf16`` | ``f32``).
        codec: expert codec (default: :class:`UnquantizedCodec` in ``dtype``).
        kept: pruning: MoE layer -> source expert ids to keep, in their new order
            (renumbered 0..n-1; the layer's router rows and router bias are sliced
            alike). Layers not listed keep every expert.
        planes: bit allocation: ``(layer, new expert id)`` -> planes to store
            (1..codec levels; default all), i.e. the expert's max level + 1.
        dense_type: storage type of each dense tensor (default :func:`dense_storage_type`).
        config: the HF config to record (default the checkpoint's; pruning edits it).
        extra_metadata: more shard-1 keys (e.g. the compression record).

    Returns:
        The plan (metadata filled by :func:`build_metadata`).

    Raises:
        ValueError: unknown dtype, a kept id that does not exist, a bad plane count.
        ModelFormatError: an expert lacks a projection or has inconsistent shapes.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    codec = codec or UnquantizedCodec(dtype)
    shapes = _canonical_shapes(ckpt)
    dense: list[DenseEntry] = []
    expert_shapes: dict[tuple[int, int], dict[str, tuple[int, ...]]] = {}
    kept = {int(k): [int(e) for e in v] for k, v in (kept or {}).items()}
    for name, shape in shapes.items():
        key = parse_expert_name(name)
        if key is None:
            rows = _router_rows(name, kept)
            if rows is not None:
                shape = (len(rows),) + tuple(shape[1:])
            stype = dense_type(name, shape) if dense_type else dense_storage_type(name, shape, dtype)
            dense.append(DenseEntry(TensorDecl(name, shape, stype), name, rows))
        else:
            expert_shapes.setdefault((key.layer, key.expert), {})[key.proj] = shape
    by_layer: dict[int, list[int]] = {}
    for layer, expert in expert_shapes:
        by_layer.setdefault(layer, []).append(expert)
    experts = []
    for layer in sorted(by_layer):
        sources = kept.get(layer, sorted(by_layer[layer]))
        missing = sorted(set(sources) - set(by_layer[layer]))
        if missing:
            raise ValueError(f"layer {layer}: kept experts {missing[:5]} do not exist in the checkpoint")
        for new_id, src in enumerate(sources):
            projs = expert_shapes[(layer, src)]
            _check_expert_shapes(ckpt.path, layer, src, projs)
            decls = codec.plane_decls(layer, new_id, projs)
            n = (planes or {}).get((layer, new_id), len(decls))
            if not 1 <= n <= len(decls):
                raise ValueError(f"expert {new_id} of layer {layer}: {n} planes asked, the codec has 1..{len(decls)}")
            experts.append(ExpertEntry(layer, new_id, src, decls[:n]))
    meta = build_metadata(ckpt, dtype, codec, config)
    meta.update(extra_metadata or {})
    return ConversionPlan(dense, experts, codec, meta)


def _router_rows(name: str, kept: Mapping[int, Sequence[int]]) -> tuple[int, ...] | None:
    """Kept rows of a MoE router weight ``[E, H]`` or router bias ``[E]`` (None: not a pruned router)."""
    if not kept or not name.startswith("model.layers.") or not name.endswith(ROUTER_SUFFIXES):
        return None
    try:
        layer = int(name.split(".")[2])
    except ValueError:
        return None
    return tuple(kept[layer]) if layer in kept else None


def _check_expert_shapes(folder: Path, layer: int, expert: int, projs: Mapping[str, tuple[int, ...]]) -> None:
    missing = [p for p in EXPERT_PROJS if p not in projs]
    if missing:
        raise ModelFormatError(f"{folder}: expert {expert} of layer {layer} has no {', '.join(missing)} weight; "
                               "the checkpoint is incomplete, re-download it")
    gate, up, down = (projs[p] for p in EXPERT_PROJS)
    if len(gate) != 2 or gate != up or down != (gate[1], gate[0]):
        raise ModelFormatError(f"{folder}: expert {expert} of layer {layer} has mismatched shapes gate {gate}, "
                               f"up {up}, down {down} (expected [I, H], [I, H], [H, I]); re-download the checkpoint")


# --- metadata ------------------------------------------------------------------------------
def _chat_template(folder: Path) -> str | None:
    """The chat template: ``chat_template.jinja``, else ``tokenizer_config.json``'s ``chat_template``."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    cfg = folder / "tokenizer_config.json"
    if not cfg.is_file():
        return None
    try:
        template = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise ModelFormatError(f"{cfg}: not valid JSON ({exc}); fix or remove it") from exc
    if isinstance(template, list):  # [{"name": ..., "template": ...}]: keep the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) and template else None


def build_metadata(ckpt: HFCheckpoint, dtype: str, codec: ExpertCodec,
                   config: Mapping[str, object] | None = None) -> dict[str, MetaValue]:
    """Shard-1 metadata: config JSON, key hyper-parameters, tokenizer, chat template, codec.

    Args:
        config: the HF config to record (default: the checkpoint's).

    Raises:
        ModelFormatError: an unreadable ``tokenizer.json``.
    """
    cfg = dict(config) if config is not None else ckpt.config
    meta: dict[str, MetaValue] = {
        C.KEY_NAME: ckpt.path.resolve().name,
        C.KEY_MODEL_TYPE: ckpt.model_type,
        C.KEY_HF_CONFIG: json.dumps(cfg, sort_keys=True),
        C.KEY_DTYPE: dtype,
        C.KEY_EXPERT_CODEC: codec.name,
        C.KEY_EXPERT_LEVEL_COUNT: len(codec.level_names()),
        C.KEY_EXPERT_LEVEL_NAMES: json.dumps(codec.level_names()),
    }
    for key, spellings in _HPARAMS:
        value = next((cfg[s] for s in spellings if isinstance(cfg.get(s), int) and not isinstance(cfg.get(s), bool)),
                     None)
        if value is not None:
            meta[key] = int(value)
    tok = ckpt.path / "tokenizer.json"
    if tok.is_file():
        try:
            meta[C.KEY_TOKENIZER_HF_JSON] = tok.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ModelFormatError(f"{tok}: not UTF-8 text ({exc}); re-download the tokenizer") from exc
    template = _chat_template(ckpt.path)
    if template:
        meta[C.KEY_CHAT_TEMPLATE] = template
    return meta


# --- writing -------------------------------------------------------------------------------
def _prepare_out_dir(out_dir: Path, stem: str, overwrite: bool) -> None:
    """Create ``out_dir``; refuse to clobber a finished model (``overwrite``: delete it).

    Leftovers of an interrupted conversion (``.partial`` files, shards 2..N without
    shard 1) are left to :class:`ShardSetWriter`, which keeps what it can resume from.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    existing = sorted(p for p in out_dir.glob(f"{stem}-*-of-*.gguf") if C.SHARD_NAME_RE.match(p.name))
    finished = [p for p in existing if int(C.SHARD_NAME_RE.match(p.name).group("no")) == 1]
    if not finished:  # shard 1 is renamed into place last: without it, this is an interrupted conversion
        return
    if not overwrite:
        raise MoestreamError(f"{out_dir}: already holds a converted model ({finished[0].name}); "
                             "choose an empty folder or pass --force to replace it")
    for p in existing + sorted(out_dir.glob(f"{stem}-*-of-*.gguf{C.PARTIAL_SUFFIX}")):
        p.unlink()
    ResumeState.remove(out_dir)


def write_plan(ckpt: HFCheckpoint, plan: ConversionPlan, out_dir: Path, max_shard_size: int,
               progress: bool = True, stem: str = C.DEFAULT_STEM, *,
               resume_key: Mapping[str, Any] | None = None, resume: bool = True) -> list[Path]:
    """Declare the plan to a :class:`ShardSetWriter` and stream every tensor into it.

    Args:
        resume_key: JSON-ready fingerprint of the input and options (see :func:`conversion_key`);
            makes the conversion resumable: shards completed by an interrupted run with the
            same key and plan are verified and kept, their tensors neither read nor encoded.
        resume: False: start clean even when such shards exist.

    Returns:
        Shard paths, shard 1 first.

    Raises:
        ModelFormatError: a source tensor's shape differs from the plan (or is unreadable).
        MoestreamError: the disk filled up (the ``.partial`` files are removed first).
    """
    try:
        return _write_shards(ckpt, plan, out_dir, max_shard_size, progress, stem, resume_key, resume)
    except OSError as exc:
        # numpy's tofile reports a short write as a plain OSError("N requested and M written"), no errno
        short_write = exc.errno is None and "written" in str(exc)
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT) and not short_write:
            raise
        kept = "; completed shards are kept and a re-run resumes" if resume_key is not None else ""
        raise MoestreamError(f"{out_dir}: no space left on the device while writing the model ({exc}; partial "
                             f"files removed{kept}); free space or choose another output folder, then re-run convert"
                             ) from exc


def _write_shards(ckpt: HFCheckpoint, plan: ConversionPlan, out_dir: Path, max_shard_size: int,
                  progress: bool, stem: str, resume_key: Mapping[str, Any] | None, resume: bool) -> list[Path]:
    """:func:`write_plan` without the disk-full translation."""
    from tqdm import tqdm

    with ShardSetWriter(out_dir, plan.metadata, max_shard_size, stem, resume_key=resume_key, resume=resume) as writer:
        for d in plan.dense:
            writer.add_dense(d.decl)
        for e in plan.experts:
            for plane, decls in enumerate(e.planes):
                writer.add_expert_plane(e.layer, e.expert, plane, decls)
        writer.begin()
        with tqdm(total=writer.total_bytes(), initial=writer.resumed_bytes(), unit="B", unit_scale=True,
                  unit_divisor=1024, desc="convert", disable=not progress) as bar:
            for d in plan.dense:
                if writer.resumed(d.decl.name):
                    continue
                t = ckpt.read_canonical(d.source)
                if d.rows is not None:
                    t = t[list(d.rows)]
                _check_shape(ckpt.path, d.source, tuple(t.shape), d.decl.shape)
                writer.write(d.decl.name, to_storage_array(t, d.decl.ggml_type, d.source))
                bar.update(padded(d.decl.nbytes))
            for e in plan.experts:
                if writer.resumed(e.planes[0][0].name):  # an expert never straddles two shards
                    continue
                tensors = _read_expert(ckpt, e)
                arrays = plan.codec.encode(e.layer, e.expert, tensors)[:len(e.planes)]  # allocation may cap planes
                for decls, plane_arrays in zip(e.planes, arrays, strict=True):
                    for decl, arr in zip(decls, plane_arrays, strict=True):
                        writer.write(decl.name, arr)
                        bar.update(padded(decl.nbytes))
        return writer.finish()


def _read_expert(ckpt: HFCheckpoint, e: ExpertEntry) -> dict[str, torch.Tensor]:
    out = {}
    for p in EXPERT_PROJS:
        name = C.expert_tensor_name(e.layer, e.source_expert, p)
        out[p] = ckpt.read_canonical(name)
    gate, up, down = (tuple(out[p].shape) for p in EXPERT_PROJS)
    _check_expert_shapes(ckpt.path, e.layer, e.source_expert, {"gate_proj": gate, "up_proj": up, "down_proj": down})
    return out


def _check_shape(folder: Path, name: str, got: tuple[int, ...], want: tuple[int, ...]) -> None:
    if got != want:
        raise ModelFormatError(f"{folder}: tensor {name} has shape {got}, its header said {want}; "
                               "the checkpoint is inconsistent, re-download it")


def conversion_key(ckpt: HFCheckpoint, **options: Any) -> dict[str, Any]:
    """The resume key of a conversion: the source files' fingerprint and the options that shape the output.

    Args:
        ckpt: the opened checkpoint (:meth:`HFCheckpoint.fingerprint`: sizes, mtimes, header hashes).
        options: JSON-ready options (dtype, codec options, a digest of calibration results...).
    """
    return {"source": ckpt.fingerprint(), "options": options}


def convert_checkpoint(hf_dir: str | Path, out_dir: str | Path, dtype: str = "f16",
                       max_shard_size: int = DEFAULT_MAX_SHARD_SIZE, progress: bool = True,
                       overwrite: bool = False, stem: str = C.DEFAULT_STEM, resume: bool = True) -> list[Path]:
    """Convert an HF MoE checkpoint to unquantized moestream shards.

    Args:
        hf_dir: Hugging Face model folder (config.json + safetensors; tokenizer
            files are carried along when present).
        out_dir: output folder (created if needed).
        dtype: storage dtype of weight matrices: ``f16`` | ``bf16`` | ``f32``
            (1-D tensors and routers are always f32).
        max_shard_size: tensor-data bytes per shard (0 = one shard).
        progress: show a tqdm progress bar on stderr.
        overwrite: replace a model already in ``out_dir``.
        stem: shard file-name stem.
        resume: keep the verified shards of an interrupted conversion of the same input
            with the same options (False: start clean). A different input or different
            options always start clean.

    Returns:
        Shard paths, shard 1 first.

    Raises:
        ModelFormatError: missing/invalid config or weights, inconsistent tensors.
        MoestreamError: ``out_dir`` already holds a model and ``overwrite`` is False.
        ValueError: unknown dtype or negative ``max_shard_size``.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if max_shard_size < 0:
        raise ValueError("max_shard_size must be >= 0 (0 = a single shard)")
    ckpt = HFCheckpoint.open(hf_dir, drop_cache=True)  # memory: one tensor, page cache included
    try:
        plan = plan_conversion(ckpt, dtype)
        out = Path(out_dir)
        _prepare_out_dir(out, stem, overwrite)
        return write_plan(ckpt, plan, out, max_shard_size, progress, stem,
                          resume_key=conversion_key(ckpt, converter="convert", dtype=dtype), resume=resume)
    finally:
        ckpt.close()
