"""Synthetic scale models for benchmarks: real MoE shapes, random weights, real tokenizer.

Owns :class:`SyntheticSpec` (default: the shapes of Qwen3-30B-A3B — hidden
2048, 128 experts, top-8, expert width 768, 32 query heads / 4 KV heads of
128 — with few layers so it fits this disk and time), :func:`write_hf_folder`
(an HF ``qwen3_moe`` folder whose ``model.safetensors`` is written tensor by
tensor, so peak memory is one tensor, never the model), and
:func:`build_synthetic` (HF folder -> moestream shards via
``convert.convert.convert_checkpoint`` and -> stock llama.cpp GGUF via
``convert.llamacpp_export.export_llamacpp``).

QUALITY NUMBERS NEVER COME FROM THESE MODELS: the weights are random, so
they only make I/O and compute costs real (bytes per expert, FLOPs, routing
spread over all experts). Their routing has none of the locality of a trained
model, and greedy generation on them falls into repetition loops, so decode
is timed by teacher forcing real text (see ``bench/run_arm.py``).

The tokenizer is the embedded default model's byte-level BPE (8192 tokens),
so the vocabulary-sized tensors are small compared to Qwen3's 151936: the
model is dominated by routed experts, the part that streaming is about.

Knows nothing about the engine; imports only ``convert/`` (to write formats).
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch

REPO = Path(__file__).resolve().parent.parent
#: Where the embedded model's tokenizer lives (and where it was trained, before the model landed).
TOKENIZER_DIRS = (REPO / "engine" / "default_model", REPO / "runs" / "default" / "tokenizer")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
QUALITY_NOTE = ("random weights: timing and memory only; quality numbers never come from this model; "
                "decode timed by teacher forcing real text")


@dataclass(frozen=True)
class SyntheticSpec:
    """Shapes of the synthetic model (HF ``qwen3_moe`` field meanings)."""

    layers: int = 6
    hidden: int = 2048
    experts: int = 128
    top_k: int = 8
    expert_inter: int = 768
    heads: int = 32
    kv_heads: int = 4
    head_dim: int = 128
    vocab: int = 8192
    max_positions: int = 4096
    rope_theta: float = 1_000_000.0
    dtype: str = "bf16"
    seed: int = 0
    init_std: float = 0.02

    def config(self, eos_id: int | None = None, pad_id: int | None = None) -> dict:
        """The HF ``config.json`` of this model."""
        return {
            "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
            "hidden_size": self.hidden, "num_hidden_layers": self.layers, "num_experts": self.experts,
            "num_experts_per_tok": self.top_k, "moe_intermediate_size": self.expert_inter,
            "intermediate_size": 6144, "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim, "vocab_size": self.vocab, "max_position_embeddings": self.max_positions,
            "rope_theta": self.rope_theta, "rms_norm_eps": 1e-6, "norm_topk_prob": True,
            "decoder_sparse_step": 1, "mlp_only_layers": [], "attention_bias": False,
            "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": "bfloat16",
            "eos_token_id": eos_id, "pad_token_id": pad_id, "bos_token_id": None,
            "moestream_synthetic": QUALITY_NOTE,
        }

    def tensor_shapes(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """Every tensor's HF name and shape, in file order (layer by layer, experts in order)."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        yield "model.embed_tokens.weight", (self.vocab, h)
        for layer in range(self.layers):
            p = f"model.layers.{layer}."
            yield p + "input_layernorm.weight", (h,)
            yield p + "self_attn.q_proj.weight", (q, h)
            yield p + "self_attn.k_proj.weight", (kv, h)
            yield p + "self_attn.v_proj.weight", (kv, h)
            yield p + "self_attn.o_proj.weight", (h, q)
            yield p + "self_attn.q_norm.weight", (self.head_dim,)
            yield p + "self_attn.k_norm.weight", (self.head_dim,)
            yield p + "post_attention_layernorm.weight", (h,)
            yield p + "mlp.gate.weight", (self.experts, h)
            for e in range(self.experts):
                yield p + f"mlp.experts.{e}.gate_proj.weight", (self.expert_inter, h)
                yield p + f"mlp.experts.{e}.up_proj.weight", (self.expert_inter, h)
                yield p + f"mlp.experts.{e}.down_proj.weight", (h, self.expert_inter)
        yield "model.norm.weight", (h,)
        yield "lm_head.weight", (self.vocab, h)

    def n_params(self) -> int:
        """Parameter count."""
        total = 0
        for _, shape in self.tensor_shapes():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total

    def expert_params(self) -> int:
        """Parameters of one routed expert."""
        return 3 * self.hidden * self.expert_inter


_ST_DTYPE = {"bf16": ("BF16", torch.bfloat16, 2), "f16": ("F16", torch.float16, 2), "f32": ("F32", torch.float32, 4)}


def _tensor(name: str, shape: tuple[int, ...], spec: SyntheticSpec, gen: torch.Generator) -> torch.Tensor:
    """Random weights for a matrix, ones for norm scales (so activations keep a sane scale)."""
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.float32)
    std = spec.init_std
    if name.endswith("mlp.gate.weight"):
        std = 1.0 / spec.hidden ** 0.5 * 4.0  # router logits of order 1: routing spreads over all experts
    return torch.randn(shape, generator=gen, dtype=torch.float32).mul_(std)


def write_safetensors_streaming(path: Path, spec: SyntheticSpec, progress: bool = True) -> int:
    """Write every tensor of ``spec`` into one safetensors file, one tensor in memory at a time.

    The header (names, dtypes, shapes, offsets) is computed from shapes first,
    then each tensor is generated, cast and appended.

    Args:
        path: the ``.safetensors`` file to write (via ``.partial`` + rename).
        spec: the model shapes, storage dtype and seed.
        progress: print progress to stderr every ~1 GB.

    Returns:
        Bytes written.
    """
    st_name, torch_dtype, width = _ST_DTYPE[spec.dtype]
    header: dict[str, object] = {"__metadata__": {"format": "pt", "moestream_synthetic": QUALITY_NOTE}}
    offset = 0
    shapes = list(spec.tensor_shapes())
    for name, shape in shapes:
        n = 1
        for d in shape:
            n *= d
        header[name] = {"dtype": st_name, "shape": list(shape), "data_offsets": [offset, offset + n * width]}
        offset += n * width
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(path.name + ".partial")
    gen = torch.Generator().manual_seed(spec.seed)
    written, next_report, t0 = 0, 2**30, time.perf_counter()
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape in shapes:
            t = _tensor(name, shape, spec, gen).to(torch_dtype).contiguous()
            f.write(t.reshape(-1).view(torch.uint8).numpy())
            written += t.numel() * width
            if progress and written >= next_report:
                print(f"  safetensors: {written / 2**30:.1f} / {offset / 2**30:.1f} GiB "
                      f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
                next_report += 2**30
    tmp.replace(path)
    return 8 + len(raw) + offset


def find_tokenizer_dir(explicit: str | Path | None = None) -> Path:
    """The folder holding ``tokenizer.json`` to reuse (explicit, else the default model's).

    Raises:
        FileNotFoundError: none found.
    """
    dirs = [Path(explicit)] if explicit else list(TOKENIZER_DIRS)
    for d in dirs:
        if (d / "tokenizer.json").is_file():
            return d
    raise FileNotFoundError(f"no tokenizer.json in {', '.join(map(str, dirs))}; pass --tokenizer DIR")


def _token_id(tok: dict, content: str | None) -> int | None:
    if not content:
        return None
    for added in tok.get("added_tokens", []):
        if added.get("content") == content:
            return int(added["id"])
    return tok.get("model", {}).get("vocab", {}).get(content)


def write_hf_folder(out: Path, spec: SyntheticSpec, tokenizer_dir: Path | None = None,
                    progress: bool = True) -> Path:
    """Write an HF ``qwen3_moe`` folder: config.json, tokenizer files, model.safetensors.

    Args:
        out: the folder (created; an existing complete folder is reused).
        spec: shapes; ``spec.vocab`` is raised to the tokenizer's size when smaller.
        tokenizer_dir: folder with tokenizer.json (default: the embedded model's).
        progress: report progress on stderr.

    Returns:
        ``out``.
    """
    out.mkdir(parents=True, exist_ok=True)
    tok_dir = find_tokenizer_dir(tokenizer_dir)
    for name in TOKENIZER_FILES:
        if (tok_dir / name).is_file():
            shutil.copyfile(tok_dir / name, out / name)
    tok = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    tcfg = json.loads((out / "tokenizer_config.json").read_text()) if (out / "tokenizer_config.json").is_file() \
        else {}
    eos, pad = _token_id(tok, tcfg.get("eos_token")), _token_id(tok, tcfg.get("pad_token"))
    (out / "config.json").write_text(json.dumps(spec.config(eos, pad), indent=2))
    (out / "synthetic_spec.json").write_text(json.dumps(asdict(spec), indent=2))
    st = out / "model.safetensors"
    if not st.is_file():
        write_safetensors_streaming(st, spec, progress=progress)
    return out


def build_synthetic(root: Path, spec: SyntheticSpec, *, shard_dtype: str = "bf16",
                    gguf_qtypes: tuple[str, ...] = ("q8_0",), tokenizer_dir: Path | None = None,
                    progress: bool = True) -> dict[str, str]:
    """HF folder, moestream shards and llama.cpp GGUF(s) of one synthetic model, under ``root``.

    Existing outputs are kept (delete them to rebuild).

    Args:
        root: output folder (``hf/``, ``shards_<dtype>/``, ``llamacpp_<qtype>.gguf``).
        spec: the shapes.
        shard_dtype: moestream expert storage dtype (``f32`` | ``f16`` | ``bf16``).
        gguf_qtypes: llama.cpp export types (``q8_0``, ``q4_0``, ``f16``, ``f32``).
        tokenizer_dir: folder with tokenizer.json.
        progress: progress on stderr.

    Returns:
        ``{"hf": path, "moestream_<dtype>": path, "llamacpp_<qtype>": path, ...}``.
    """
    from moestream.convert.convert import convert_checkpoint

    root.mkdir(parents=True, exist_ok=True)
    hf = write_hf_folder(root / "hf", spec, tokenizer_dir, progress)
    paths = {"hf": str(hf)}
    shards = root / f"shards_{shard_dtype}"
    if not any(shards.glob("*.gguf")):
        convert_checkpoint(hf, shards, dtype=shard_dtype, progress=progress)
    paths[f"moestream_{shard_dtype}"] = str(shards)
    for q in gguf_qtypes:
        out = root / f"llamacpp_{q}.gguf"
        if not out.is_file():
            from moestream.convert.llamacpp_export import export_llamacpp

            export_llamacpp(hf, out, q, progress=progress)
        paths[f"llamacpp_{q}"] = str(out)
    (root / "paths.json").write_text(json.dumps(paths, indent=2))
    return paths


def main(argv: list[str] | None = None) -> int:
    """``python -m moestream.bench.synthetic OUT [--layers N] [--gguf q8_0 f16]``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="output folder (big: put it outside the repository, e.g. /work/bench_data/...)")
    p.add_argument("--layers", type=int, default=SyntheticSpec.layers)
    p.add_argument("--shard-dtype", choices=("f32", "f16", "bf16"), default="bf16")
    p.add_argument("--gguf", nargs="*", default=["q8_0"], help="llama.cpp export types (q8_0 q4_0 f16 f32)")
    p.add_argument("--tokenizer", help="folder with tokenizer.json (default: the embedded model's)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    spec = SyntheticSpec(layers=args.layers, seed=args.seed)
    tok_dir = find_tokenizer_dir(args.tokenizer)
    vocab = len(json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"])
    if vocab > spec.vocab:
        spec = SyntheticSpec(**{**asdict(spec), "vocab": -(-vocab // 256) * 256})
    print(f"synthetic qwen3_moe: {spec.n_params() / 1e9:.2f} B params, {spec.layers} layers; {QUALITY_NOTE}",
          file=sys.stderr)
    paths = build_synthetic(Path(args.out), spec, shard_dtype=args.shard_dtype, gguf_qtypes=tuple(args.gguf),
                            tokenizer_dir=tok_dir)
    print(json.dumps(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
