"""Read a stock llama.cpp MoE GGUF as a moestream model: HF-style config, canonical dense tensors, expert byte ranges.

Owns :class:`LlamaCppGGUF`: opens a GGUF written by llama.cpp's converter
(or by ``convert/llamacpp_export.py``) for the architectures ``qwen3moe``,
``qwen2moe``, ``llama`` with experts (Mixtral), ``olmoe`` and ``deepseek2``
(DeepSeek-V2/V3), and

- rebuilds the HF ``config.json`` dict the engine's family expects
  (:attr:`config`, :attr:`model_type`);
- serves every non-expert tensor under its canonical name, dequantized to
  fp32 with ``gguf.quants.dequantize`` and with llama.cpp's layout changes
  undone (Mixtral q/k rows back to rotate-half order; DeepSeek ``attn_k_b`` +
  ``attn_v_b`` merged back into ``kv_b_proj``);
- exposes each routed expert projection as one contiguous byte range inside
  the stacked 3-D tensor (``expert_range(layer, expert, proj)`` = tensor
  offset + e * bytes per expert) and decodes such bytes on demand, for any
  type gguf-py can dequantize (F32/F16/BF16, Q4_0..Q8_0, K-quants, IQ types).

Knows nothing about the engine, the scheduler or moestream's shard format.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moestream.convert.errors import ModelFormatError, UnsupportedModelError
from moestream.convert.hf_checkpoint import EXPERT_PROJS
from moestream.convert.llamacpp_names import (
    EXPERT_TENSOR, FUSED_GATE_UP, GATING_SIGMOID, K_B_GGUF, KEY, KV_B_CANONICAL, KV_B_GGUF, SUPPORTED_ARCHS,
    V_B_GGUF, canonical_name,
)
from moestream.convert.shard_reader import ByteRange, read_range

_BLK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")
_MODEL_TYPE = {"qwen3moe": "qwen3_moe", "qwen2moe": "qwen2_moe", "llama": "mixtral", "olmoe": "olmoe"}


@dataclass(frozen=True)
class _ExpertTensor:
    """One stacked expert tensor of one layer: where it is and how to decode a slice of it."""

    offset: int  # absolute file offset of expert 0
    bytes_per_expert: int
    rows: int
    cols: int
    qtype: Any  # gguf.GGMLQuantizationType


class LlamaCppGGUF:
    """A llama.cpp MoE GGUF opened for per-tensor and per-expert reads.

    Attributes:
        path: the file.
        arch: ``general.architecture``.
        model_type: the HF family the engine builds (``qwen3_moe``, ``qwen2_moe``, ``mixtral``,
            ``olmoe``, ``deepseek_v2``, ``deepseek_v3``).
        config: HF-style config dict for ``ModelArgs.from_config``.
    """

    def __init__(self, path: Path, reader: Any) -> None:
        """Use :meth:`open`."""
        self.path = path
        self._reader = reader
        self._tensors = {t.name: t for t in reader.tensors}
        self.arch: str = self._str("general.architecture")
        self._fd: int | None = None
        self._check_arch()
        self._experts = self._index_experts()
        self.config: dict[str, Any] = self._build_config()
        self.model_type: str = self.config["model_type"]

    @classmethod
    def open(cls, path: str | Path) -> "LlamaCppGGUF":
        """Open a llama.cpp GGUF file.

        Args:
            path: the ``.gguf`` file (single file; split GGUFs are not read here).

        Returns:
            The opened model.

        Raises:
            ModelFormatError: not a readable GGUF, or tensors/keys missing for its architecture.
            UnsupportedModelError: an architecture that is not one of the supported MoE families,
                or a ``llama`` GGUF without experts (a dense model).
            NotImplementedError: fused ``ffn_gate_up_exps`` tensors.
        """
        import gguf

        p = Path(path)
        if not p.is_file():
            raise ModelFormatError(f"{p}: no such file; pass a llama.cpp .gguf file")
        try:
            reader = gguf.GGUFReader(str(p))
        except (ValueError, OSError, IndexError) as exc:
            raise ModelFormatError(f"{p}: not a readable GGUF file ({exc}); it may be truncated") from exc
        return cls(p, reader)

    # --- metadata -----------------------------------------------------------------------------------
    def _field(self, key: str, default: Any = None) -> Any:
        f = self._reader.fields.get(key)
        return default if f is None else f.contents()

    def _str(self, key: str) -> str:
        v = self._field(key)
        if not isinstance(v, str):
            raise ModelFormatError(f"{self.path}: GGUF has no '{key}'; is this a llama.cpp model file?")
        return v

    def _key(self, name: str, default: Any = None) -> Any:
        v = self._field(KEY[name].format(arch=self.arch), default)
        if isinstance(v, list):  # per-layer arrays (e.g. head_count): MoE families here use one value
            v = v[0] if v else default
        return v

    def _need(self, name: str) -> Any:
        v = self._key(name)
        if v is None:
            raise ModelFormatError(f"{self.path}: missing metadata key {KEY[name].format(arch=self.arch)}")
        return v

    def _check_arch(self) -> None:
        if self.arch not in SUPPORTED_ARCHS:
            raise UnsupportedModelError(f"{self.path}: llama.cpp architecture {self.arch!r} is not supported; "
                                        f"moestream reads the MoE architectures {', '.join(SUPPORTED_ARCHS)}")
        if not self._key("expert_count"):
            raise UnsupportedModelError(f"{self.path}: {self.arch} GGUF has no experts (expert_count is 0): "
                                        "it is a dense model; moestream runs Mixture-of-Experts models only")
        if any(FUSED_GATE_UP.format(bid=b) in self._tensors for b in range(self._block_count())):
            raise NotImplementedError(f"{self.path}: fused ffn_gate_up_exps tensors are not read yet")

    def _block_count(self) -> int:
        return int(self._need("block_count"))

    # --- experts -------------------------------------------------------------------------------------
    def _index_experts(self) -> dict[tuple[int, str], _ExpertTensor]:
        out: dict[tuple[int, str], _ExpertTensor] = {}
        n_expert = int(self._need("expert_count"))
        for layer in range(self._block_count()):
            for proj in EXPERT_PROJS:
                t = self._tensors.get(EXPERT_TENSOR[proj].format(bid=layer))
                if t is None:
                    continue
                ne = [int(x) for x in t.shape]  # ggml order: cols, rows, experts
                if len(ne) != 3 or ne[2] != n_expert:
                    raise ModelFormatError(f"{self.path}: {t.name} has shape {ne}, expected [cols, rows, {n_expert}]")
                if int(t.n_bytes) % n_expert:
                    raise ModelFormatError(f"{self.path}: {t.name} byte size is not a multiple of {n_expert}")
                out[(layer, proj)] = _ExpertTensor(int(t.data_offset), int(t.n_bytes) // n_expert, ne[1], ne[0],
                                                   t.tensor_type)
        layers = sorted({layer for layer, _ in out})
        for layer in layers:
            if any((layer, p) not in out for p in EXPERT_PROJS):
                raise ModelFormatError(f"{self.path}: layer {layer} lacks one of ffn_gate/up/down_exps")
        if not layers:
            raise UnsupportedModelError(f"{self.path}: no ffn_*_exps tensors: not a MoE model")
        return out

    @property
    def moe_layers(self) -> list[int]:
        """Layers with routed experts."""
        return sorted({layer for layer, _ in self._experts})

    @property
    def num_experts(self) -> int:
        """Routed experts per MoE layer."""
        return int(self._need("expert_count"))

    def expert_range(self, layer: int, expert: int, proj: str) -> ByteRange:
        """Byte range of one expert's projection inside the stacked 3-D tensor.

        Args:
            layer: MoE layer.
            expert: expert id.
            proj: ``gate_proj``, ``up_proj`` or ``down_proj``.

        Raises:
            KeyError: no such layer/projection; IndexError: expert id out of range.
        """
        et = self._experts[(layer, proj)]
        if not 0 <= expert < self.num_experts:
            raise IndexError(f"expert {expert} out of range 0..{self.num_experts - 1}")
        return ByteRange(str(self.path), et.offset + expert * et.bytes_per_expert, et.bytes_per_expert)

    def expert_qtype(self, layer: int, proj: str) -> str:
        """ggml type name of a layer's stacked projection (e.g. ``Q8_0``)."""
        return self._experts[(layer, proj)].qtype.name

    def decode_expert_proj(self, layer: int, proj: str, buf: Any) -> torch.Tensor:
        """Decode the bytes of :meth:`expert_range` into an fp32 ``[rows, cols]`` tensor (gate/up ``[I, H]``, down ``[H, I]``)."""
        import gguf

        et = self._experts[(layer, proj)]
        raw = np.frombuffer(buf, dtype=np.uint8, count=et.bytes_per_expert).reshape(et.rows, -1)
        return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(raw, et.qtype), dtype=np.float32))

    def read_expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """Read and decode one expert: ``{"gate_proj", "up_proj", "down_proj"}`` fp32 tensors."""
        out = {}
        for proj in EXPERT_PROJS:
            rng = self.expert_range(layer, expert, proj)
            out[proj] = self.decode_expert_proj(layer, proj, read_range(self._file(), rng.offset, rng.nbytes, rng.path))
        return out

    def _file(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def close(self) -> None:
        """Close the positioned-read handle (the reader's memory map goes with the object)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # --- dense tensors ------------------------------------------------------------------------------
    def _array(self, name: str) -> np.ndarray:
        import gguf

        t = self._tensors[name]
        data = np.asarray(t.data)
        if t.tensor_type == gguf.GGMLQuantizationType.F32:
            arr = data.astype(np.float32, copy=False)
        else:
            arr = gguf.quants.dequantize(data, t.tensor_type)
        shape = tuple(int(x) for x in reversed([int(s) for s in t.shape]))
        return np.array(arr, dtype=np.float32, copy=True).reshape(shape)  # detached from the memory map

    def dense_names(self) -> list[str]:
        """Canonical names of every non-routed-expert tensor the engine model loads."""
        names = []
        plural = self.arch == "deepseek2"
        for name in self._tensors:
            if any(name == EXPERT_TENSOR[p].format(bid=b) for b, p in self._experts):
                continue
            m = _BLK_RE.match(name)
            if m and m.group(2) in (V_B_GGUF, KV_B_GGUF):
                names.append(f"model.layers.{m.group(1)}.{KV_B_CANONICAL}")
                continue
            if m and m.group(2) == K_B_GGUF:
                continue
            canon = canonical_name(name, plural)
            if canon is None:
                continue  # e.g. rope_freqs, which the engine recomputes
            names.append(canon)
        if self.model_type == "deepseek_v3":
            for layer in self.moe_layers:
                bias = f"model.layers.{layer}.mlp.gate.e_score_correction_bias"
                if bias not in names:
                    names.append(bias)
        return sorted(names)

    def read_dense(self, name: str) -> torch.Tensor:
        """One canonical non-expert tensor, dequantized to fp32, in HF layout.

        Raises:
            KeyError: unknown name.
        """
        m = re.match(r"^model\.layers\.(\d+)\.(.+)$", name)
        if m and m.group(2) == KV_B_CANONICAL:
            return torch.from_numpy(self._kv_b(int(m.group(1))))
        if m and m.group(2) == "mlp.gate.e_score_correction_bias" \
                and f"blk.{m.group(1)}.exp_probs_b.bias" not in self._tensors:
            return torch.zeros(self.num_experts)  # sigmoid routing without a correction bias
        gname = _gguf_of(name)
        arr = self._array(gname)
        if self.arch == "llama" and name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            heads = self.config["num_attention_heads"] if ".q_proj." in name else self.config["num_key_value_heads"]
            arr = _unpermute_rope(arr, int(heads))
        if name.endswith("mlp.shared_expert_gate.weight"):
            arr = arr.reshape(1, -1)
        return torch.from_numpy(np.ascontiguousarray(arr))

    def _kv_b(self, layer: int) -> np.ndarray:
        legacy = f"blk.{layer}.{KV_B_GGUF}"
        if legacy in self._tensors:
            return self._array(legacy)
        k_b = self._array(f"blk.{layer}.{K_B_GGUF}")  # [n_head, rank, nope]
        v_b = self._array(f"blk.{layer}.{V_B_GGUF}")  # [n_head, v, rank]
        kv = np.concatenate([k_b.transpose(0, 2, 1), v_b], axis=1)  # [n_head, nope + v, rank]
        return np.ascontiguousarray(kv.reshape(-1, kv.shape[-1]))

    # --- config ---------------------------------------------------------------------------------------
    def _ne(self, name: str) -> list[int] | None:
        t = self._tensors.get(name)
        return None if t is None else [int(x) for x in t.shape]

    def _build_config(self) -> dict[str, Any]:
        emb = self._ne("token_embd.weight")
        if emb is None:
            raise ModelFormatError(f"{self.path}: no token_embd.weight tensor")
        hidden, vocab = emb[0], emb[1]
        n_head = int(self._need("head_count"))
        eos = self._field("tokenizer.ggml.eos_token_id")
        bos = self._field("tokenizer.ggml.bos_token_id")
        cfg: dict[str, Any] = {
            "vocab_size": vocab,
            "hidden_size": int(self._key("embedding_length", hidden)),
            "num_hidden_layers": self._block_count(),
            "num_attention_heads": n_head,
            "num_key_value_heads": int(self._key("head_count_kv", n_head)),
            "rms_norm_eps": float(self._need("rms_eps")),
            "rope_theta": float(self._key("rope_freq_base", 10000.0)),
            "max_position_embeddings": int(self._key("context_length", 4096)),
            "tie_word_embeddings": "output.weight" not in self._tensors,
            "num_experts_per_tok": int(self._need("expert_used_count")),
            "hidden_act": "silu",
            "bos_token_id": None if bos is None else int(bos),
            "eos_token_id": None if eos is None else int(eos),
        }
        first = self.moe_layers[0]
        inter = self._experts[(first, "gate_proj")].rows
        n_expert = self.num_experts
        if self.arch == "deepseek2":
            cfg.update(self._deepseek_config(inter))
            return cfg
        rope_dim = self._key("rope_dim")
        head_dim = int(self._key("key_length", hidden // n_head))
        if rope_dim is not None and int(rope_dim) != head_dim:
            raise UnsupportedModelError(f"{self.path}: partial RoPE (rope.dimension_count {rope_dim} < head "
                                        f"size {head_dim}) is not supported for {self.arch}")
        if self._key("rope_scaling_type") not in (None, "none"):
            raise UnsupportedModelError(f"{self.path}: rope scaling {self._key('rope_scaling_type')!r} is not "
                                        f"supported for {self.arch}")
        if self.moe_layers != list(range(cfg["num_hidden_layers"])):
            raise UnsupportedModelError(f"{self.path}: {self.arch} with dense layers is not supported")
        cfg["head_dim"] = head_dim
        cfg["model_type"] = _MODEL_TYPE[self.arch]
        if self.arch == "qwen3moe":
            cfg.update(num_experts=n_expert, moe_intermediate_size=inter, norm_topk_prob=True,
                       intermediate_size=int(self._key("feed_forward_length", inter) or inter),
                       mlp_only_layers=[], decoder_sparse_step=1)
        elif self.arch == "qwen2moe":
            sh = self._ne(f"blk.{first}.ffn_gate_shexp.weight")
            cfg.update(num_experts=n_expert, moe_intermediate_size=inter, norm_topk_prob=False,
                       intermediate_size=int(self._key("feed_forward_length", inter) or inter),
                       shared_expert_intermediate_size=int(self._key("expert_shared_ff", sh[1] if sh else inter)),
                       qkv_bias=f"blk.{first}.attn_q.bias" in self._tensors, mlp_only_layers=[], decoder_sparse_step=1)
        elif self.arch == "llama":
            cfg.update(num_local_experts=n_expert, intermediate_size=inter, sliding_window=None)
        else:  # olmoe
            clamp = self._key("clamp_kqv")
            cfg.update(num_experts=n_expert, intermediate_size=inter, norm_topk_prob=False,
                       clip_qkv=None if not clamp else float(clamp))
        return cfg

    def _deepseek_config(self, inter: int) -> dict[str, Any]:
        rope = int(self._need("rope_dim"))
        if self._key("key_length_mla") is not None:
            nope = int(self._key("key_length_mla")) - rope
            v = int(self._need("value_length_mla"))
        else:  # legacy (unsplit attn_kv_b) files
            nope = int(self._need("key_length")) - rope
            v = int(self._need("value_length"))
        sigmoid = int(self._key("expert_gating_func", 1) or 1) == GATING_SIGMOID
        n_group = int(self._key("expert_group_count", 1) or 1)
        topk_group = int(self._key("expert_group_used_count", 1) or 1)
        q_lora = int(self._key("q_lora_rank", 0) or 0)
        n_layers = self._block_count()
        cfg: dict[str, Any] = {
            "num_key_value_heads": int(self._need("head_count")),
            "kv_lora_rank": int(self._need("kv_lora_rank")),
            "q_lora_rank": q_lora or None,
            "qk_rope_head_dim": rope, "qk_nope_head_dim": nope, "v_head_dim": v,
            "n_routed_experts": self.num_experts,
            "n_shared_experts": int(self._key("expert_shared_count", 0) or 0),
            "moe_intermediate_size": inter,
            "intermediate_size": int(self._key("feed_forward_length", inter) or inter),
            "first_k_dense_replace": int(self._key("leading_dense", 0) or 0),
            "moe_layer_freq": 1,
            "routed_scaling_factor": float(self._key("expert_weights_scale", 1.0) or 1.0),
            "norm_topk_prob": bool(self._key("expert_weights_norm", False)),
        }
        if self.moe_layers != list(range(cfg["first_k_dense_replace"], n_layers)):
            raise ModelFormatError(f"{self.path}: MoE layers {self.moe_layers} do not follow the "
                                   f"{cfg['first_k_dense_replace']} leading dense layers")
        if sigmoid:
            cfg.update(model_type="deepseek_v3", scoring_func="sigmoid", topk_method="noaux_tc",
                       n_group=n_group, topk_group=topk_group, rope_interleave=True, num_nextn_predict_layers=0)
        else:
            if n_group > 1 and topk_group < n_group:
                raise NotImplementedError(f"{self.path}: softmax routing with expert groups (llama.cpp ranks groups "
                                          "by their top-2 sum) has no moestream equivalent yet")
            cfg.update(model_type="deepseek_v2", scoring_func="softmax", topk_method="greedy",
                       n_group=None, topk_group=None)
        stype = self._key("rope_scaling_type")
        if stype not in (None, "none"):
            if stype != "yarn":
                raise UnsupportedModelError(f"{self.path}: rope scaling {stype!r} is not supported (only yarn)")
            log_mul = float(self._key("rope_yarn_log_mul", 0.0) or 0.0) / 0.1  # = HF mscale_all_dim
            cfg["rope_scaling"] = {"rope_type": "yarn", "factor": float(self._need("rope_scaling_factor")),
                                   "original_max_position_embeddings": int(self._need("rope_orig_ctx")),
                                   "mscale": log_mul, "mscale_all_dim": log_mul,
                                   "beta_fast": 32.0, "beta_slow": 1.0}
        return cfg

    # --- tokenizer -------------------------------------------------------------------------------------
    def tokenizer_metadata(self) -> dict[str, Any]:
        """The ``tokenizer.ggml.*`` fields: ``model``, ``pre``, ``tokens``, ``token_type``, ``merges``, special ids."""
        keys = ("model", "pre", "tokens", "token_type", "merges", "bos_token_id", "eos_token_id", "padding_token_id")
        return {k: self._field(f"tokenizer.ggml.{k}") for k in keys}

    def chat_template(self) -> str | None:
        """``tokenizer.chat_template`` when present."""
        v = self._field("tokenizer.chat_template")
        return v if isinstance(v, str) else None


def _gguf_of(canonical: str) -> str:
    from moestream.convert.llamacpp_names import gguf_name

    g = gguf_name(canonical)
    if g is None:
        raise KeyError(canonical)
    return g


def _unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's interleaved q/k row order (inverse of ``convert_hf_to_gguf`` LlamaModel.permute)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
