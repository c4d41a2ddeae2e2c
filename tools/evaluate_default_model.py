"""Evaluate the embedded default model for its model card.

Owns the model card's numbers: held-out perplexity per domain beside a
unigram baseline, greedy continuations of domain prompts, per-layer expert
load, per-domain expert-usage divergence (Jensen-Shannon), and routing
consistency (SRP at m = 4/16/64 and cache hit rates, each beside its
time-shuffled baseline) computed with moestream's own engine (routing hook)
and scheduler analysis. Knows nothing about training.

Usage:
  python tools/evaluate_default_model.py --model engine/default_model \
      --corpus data/corpus --out engine/default_model/evaluation.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from moestream.engine.hf_loading import load_hf_model
from moestream.scheduler.analysis import analyze, routing_load
from moestream.scheduler.simulate import TraceRecorder

DOMAINS = ("python", "perl", "kernel", "fortunes")
PROMPTS = {
    "python": "The :mod:`itertools` module",
    "perl": "=head1 DESCRIPTION\n\nThis function",
    "kernel": "The device driver must",
    "fortunes": "A friend in need",
}


def domain_windows(tokenizer: Tokenizer, text: str, seq: int, max_windows: int) -> list[list[int]]:
    """Consecutive non-overlapping windows of seq+1 tokens from a held-out text."""
    ids = tokenizer.encode(text).ids
    return [ids[i:i + seq + 1] for i in range(0, len(ids) - seq - 1, seq)][:max_windows]


def unigram_log_probs(tokenizer: Tokenizer, corpus: Path, vocab: int) -> np.ndarray:
    """Add-one smoothed unigram log-probabilities from the train split."""
    counts = np.ones(vocab, dtype=np.float64)
    for domain in DOMAINS:
        ids = tokenizer.encode((corpus / "train" / f"{domain}.txt").read_text()).ids
        counts += np.bincount(ids, minlength=vocab)[:vocab]
    return np.log(counts / counts.sum())


@torch.no_grad()
def evaluate_domain(model, windows: list[list[int]], recorder: TraceRecorder) -> tuple[float, np.ndarray]:
    """Mean next-token NLL over the windows; routing of every window recorded as one sequence."""
    nll, count = 0.0, 0
    for window in windows:
        ids = torch.tensor([window[:-1]])
        recorder.begin_sequence()
        logits = model(ids)[0]
        recorder.end_sequence()
        targets = torch.tensor(window[1:])
        nll += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
        count += len(targets)
    return nll / count, np.asarray(count)


def usage_per_layer(trace, first_seq: int, n_seq: int) -> np.ndarray:
    """Expert-usage distribution [L, E] over a range of sequences of a trace."""
    counts = np.zeros((trace.n_layers, trace.n_experts))
    for s in range(first_seq, first_seq + n_seq):
        for layer in range(trace.n_layers):
            counts[layer] += np.bincount(trace.layer_tokens(s, layer).reshape(-1), minlength=trace.n_experts)
    return counts / counts.sum(axis=1, keepdims=True)


def jensen_shannon(p: np.ndarray, q: np.ndarray) -> float:
    """JS divergence in bits (0 = identical, 1 = disjoint)."""
    m = (p + q) / 2

    def kl(a: np.ndarray, b: np.ndarray) -> float:
        mask = a > 0
        return float(np.sum(a[mask] * np.log2(a[mask] / b[mask])))

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


@torch.no_grad()
def greedy(model, tokenizer: Tokenizer, prompt: str, n: int) -> str:
    """Greedy continuation through the KV cache."""
    ids = tokenizer.encode(prompt).ids
    cache = model.make_cache(1, len(ids) + n)
    logits = model(torch.tensor([ids]), cache)
    out: list[int] = []
    for _ in range(n):
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        logits = model(torch.tensor([[nxt]]), cache)
    return tokenizer.decode(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("engine/default_model"))
    parser.add_argument("--corpus", type=Path, default=Path("data/corpus"))
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--windows", type=int, default=40, help="windows per domain")
    parser.add_argument("--out", type=Path, default=Path("engine/default_model/evaluation.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)

    model, margs = load_hf_model(args.model)
    model.eval()
    tokenizer = Tokenizer.from_file(str(args.model / "tokenizer.json"))
    unigram = unigram_log_probs(tokenizer, args.corpus, tokenizer.get_vocab_size())
    recorder = TraceRecorder(len(model.moe_layers()), margs.n_routed_experts, margs.top_k)
    moe_layers = model.moe_layers()

    def hook(layer: int, ids: torch.Tensor, weights: torch.Tensor) -> None:
        recorder(moe_layers.index(layer), ids, weights)

    report: dict = {"model": str(args.model), "seq": args.seq, "domains": {}}
    seq_ranges: dict[str, tuple[int, int]] = {}
    for domain in DOMAINS:
        text = (args.model / "heldout" / f"{domain}.txt").read_text()
        windows = domain_windows(tokenizer, text, args.seq, args.windows)
        first = recorder.trace().n_sequences
        model.add_routing_hook(hook)
        nll, _ = evaluate_domain(model, windows, recorder)
        model.remove_routing_hook(hook)
        seq_ranges[domain] = (first, len(windows))
        targets = np.concatenate([w[1:] for w in windows])
        report["domains"][domain] = {
            "windows": len(windows), "tokens": int(targets.size),
            "perplexity": math.exp(nll), "unigram_perplexity": math.exp(-float(unigram[targets].mean())),
            "greedy_prompt": PROMPTS[domain], "greedy_continuation": greedy(model, tokenizer, PROMPTS[domain], 40),
        }
        print(domain, json.dumps(report["domains"][domain]), flush=True)

    trace = recorder.trace({"model": str(args.model), "text": "heldout/*.txt", "seq": args.seq})
    usage = {d: usage_per_layer(trace, *seq_ranges[d]) for d in DOMAINS}
    report["domain_divergence_js_bits"] = {
        f"{a}|{b}": [jensen_shannon(usage[a][layer], usage[b][layer]) for layer in range(trace.n_layers)]
        for a, b in itertools.combinations(DOMAINS, 2)}
    report["load"] = routing_load(trace)
    report["routing"] = analyze(trace, segment_lengths=(4, 16, 64), rhos=[1, 2, 4, 8],
                                policies=("lru", "lfu", "consistency", "sch", "belady"), scopes=("layer",))
    args.out.write_text(json.dumps(report, indent=1))
    trace.save(args.out.with_name("heldout_trace.npz"))
    print(json.dumps({k: report[k] for k in ("domain_divergence_js_bits", "load")}, indent=1))
    print(json.dumps(report["routing"]["srp"], indent=1))


if __name__ == "__main__":
    main()
