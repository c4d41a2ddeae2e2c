"""Render the default model's learning curve plot and the measured sections of its model card.

Owns: turning ``learning_curve.json`` (training) and ``evaluation.json``
(tools/evaluate_default_model.py) into ``learning_curve.png`` and the
Markdown tables pasted into MODEL_CARD.md between the
``<!-- measured:begin -->`` / ``<!-- measured:end -->`` markers.

Usage:
  python tools/write_model_card.py --curve runs/default/learning_curve.json \
      --eval engine/default_model/evaluation.json --card engine/default_model/MODEL_CARD.md
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

BEGIN, END = "<!-- measured:begin -->", "<!-- measured:end -->"


def plot_curve(curve: list[dict], out: Path) -> None:
    """Training loss (smoothed) and validation loss per domain against tokens seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    tokens = [r["tokens"] / 1e6 for r in curve]
    losses = [r["loss"] for r in curve]
    smooth = [sum(losses[max(0, i - 9):i + 1]) / len(losses[max(0, i - 9):i + 1]) for i in range(len(losses))]
    ax.plot(tokens, smooth, label="train (10-step mean)", color="black")
    evals = [r for r in curve if "val_loss" in r]
    for domain in evals[0]["val_loss"] if evals else []:
        ax.plot([r["tokens"] / 1e6 for r in evals], [r["val_loss"][domain] for r in evals], marker="o",
                label=f"validation {domain}")
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("moestream default model: learning curve")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def measured_markdown(curve: list[dict], ev: dict) -> str:
    """The model card's measured sections as Markdown."""
    last_eval = [r for r in curve if "val_loss" in r][-1]
    lines = [f"Training: {curve[-1]['step']} steps, {curve[-1]['tokens']:,} tokens seen.", "",
             "### Held-out perplexity (test split, never trained on)", "",
             "| domain | tokens | perplexity | unigram baseline | validation loss at end |", "|---|---|---|---|---|"]
    for domain, d in ev["domains"].items():
        lines.append(f"| {domain} | {d['tokens']:,} | {d['perplexity']:.1f} | {d['unigram_perplexity']:.1f} "
                     f"| {last_eval['val_loss'].get(domain, float('nan')):.3f} |")
    lines += ["", "### Greedy continuations (40 tokens)", ""]
    for domain, d in ev["domains"].items():
        text = (d["greedy_prompt"] + d["greedy_continuation"]).replace("\n", "⏎")
        lines.append(f"- **{domain}**: `{text[:300]}`")
    load = ev["load"]["busiest_over_uniform_per_layer"]
    lines += ["", "### Routing", "",
              "Busiest expert's share of routing, as a multiple of the uniform share 1/E, per layer: "
              + ", ".join(f"{x:.2f}×" for x in load) + ".", "",
              "Jensen–Shannon divergence (bits, 0 = same usage, 1 = disjoint) between domains' expert-usage "
              "distributions, per layer:", "", "| domains | " + " | ".join(f"layer {i}" for i in range(len(load)))
              + " |", "|---|" + "---|" * len(load)]
    for pair, values in ev["domain_divergence_js_bits"].items():
        lines.append(f"| {pair.replace('|', ' vs ')} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    lines += ["", "SRP (segment routing best performance; time-shuffled baseline in brackets):", "",
              "| m | model | per layer |", "|---|---|---|"]
    for m, r in ev["routing"]["srp"].items():
        per = ", ".join(f"{a:.3f} ({b:.3f})" for a, b in zip(r["observed"]["per_layer"], r["shuffled"]["per_layer"]))
        lines.append(f"| {m} | {r['observed']['model']:.3f} ({r['shuffled']['model']:.3f}) | {per} |")
    curves = ev["routing"]["hit_rate"]["layer"]
    rhos = ev["routing"]["settings"]["rhos"]
    lines += ["", "Per-layer cache hit rate at cache size ρ·k experts per layer (shuffled in brackets):", "",
              "| policy | " + " | ".join(f"ρ={r}" for r in rhos) + " |", "|---|" + "---|" * len(rhos)]
    for name, c in curves.items():
        lines.append(f"| {name} | " + " | ".join(f"{a:.3f} ({b:.3f})" for a, b in zip(c["observed"], c["shuffled"]))
                     + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--curve", type=Path, default=Path("runs/default/learning_curve.json"))
    parser.add_argument("--eval", type=Path, default=Path("engine/default_model/evaluation.json"))
    parser.add_argument("--card", type=Path, default=Path("engine/default_model/MODEL_CARD.md"))
    args = parser.parse_args()
    curve = json.loads(args.curve.read_text())
    ev = json.loads(args.eval.read_text())
    plot_curve(curve, args.card.with_name("learning_curve.png"))
    args.card.with_name("learning_curve.json").write_text(json.dumps(curve))
    card = args.card.read_text()
    head, rest = card.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    args.card.write_text(head + BEGIN + "\n" + measured_markdown(curve, ev) + "\n" + END + tail)
    print(f"updated {args.card}")


if __name__ == "__main__":
    main()
