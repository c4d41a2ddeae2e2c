"""Quality of a compressed model against its reference: perplexity, KL, top-1 agreement.

Owns the numbers of ``moestream eval`` and of the converter's ``--eval-text``
report (as llama.cpp's ``perplexity --kl-divergence`` reports them):

- perplexity of the reference and of the model on held-out token windows
  (teacher-forced, each window from position 0, next-token targets);
- mean KL(ref ‖ model) of the next-token distributions over every predicted position;
- top-1 agreement: the fraction of positions where both argmaxes agree.

:class:`ReferenceRun` runs the reference once and keeps its log-probabilities so
many models (pruning/codec variants, nested levels) are compared without
holding more than one of them. Models are callables ``ids [1, T] -> logits
[1, T, V]`` (the engine's ``MoECausalLM``); this module imports nothing of the engine.

Knows nothing about shard files or codecs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from moestream.convert.errors import MoestreamError

Model = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class QualityMetrics:
    """Aggregated metrics of one model against the reference."""

    positions: int
    ppl: float
    ref_ppl: float
    kl_mean: float
    top1_agreement: float

    @property
    def ppl_increase(self) -> float:
        """ppl / ref_ppl − 1."""
        return self.ppl / self.ref_ppl - 1.0

    def as_dict(self) -> dict[str, float]:
        return {"positions": self.positions, "ppl": self.ppl, "ref_ppl": self.ref_ppl,
                "ppl_increase": self.ppl_increase, "kl_mean": self.kl_mean, "top1_agreement": self.top1_agreement}


def _logits(model: Model, window: Sequence[int]) -> torch.Tensor:
    with torch.no_grad():
        out = model(torch.tensor([list(window)], dtype=torch.long))
    return out[0, :-1].float()  # [T-1, V] predictions of tokens 1..T-1


class ReferenceRun:
    """The reference's next-token log-probabilities on a set of windows (computed once)."""

    def __init__(self, reference: Model, windows: Sequence[Sequence[int]]) -> None:
        """Run ``reference`` on every window.

        Raises:
            MoestreamError: no window with at least two tokens.
        """
        self.windows = [list(w) for w in windows if len(w) >= 2]
        if not self.windows:
            raise MoestreamError("the evaluation text gives no window of 2+ tokens; pass a longer --text file")
        self.logp = [torch.log_softmax(_logits(reference, w), dim=-1) for w in self.windows]  # [T-1, V] each
        self.targets = [torch.tensor(w[1:], dtype=torch.long) for w in self.windows]
        nll = sum(float(-lp.gather(1, t[:, None]).sum()) for lp, t in zip(self.logp, self.targets))
        self.positions = sum(len(t) for t in self.targets)
        self.ppl = math.exp(nll / self.positions)
        self.argmax = [lp.argmax(dim=-1) for lp in self.logp]

    def compare(self, model: Model) -> QualityMetrics:
        """Metrics of ``model`` against the reference on the same windows."""
        nll = kl = agree = 0.0
        for w, ref_lp, t, ref_top in zip(self.windows, self.logp, self.targets, self.argmax):
            lp = torch.log_softmax(_logits(model, w), dim=-1)  # [T-1, V]
            nll += float(-lp.gather(1, t[:, None]).sum())
            kl += float((ref_lp.exp() * (ref_lp - lp)).sum())
            agree += float((lp.argmax(dim=-1) == ref_top).sum())
        n = self.positions
        return QualityMetrics(n, math.exp(nll / n), self.ppl, kl / n, agree / n)


def evaluate(reference: Model, models: Mapping[str, Callable[[], Model] | Model],
             windows: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Compare each model with the reference.

    Args:
        reference: the unmodified model.
        models: label -> an ``nn.Module``, or a zero-argument factory returning one (loaded
            one at a time, dropped after its windows).
        windows: token windows.

    Returns:
        ``{"positions", "ref_ppl", "models": {label: QualityMetrics.as_dict()}}``.
    """
    ref = ReferenceRun(reference, windows)
    out: dict[str, Any] = {"positions": ref.positions, "windows": len(ref.windows), "ref_ppl": ref.ppl, "models": {}}
    for label, m in models.items():
        model = m if isinstance(m, torch.nn.Module) else m()
        out["models"][label] = ref.compare(model).as_dict()
        del model
    return out


def format_report(report: Mapping[str, Any]) -> str:
    """A text table of :func:`evaluate`'s result."""
    lines = [f"reference ppl {report['ref_ppl']:.4f} on {report['positions']} positions ({report['windows']} windows)",
             f"{'model':<28} {'ppl':>9} {'Δppl':>8} {'KL':>9} {'top-1':>7}"]
    for label, m in report["models"].items():
        lines.append(f"{label:<28} {m['ppl']:>9.4f} {100 * m['ppl_increase']:>7.2f}% {m['kl_mean']:>9.5f} "
                     f"{100 * m['top1_agreement']:>6.2f}%")
    return "\n".join(lines)


def write_report(report: Mapping[str, Any], path: str | Path) -> Path:
    """Write the report as JSON (indent 2); returns the path."""
    p = Path(path)
    p.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return p
