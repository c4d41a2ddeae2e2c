"""Adaptive pruning (per-layer expert counts) and per-layer top-k, end to end (issue 4, item 2).

Tiny random-init HF models (tests/tiny_models.py) with a byte-level tokenizer,
calibrated on fixed random token windows as in tests/test_compression.py:
plan -> convert -> shards -> every family's routers built per layer ->
Engine.load (streamed) and the resident reference; the llama.cpp target
refuses per-layer counts. Checks behaviour only (no timings).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_compression import _all_tensors, _byte_tokenizer_json, _windows  # noqa: E402
from tiny_models import TINY_CONFIGS, build_tiny_hf_model  # noqa: E402

from moestream.convert.calibration import collect_stats  # noqa: E402
from moestream.convert.commands import main as convert_main  # noqa: E402
from moestream.convert.compress import CompressOptions, compress_checkpoint  # noqa: E402
from moestream.convert.convert import convert_checkpoint  # noqa: E402
from moestream.convert.errors import ModelFormatError  # noqa: E402
from moestream.convert.hf_checkpoint import HFCheckpoint  # noqa: E402
from moestream.convert.pruning import choose_kept, expert_count, pruned_config  # noqa: E402
from moestream.convert.shards import ShardedModel  # noqa: E402
from moestream.engine.compressed_models import load_calibration_model, load_eval_model  # noqa: E402
from moestream.engine.hf_loading import build_model  # noqa: E402
from moestream.engine.planning import model_footprint  # noqa: E402

torch.set_num_threads(1)
E = 8  # experts per layer of the tiny models; qwen3_moe: layers 0 and 2 are MoE, layer 1 dense, top-2
PER_LAYER = "moestream_num_experts_per_layer"
TOPK_LAYER = "moestream_top_k_per_layer"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("adaptive")
    hf = root / "qwen3_moe"
    build_tiny_hf_model("qwen3_moe", hf)
    (hf / "tokenizer.json").write_text(_byte_tokenizer_json())
    model = load_calibration_model(hf)
    return {"hf": hf, "root": root, "model": model, "cal": collect_stats(model, _windows())}


def _counts_in_shards(path: Path) -> dict[int, int]:
    with ShardedModel.open(path) as r:
        out: dict[int, int] = {}
        for layer, expert in r.expert_keys():
            out[layer] = out.get(layer, 0) + 1
        return out


def _greedy(model, prompt: list[int], n: int, eos: int = 2) -> list[int]:
    """Greedy continuation by full forwards (no KV cache), stopping before EOS."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
            if nxt == eos:
                break
            ids.append(nxt)
            out.append(nxt)
    return out


def _adaptive(tiny, out: Path, criterion: str = "frequency", ratio: float = 0.25, **kw):
    opts = CompressOptions(prune=ratio, criterion=criterion, prune_mode="adaptive", dtype="f32", dense="f32", **kw)
    return compress_checkpoint(tiny["hf"], out, opts, calibration=tiny["cal"], progress=False)


# ------------------------------------------------------------------------------------ end to end
def test_adaptive_plan_converts_loads_through_the_engine_and_generates(tiny, tmp_path):
    plan = choose_kept(tiny["cal"].scores("frequency"), 0.25, "adaptive", top_k=2)
    counts = {layer: len(v) for layer, v in plan.items()}
    assert len(set(counts.values())) > 1 and sum(counts.values()) == 2 * E - 4, counts  # per-layer, 25 % overall
    paths, rec = _adaptive(tiny, tmp_path / "m")
    assert {int(k): v for k, v in rec["kept"].items()} == plan
    assert _counts_in_shards(paths[0]) == counts  # the shards hold exactly the planned experts
    with ShardedModel.open(paths[0]) as r:
        cfg = r.config
        ck = HFCheckpoint.open(tiny["hf"])
        for layer, kept in plan.items():  # router rows sliced with each layer's own kept ids
            name = f"model.layers.{layer}.mlp.gate.weight"
            assert torch.equal(r.read_dense(name), ck.read_canonical(name).float()[kept])
        ck.close()
    assert cfg[PER_LAYER] == [counts[0], 0, counts[2]] and expert_count(cfg) == max(counts.values())
    assert rec[PER_LAYER] == cfg[PER_LAYER] and TOPK_LAYER not in cfg

    resident, _ = load_eval_model(paths[0])
    for layer, n in counts.items():
        block = resident.model.layers[layer].mlp
        assert block.num_experts == n and block.gate.weight.shape[0] == n and block.top_k == 2
    assert resident.costs().routed_experts == sum(counts.values())

    from moestream.engine.api import Engine

    ids = torch.tensor(_windows(1, 12, seed=3))
    with Engine.load(paths[0], memory="2GB") as engine:  # codec none: experts stream through the arena
        st = engine.stats()
        assert st["format"] == "shards" and st["experts"]["provider"] == "streaming"
        assert st["experts"]["experts_total"] == sum(counts.values())
        prompt = _windows(1, 6, seed=7)[0]
        res = engine.generate(prompt, max_tokens=4)
        with torch.no_grad():
            streamed = engine.model(ids)
    with torch.no_grad():
        want = resident(ids)
    assert torch.equal(streamed, want)  # exact precision policy: streamed == resident, bit for bit
    assert res.token_ids == _greedy(resident, prompt, 4) and res.stats.generated_tokens == len(res.token_ids) >= 1


def test_adaptive_with_nothing_removed_is_bit_identical(tiny, tmp_path):
    plain = convert_checkpoint(tiny["hf"], tmp_path / "plain", dtype="f32", progress=False)
    want = _all_tensors(plain[0])
    # ratio 0, and a ratio so small that the global plan drops nothing: both equal the unpruned conversion
    for name, ratio in (("zero", 0.0), ("none_dropped", 0.01)):
        assert all(len(v) == E for v in choose_kept(tiny["cal"].scores("reap"), ratio, "adaptive", top_k=2).values())
        paths, rec = compress_checkpoint(tiny["hf"], tmp_path / name, CompressOptions(
            prune=ratio, criterion="reap", prune_mode="adaptive", dtype="f32", dense="f32", favour=False),
            calibration=tiny["cal"], progress=False)
        assert _all_tensors(paths[0]) == want, name
        with ShardedModel.open(paths[0]) as r:
            assert PER_LAYER not in r.config and expert_count(r.config) == E


@pytest.mark.parametrize("criterion", ["frequency", "reap", "ean", "cc"])
def test_adaptive_removing_never_selected_experts_leaves_logits_unchanged(tiny, tmp_path, criterion):
    model = tiny["model"]
    window = _windows(1, 3, seed=6)  # 3 tokens x top-2: 5 experts never chosen in layer 0, 3 in layer 2
    cal = collect_stats(model, window)
    unused = {layer: int((st.freq == 0).sum()) for layer, st in cal.layers.items()}
    total_unused = sum(unused.values())
    assert len(set(unused.values())) > 1 and min(unused.values()) >= 1, unused  # adaptive counts differ per layer
    paths, rec = compress_checkpoint(tiny["hf"], tmp_path / "m", CompressOptions(
        prune=total_unused / (E * len(unused)), criterion=criterion, prune_mode="adaptive", dtype="f32",
        dense="f32"), calibration=cal, progress=False)
    for layer, kept in rec["kept"].items():  # exactly the never-selected experts are gone, per layer
        assert sorted(set(range(E)) - set(kept)) == np.flatnonzero(cal.layers[int(layer)].freq == 0).tolist()
    assert _counts_in_shards(paths[0]) == {layer: E - n for layer, n in unused.items()}
    pruned, _ = load_eval_model(paths[0])
    ids = torch.tensor(window)
    with torch.no_grad():
        assert torch.allclose(model(ids), pruned(ids), atol=1e-5, rtol=1e-5)


def test_grouped_routing_adaptive_counts_stay_divisible_by_groups(tmp_path):
    rng = np.random.default_rng(1)
    scores = {1: rng.random(16) * 0.1, 2: rng.random(16), 3: rng.random(16) * 10}
    scores[1][:4] = 5.0  # group 0 of layer 1 is important, the rest of the layer is not
    kept = choose_kept(scores, 0.25, "adaptive", top_k=2, n_group=4, topk_group=2)
    counts = {layer: len(v) for layer, v in kept.items()}
    assert len(set(counts.values())) > 1, counts
    for ids in kept.values():  # the same number kept in every contiguous group of 4
        per = [sum(1 for i in ids if i // 4 == g) for g in range(4)]
        assert len(set(per)) == 1 and per[0] >= 1
    with pytest.raises(ValueError, match=r"2 per group\) needs; lower --prune"):  # noaux_tc: groups ranked by top-2
        choose_kept({1: rng.random(8), 2: rng.random(8)}, 0.25, "adaptive", top_k=2, n_group=4, topk_group=2,
                    min_per_group=2)
    # the engine refuses a per-layer count that does not split into the routing groups
    _, _, cfg = TINY_CONFIGS["deepseek_v2"]
    bad = {**cfg, "model_type": "deepseek_v2", "topk_method": "group_limited_greedy", PER_LAYER: [0, 8, 6]}
    with pytest.raises(ModelFormatError, match="n_group=4"):
        build_model("deepseek_v2", bad)


def test_deepseek_grouped_adaptive_pruning_end_to_end(tmp_path):
    hf = tmp_path / "ds"
    build_tiny_hf_model("deepseek_v2", hf, overrides={"n_routed_experts": 16})  # 4 groups of 4, top-2 of 2 groups
    model = load_calibration_model(hf)
    cal = collect_stats(model, _windows(2, 24))
    opts = CompressOptions(prune=0.4, criterion="frequency", prune_mode="adaptive", dtype="f32", dense="f32")
    paths, _ = compress_checkpoint(hf, tmp_path / "m", opts, calibration=cal, progress=False)
    counts = _counts_in_shards(paths[0])
    assert len(set(counts.values())) > 1 and all(n % 4 == 0 for n in counts.values()), counts
    pruned, _ = load_eval_model(paths[0])
    for layer, n in counts.items():
        gate = pruned.model.layers[layer].mlp.gate
        assert gate.num_experts == n and gate.n_group == 4 and gate.weight.shape[0] == n
    assert torch.isfinite(pruned(torch.tensor(_windows(1, 8)))).all()


# ------------------------------------------------------------------------------------ every family
@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_every_family_builds_routers_with_its_layers_counts_and_top_k(model_type):
    _, _, cfg = TINY_CONFIGS[model_type]
    cfg = {**cfg, "model_type": model_type}
    with torch.device("meta"):
        model, _ = build_model(model_type, cfg)
    moe = model.moe_layers()
    counts = [0] * cfg["num_hidden_layers"]
    ks = [0] * cfg["num_hidden_layers"]
    for j, layer in enumerate(moe):  # multiples of 8: 4 DeepSeek routing groups of >= 2 (noaux_tc's top-2)
        counts[layer], ks[layer] = (8, 2) if j % 2 == 0 else (16, 1)
    per = {**cfg, PER_LAYER: counts, TOPK_LAYER: ks}
    with torch.device("meta"):
        model, args = build_model(model_type, per)
    for layer in moe:
        block = model.model.layers[layer].mlp
        assert block.num_experts == counts[layer] and block.gate.weight.shape[0] == counts[layer]
        assert block.top_k == ks[layer]
        bias = getattr(block.gate, "e_score_correction_bias", None)
        assert bias is None or bias.shape[0] == counts[layer]
    costs = model.costs()
    assert costs.routed_experts == sum(counts) and costs.active_experts_per_token == sum(ks)
    fp = model_footprint(model_type, per, [4096], 64)
    assert fp.total_routed_experts == sum(counts) and fp.active_experts_per_token == sum(ks)
    with pytest.raises(ModelFormatError, match="top-k"):  # a top-k above the layer's experts
        build_model(model_type, {**per, TOPK_LAYER: [17 if c else 0 for c in counts]})
    with pytest.raises(ModelFormatError, match="one non-negative integer per decoder layer"):
        build_model(model_type, {**per, PER_LAYER: counts[:-1]})


# ------------------------------------------------------------------------------------ per-layer top-k
def _routing(model, ids) -> tuple[torch.Tensor, dict[int, list[torch.Tensor]]]:
    seen: dict[int, list[torch.Tensor]] = {}

    def hook(layer, expert_ids, weights):
        seen.setdefault(layer, []).append(expert_ids.clone())
    model.add_routing_hook(hook)
    try:
        with torch.no_grad():
            out = model(ids)
    finally:
        model.remove_routing_hook(hook)
    return out, seen


class _CountingProvider:
    """Wraps a provider and records how many experts each acquire asks for, per layer."""

    def __init__(self, inner) -> None:
        self.inner, self.sizes = inner, {}

    def hint(self, *a) -> None:
        self.inner.hint(*a)

    def acquire(self, layer, ids, weights):
        self.sizes.setdefault(layer, []).append(len(ids))
        return self.inner.acquire(layer, ids, weights)

    def release(self, layer, ids) -> None:
        self.inner.release(layer, ids)

    def stats(self) -> dict:
        return self.inner.stats()


def test_per_layer_top_k_equal_is_bit_identical_and_smaller_changes_routing(tiny, tmp_path):
    hf = tiny["hf"]
    plain = convert_checkpoint(hf, tmp_path / "plain", dtype="f32", progress=False)
    same, _ = compress_checkpoint(hf, tmp_path / "same", CompressOptions(top_k=[2, 2], dtype="f32", dense="f32",
                                                                         favour=False), progress=False)
    assert _all_tensors(same[0]) == _all_tensors(plain[0])
    with ShardedModel.open(same[0]) as r:
        assert TOPK_LAYER not in r.config and r.config["num_experts_per_tok"] == 2
    ids = torch.tensor(_windows(1, 16, seed=4))
    ref, _ = load_eval_model(plain[0])
    a, _ = load_eval_model(same[0])
    want, _ = _routing(ref, ids)
    got, _ = _routing(a, ids)
    assert torch.equal(want, got)

    rc = convert_main(["-q", "convert", str(hf), str(tmp_path / "k21"), "--top-k", "2,1", "--dtype", "f32",
                       "--dense", "f32"])
    assert rc == 0
    with ShardedModel.open(tmp_path / "k21") as r:
        assert r.config[TOPK_LAYER] == [2, 0, 1] and r.config["num_experts_per_tok"] == 2
        assert json.loads(r.metadata["moestream.compression"])["options"]["top_k"] == [2, 1]
    b, _ = load_eval_model(tmp_path / "k21")
    out, seen = _routing(b, ids)
    assert not torch.allclose(out, want, atol=1e-4)
    assert [t.shape[1] for t in seen[0]] == [2] and [t.shape[1] for t in seen[2]] == [1]
    b.set_expert_provider(counting := _CountingProvider(b.expert_provider))
    with torch.no_grad():
        b(ids[:, :1])  # one token: each layer acquires exactly its k experts
    assert counting.sizes == {0: [2], 2: [1]}

    from moestream.engine.api import Engine

    with Engine.load(tmp_path / "k21", memory="2GB") as engine:  # streamed, per-layer k
        with torch.no_grad():
            assert torch.equal(engine.model(ids), out)
        prompt = _windows(1, 6, seed=7)[0]
        assert engine.generate(prompt, max_tokens=3).token_ids == _greedy(b, prompt, 3)


def test_top_k_options_are_validated_with_clear_errors(tiny, tmp_path, capsys):
    hf = tiny["hf"]
    cases = [(["--top-k", "2,2,2"], "2 MoE layers"), (["--top-k", "9"], "must be in 1..8"),
             (["--top-k", "0"], "must be positive integers"), (["--top-k", "a,b"], "comma-separated"),
             (["--top-k", "8,7", "--prune", "0.5", "--calib", str(tiny["root"] / "calib.txt"), "--calib-windows", "2"],
              "must be in 1..4")]
    (tiny["root"] / "calib.txt").write_text("The quick brown fox jumps over the lazy dog. " * 60)
    for i, (extra, msg) in enumerate(cases):
        rc = convert_main(["-q", "convert", str(hf), str(tmp_path / f"o{i}"), *extra])
        err = capsys.readouterr().err
        assert rc == 2 and msg in err, (extra, err)
    with pytest.raises(ValueError, match="routing groups"):
        pruned_config({"num_experts": 8, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 1,
                       "num_hidden_layers": 1}, {0: [0, 2, 4, 6]}, top_k=2)


# ------------------------------------------------------------------------------------ llama.cpp target
def test_llamacpp_target_refuses_adaptive_pruning(tiny, tmp_path, capsys):
    hf = tiny["hf"]
    rc = convert_main(["-q", "convert", str(hf), str(tmp_path / "a"), "--target", "llama.cpp", "--prune", "0.25",
                       "--prune-mode", "adaptive"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--prune-mode adaptive" in err and "one expert count" in err and "\n" not in err
    paths, _ = _adaptive(tiny, tmp_path / "adaptive")
    rc = convert_main(["-q", "convert", str(paths[0].parent), str(tmp_path / "b"), "--target", "llama.cpp"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "adaptively pruned" in err and "--prune-mode uniform" in err and "\n" not in err
    # an HF folder whose config carries per-layer counts is refused by the exporter itself
    hf2 = tmp_path / "hf2"
    shutil.copytree(hf, hf2)
    cfg = json.loads((hf2 / "config.json").read_text())
    cfg[PER_LAYER] = [8, 0, 6]
    (hf2 / "config.json").write_text(json.dumps(cfg))
    from moestream.convert.llamacpp_export import export_llamacpp

    with pytest.raises(ModelFormatError, match="llama.cpp has one expert_count"):
        export_llamacpp(hf2, tmp_path / "x.gguf", progress=False)
