"""Layer-streamed calibration (engine/streamed_calibration.py) equals the whole-model one; memory stays flat.

``collect_stats`` on ``load_calibration_stream`` (one decoder layer's weights and one expert at a
time) must give bit-identical statistics — frequency, gate sums, EAN, REAP, activation second
moments, the sampled input rows — to ``collect_stats`` on the resident ``load_calibration_model``,
for every family, and level errors measured per layer as it completes must equal those measured
afterwards. Peak RSS of a calibration child (above its RSS after the imports, Linux VmHWM reset
through /proc/self/clear_refs) must not grow with the number of layers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from runtime_model import subprocess_env  # noqa: E402
from tiny_models import TINY_CONFIGS, build_tiny_hf_model  # noqa: E402

from moestream.convert import constants as C  # noqa: E402
from moestream.convert.calibration import CalibrationResult, collect_stats, measure_level_errors  # noqa: E402
from moestream.convert.codecs import get_codec  # noqa: E402
from moestream.convert.hf_checkpoint import HFCheckpoint  # noqa: E402
from moestream.convert.nested_planes import NestedExpertCodec  # noqa: E402
from moestream.engine.compressed_models import load_calibration_model, load_calibration_stream  # noqa: E402

torch.set_num_threads(1)
STATS = ("freq", "gate_sum", "ean", "reap_sum", "act_in", "act_mid")


def _windows(lengths=(48, 48, 17, 48, 5), seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (t,), generator=g).tolist() for t in lengths]


def assert_identical(a: CalibrationResult, b: CalibrationResult) -> None:
    assert (a.tokens, a.windows, a.top_k) == (b.tokens, b.windows, b.top_k)
    assert list(a.layers) == list(b.layers)
    for layer in a.layers:
        sa, sb = a.layers[layer], b.layers[layer]
        assert (sa.n_experts, sa.hidden, sa.inter) == (sb.n_experts, sb.hidden, sb.inter)
        for name in STATS:
            assert np.array_equal(getattr(sa, name), getattr(sb, name)), (layer, name)
        assert sorted(sa.samples) == sorted(sb.samples)
        for e in sa.samples:
            assert np.array_equal(sa.samples[e], sb.samples[e]), (layer, e)
    assert sorted(a.errors) == sorted(b.errors)
    for layer in a.errors:
        assert np.array_equal(a.errors[layer], b.errors[layer]), layer


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_streamed_statistics_equal_whole_model(model_type, tmp_path):
    hf = tmp_path / model_type
    build_tiny_hf_model(model_type, hf)
    wins = _windows()
    whole = collect_stats(load_calibration_model(hf), wins, max_samples=8)  # reservoir overflows: keys matter
    streamed = collect_stats(load_calibration_stream(hf), wins, max_samples=8)
    assert_identical(whole, streamed)
    assert all(st.freq.sum() > 0 for st in streamed.layers.values())


def test_bf16_checkpoint_and_per_layer_level_errors(tmp_path):
    # bf16 storage (the embedding rows and weights are cast per element, as the resident load does), and
    # level errors measured as each layer completes (then its samples dropped) equal those measured after
    from safetensors.torch import load_file, save_file

    hf = tmp_path / "bf16"
    build_tiny_hf_model("qwen3_moe", hf)
    weights = load_file(str(hf / "model.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in weights.items()}, str(hf / "model.safetensors"),
              metadata={"format": "pt"})
    cfg = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**cfg, "torch_dtype": "bfloat16"}))
    wins = _windows((40, 40, 40))
    nested = NestedExpertCodec(get_codec("matryoshka_floor"), 32)
    ck = HFCheckpoint.open(hf)

    def read(layer: int, expert: int) -> dict[str, torch.Tensor]:
        return {p: ck.read_canonical(C.expert_tensor_name(layer, expert, p)) for p in C.EXPERT_PROJS}

    try:
        whole = measure_level_errors(collect_stats(load_calibration_model(hf), wins, max_samples=16), read, nested)
        layers_done = []

        def on_layer(result: CalibrationResult, layer: int) -> None:
            measure_level_errors(result, read, nested, layers=[layer], drop_samples=True)
            layers_done.append(layer)

        streamed = collect_stats(load_calibration_stream(hf), wins, max_samples=16, on_layer=on_layer)
    finally:
        ck.close()
    assert layers_done == sorted(streamed.layers)
    assert all(not st.samples for st in streamed.layers.values())
    for st in whole.layers.values():
        st.samples.clear()
    assert_identical(whole, streamed)
    assert streamed.errors_codec == whole.errors_codec == "matryoshka_floor"


_CHILD = """
import json, sys, torch
torch.set_num_threads(1)
from moestream.convert.calibration import collect_stats
from moestream.engine import compressed_models as cm, streamed_calibration
def hwm_kib():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
loader = cm.load_calibration_stream if sys.argv[2] == "stream" else cm.load_calibration_model
g = torch.Generator().manual_seed(0)
wins = torch.randint(3, 8000, (4, 64), generator=g).tolist()
with open("/proc/self/clear_refs", "w") as f:  # reset the peak: measure calibration, not the imports
    f.write("5")
base = hwm_kib()
res = collect_stats(loader(sys.argv[1]), wins, max_samples=0)
print(json.dumps({"base_kib": base, "peak_kib": hwm_kib(), "tokens": res.tokens}))
"""


def _peak_rss_mib(hf: Path, mode: str) -> float:
    """Peak RSS of a calibration child above its RSS after the imports (MiB)."""
    out = subprocess.run([sys.executable, "-c", _CHILD, str(hf), mode], capture_output=True, text=True,
                         env=subprocess_env(), timeout=600)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return (r["peak_kib"] - r["base_kib"]) / 1024


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc/self/clear_refs")
def test_calibration_peak_memory_does_not_grow_with_layers(tmp_path):
    from moestream.bench.synthetic import SyntheticSpec, write_hf_folder

    sizes = {}
    for layers in (2, 8):
        spec = SyntheticSpec(layers=layers, hidden=256, experts=32, top_k=4, expert_inter=256, heads=4, kv_heads=2,
                             head_dim=64)
        sizes[layers] = write_hf_folder(tmp_path / f"l{layers}", spec, progress=False)
    layer_mib = 32 * 3 * 256 * 256 * 4 / 2**20  # one layer's experts in fp32 (~25 MiB)
    stream = {n: _peak_rss_mib(p, "stream") for n, p in sizes.items()}
    whole = {n: _peak_rss_mib(p, "whole") for n, p in sizes.items()}
    report = f"peak RSS MiB streamed {stream}, whole model {whole}; 6 more layers of experts = {6 * layer_mib:.0f} MiB"
    print(report)
    assert whole[8] - whole[2] > 4 * layer_mib, report  # the measurement sees the whole-model path grow
    assert stream[8] - stream[2] < 1.5 * layer_mib, report  # the streamed one does not
