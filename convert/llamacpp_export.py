"""Export an HF MoE checkpoint to a GGUF that stock llama.cpp loads (``--target llama.cpp``).

Owns :func:`export_llamacpp`: per family the llama.cpp architecture, the
hyper-parameter keys llama.cpp requires, the tensor renames and layout
changes llama.cpp's own ``convert_hf_to_gguf.py`` applies (Mixtral's
``llama`` arch permutes q/k rows to interleaved-pair RoPE; DeepSeek's MLA
``kv_b_proj`` is split into ``attn_k_b`` (transposed) and ``attn_v_b``;
routed experts stacked into 3-D ``ffn_{gate,up,down}_exps``), one quant type
per tensor through ``gguf.quants.quantize``, and the ``tokenizer.ggml.*``
byte-level BPE vocabulary built from ``tokenizer.json``.

The write streams: tensor infos are planned from shapes, then each tensor is
read, converted and written in turn (peak memory: one layer's stack of one
expert projection).

Quant policy (like llama.cpp's converter): 1-D tensors (norms, biases,
``exp_probs_b``) and routers (``ffn_gate_inp*``) stay F32; every other tensor
gets ``qtype``, falling back to F16 when its row length is not a multiple of
the quant block (32).

Knows nothing about the engine or moestream's shard format.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from moestream.convert.errors import ModelFormatError, UnsupportedModelError
from moestream.convert.hf_checkpoint import HFCheckpoint, expert_name, parse_expert_name
from moestream.convert.llamacpp_names import (
    ARCH_OF_MODEL_TYPE, EXPERT_TENSOR, GATING_SIGMOID, GATING_SOFTMAX, GPT2_PRE, K_B_GGUF, KEY, KV_B_CANONICAL,
    PRE_TOKENIZER_REGEX, V_B_GGUF, gguf_name,
)


#: Accepted ``qtype`` values -> (ggml type name, llama.cpp ``general.file_type``).
QTYPES: dict[str, tuple[str, int]] = {"f32": ("F32", 0), "f16": ("F16", 1), "q4_0": ("Q4_0", 2), "q8_0": ("Q8_0", 7)}


@dataclass
class _Plan:
    """One output tensor: name, numpy-order shape, ggml type, and how to produce its fp32 data."""

    name: str
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType
    produce: Callable[[], np.ndarray]

    def nbytes(self) -> int:
        import gguf

        block, tsize = gguf.GGML_QUANT_SIZES[self.qtype]
        n = int(np.prod(self.shape))
        return n // block * tsize


def export_llamacpp(hf_dir: str | Path, out_path: str | Path, qtype: str = "q8_0", progress: bool = True) -> Path:
    """Write a stock llama.cpp GGUF for an HF MoE checkpoint.

    Args:
        hf_dir: HF folder (config.json, safetensors, tokenizer.json).
        out_path: the ``.gguf`` file to write (written as ``<out>.partial`` then renamed).
        qtype: ``q8_0``, ``q4_0``, ``f16`` or ``f32``.
        progress: show a tqdm bar over tensors.

    Returns:
        The written path.

    Raises:
        ValueError: unknown ``qtype``.
        UnsupportedModelError: a family llama.cpp has no architecture for, or settings llama.cpp
            cannot represent (dense layers in qwen3_moe, unnormalised qwen3_moe routing, RoPE scaling
            outside DeepSeek's YaRN, DeepSeek-V3 without interleaved RoPE).
        ModelFormatError: missing tokenizer.json, missing tensors, or per-layer expert counts that
            differ (llama.cpp needs the same count in every MoE layer: prune uniformly).
        NotImplementedError: a tokenizer that is not byte-level BPE, or an unknown pre-tokenizer regex.
    """
    import gguf

    if qtype not in QTYPES:
        raise ValueError(f"qtype {qtype!r} is not supported for llama.cpp export; choose one of {', '.join(QTYPES)}")
    ckpt = HFCheckpoint.open(hf_dir)
    cfg = ckpt.config
    mt = ckpt.model_type
    if mt not in ARCH_OF_MODEL_TYPE:
        raise UnsupportedModelError(f"model_type {mt!r} has no llama.cpp MoE architecture here; "
                                    f"supported: {', '.join(sorted(ARCH_OF_MODEL_TYPE))}")
    arch = ARCH_OF_MODEL_TYPE[mt]
    _check_uniform_routing(cfg, ckpt.path)
    experts = _expert_layout(ckpt)
    plans = _plan_tensors(ckpt, arch, experts, QTYPES[qtype][0])
    out = Path(out_path)
    tmp = out.with_name(out.name + ".partial")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        _write_hparams(writer, arch, mt, cfg, experts)
        writer.add_file_type(QTYPES[qtype][1])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_name(Path(hf_dir).name)
        _write_tokenizer(writer, Path(hf_dir), cfg)
        for p in plans:
            writer.add_tensor_info(p.name, _byte_shape(p), np.uint8, p.nbytes(), raw_dtype=p.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        bar = _progress(plans, progress)
        for p in plans:
            writer.write_tensor_data(_encode(p))
            if bar is not None:
                bar.update(p.nbytes())
        if bar is not None:
            bar.close()
        writer.close()
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    finally:
        ckpt.close()
    tmp.replace(out)
    return out


# --- structure ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Experts:
    """Routed-expert layout: MoE layers, experts per layer, expert shape."""

    layers: tuple[int, ...]
    count: int
    inter: int  # I
    hidden: int  # H


def _check_uniform_routing(cfg: dict[str, Any], path: Path) -> None:
    """llama.cpp has one expert count and one top-k per model: refuse moestream's per-layer values.

    Raises:
        ModelFormatError: ``moestream_num_experts_per_layer`` / ``moestream_top_k_per_layer`` differ between layers.
    """
    for key, what in (("moestream_num_experts_per_layer", "expert_count (adaptive pruning)"),
                      ("moestream_top_k_per_layer", "expert_used_count (per-layer top-k)")):
        per = {v for v in cfg.get(key) or [] if v}
        if len(per) > 1:
            raise ModelFormatError(f"{path}: {key} differs between layers ({min(per)}..{max(per)}) but llama.cpp has "
                                   f"one {what} per model; prune with --prune-mode uniform and one --top-k")


def _expert_layout(ckpt: HFCheckpoint) -> _Experts:
    per_layer: dict[int, set[int]] = {}
    for name in ckpt.canonical_names():
        key = parse_expert_name(name)
        if key is not None:
            per_layer.setdefault(key.layer, set()).add(key.expert)
    if not per_layer:
        raise UnsupportedModelError(f"{ckpt.path}: no routed experts found; llama.cpp export here is for MoE models")
    counts = {layer: len(ids) for layer, ids in per_layer.items()}
    if len(set(counts.values())) != 1:
        raise ModelFormatError(
            f"{ckpt.path}: expert counts differ between layers ({counts}); llama.cpp needs the same expert count "
            "in every MoE layer: prune with --prune-mode uniform for a llama.cpp target")
    count = next(iter(counts.values()))
    for layer, ids in per_layer.items():
        if sorted(ids) != list(range(count)):
            raise ModelFormatError(f"{ckpt.path}: layer {layer} expert ids are not 0..{count - 1}")
    first = min(per_layer)
    inter, hidden = ckpt.read_canonical(expert_name(first, 0, "gate_proj")).shape
    return _Experts(tuple(sorted(per_layer)), count, int(inter), int(hidden))


def _tensor_qtype(name: str, shape: tuple[int, ...], target: str) -> Any:
    import gguf

    T = gguf.GGMLQuantizationType
    if len(shape) == 1 or "ffn_gate_inp" in name:
        return T.F32
    if target in ("F32", "F16"):
        return T[target]
    block = gguf.GGML_QUANT_SIZES[T[target]][0]
    return T[target] if shape[-1] % block == 0 else T.F16


def _plan_tensors(ckpt: HFCheckpoint, arch: str, ex: _Experts, target: str) -> list[_Plan]:
    cfg = ckpt.config
    plans: list[_Plan] = []
    tied = bool(cfg.get("tie_word_embeddings", False))

    def add(name: str, shape: tuple[int, ...], produce: Callable[[], np.ndarray]) -> None:
        plans.append(_Plan(name, shape, _tensor_qtype(name, shape, target), produce))

    hf_names = dict(ckpt.canonical_items())
    names = [n for n in hf_names if parse_expert_name(n) is None]
    n_head = int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    for canon in names:
        if canon == "lm_head.weight" and tied:
            continue
        shape = tuple(ckpt.shape(hf_names[canon]))
        if canon.endswith(KV_B_CANONICAL):
            plans.extend(_plan_kv_b(ckpt, canon, shape, target))
            continue
        gname = gguf_name(canon)
        if gname is None:
            raise UnsupportedModelError(f"{ckpt.path}: tensor {canon} has no llama.cpp {arch} counterpart")
        read = _reader(ckpt, canon)
        if arch == "llama" and canon.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            heads = n_head if ".q_proj." in canon else n_kv
            read = (lambda r, h: lambda: _permute_rope(r(), h))(read, heads)
        if canon.endswith("mlp.shared_expert_gate.weight"):  # [1, H] -> [H] (llama.cpp: {n_embd})
            shape = (shape[-1],)
            read = (lambda r: lambda: r().reshape(-1))(read)
        add(gname, shape, read)
    for layer in ex.layers:
        for proj in ("gate_proj", "up_proj", "down_proj"):
            shape = (ex.count, ex.inter, ex.hidden) if proj != "down_proj" else (ex.count, ex.hidden, ex.inter)
            add(EXPERT_TENSOR[proj].format(bid=layer), shape,
                (lambda L, pr: lambda: _stack_experts(ckpt, L, pr, ex.count))(layer, proj))
    return plans


def _reader(ckpt: HFCheckpoint, canon: str) -> Callable[[], np.ndarray]:
    return lambda: ckpt.read_canonical(canon).float().numpy()


def _stack_experts(ckpt: HFCheckpoint, layer: int, proj: str, count: int) -> np.ndarray:
    return np.stack([ckpt.read_canonical(expert_name(layer, e, proj)).float().numpy() for e in range(count)])


def _permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half row order -> llama.cpp interleaved pairs (as ``convert_hf_to_gguf`` LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _plan_kv_b(ckpt: HFCheckpoint, canon: str, shape: tuple[int, ...], target: str) -> list[_Plan]:
    """DeepSeek MLA: ``kv_b_proj [n_head*(nope+v), rank]`` -> ``attn_k_b [n_head, rank, nope]``, ``attn_v_b [n_head, v, rank]``."""
    cfg = ckpt.config
    n_head, nope, v = int(cfg["num_attention_heads"]), int(cfg["qk_nope_head_dim"]), int(cfg["v_head_dim"])
    rank = shape[1]
    if shape[0] != n_head * (nope + v):
        raise ModelFormatError(f"{ckpt.path}: {canon} has shape {shape}, expected [{n_head * (nope + v)}, rank]")
    bid = canon.split(".")[2]

    def split() -> tuple[np.ndarray, np.ndarray]:
        w = ckpt.read_canonical(canon).float().numpy().reshape(n_head, nope + v, rank)
        return np.ascontiguousarray(w[:, :nope].transpose(0, 2, 1)), np.ascontiguousarray(w[:, nope:])

    kb, vb = f"blk.{bid}.{K_B_GGUF}", f"blk.{bid}.{V_B_GGUF}"
    return [_Plan(kb, (n_head, rank, nope), _tensor_qtype(kb, (n_head, rank, nope), target), lambda: split()[0]),
            _Plan(vb, (n_head, v, rank), _tensor_qtype(vb, (n_head, v, rank), target), lambda: split()[1])]


def _byte_shape(p: _Plan) -> tuple[int, ...]:
    import gguf

    block, tsize = gguf.GGML_QUANT_SIZES[p.qtype]
    return (*p.shape[:-1], p.shape[-1] // block * tsize)


def _encode(p: _Plan) -> np.ndarray:
    import gguf

    data = np.ascontiguousarray(p.produce(), dtype=np.float32)
    if tuple(data.shape) != p.shape:
        raise ModelFormatError(f"tensor {p.name}: got shape {tuple(data.shape)}, planned {p.shape}")
    if p.qtype == gguf.GGMLQuantizationType.F32:
        raw = data
    elif p.qtype == gguf.GGMLQuantizationType.F16:
        raw = data.astype(np.float16)
    else:
        raw = gguf.quants.quantize(data, p.qtype)
    return np.ascontiguousarray(raw).view(np.uint8).reshape(_byte_shape(p))


def _progress(plans: list[_Plan], enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=sum(p.nbytes() for p in plans), unit="B", unit_scale=True, desc="llama.cpp export")


# --- hyper-parameters --------------------------------------------------------------------------------
def _put(writer: Any, key: str, arch: str, value: Any, kind: str) -> None:
    getattr(writer, f"add_{kind}")(KEY[key].format(arch=arch), value)


def _rope_scaling(cfg: dict[str, Any]) -> dict[str, Any] | None:
    rs = cfg.get("rope_scaling")
    if rs is None and isinstance(cfg.get("rope_parameters"), dict):
        rs = cfg["rope_parameters"]
    if not isinstance(rs, dict) or rs.get("rope_type", rs.get("type", "default")) in (None, "default"):
        return None
    return rs


def _rope_theta(cfg: dict[str, Any]) -> float:
    if "rope_theta" in cfg:
        return float(cfg["rope_theta"])
    rp = cfg.get("rope_parameters")
    return float(rp.get("rope_theta", 10000.0)) if isinstance(rp, dict) else 10000.0


def _write_hparams(w: Any, arch: str, mt: str, cfg: dict[str, Any], ex: _Experts) -> None:
    n_head = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    top_k = int(cfg.get("num_experts_per_tok") or 0)
    if not 0 < top_k <= ex.count:
        raise ModelFormatError(f"num_experts_per_tok={top_k} must be in 1..{ex.count} (the expert count)")
    _put(w, "context_length", arch, int(cfg.get("max_position_embeddings", 4096)), "uint32")
    _put(w, "embedding_length", arch, hidden, "uint32")
    _put(w, "block_count", arch, int(cfg["num_hidden_layers"]), "uint32")
    _put(w, "feed_forward_length", arch, int(cfg.get("intermediate_size") or ex.inter), "uint32")
    _put(w, "head_count", arch, n_head, "uint32")
    _put(w, "rms_eps", arch, float(cfg.get("rms_norm_eps", 1e-6)), "float32")
    _put(w, "rope_freq_base", arch, _rope_theta(cfg), "float32")
    _put(w, "expert_count", arch, ex.count, "uint32")
    _put(w, "expert_used_count", arch, top_k, "uint32")
    _put(w, "expert_ff", arch, ex.inter, "uint32")
    _put(w, "vocab_size", arch, int(cfg["vocab_size"]), "uint32")
    if arch == "deepseek2":
        _write_deepseek(w, mt, cfg, ex)
        return
    if _rope_scaling(cfg) is not None:
        raise UnsupportedModelError(f"{mt}: rope scaling {_rope_scaling(cfg)} is not exported to llama.cpp")
    n_layers = int(cfg["num_hidden_layers"])
    if ex.layers != tuple(range(n_layers)):
        raise UnsupportedModelError(
            f"{mt}: dense layers {sorted(set(range(n_layers)) - set(ex.layers))} between MoE layers "
            f"(mlp_only_layers / decoder_sparse_step) are not supported by llama.cpp's {arch}")
    head_dim = int(cfg.get("head_dim") or hidden // n_head)
    _put(w, "head_count_kv", arch, int(cfg.get("num_key_value_heads") or n_head), "uint32")
    _put(w, "key_length", arch, head_dim, "uint32")
    _put(w, "value_length", arch, head_dim, "uint32")
    _put(w, "rope_dim", arch, head_dim, "uint32")
    if mt == "qwen3_moe" and not cfg.get("norm_topk_prob", False):
        raise UnsupportedModelError("qwen3_moe with norm_topk_prob=false: llama.cpp's qwen3moe always "
                                    "renormalises the top-k weights, so it would compute another model")
    if mt == "qwen2_moe":
        if cfg.get("norm_topk_prob", False):
            raise UnsupportedModelError("qwen2_moe with norm_topk_prob=true: llama.cpp's qwen2moe never "
                                        "renormalises the top-k weights")
        _put(w, "expert_shared_ff", arch, int(cfg["shared_expert_intermediate_size"]), "uint32")
    if mt == "olmoe":
        if int(cfg.get("num_key_value_heads") or n_head) != n_head:
            raise UnsupportedModelError("olmoe with num_key_value_heads != num_attention_heads: llama.cpp's olmoe "
                                        "normalises k over n_embd, i.e. it has no grouped-query attention")
        if cfg.get("norm_topk_prob", False):
            raise UnsupportedModelError("olmoe with norm_topk_prob=true is not what llama.cpp's olmoe computes")
        if cfg.get("clip_qkv") is not None:
            _put(w, "clamp_kqv", arch, float(cfg["clip_qkv"]), "float32")


def _write_deepseek(w: Any, mt: str, cfg: dict[str, Any], ex: _Experts) -> None:
    arch = "deepseek2"
    rank = int(cfg["kv_lora_rank"])
    rope, nope, v = int(cfg["qk_rope_head_dim"]), int(cfg["qk_nope_head_dim"]), int(cfg["v_head_dim"])
    first_dense = int(cfg.get("first_k_dense_replace") or 0)
    if ex.layers != tuple(range(first_dense, int(cfg["num_hidden_layers"]))):
        raise UnsupportedModelError(f"{mt}: MoE layers {list(ex.layers)} are not 'all after the leading "
                                    f"{first_dense} dense layers' (moe_layer_freq != 1 is not in llama.cpp)")
    if mt == "deepseek_v3" and not cfg.get("rope_interleave", True):
        raise UnsupportedModelError("deepseek_v3 with rope_interleave=false is not exported (llama.cpp's "
                                    "deepseek2 rotates interleaved pairs)")
    _put(w, "head_count_kv", arch, 1, "uint32")  # MLA runs as MQA over the latent
    _put(w, "key_length", arch, rank + rope, "uint32")
    _put(w, "value_length", arch, rank, "uint32")
    _put(w, "key_length_mla", arch, nope + rope, "uint32")
    _put(w, "value_length_mla", arch, v, "uint32")
    _put(w, "rope_dim", arch, rope, "uint32")
    _put(w, "q_lora_rank", arch, int(cfg.get("q_lora_rank") or 0), "uint32")  # 0 selects attn_q
    _put(w, "kv_lora_rank", arch, rank, "uint32")
    _put(w, "leading_dense", arch, first_dense, "uint32")
    _put(w, "expert_shared_count", arch, int(cfg.get("n_shared_experts") or 0), "uint32")
    _put(w, "expert_weights_scale", arch, float(cfg.get("routed_scaling_factor", 1.0)), "float32")
    sigmoid = mt == "deepseek_v3" or cfg.get("scoring_func") == "sigmoid"
    _put(w, "expert_gating_func", arch, GATING_SIGMOID if sigmoid else GATING_SOFTMAX, "uint32")
    norm = bool(cfg.get("norm_topk_prob", mt == "deepseek_v3"))
    _put(w, "expert_weights_norm", arch, norm, "bool")
    method = cfg.get("topk_method") or ("noaux_tc" if mt == "deepseek_v3" else "greedy")
    n_group, topk_group = int(cfg.get("n_group") or 1), int(cfg.get("topk_group") or 1)
    if method == "noaux_tc" and n_group > 1:
        _put(w, "expert_group_count", arch, n_group, "uint32")
        _put(w, "expert_group_used_count", arch, topk_group, "uint32")
    elif method == "group_limited_greedy" and topk_group < n_group:
        warnings.warn(f"{mt}: llama.cpp has no group_limited_greedy routing (best-expert group ranking); "
                      "the export routes greedily over all experts, as llama.cpp's own converter does",
                      stacklevel=3)
    rs = _rope_scaling(cfg)
    if rs is not None:
        if rs.get("rope_type", rs.get("type")) != "yarn":
            raise UnsupportedModelError(f"{mt}: rope scaling {rs} is not exported (only YaRN)")
        w.add_string(KEY["rope_scaling_type"].format(arch=arch), "yarn")
        _put(w, "rope_scaling_factor", arch, float(rs["factor"]), "float32")
        _put(w, "rope_orig_ctx", arch, int(rs["original_max_position_embeddings"]), "uint32")
        if rs.get("mscale_all_dim") is not None:
            _put(w, "rope_yarn_log_mul", arch, 0.1 * float(rs["mscale_all_dim"]), "float32")


# --- tokenizer ---------------------------------------------------------------------------------------
def _pre_tokenizer_name(tok: dict[str, Any]) -> str:
    pre = tok.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return GPT2_PRE
    if pre.get("type") == "Sequence":
        splits = [p for p in pre.get("pretokenizers", []) if p.get("type") == "Split"]
        levels = [p for p in pre.get("pretokenizers", []) if p.get("type") == "ByteLevel"]
        if len(splits) == 1 and levels:
            pattern = splits[0].get("pattern", {}).get("Regex")
            for name, regex in PRE_TOKENIZER_REGEX.items():
                if pattern == regex:
                    return name
            raise NotImplementedError(f"pre-tokenizer regex {pattern!r} is not one llama.cpp knows by name here "
                                      f"(known: gpt-2, {', '.join(PRE_TOKENIZER_REGEX)})")
    raise NotImplementedError(f"pre-tokenizer {pre.get('type')!r} is not supported for llama.cpp export "
                              "(byte-level BPE only)")


def _first_id(value: Any) -> int | None:
    if isinstance(value, list):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def _write_tokenizer(w: Any, hf_dir: Path, cfg: dict[str, Any]) -> None:
    import gguf

    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        raise ModelFormatError(f"{path}: missing; llama.cpp needs the tokenizer in the GGUF, "
                               "put the model's tokenizer.json beside config.json")
    tok = json.loads(path.read_text(encoding="utf-8"))
    model = tok.get("model", {})
    if model.get("type") != "BPE":
        raise NotImplementedError(f"tokenizer model {model.get('type')!r}: only byte-level BPE is exported")
    pre = _pre_tokenizer_name(tok)
    vocab: dict[str, int] = dict(model["vocab"])
    special = set()
    for added in tok.get("added_tokens", []):
        vocab[added["content"]] = int(added["id"])
        if added.get("special", False):
            special.add(int(added["id"]))
    n_vocab = int(cfg["vocab_size"])
    if max(vocab.values()) >= n_vocab:
        raise ModelFormatError(f"{path}: token id {max(vocab.values())} >= config vocab_size {n_vocab}")
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    tcfg_path = hf_dir / "tokenizer_config.json"
    tcfg = json.loads(tcfg_path.read_text(encoding="utf-8")) if tcfg_path.is_file() else {}
    for key, adder in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                       ("pad_token_id", w.add_pad_token_id)):
        tid = _first_id(cfg.get(key))
        if tid is not None and 0 <= tid < n_vocab:
            adder(tid)
    w.add_add_bos_token(bool(tcfg.get("add_bos_token", False)))
    template = tcfg.get("chat_template")
    if isinstance(template, str):
        w.add_chat_template(template)
    elif (hf_dir / "chat_template.jinja").is_file():
        w.add_chat_template((hf_dir / "chat_template.jinja").read_text(encoding="utf-8"))
