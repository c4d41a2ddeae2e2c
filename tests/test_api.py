"""The Python API (Engine) on a real tiny model folder, in-process and from a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from moestream.engine.api import (DEFAULT_MODEL_DIR, BudgetError, ContextOverflowError, Engine, EngineBusyError,
                                  EngineClosedError, InvalidRequestError, ModelFormatError, MoestreamError)

from runtime_model import build_runtime_model, subprocess_env

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_runtime_model(tmp_path_factory.mktemp("api_model"))


@pytest.fixture(scope="module")
def engine(model_dir: Path):
    eng = Engine.load(str(model_dir), memory="6GB", device="cpu", ctx=128)
    yield eng
    eng.close()


def test_generate_stream_and_result_agree(engine: Engine) -> None:
    res = engine.generate("The quick brown fox", max_tokens=16, temperature=0.8, seed=11)
    assert len(res.token_ids) == 16 and res.finish_reason == "length"
    assert res.stats.prompt_tokens == engine.count_tokens("The quick brown fox")
    stream = engine.generate("The quick brown fox", max_tokens=16, temperature=0.8, seed=11, stream=True)
    chunks = list(stream)
    assert "".join(c.text for c in chunks) == res.text
    assert [t for c in chunks for t in c.token_ids] == res.token_ids
    assert chunks[-1].finish_reason == "length" and chunks[-1].stats.generated_tokens == 16
    other = engine.generate("The quick brown fox", max_tokens=16, temperature=0.8, seed=12)
    assert other.token_ids != res.token_ids  # a different seed samples differently


def test_chat_uses_template(engine: Engine) -> None:
    msgs = [{"role": "user", "content": "Hello"}]
    res = engine.chat(msgs, max_tokens=8)
    text = engine.tokenizer.apply_chat_template(msgs)
    assert res.stats.prompt_tokens == len(engine.tokenizer.encode(text))
    assert res.token_ids == engine.generate(engine.tokenizer.encode(text), max_tokens=8).token_ids


def test_one_request_at_a_time(engine: Engine) -> None:
    stream = engine.generate("Hello", max_tokens=8, stream=True)
    next(stream)
    assert engine.busy and engine.stats()["busy"]
    with pytest.raises(EngineBusyError, match="one at a time"):
        engine.generate("Hello", max_tokens=2)
    with pytest.raises(EngineBusyError):
        engine.close()
    stream.close()
    assert not engine.busy
    assert engine.stats()["last_request"]["finish_reason"] == "cancelled"
    # an abandoned (garbage-collected) stream frees the engine too
    engine.generate("Hello", max_tokens=8, stream=True)
    assert not engine.busy
    assert engine.generate("Hello", max_tokens=2).stats.generated_tokens == 2


def test_bad_requests(engine: Engine) -> None:
    with pytest.raises(ContextOverflowError, match="--ctx"):
        engine.generate("word " * 400, max_tokens=4)
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        engine.generate("Hello", max_tokens=0)
    with pytest.raises(InvalidRequestError, match="top_p"):
        engine.generate("Hello", top_p=2.0)
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.generate("", max_tokens=2)
    assert not engine.busy


def test_stats_report_budget_and_experts(engine: Engine) -> None:
    engine.generate("Hello", max_tokens=3)
    s = engine.stats()
    assert s["memory_budget_bytes"] == 6 * 10**9
    assert s["context_length"] == 128 and s["device"] == "cpu" and s["format"] == "hf"
    assert s["model_type"] == "qwen3_moe" and s["rss_bytes"] > 0 and s["peak_rss_bytes"] > 0
    assert s["experts"]["provider"] == "resident" and s["experts"]["acquired"] > 0
    assert s["last_request"]["generated_tokens"] == 3


def test_load_errors(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError, match="does not exist"):
        Engine.load(str(tmp_path / "nope"))
    with pytest.raises(ModelFormatError, match="neither config.json"):
        Engine.load(str(tmp_path))
    with pytest.raises(BudgetError, match="--memory"):
        Engine.load(str(model_dir), memory="lots")
    with pytest.raises(MoestreamError, match="device"):
        Engine.load(str(model_dir), device="tpu")
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        with pytest.raises(ModelFormatError, match="default model is missing"):
            Engine.load("default")


def test_close_and_context_manager(model_dir: Path) -> None:
    with Engine.load(str(model_dir), ctx=64) as eng:
        assert eng.generate("Hi", max_tokens=2).stats.generated_tokens == 2
    with pytest.raises(EngineClosedError):
        eng.generate("Hi", max_tokens=2)
    assert eng.stats()["closed"]


def test_api_from_fresh_interpreter(model_dir: Path) -> None:
    script = textwrap.dedent(f"""
        import json
        from moestream.engine.api import Engine
        with Engine.load({str(model_dir)!r}, ctx=96) as engine:
            a = engine.generate("Hello", max_tokens=6, temperature=0.0)
            b = "".join(c.text for c in engine.chat([{{"role": "user", "content": "Hi"}}], max_tokens=5,
                                                    temperature=0.5, seed=3, stream=True))
            c = engine.chat([{{"role": "user", "content": "Hi"}}], max_tokens=5, temperature=0.5, seed=3)
            print(json.dumps({{"a": a.to_dict(), "b": b, "c": c.text, "stats": engine.stats()}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=subprocess_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert len(out["a"]["tokens"]) == 6 and out["a"]["finish_reason"] == "length"
    assert out["b"] == out["c"]
    assert out["stats"]["requests"] == 3


def test_example_script(model_dir: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "embed_in_app.py"), str(model_dir),
                           "--max-tokens", "6"], capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr
    assert "generate:" in proc.stdout and "busy:" in proc.stdout and '"requests": 3' in proc.stdout


def test_shard_model_matches_hf_folder(model_dir: Path, tmp_path: Path, engine: Engine) -> None:
    out = tmp_path / "shards"
    proc = subprocess.run([sys.executable, "-m", "moestream.engine.cli", "--quiet", "convert", str(model_dir), str(out),
                           "--dtype", "f32"], capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr
    with Engine.load(str(out), ctx=128) as sharded:
        assert sharded.stats()["format"] == "shards"
        msgs = [{"role": "user", "content": "Hello"}]
        assert sharded.chat(msgs, max_tokens=8).token_ids == engine.chat(msgs, max_tokens=8).token_ids
        assert sharded.tokenizer.eos_token_ids == engine.tokenizer.eos_token_ids
