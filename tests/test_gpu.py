"""The accelerator path (``--device cuda`` / ``mps``): resident models and streamed experts on the GPU.

Skipped on machines without CUDA or MPS (marker ``gpu``). On a GPU:

- the embedded default model runs on the device and agrees with the CPU run
  (logits within fp32 rounding of a different kernel library, same greedy text);
- a streamed shard model keeps its expert arena in device memory, reads land in
  pinned host staging buffers and are copied on a separate CUDA stream, and its
  logits (prefill + decode) equal the fully resident model on the same device
  bit for bit at the minimum, a middle and the full budget (``exact`` policy);
- ``moestream run --device cuda`` answers and ``Engine.load(device=...)`` reports the device;
- a nested-codec model (matryoshka_floor, residual) keeps its plane bytes in the device arena and
  decodes experts there (``PlaneDecoder``): logits equal the resident decoded model on the same device
  bit for bit at the minimum and the full budget, and at a capped level (on CUDA matryoshka levels
  decode through the torch.compile'd fused decode, residual eagerly).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from runtime_model import subprocess_env  # noqa: E402
from streaming_helpers import CTX, budgets, build_converted, run_logits  # noqa: E402

from moestream.convert.compress import CompressOptions, compress_checkpoint  # noqa: E402
from moestream.convert.shard_reader import ShardedModel  # noqa: E402
from moestream.engine.api import Engine  # noqa: E402
from moestream.engine.compressed_models import load_eval_model  # noqa: E402
from moestream.engine.planning import all_experts_arena_bytes, min_streaming_budget  # noqa: E402
from moestream.engine.hf_loading import load_hf_model  # noqa: E402
from moestream.engine.streaming import (StreamingExperts, load_resident_shard_model, load_streaming_model,  # noqa: E402
                                        shard_footprint)

MPS = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
DEVICES = [d for d, ok in (("cuda", torch.cuda.is_available()), ("mps", MPS)) if ok]
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not DEVICES, reason="needs a CUDA or MPS device (run on a GPU machine)")]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_converted(tmp_path_factory.mktemp("gpu"))


@pytest.fixture(scope="module")
def nested(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_nested")
    out = {}
    for codec in ("matryoshka_floor", "residual"):
        shards, _ = compress_checkpoint(models["hf"], root / codec, CompressOptions(codec=codec, group_size=64),
                                        progress=False)
        out[codec] = shards[0].parent
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_default_model_on_device_matches_cpu(device):
    prompt = "def parse_args(argv):\n    "
    with Engine.load("default", device="cpu") as cpu, Engine.load("default", device=device) as dev:
        assert dev.device.type == device and dev.stats()["device"].startswith(device)
        ids = torch.tensor([cpu.tokenizer.encode(prompt)])
        with torch.no_grad():
            ref = cpu.model(ids, cpu.model.make_cache(1, CTX))
            got = dev.model(ids.to(device), dev.model.make_cache(1, CTX, device=device)).cpu()
        assert torch.allclose(got, ref, atol=2e-3, rtol=1e-3), (got - ref).abs().max()
        a = cpu.generate(prompt, max_tokens=24, temperature=0.0).text
        b = dev.generate(prompt, max_tokens=24, temperature=0.0).text
        assert a == b


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_streamed_arena_on_device_bit_exact_vs_resident(models, device, dtype):
    ids = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(1))
    if dtype == "f32":
        ref_model, _ = load_hf_model(models["hf"])
    else:
        ref_model, _, _ = load_resident_shard_model(models[dtype])
    ref_model.to(device)
    ref_model.expert_provider.to(device)
    ref = run_logits(ref_model, ids, 16, device=device)
    for budget in budgets(models[dtype]):
        loaded = load_streaming_model(models[dtype], memory=budget, ctx=CTX, device=device)
        loaded.model.to(device)
        provider = loaded.model.expert_provider
        assert isinstance(provider, StreamingExperts)
        try:
            assert provider.arena.buffer.device.type == device  # the arena is device memory
            got = run_logits(loaded.model, ids, 16, device=device)
            assert torch.equal(got, ref), (dtype, budget, (got - ref).abs().max())
            st = provider.stats()
            assert st["totals"]["misses"] > 0 and st["loader"]["bytes_read"] > 0
            tr = st["transfer"]
            assert tr["copies"] == st["loader"]["reads"] and tr["bytes_copied"] == st["loader"]["bytes_read"]
            if device == "cuda":
                assert tr["pinned"] and tr["copy_stream"]
                assert provider.staging.copy_stream != torch.cuda.current_stream()
        finally:
            provider.close()


@pytest.mark.parametrize("device", DEVICES)
def test_engine_streams_on_device_at_minimum_budget(models, device):
    low, _, full = budgets(models["f16"])
    texts = []
    for memory in (low, full):
        with Engine.load(models["f16"], memory=memory, device=device, ctx=CTX) as engine:
            assert engine.device.type == device
            out = engine.generate("The quick brown fox", max_tokens=16, temperature=0.0)
            texts.append(out.text)
            assert engine.stats()["experts"]["transfer"]["device"].startswith(device)
    assert texts[0] == texts[1]  # exact policy: the budget changes speed, never the answer


@pytest.mark.parametrize("device", DEVICES)
def test_cli_run_on_device(models, device):
    proc = subprocess.run([sys.executable, "-m", "moestream.engine.cli", "run", str(models["f16"]), "--device", device,
                           "--prompt", "Hello", "--max-tokens", "8", "--temperature", "0", "--json"],
                          capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["engine"]["device"].startswith(device)
    assert out["engine"]["experts"]["transfer"]["copies"] > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("codec", ["matryoshka_floor", "residual"])
def test_nested_experts_decode_in_the_device_arena_bit_exact(nested, device, codec):
    path = nested[codec]
    ids = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(4))
    with ShardedModel.open(path, verify="off") as r:
        fp = shard_footprint(r, CTX, device)
    low = min_streaming_budget(fp)
    for level in (None, 0):
        ref_model, _ = load_eval_model(path, level)
        ref_model.to(device)
        ref_model.expert_provider.to(device)
        ref = run_logits(ref_model, ids, 16, device=device)
        for budget in ((low, low + all_experts_arena_bytes(fp)) if level is None else (low,)):
            loaded = load_streaming_model(path, memory=budget, ctx=CTX, device=device, level=level)
            loaded.model.to(device)
            provider = loaded.model.expert_provider
            try:
                assert provider.arena.buffer.device.type == device  # plane bytes live in device memory
                st = provider.stats()
                assert st["device_decode"] and not st["native_nested_kernel"]
                got = run_logits(loaded.model, ids, 16, device=device)
                st = provider.stats()  # CUDA: matryoshka levels decode through the compiled, fused decode
                assert st["compiled_decode"] is (device == "cuda" and codec == "matryoshka_floor"), st
                assert torch.equal(got, ref), (codec, level, budget, (got - ref).abs().max())
                st = provider.stats()
                assert st["transfer"]["bytes_copied"] == st["loader"]["bytes_read"] > 0
            finally:
                provider.close()
