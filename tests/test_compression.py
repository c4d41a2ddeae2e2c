"""Compression (issue 4): calibration, pruning, nested codecs as planes, bit allocation, quality report.

Built on tiny random-init HF models (tests/tiny_models.py) with a byte-level
tokenizer written beside them, so the CLI verbs run end to end. Checks
behaviour only (no timings).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import build_tiny_hf_model  # noqa: E402

from moestream.convert import constants as C  # noqa: E402
from moestream.convert.calibration import CalibrationError, collect_stats, split_windows  # noqa: E402
from moestream.convert.codecs import get_codec  # noqa: E402
from moestream.convert.commands import main as convert_main  # noqa: E402
from moestream.convert.compress import CompressOptions, compress_checkpoint, plan_compression  # noqa: E402
from moestream.convert.convert import convert_checkpoint  # noqa: E402
from moestream.convert.errors import BudgetError, MoestreamError  # noqa: E402
from moestream.convert.hf_checkpoint import HFCheckpoint  # noqa: E402
from moestream.convert.nested_planes import effective_group_size  # noqa: E402
from moestream.convert.pruning import choose_kept, pruned_config  # noqa: E402
from moestream.convert.quality import ReferenceRun, evaluate  # noqa: E402
from moestream.convert.shards import ShardedModel  # noqa: E402
from moestream.engine.compressed_models import load_calibration_model, load_eval_model  # noqa: E402

torch.set_num_threads(1)
PROJS = ("gate_proj", "up_proj", "down_proj")


def _byte_tokenizer_json() -> str:
    """A byte-level BPE with no merges: ids 0..255 (fits the tiny vocab of 256)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


TEXT = ("The quick brown fox jumps over the lazy dog. " * 20 + "def f(x):\n    return x * 2\n" * 20)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compression")
    out = {}
    for mt in ("qwen3_moe", "qwen2_moe"):
        path = root / mt
        build_tiny_hf_model(mt, path)
        (path / "tokenizer.json").write_text(_byte_tokenizer_json())
        out[mt] = path
    (root / "calib.txt").write_text(TEXT)
    (root / "short.txt").write_text("too short")
    out["calib"] = root / "calib.txt"
    out["short"] = root / "short.txt"
    out["root"] = root
    return out


def _windows(n: int = 4, t: int = 48, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (n, t), generator=g).tolist()


@pytest.fixture(scope="module")
def calib(tiny):
    model = load_calibration_model(tiny["qwen3_moe"])
    return collect_stats(model, _windows())


def _read_weights(hf: Path, layer: int, expert: int) -> dict[str, torch.Tensor]:
    ck = HFCheckpoint.open(hf)
    try:
        return {p: ck.read_canonical(C.expert_tensor_name(layer, expert, p)).float() for p in PROJS}
    finally:
        ck.close()


# ------------------------------------------------------------------------------------ prefix property
@pytest.mark.parametrize("codec", ["matryoshka_floor", "residual", "matryoshka"])
def test_prefix_property_through_the_converter(tiny, tmp_path, codec):
    """Level j read from the first j+1 planes of the shard == the codec's level-(j+1) decode, bit for bit."""
    hf = tiny["qwen3_moe"]
    paths, _ = compress_checkpoint(hf, tmp_path / "m", CompressOptions(codec=codec, group_size=64), progress=False)
    with ShardedModel.open(paths[0], verify="always") as r:
        assert r.codec == codec
        keys = r.expert_keys()
        nested = get_codec(codec)
        L = len(nested.level_bits)
        for layer, expert in keys[:3] + keys[-2:]:
            assert r.n_levels(layer, expert) == L
            w = _read_weights(hf, layer, expert)
            enc = {p: nested.encode(w[p].numpy(), effective_group_size(64, w[p].shape[1])) for p in PROJS}
            full = r.read_expert_bytes(layer, expert, L - 1)
            prev_end = None
            for j in range(L):
                rng = r.expert_range(layer, expert, j)
                assert rng.offset == r.expert_range(layer, expert, 0).offset  # one contiguous range from plane 0
                assert prev_end is None or rng.nbytes > prev_end
                prev_end = rng.nbytes
                got = r.read_expert(layer, expert, j)
                prefix = r.decode_expert_bytes(layer, expert, j, bytearray(full[:rng.nbytes]))
                for p in PROJS:
                    want = torch.from_numpy(enc[p].reference_decode(j + 1))
                    assert torch.equal(got[p], want), (layer, expert, j, p)
                    assert torch.equal(prefix[p], want)


def test_ggml_codec_matches_gguf_quantizer(tiny, tmp_path):
    from gguf import GGMLQuantizationType
    from gguf import quants as gq

    hf = tiny["qwen3_moe"]
    paths, _ = compress_checkpoint(hf, tmp_path / "q4", CompressOptions(codec="gguf_q4_0", dense="q8_0"),
                                   progress=False)
    with ShardedModel.open(paths[0]) as r:
        layer, expert = r.expert_keys()[0]
        w = _read_weights(hf, layer, expert)
        got = r.read_expert(layer, expert, 0)
        for p in PROJS:
            want = gq.dequantize(gq.quantize(w[p].numpy(), GGMLQuantizationType.Q4_0), GGMLQuantizationType.Q4_0)
            assert np.array_equal(got[p].numpy(), want)
        emb = r.read_dense("model.embed_tokens.weight")  # favoured: q8_0 -> f16
        assert r.dense_record("model.embed_tokens.weight").ggml_type == GGMLQuantizationType.F16
        attn = [n for n in r.dense_names() if n.startswith("model.layers.1.self_attn.q_proj")][0]
        assert r.dense_record(attn).ggml_type == GGMLQuantizationType.Q8_0  # a middle layer
        assert r.read_dense(attn).dtype == torch.float32 and emb.shape[0] == 256


# ------------------------------------------------------------------------------------ allocation
@pytest.mark.parametrize("budget", ["8bpw", "12bpw"])  # tiny experts: one page per plane = 5.33 bpw
def test_knapsack_stays_within_bpw_budget(tiny, tmp_path, calib, budget):
    hf = tiny["qwen3_moe"]
    paths, rec = compress_checkpoint(hf, tmp_path / "m", CompressOptions(codec="matryoshka_floor", group_size=64,
                                     size_budget=budget), calibration=calib, progress=False)
    a = rec["allocation"]
    assert a["expert_bytes"] <= a["budget_bytes"]
    with ShardedModel.open(paths[0]) as r:
        stored = sum(r.expert_nbytes(l, e, r.n_levels(l, e) - 1) for l, e in r.expert_keys())
        n_weights = sum(3 * 64 * 32 for _ in r.expert_keys())
        levels = {r.n_levels(l, e) for l, e in r.expert_keys()}
    assert stored == a["expert_bytes"] and stored <= float(budget[:-3]) * n_weights / 8
    assert len(levels) >= 1 and max(levels) <= 3


def test_knapsack_whole_model_budget_and_too_small(tiny, tmp_path, calib):
    hf = tiny["qwen3_moe"]
    ck = HFCheckpoint.open(hf)
    try:
        plan, _ = plan_compression(ck, CompressOptions(codec="matryoshka_floor", group_size=64), calib)
        from moestream.convert.shard_writer import padded

        dense = sum(padded(d.decl.nbytes) for d in plan.dense)
        lowest = sum(padded(e.planes[0][0].nbytes) for e in plan.experts)
        total = dense + lowest + 20 * 4096
        _, rec = plan_compression(ck, CompressOptions(codec="matryoshka_floor", group_size=64,
                                                      size_budget=str(total)), calib)
        assert rec["dense_bytes"] + rec["expert_bytes"] <= total
        with pytest.raises(BudgetError, match="smallest possible model"):
            plan_compression(ck, CompressOptions(codec="matryoshka_floor", group_size=64,
                                                 size_budget=str(dense + lowest - 1)), calib)
        with pytest.raises(BudgetError, match="smallest possible experts"):
            plan_compression(ck, CompressOptions(codec="matryoshka_floor", group_size=64, size_budget="0.5bpw"), calib)
    finally:
        ck.close()


# ------------------------------------------------------------------------------------ pruning
def _all_tensors(path: Path) -> dict[str, bytes]:
    with ShardedModel.open(path) as r:
        out = {n: bytes(r.read_dense(n).contiguous().view(torch.uint8).numpy()) for n in r.dense_names()}
        for l, e in r.expert_keys():
            out[f"{l}.{e}"] = bytes(r.read_expert_bytes(l, e, 0))
    return out


def test_pruning_zero_experts_is_bit_identical(tiny, tmp_path, calib):
    hf = tiny["qwen3_moe"]
    plain = convert_checkpoint(hf, tmp_path / "plain", progress=False)
    pruned, rec = compress_checkpoint(hf, tmp_path / "p0", CompressOptions(prune=0.0, criterion="reap"),
                                      calibration=calib, progress=False)
    assert _all_tensors(plain[0]) == _all_tensors(pruned[0])
    assert all(v == list(range(len(v))) for v in choose_kept(calib.scores("reap"), 0.0).values())


@pytest.mark.parametrize("criterion", ["frequency", "reap", "ean", "cc"])
def test_removing_never_selected_experts_leaves_outputs_unchanged(tiny, tmp_path, criterion):
    hf = tiny["qwen3_moe"]
    model = load_calibration_model(hf)
    window = _windows(1, 3, seed=1)  # 3 tokens x top-2: some experts are never chosen
    cal = collect_stats(model, window)
    unused = {layer: int((st.freq == 0).sum()) for layer, st in cal.layers.items()}
    r = min(unused.values())
    assert r >= 1, unused
    E = 8
    paths, rec = compress_checkpoint(hf, tmp_path / "m", CompressOptions(prune=r / E, criterion=criterion, dtype="f32",
                                                                                    dense="f32"),
                                     calibration=cal, progress=False)
    for layer, kept in rec["kept"].items():
        dropped = set(range(E)) - set(kept)
        assert len(kept) == E - r and all(cal.layers[int(layer)].freq[d] == 0 for d in dropped)
    pruned, _ = load_eval_model(paths[0])
    assert pruned.args.num_experts == E - r
    ids = torch.tensor(window)
    with torch.no_grad():
        want, got = model(ids), pruned(ids)
    assert torch.allclose(want, got, atol=1e-5, rtol=1e-5)
    with ShardedModel.open(paths[0]) as rd:  # router rows sliced with the kept ids
        ck = HFCheckpoint.open(hf)
        for layer, kept in rec["kept"].items():
            name = f"model.layers.{layer}.mlp.gate.weight"
            assert torch.equal(rd.read_dense(name), ck.read_canonical(name).float()[kept])
        ck.close()


def test_qwen2_moe_pruning_converts_and_records_the_weight_note(tiny, tmp_path):
    hf = tiny["qwen2_moe"]
    cal = collect_stats(load_calibration_model(hf), _windows(2, 32))
    paths, rec = compress_checkpoint(hf, tmp_path / "m", CompressOptions(prune=0.25, criterion="reap"),
                                     calibration=cal, progress=False)
    assert "not renormalised" in rec["note"]
    model, _ = load_eval_model(paths[0])
    assert model.args.num_experts == 6
    assert torch.isfinite(model(torch.tensor(_windows(1, 8)))).all()


def test_grouped_routing_prunes_the_same_number_per_group():
    rng = np.random.default_rng(0)
    scores = {1: rng.random(16), 2: rng.random(16)}
    kept = choose_kept(scores, 0.25, "uniform", top_k=2, n_group=4, topk_group=2)
    for ids in kept.values():
        assert len(ids) == 12 and [sum(1 for i in ids if i // 4 == g) for g in range(4)] == [3, 3, 3, 3]
    with pytest.raises(ValueError, match="top-k"):
        choose_kept(scores, 0.75, "uniform", top_k=4, n_group=4, topk_group=1)


def test_adaptive_mode_counts_and_config_limits():
    scores = {0: np.array([1.0, 1.0, 1.0, 1.0]), 1: np.array([10.0, 0.01, 0.01, 9.0])}
    kept = choose_kept(scores, 0.25, "adaptive", top_k=1)
    assert kept[0] == [0, 1, 2, 3] and kept[1] == [0, 3]
    cfg = pruned_config({"num_experts": 4, "num_experts_per_tok": 1, "num_hidden_layers": 2}, kept)
    assert cfg["num_experts"] == 4 and cfg["moestream_num_experts_per_layer"] == [4, 2]  # per-layer counts
    with pytest.raises(ValueError, match="must be in 1..2"):
        pruned_config({"num_experts": 4, "num_experts_per_tok": 1, "num_hidden_layers": 2}, kept, top_k=3)
    cfg = pruned_config({"num_experts": 4, "num_experts_per_tok": 2}, {0: [0, 1, 2], 1: [0, 1, 3]}, top_k=1)
    assert cfg["num_experts"] == 3 and cfg["num_experts_per_tok"] == 1


# ------------------------------------------------------------------------------------ quality + engine
def test_compressed_model_loads_and_eval_reports_every_level(tiny, tmp_path, calib):
    hf = tiny["qwen3_moe"]
    paths, _ = compress_checkpoint(hf, tmp_path / "m", CompressOptions(codec="matryoshka_floor", group_size=64,
                                   prune=0.25, size_budget="12bpw"), calibration=calib, progress=False)
    ref = load_calibration_model(hf)
    report = evaluate(ref, {f"level{lv}": (lambda lv=lv: load_eval_model(paths[0], lv)[0]) for lv in range(3)},
                      _windows(2, 32, seed=5))
    for m in report["models"].values():
        assert m["kl_mean"] >= 0 and 0 <= m["top1_agreement"] <= 1 and np.isfinite(m["ppl"])
    same = ReferenceRun(ref, _windows(2, 32, seed=5)).compare(ref)
    assert same.kl_mean == pytest.approx(0, abs=1e-6) and same.top1_agreement == 1.0 and same.ppl == same.ref_ppl


def test_cli_convert_with_eval_text_and_eval_verb(tiny, tmp_path, capsys):
    hf = tiny["qwen3_moe"]
    out = tmp_path / "cli"
    rc = convert_main(["-q", "convert", str(hf), str(out), "--codec", "residual", "--group-size", "64",
                       "--prune", "0.25", "--criterion", "cc", "--size-budget", "8bpw", "--calib", str(tiny["calib"]),
                       "--calib-windows", "4", "--eval-text", str(tiny["calib"])])
    assert rc == 0
    q = json.loads((out / "quality.json").read_text())
    assert set(q["models"]) == {"level0", "level1", "level2"} and q["stored_levels"] == 3
    with ShardedModel.open(out) as r:
        rec = json.loads(r.metadata["moestream.compression"])
        assert rec["options"]["criterion"] == "cc" and r.codec == "residual"
    from moestream.engine.api import Engine

    with Engine.load(out) as engine:  # the engine loads compressed shards (resident decode at the max level)
        res = engine.generate([5, 6, 7], max_tokens=3)
        assert res.stats.generated_tokens == 3 and engine.stats()["format"] == "shards"
    capsys.readouterr()
    rc = convert_main(["eval", str(out), "--reference", str(hf), "--text", str(tiny["calib"]), "--level", "1",
                       "--json", str(tmp_path / "e.json")])
    assert rc == 0
    e = json.loads((tmp_path / "e.json").read_text())
    assert list(e["models"]) == ["level1"] and e["ref_ppl"] > 1


# ------------------------------------------------------------------------------------ bad input
def test_bad_inputs_give_clear_errors(tiny, tmp_path, capsys):
    hf = tiny["qwen3_moe"]
    with pytest.raises(CalibrationError, match="too short"):
        split_windows([5, 6, 7], 16, min_tokens=64)
    rc = convert_main(["-q", "convert", str(hf), str(tmp_path / "a"), "--prune", "0.25", "--calib", str(tiny["short"])])
    assert rc == 2 and "too short" in capsys.readouterr().err
    rc = convert_main(["-q", "convert", str(hf), str(tmp_path / "b"), "--prune", "0.25", "--criterion", "magic"])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown --criterion 'magic'" in err and "reap" in err
    rc = convert_main(["-q", "convert", str(hf), str(tmp_path / "c"), "--codec", "matryoshka_floor", "--group-size",
                       "64", "--size-budget", "0.1bpw", "--calib", str(tiny["calib"]), "--calib-windows", "2"])
    assert rc == 2 and "smallest possible experts" in capsys.readouterr().err
    rc = convert_main(["-q", "convert", str(hf), str(tmp_path / "d"), "--size-budget", "4bpw", "--codec", "none"])
    assert rc == 2 and "nested codec" in capsys.readouterr().err
    with pytest.raises(MoestreamError, match="calibration"):
        compress_checkpoint(hf, tmp_path / "e", CompressOptions(prune=0.5), progress=False)


def test_size_budget_alone_uses_the_default_nested_codec(tiny, tmp_path):
    from moestream.convert.compress import DEFAULT_CODEC

    out = tmp_path / "d"
    rc = convert_main(["-q", "convert", str(tiny["qwen3_moe"]), str(out), "--size-budget", "12bpw", "--group-size",
                       "64", "--calib", str(tiny["calib"]), "--calib-windows", "4"])
    assert rc == 0
    with ShardedModel.open(out) as r:
        assert r.codec == DEFAULT_CODEC
