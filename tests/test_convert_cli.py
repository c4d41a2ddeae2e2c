"""``convert`` / ``info`` on tiny random-init HF models (tests/tiny_models.py), library and CLI.

Proves: every tensor of the checkpoint comes back bit-exact in f32 and equal
to the cast in f16/bf16 (1-D tensors and routers stay f32); the tokenizer and
chat template travel in metadata; splitting by size works and loads; a
failed or killed conversion never leaves a loadable model and a re-run works
(resuming is tested in tests/test_convert_resume.py);
missing config -> ModelFormatError naming config.json; the argparse verbs
return 0 on success and 2 with ``error: ...`` naming the file on bad input.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import build_tiny_hf_model  # noqa: E402

from moestream.convert import constants as C  # noqa: E402
from moestream.convert.commands import main as cli_main  # noqa: E402
from moestream.convert.commands import parse_size  # noqa: E402
from moestream.convert.convert import F32_NAME_SUFFIXES, convert_checkpoint  # noqa: E402
from moestream.convert.errors import ModelFormatError, MoestreamError  # noqa: E402
from moestream.convert.hf_checkpoint import HFCheckpoint, parse_expert_name  # noqa: E402
from moestream.convert.shard_writer import ShardSetWriter  # noqa: E402
from moestream.convert.shards import ShardedModel  # noqa: E402

torch.set_num_threads(1)
TOKENIZER_JSON = json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}})
TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for model_type in ("qwen2_moe", "mixtral"):
        path = tmp_path_factory.mktemp(model_type)
        build_tiny_hf_model(model_type, path)
        out[model_type] = path
    (out["qwen2_moe"] / "tokenizer.json").write_text(TOKENIZER_JSON)
    (out["qwen2_moe"] / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    return out


def _expected(t: torch.Tensor, name: str, dtype: str) -> torch.Tensor:
    if t.dim() <= 1 or name.endswith(F32_NAME_SUFFIXES) or dtype == "f32":
        return t.to(torch.float32)
    return t.to({"f16": torch.float16, "bf16": torch.bfloat16}[dtype])


def _assert_round_trip(hf_dir: Path, out: Path, dtype: str) -> None:
    ckpt = HFCheckpoint.open(hf_dir)
    names = ckpt.canonical_names()
    with ShardedModel.open(out) as m:
        stored = set(m.dense_names())
        experts = set()
        for name in names:
            src = ckpt.read_canonical(name)
            key = parse_expert_name(name)
            if key is None:
                got = m.read_dense(name)
            else:
                experts.add((key.layer, key.expert))
                got = m.read_expert(key.layer, key.expert)[key.proj]
            want = _expected(src, name, dtype)
            assert got.dtype == want.dtype and got.shape == want.shape, name
            assert torch.equal(got, want), name
        assert stored == {n for n in names if parse_expert_name(n) is None}
        assert set(m.expert_keys()) == experts
        assert m.config == ckpt.config and m.model_type == ckpt.model_type


@pytest.mark.parametrize("model_type", ["qwen2_moe", "mixtral"])
def test_f32_round_trip_bit_exact(hf_dirs, tmp_path: Path, model_type: str) -> None:
    paths = convert_checkpoint(hf_dirs[model_type], tmp_path / "out", dtype="f32", progress=False)
    assert [p.name for p in paths] == ["model-00001-of-00001.gguf"]
    _assert_round_trip(hf_dirs[model_type], tmp_path / "out", "f32")


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_half_round_trip_equals_cast_and_splits(hf_dirs, tmp_path: Path, dtype: str) -> None:
    paths = convert_checkpoint(hf_dirs["qwen2_moe"], tmp_path / "out", dtype=dtype,
                               max_shard_size=100_000, progress=False)
    assert len(paths) > 2
    _assert_round_trip(hf_dirs["qwen2_moe"], tmp_path / "out", dtype)
    m = ShardedModel.open(paths[0])
    assert m.tokenizer_json == TOKENIZER_JSON and m.chat_template == TEMPLATE
    assert m.metadata[C.KEY_EXPERT_COUNT] == 8 and m.metadata[C.KEY_DTYPE] == dtype
    assert m.metadata[C.KEY_EXPERT_CODEC] == C.CODEC_NONE and m.metadata[C.KEY_EXPERT_LEVEL_COUNT] == 1
    # routers stay f32 (routing must not change), matrices use the requested dtype
    assert m.read_dense("model.layers.0.mlp.gate.weight").dtype == torch.float32
    assert m.read_dense("model.layers.0.self_attn.q_proj.weight").dtype != torch.float32


def test_chat_template_jinja_file_wins(hf_dirs, tmp_path: Path) -> None:
    import shutil

    hf = tmp_path / "hf"
    shutil.copytree(hf_dirs["mixtral"], hf)
    (hf / "chat_template.jinja").write_text("{{ jinja }}")
    convert_checkpoint(hf, tmp_path / "out", progress=False)
    m = ShardedModel.open(tmp_path / "out")
    assert m.chat_template == "{{ jinja }}" and m.tokenizer_json is None


def test_missing_config(hf_dirs, tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "model.safetensors").write_bytes((hf_dirs["mixtral"] / "model.safetensors").read_bytes())
    with pytest.raises(ModelFormatError, match="config.json"):
        convert_checkpoint(hf, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_failed_conversion_leaves_nothing_loadable_and_rerun_resumes(hf_dirs, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    real_write = ShardSetWriter.write
    calls = {"n": 0}

    def failing_write(self, name, array):
        calls["n"] += 1
        if calls["n"] == 20:
            raise OSError("disk full (simulated)")
        return real_write(self, name, array)

    monkeypatch.setattr(ShardSetWriter, "write", failing_write)
    with pytest.raises(OSError, match="simulated"):
        convert_checkpoint(hf_dirs["mixtral"], out, max_shard_size=50_000, progress=False)
    # no .partial file; the shards completed before the failure stay (with their record) for a resumed run
    assert not list(out.glob("*" + C.PARTIAL_SUFFIX)) and (out / C.CONVERT_STATE_FILE).is_file()
    with pytest.raises(ModelFormatError, match="conversion incomplete.*re-run convert"):
        ShardedModel.open(out)
    monkeypatch.setattr(ShardSetWriter, "write", real_write)
    convert_checkpoint(hf_dirs["mixtral"], out, max_shard_size=50_000, progress=False)
    assert not (out / C.CONVERT_STATE_FILE).exists()
    ShardedModel.open(out)


def test_killed_conversion_does_not_load_and_rerun_cleans_up(hf_dirs, tmp_path: Path) -> None:
    out = tmp_path / "out"
    paths = convert_checkpoint(hf_dirs["mixtral"], out, max_shard_size=50_000, progress=False)
    for p in paths:  # what a kill -9 before the final renames leaves behind
        p.rename(p.with_name(p.name + C.PARTIAL_SUFFIX))
    with pytest.raises(ModelFormatError, match="conversion incomplete, re-run convert"):
        ShardedModel.open(out)
    convert_checkpoint(hf_dirs["mixtral"], out, max_shard_size=50_000, progress=False)
    assert not list(out.glob("*.partial"))
    ShardedModel.open(out)


def test_refuses_to_overwrite_without_force(hf_dirs, tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert_checkpoint(hf_dirs["mixtral"], out, progress=False)
    with pytest.raises(MoestreamError, match="--force"):
        convert_checkpoint(hf_dirs["mixtral"], out, progress=False)
    convert_checkpoint(hf_dirs["mixtral"], out, dtype="bf16", progress=False, overwrite=True)
    assert ShardedModel.open(out).metadata[C.KEY_DTYPE] == "bf16"


# ------------------------------------------------------------------------------------ CLI
def test_parse_size() -> None:
    assert parse_size("2GB") == 2 * 10**9 and parse_size("1.5GiB") == 3 * 2**29
    assert parse_size("500M") == 5 * 10**8 and parse_size("4096") == 4096 and parse_size("0") == 0
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="not a size"):
        parse_size("lots")


def test_cli_convert_then_info(hf_dirs, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    rc = cli_main(["-q", "convert", str(hf_dirs["qwen2_moe"]), str(out), "--dtype", "bf16",
                   "--max-shard-size", "100KB"])
    assert rc == 0
    assert "wrote" in capsys.readouterr().out
    _assert_round_trip(hf_dirs["qwen2_moe"], out, "bf16")
    assert cli_main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "model type:   qwen2_moe" in text and "expert level 0:" in text and "shards (" in text
    assert "tokenizer:    yes; chat template: yes" in text
    assert cli_main(["info", str(sorted(out.glob("*.gguf"))[0]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["expert_count"] == 3 * 8 and len(info["shards"]) > 1


def test_cli_errors_name_the_file(hf_dirs, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert cli_main(["-q", "convert", str(hf_dirs["mixtral"]), str(out)]) == 0
    capsys.readouterr()
    shard = sorted(out.glob("*.gguf"))[0]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 4096)
    assert cli_main(["info", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and shard.name in err and "Traceback" not in err
    assert cli_main(["-q", "convert", str(tmp_path / "nothing"), str(tmp_path / "o2")]) == 2
    assert "nothing" in capsys.readouterr().err
    assert cli_main(["-q", "convert", str(hf_dirs["mixtral"]), str(out)]) == 2
    assert "--force" in capsys.readouterr().err


def test_dispatcher_has_the_verbs() -> None:
    cli = pytest.importorskip("moestream.engine.cli", reason="engine/cli.py (the dispatcher) not importable")
    parser = cli.build_parser()
    args = parser.parse_args(["convert", "a", "b", "--dtype", "f32", "--max-shard-size", "1GB"])
    assert args.func.__name__ == "cmd_convert" and args.max_shard_size == 10**9
    assert parser.parse_args(["info", "m"]).func.__name__ == "cmd_info"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_uncached_reads_equal_safetensors(tmp_path: Path, dtype: torch.dtype) -> None:
    """``drop_cache=True`` (pread + page-cache drops, what convert uses) reads what safetensors reads, fused too."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    E, H, I = 4, 64, 32
    tensors = {"model.embed_tokens.weight": torch.randn(16, H, generator=g).to(dtype),
               "model.norm.weight": torch.ones(H, dtype=dtype),
               "model.layers.0.mlp.experts.gate_up_proj": torch.randn(E, 2 * I, H, generator=g).to(dtype),
               "model.layers.0.mlp.experts.down_proj": torch.randn(E, H, I, generator=g).to(dtype),
               "model.layers.0.mlp.gate.weight": torch.randn(E, H, generator=g).to(dtype)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "hidden_size": H,
                                                      "num_hidden_layers": 1}))
    plain, uncached = HFCheckpoint.open(tmp_path), HFCheckpoint.open(tmp_path, drop_cache=True)
    try:
        assert uncached.is_fused() and len(plain.canonical_names()) == 3 + 3 * E
        for name in plain.canonical_names():
            a, b = plain.read_canonical(name), uncached.read_canonical(name)
            assert a.dtype == b.dtype and torch.equal(a, b), name
        assert uncached._fds  # the pread path was taken
    finally:
        uncached.close()
    assert uncached.fingerprint() == plain.fingerprint()
