"""The embedded default model: loads by name, matches transformers, routes like a trained MoE.

These tests use the shipped trained weights (engine/default_model/), not random ones,
because what they check (balanced load, locality above the shuffled baseline,
domain-specific expert use) only exists after training.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from moestream.engine.api import Engine
from moestream.engine.hf_loading import load_hf_model
from moestream.scheduler.analysis import srp
from moestream.scheduler.simulate import TraceRecorder, shuffle_trace

MODEL_DIR = Path(__file__).resolve().parents[1] / "engine" / "default_model"
DOMAINS = ("python", "perl", "kernel", "fortunes")


@pytest.fixture(scope="module")
def model_and_tokenizer():
    from tokenizers import Tokenizer

    torch.set_num_threads(1)
    model, args = load_hf_model(MODEL_DIR)
    model.eval()
    return model, args, Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))


def _heldout_ids(tokenizer, domain: str, n: int, offset: int = 0) -> list[int]:
    return tokenizer.encode((MODEL_DIR / "heldout" / f"{domain}.txt").read_text()).ids[offset:offset + n]


def test_logits_match_transformers(model_and_tokenizer) -> None:
    transformers = pytest.importorskip("transformers")
    model, _, tokenizer = model_and_tokenizer
    reference = transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    ids = torch.tensor([_heldout_ids(tokenizer, "kernel", 48)])
    with torch.no_grad():
        ours = model(ids)
        theirs = reference(ids).logits
    assert torch.max(torch.abs(ours - theirs)).item() < 1e-4
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def _trace(model, args, tokenizer, windows_per_domain: int = 4, seq: int = 256):
    recorder = TraceRecorder(len(model.moe_layers()), args.n_routed_experts, args.top_k)
    model.add_routing_hook(recorder)
    try:
        for domain in DOMAINS:
            for w in range(windows_per_domain):
                recorder.begin_sequence()
                with torch.no_grad():
                    model(torch.tensor([_heldout_ids(tokenizer, domain, seq, offset=w * seq)]))
                recorder.end_sequence()
    finally:
        model.remove_routing_hook(recorder)
    return recorder.trace()


def test_router_is_trained_balanced_and_local(model_and_tokenizer) -> None:
    """Balanced load (busiest expert ≤ 2.5× uniform), every expert used, SRP(m=16) above shuffled."""
    model, args, tokenizer = model_and_tokenizer
    trace = _trace(model, args, tokenizer)
    for layer in range(trace.n_layers):
        counts = sum(np.bincount(trace.layer_tokens(s, layer).reshape(-1), minlength=trace.n_experts)
                     for s in range(trace.n_sequences))
        share = counts / counts.sum()
        assert share.max() * trace.n_experts <= 2.5, f"layer {layer} busiest expert {share.max():.3f}"
        assert (counts > 0).all(), f"layer {layer} has experts that are never routed to"
    observed = srp(trace, 16)["model"]
    shuffled = srp(shuffle_trace(trace, seed=0), 16)["model"]
    assert observed > shuffled + 0.02, (observed, shuffled)


def test_domains_use_experts_differently(model_and_tokenizer) -> None:
    """Per-domain expert usage differs: total-variation distance between python and fortunes > 0.1."""
    model, args, tokenizer = model_and_tokenizer
    trace = _trace(model, args, tokenizer, windows_per_domain=2)

    def usage(first: int) -> np.ndarray:
        c = sum(np.bincount(trace.layer_tokens(s, 1).reshape(-1), minlength=trace.n_experts)
                for s in range(first, first + 2))
        return c / c.sum()

    python, fortunes = usage(0), usage(6)
    assert 0.5 * np.abs(python - fortunes).sum() > 0.1


def test_engine_resolves_default_name() -> None:
    with Engine.load("default") as engine:
        result = engine.generate("The kernel", max_tokens=8, temperature=0.0)
    assert result.stats.generated_tokens == 8
    assert isinstance(result.text, str) and result.text
