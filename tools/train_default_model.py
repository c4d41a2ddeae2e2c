"""Train the embedded default model: a small qwen3_moe on the four-domain corpus.

Owns: the default model's architecture choice, the training loop (transformers'
Qwen3MoeForCausalLM with its router load-balancing loss), periodic validation
per domain, checkpoints that can be resumed, the learning curve, and the final
bf16 export in Hugging Face layout. Knows nothing about moestream's engine.

Usage (about an hour on 2 cores; resumable):
  python tools/build_corpus.py && python tools/train_tokenizer.py
  python tools/train_default_model.py --out runs/default --tokens 2400000
  python tools/train_default_model.py --out runs/default --tokens 2400000 --resume      # after an interruption
The same seed and arguments give the same curve (up to thread-level float noise).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

DOMAINS = ("python", "perl", "kernel", "fortunes")


def model_config(vocab_size: int, eos_id: int, pad_id: int) -> Qwen3MoeConfig:
    """The default model's shape: 4 layers, 32 experts of width 128, top-2, hidden 256."""
    return Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        num_experts=32,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=1024,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        output_router_logits=True,
        router_aux_loss_coef=0.0,  # transformers pools layers; the per-layer loss below replaces it
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        bos_token_id=None,
    )


def per_layer_balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Switch-style load-balancing loss computed per layer, averaged over layers (1.0 when balanced).

    transformers' ``load_balancing_loss_func`` concatenates all layers' logits before
    measuring balance, so one layer's hot expert hides behind another's cold one;
    measured here it left single experts with 5-6x the uniform share. Per layer:
    E * sum_e f_e * P_e / k, with f_e the fraction of top-k slots routed to e and
    P_e the mean router probability of e.
    """
    losses = []
    for logits in router_logits:  # [N, E] per MoE layer
        probs = torch.softmax(logits.float(), dim=-1)
        n_experts = probs.shape[-1]
        chosen = torch.topk(probs, top_k, dim=-1).indices
        fraction = torch.zeros(n_experts).index_add_(0, chosen.reshape(-1), torch.ones(chosen.numel()))
        fraction = fraction / chosen.numel()
        losses.append(n_experts * (fraction * probs.mean(dim=0)).sum())
    return torch.stack(losses).mean()


def encode_split(tokenizer: Tokenizer, corpus: Path, split: str) -> dict[str, np.ndarray]:
    """Token ids per domain for one split (documents joined by <|endoftext|>)."""
    out = {}
    for domain in DOMAINS:
        text = (corpus / split / f"{domain}.txt").read_text()
        out[domain] = np.asarray(tokenizer.encode(text).ids, dtype=np.int32)
    return out


def sample_batch(tokens: dict[str, np.ndarray], weights: np.ndarray, batch: int, seq: int,
                 rng: np.random.Generator) -> torch.Tensor:
    """Random windows of seq+1 tokens; each row from one domain (domain chosen by weight)."""
    rows = []
    for domain_idx in rng.choice(len(DOMAINS), size=batch, p=weights):
        ids = tokens[DOMAINS[domain_idx]]
        start = int(rng.integers(0, len(ids) - seq - 1))
        rows.append(ids[start:start + seq + 1])
    return torch.from_numpy(np.stack(rows).astype(np.int64))


@torch.no_grad()
def evaluate(model: Qwen3MoeForCausalLM, tokens: dict[str, np.ndarray], seq: int, windows: int) -> dict[str, float]:
    """Mean next-token loss per domain on fixed, evenly spaced windows."""
    model.eval()
    losses = {}
    for domain, ids in tokens.items():
        starts = np.linspace(0, len(ids) - seq - 2, windows).astype(int)
        batch = torch.from_numpy(np.stack([ids[s:s + seq + 1] for s in starts]).astype(np.int64))
        out = model(input_ids=batch[:, :-1], labels=batch[:, :-1].clone(), output_router_logits=False)
        # transformers shifts labels internally; feed inputs as labels for the standard causal loss
        losses[domain] = float(out.loss)
    model.train()
    return losses


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def export(model: Qwen3MoeForCausalLM, tokenizer_dir: Path, dest: Path) -> None:
    """Write the final model in HF layout, bf16 safetensors, with tokenizer files."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
    model.to(torch.float32)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tokenizer_dir / name, tmp / name)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=Path("data/corpus"))
    parser.add_argument("--tokenizer", type=Path, default=Path("runs/default/tokenizer"))
    parser.add_argument("--out", type=Path, default=Path("runs/default"))
    parser.add_argument("--tokens", type=int, default=2_400_000, help="training tokens")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=60)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--balance-coef", type=float, default=0.05, help="per-layer load-balancing loss weight")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is ~3x faster than 2 when the other core is busy)")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--max-minutes", type=float, default=0.0, help="stop early (and export) after this long")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = Tokenizer.from_file(str(args.tokenizer / "tokenizer.json"))
    train = encode_split(tokenizer, args.corpus, "train")
    val = encode_split(tokenizer, args.corpus, "validation")
    sizes = np.array([len(train[d]) for d in DOMAINS], dtype=np.float64)
    weights = sizes ** 0.7 / (sizes ** 0.7).sum()
    total_steps = args.tokens // (args.batch * args.seq)

    config = model_config(tokenizer.get_vocab_size(), tokenizer.token_to_id("<|im_end|>"),
                          tokenizer.token_to_id("<|endoftext|>"))
    model = Qwen3MoeForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(args.seed)
    curve: list[dict] = []
    start_step = 0
    ckpt = args.out / "checkpoint.pt"
    if args.resume and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        rng = state["rng"]
        curve = state["curve"]
        start_step = state["step"]
        print(f"resumed at step {start_step}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_args.json").write_text(json.dumps({k: str(v) for k, v in vars(args).items()}, indent=2))

    model.train()
    began = time.time()
    for step in range(start_step, total_steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total_steps, args.lr, args.warmup)
        batch = sample_batch(train, weights, args.batch, args.seq, rng)
        out = model(input_ids=batch[:, :-1], labels=batch[:, :-1].clone(), output_router_logits=True)
        balance = per_layer_balance_loss(out.router_logits, config.num_experts_per_tok)
        optimizer.zero_grad(set_to_none=True)
        (out.loss + args.balance_coef * balance).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        record = {"step": step + 1, "tokens": (step + 1) * args.batch * args.seq,
                  "loss": out.loss.item(), "balance_loss": balance.item(), "lr": group["lr"],
                  "elapsed_s": time.time() - began}
        done = step + 1 == total_steps or (args.max_minutes and time.time() - began > args.max_minutes * 60)
        if (step + 1) % args.eval_every == 0 or done:
            record["val_loss"] = evaluate(model, val, args.seq, windows=8)
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng,
                        "curve": curve + [record], "step": step + 1}, ckpt.with_suffix(".tmp"))
            ckpt.with_suffix(".tmp").rename(ckpt)
        curve.append(record)
        if (step + 1) % 10 == 0 or "val_loss" in record:
            tps = args.batch * args.seq * (step + 1 - start_step) / (time.time() - began)
            print(json.dumps({**record, "tok_per_s": round(tps)}), flush=True)
        if done:
            break
    (args.out / "learning_curve.json").write_text(json.dumps(curve))
    export(model, args.tokenizer, args.out / "final")
    print(f"exported {args.out / 'final'}")


if __name__ == "__main__":
    main()
