"""Benchmark harness logic: cgroup set-up/tear-down, child output parsing, record schema, report, synthetic models.

No timing thresholds: speeds are whatever the machine gives; only structure
and the kernel-limit bookkeeping are checked. Cgroup tests need root and the
v1 memory controller and are skipped (with the reason) elsewhere.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from moestream.bench import cgroup, harness, report
from moestream.bench.arm_common import MARKER, parse_result
from moestream.bench.harness import RECORD_FIELDS, Arm, SuiteConfig

CGROUP_REASON = cgroup.cgroup_unavailable_reason()
needs_cgroup = pytest.mark.skipif(CGROUP_REASON is not None, reason=str(CGROUP_REASON))


# ------------------------------------------------------------------------------------------ parsing
def test_parse_oom_control():
    text = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n"
    assert cgroup.parse_oom_control(text) == {"oom_kill_disable": 0, "under_oom": 0, "oom_kill": 3}
    assert cgroup.parse_oom_control("") == {}


def test_parse_result_takes_the_last_marker_line():
    out = "noise\n" + MARKER + json.dumps({"a": 1}) + "\nmore\n" + MARKER + json.dumps({"a": 2}) + "\n"
    assert parse_result(out) == {"a": 2}
    assert parse_result("no result here") is None


def test_budget_limits_are_overhead_plus_fraction():
    limits = harness.budget_limits([("100%", 1.0), ("25%", 0.25), ("none", None)], 1000, 300)
    assert limits == [("100%", 1.0, 1300), ("25%", 0.25, 550), ("none", None, None)]


def _cfg(tmp_path: Path, arms: list[Arm]) -> SuiteConfig:
    return SuiteConfig(name="t", arms=arms, budgets=[("50%", 0.5)], reference_bytes=1000, overhead_bytes=100,
                       tokens_file=str(tmp_path / "tok.json"), decode_steps=4, reps=2, threads=1, ctx=64)


def test_arm_argv_passes_the_limit_only_to_moestream(tmp_path):
    ms = Arm("ms", "moestream", "/m", "bf16", cache_policy="lfu", precision_policy="adaptive")
    ll = Arm("ll", "llamacpp", "/m.gguf", "Q8_0")
    cfg = _cfg(tmp_path, [ms, ll])
    a = harness.arm_argv(ms, cfg, 12345)
    assert a[:3] == [sys.executable, "-m", "moestream.bench.run_arm"]
    assert a[a.index("--memory") + 1] == "12345" and "lfu" in a and "adaptive" in a
    b = harness.arm_argv(ll, cfg, 12345)
    assert "moestream.bench.llama_runner" in b and "--memory" not in b
    assert b[b.index("-n") + 1] == "4" and b[b.index("--threads") + 1] == "1"
    with pytest.raises(ValueError):
        harness.arm_argv(Arm("x", "other", "/m", "f32"), cfg, None)


def _pass(name: str, hits: tuple[int, int, int], misses: tuple[int, int, int], read: tuple[int, int, int]) -> dict:
    stats = [{"hits": h, "misses": m, "bytes_read": r, "stall_s": 0.1 * i}
             for i, (h, m, r) in enumerate(zip(hits, misses, read))]
    return {"pass": name, "prompt_tokens": 8, "decode_steps": 4, "prefill_s": 0.5, "prefill_tok_s": 16.0,
            "ttft_s": 0.5, "decode_s": 2.0, "decode_tok_s": 2.0, "decode_tok_s_steady": 2.5, "step_s": [0.5] * 4,
            "tokens": [1, 2, 3, 4], "stats_before": stats[0], "stats_after_prefill": stats[1], "stats_after": stats[2],
            "io_before": {"read_bytes": 0}, "io_after_prefill": {"read_bytes": 100}, "io_after": {"read_bytes": 500}}


def test_make_records_ok_run_has_every_field_and_derived_metrics(tmp_path):
    arm = Arm("ms", "moestream", "/m", "bf16", cache_policy="lru", precision_policy="exact")
    result = {"engine": "moestream", "ok": True, "load_s": 1.0, "arena_slots": 10, "experts_total": 40,
              "loadavg": [1.0, 1.0, 1.0],
              "passes": [_pass("cold", (0, 2, 6), (0, 8, 10), (0, 800, 1000)),
                         _pass("warm", (6, 16, 22), (10, 10, 10), (1000, 1000, 1000))]}
    run = {"status": "ok", "limit_bytes": 600, "cgroup_max_usage_bytes": 590, "cgroup_failcnt": 7,
           "cgroup_oom_kills": 0, "child_maxrss_bytes": 400, "page_cache_dropped": True, "cgroup": "v1",
           "wall_s": 3.0, "stderr": "", "result": result}
    recs = harness.make_records(run, arm, _cfg(tmp_path, [arm]), "50%", 0.5, 600, rep=1, order=3)
    assert [r["pass"] for r in recs] == ["cold", "warm"]
    for r in recs:
        assert set(r) == set(RECORD_FIELDS)
        assert r["schema"] == harness.SCHEMA and r["status"] == "ok" and r["cgroup_peak_bytes"] == 590
    cold, warm = recs
    assert cold["hit_rate"] == pytest.approx(6 / 16)
    assert cold["decode_hit_rate"] == pytest.approx(4 / 6)
    assert cold["bytes_read_per_token"] == pytest.approx(200 / 4)
    assert cold["miss_path_bandwidth_bytes_per_s"] == pytest.approx(200 / 2.0)
    assert cold["disk_read_bytes_per_token"] == pytest.approx(100.0)
    assert warm["decode_hit_rate"] == pytest.approx(1.0) and warm["bytes_read_per_token"] == 0


def test_make_records_refusal_oom_and_missing_result_are_results(tmp_path):
    arm = Arm("ms", "moestream", "/m", "bf16")
    cfg = _cfg(tmp_path, [arm])
    refused = {"status": "error", "returncode": 2, "stderr": "",
               "result": {"ok": False, "error_type": "BudgetError", "error": "budget too small; minimum 5 GB"}}
    (r,) = harness.make_records(refused, arm, cfg, "25%", 0.25, 10, 0, 0)
    assert r["status"] == "refused" and "minimum" in r["error"] and r["pass"] is None
    oom = {"status": "oom", "returncode": -9, "stderr": "Killed", "cgroup_oom_kills": 1, "result": None}
    (r,) = harness.make_records(oom, arm, cfg, "25%", 0.25, 10, 0, 1)
    assert r["status"] == "oom" and r["oom_kills"] == 1 and set(r) == set(RECORD_FIELDS)
    silent = {"status": "ok", "returncode": 0, "stderr": "", "result": None}
    (r,) = harness.make_records(silent, arm, cfg, "25%", 0.25, 10, 0, 2)
    assert r["status"] == "error" and "BENCH_RESULT" in r["error"]


def test_report_tables_and_ratios(tmp_path):
    ms = Arm("ms", "moestream", "/m", "bf16")
    ll = Arm("ll", "llamacpp", "/m.gguf", "F16")
    cfg = _cfg(tmp_path, [ms, ll])
    ok = {"status": "ok", "limit_bytes": 600, "cgroup": "v1", "stderr": "",
          "result": {"ok": True, "passes": [_pass("cold", (0, 0, 4), (0, 8, 8), (0, 0, 10))]}}
    recs = harness.make_records(ok, ms, cfg, "50%", 0.5, 600, 0, 0)
    recs += harness.make_records({**ok, "result": {"ok": True, "passes": [
        {**_pass("cold", (0, 0, 0), (0, 0, 0), (0, 0, 0)), "decode_tok_s": 4.0}]}}, ll, cfg, "50%", 0.5, 600, 0, 1)
    recs += harness.make_records({"status": "oom", "stderr": "Killed", "result": None}, ll, cfg, "50%", 0.5, 600, 1, 2)
    rows = report.summary_rows(recs)
    by_arm = {r["arm"]: r for r in rows}
    assert by_arm["ll"]["status"] == {"ok": 1, "oom": 1}
    comp = report.comparison_rows(rows)
    assert len(comp) == 1 and comp[0]["decode_ratio"] == pytest.approx(0.5)
    doc = {"suite": "t", "config": {"mode": "teacher", "decode_steps": 4, "reps": 2, "threads": 1, "ctx": 64,
                                    "overhead_bytes": 100, "reference_bytes": 1000},
           "machine": {}, "physical": {}, "records": recs}
    md = report.markdown(doc)
    assert "| 50% |" in md and "0.50x" in md and "Failures" in md
    report.plot_tok_s_vs_budget([doc], tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0


# ------------------------------------------------------------------------------------------ cgroups
@needs_cgroup
def test_cgroup_setup_limit_and_teardown():
    with cgroup.MemoryCgroup(256 * 2**20) as g:
        s = g.stats()
        assert s["limit_bytes"] == 256 * 2**20 and s["oom_kill"] == 0 and g.tasks() == []
        path = g.path
        assert path.is_dir()
    assert not path.exists()


@needs_cgroup
def test_run_limited_ok_within_limit_and_oom_above():
    code = "import sys; b = bytearray(int(sys.argv[1]) * 2**20); b[::4096] = b'x' * len(b[::4096]); print('done')"
    ok = cgroup.run_limited([sys.executable, "-c", code, "8"], 256 * 2**20, timeout_s=60, drop_caches=False)
    assert ok.status == "ok" and ok.cgroup == "v1" and "done" in ok.stdout
    assert 0 < ok.cgroup_max_usage_bytes <= ok.limit_bytes and ok.child_maxrss_bytes > 8 * 2**20
    bad = cgroup.run_limited([sys.executable, "-c", code, "400"], 128 * 2**20, timeout_s=60, drop_caches=False)
    assert bad.status == "oom" and bad.returncode != 0
    assert bad.cgroup_max_usage_bytes <= bad.limit_bytes
    leftovers = [p for p in cgroup.CGROUP_V1_ROOT.glob(cgroup.PREFIX + "*")]
    assert leftovers == []


@needs_cgroup
def test_run_limited_timeout_kills_the_child():
    r = cgroup.run_limited([sys.executable, "-c", "import time; time.sleep(30)"], 256 * 2**20, timeout_s=1,
                           drop_caches=False)
    assert r.status == "timeout" and r.wall_s < 20


def test_run_limited_without_cgroups_still_runs(monkeypatch):
    monkeypatch.setattr(cgroup, "cgroup_unavailable_reason", lambda root=cgroup.CGROUP_V1_ROOT: "test: no cgroups")
    r = cgroup.run_limited([sys.executable, "-c", "print('hi')"], 2**30, timeout_s=60, drop_caches=False)
    assert r.status == "ok" and r.cgroup == "unavailable" and r.cgroup_reason == "test: no cgroups"
    assert r.cgroup_max_usage_bytes is None and r.child_maxrss_bytes > 0 and "hi" in r.stdout


# ------------------------------------------------------------------------------------------ synthetic + e2e
TINY = dict(layers=2, hidden=128, experts=8, top_k=2, expert_inter=64, heads=4, kv_heads=2, head_dim=32)


def test_synthetic_safetensors_streaming_layout(tmp_path):
    from safetensors import safe_open

    from moestream.bench.synthetic import SyntheticSpec, write_safetensors_streaming

    spec = SyntheticSpec(vocab=512, **TINY)
    path = tmp_path / "model.safetensors"
    n = write_safetensors_streaming(path, spec, progress=False)
    assert path.stat().st_size == n
    shapes = dict(spec.tensor_shapes())
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == set(shapes)
        t = f.get_tensor("model.layers.1.mlp.experts.7.down_proj.weight")
        assert tuple(t.shape) == shapes["model.layers.1.mlp.experts.7.down_proj.weight"]
        assert str(t.dtype) == "torch.bfloat16" and float(t.float().std()) > 0
        assert float(f.get_tensor("model.norm.weight").float().min()) == 1.0
    assert spec.n_params() == sum(int(__import__("math").prod(s)) for s in shapes.values())


@pytest.fixture(scope="module")
def tiny_synthetic(tmp_path_factory):
    from moestream.bench.synthetic import SyntheticSpec, build_synthetic, find_tokenizer_dir

    try:
        tok = find_tokenizer_dir()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    vocab = len(json.loads((tok / "tokenizer.json").read_text())["model"]["vocab"])
    spec = SyntheticSpec(vocab=-(-vocab // 256) * 256, **TINY)
    root = tmp_path_factory.mktemp("syn")
    qtypes = ("f16",) if _has_llama() else ()
    return build_synthetic(root, spec, shard_dtype="bf16", gguf_qtypes=qtypes, tokenizer_dir=tok, progress=False)


def _has_llama() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def test_suite_end_to_end_on_a_tiny_synthetic_model(tiny_synthetic, tmp_path):
    """Both engines as children, one budget, one repetition: records well formed, same ids fed to both."""
    paths = tiny_synthetic
    tokens = tmp_path / "tok.json"
    harness.make_tokens_file(Path(paths["hf"]) / "tokenizer.json", "The quick brown fox jumps over the lazy dog. "
                             "It was the best of times, it was the worst of times.", 8, 3, tokens)
    arms = [Arm("ms", "moestream", paths["moestream_bf16"], "bf16", cache_policy="lru", precision_policy="exact")]
    if "llamacpp_f16" in paths:
        arms.append(Arm("ll", "llamacpp", paths["llamacpp_f16"], "F16"))
    ov = harness.moestream_overhead(paths["moestream_bf16"], 32)
    assert ov["overhead_bytes"] > 0 and ov["total_expert_bytes"] > 0
    cfg = SuiteConfig(name="e2e", arms=arms, budgets=[("100%", 1.0)], reference_bytes=harness.model_file_bytes(
        paths["moestream_bf16"]), overhead_bytes=ov["overhead_bytes"], tokens_file=str(tokens), decode_steps=3,
        reps=1, threads=1, ctx=32, passes=2, timeout_s=300)
    doc = harness.run_suite(cfg, tmp_path / "e2e.json", log=lambda s: None, physical={})
    saved = json.loads((tmp_path / "e2e.json").read_text())
    assert saved["records"] == doc["records"] and saved["machine"]["git_commit"]
    recs = doc["records"]
    assert {r["arm"] for r in recs} == {a.name for a in arms}
    for r in recs:
        assert set(r) == set(RECORD_FIELDS)
        assert r["status"] == "ok", r["error"]
        assert r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 and r["pass"] in ("cold", "warm")
        if CGROUP_REASON is None:
            assert r["cgroup"] == "v1" and r["cgroup_peak_bytes"] <= r["limit_bytes"]
    ms = [r for r in recs if r["engine"] == "moestream"]
    assert all(r["hit_rate"] is not None for r in ms)
    md = report.markdown(doc)
    assert "moestream" in md and "| 100% |" in md


def test_memory_bound_counts_active_parameters():
    cfg = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
           "head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 8, "vocab_size": 32}
    a = harness.active_params_per_token(cfg)
    attn = 16 * 16 + 2 * 16 * 8 + 16 * 16
    assert a == {"dense": 2 * (attn + 16 * 4) + 16 * 32, "experts": 2 * 3 * 16 * 8 * 2}
    bw = 1e9
    assert harness.memory_bound_tok_s(cfg, "F16", bw) == pytest.approx(bw / (2 * (a["dense"] + a["experts"])))
    assert harness.memory_bound_tok_s(cfg, "Q8_0", bw) > harness.memory_bound_tok_s(cfg, "F16", bw)
    assert harness.memory_bound_tok_s(cfg, "weird", bw) is None
