"""Resuming an interrupted ``moestream convert`` (issue 4, item 7).

Proves, on a small synthetic qwen3_moe checkpoint split into 7 shards:

- a conversion SIGKILLed mid-way (after shard k was renamed, while shard k+1
  was being written; or between a shard's rename and its record) does not
  load, and re-running the same conversion keeps the completed shards (same
  inode and mtime: not rewritten; the log counts them), redoes the rest, and
  ends byte-identical (SHA-256 of every file) to an uninterrupted conversion —
  for the plain converter and the compressing one (nested codec);
- a different input (source file touched) or different options start clean,
  with a warning, and never mix shards; ``--no-resume`` starts clean too;
- a completed shard that no longer matches its record is converted again;
- a failure (exception) keeps the completed shards for the next run.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from runtime_model import subprocess_env  # noqa: E402

from moestream.bench.synthetic import SyntheticSpec, write_hf_folder  # noqa: E402
from moestream.convert import constants as C  # noqa: E402
from moestream.convert.commands import main as cli_main  # noqa: E402
from moestream.convert.compress import CompressOptions, compress_checkpoint  # noqa: E402
from moestream.convert.convert import convert_checkpoint  # noqa: E402
from moestream.convert.errors import ModelFormatError  # noqa: E402
from moestream.convert.resume import ResumeState  # noqa: E402
from moestream.convert.shard_reader import ShardedModel  # noqa: E402
from moestream.convert.shard_writer import ShardSetWriter  # noqa: E402

SHARD = 64_000  # bytes of tensor data per shard: 7 shards (shard 1: metadata + embeddings)
SPEC = SyntheticSpec(layers=2, hidden=64, experts=8, expert_inter=32, heads=4, kv_heads=2, head_dim=16, vocab=8192)


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_hf_folder(tmp_path_factory.mktemp("resume") / "hf", SPEC, progress=False)


def _convert(hf_dir: Path, out: Path, kind: str = "convert", dtype: str = "f16", resume: bool = True) -> list[Path]:
    if kind == "convert":
        return convert_checkpoint(hf_dir, out, dtype=dtype, max_shard_size=SHARD, progress=False, resume=resume)
    paths, _ = compress_checkpoint(hf_dir, out, CompressOptions(codec="matryoshka_floor", group_size=32, dtype=dtype),
                                   max_shard_size=SHARD, progress=False, resume=resume)
    return paths


@pytest.fixture(scope="module")
def reference(hf: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Uninterrupted conversions to compare against."""
    root = tmp_path_factory.mktemp("reference")
    out = {}
    for kind in ("convert", "compress"):
        _convert(hf, root / kind, kind)
        out[kind] = root / kind
    return out


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _identity(paths: list[Path]) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in paths}


KILL_MID_SHARD = """
    real_complete, real_write = shard_writer.ShardSetWriter._complete_shard, shard_writer.ShardSetWriter.write
    def complete(self, shard):
        real_complete(self, shard)
        if shard == KILL_AFTER:
            armed["on"] = True
    def write(self, name, array):
        real_write(self, name, array)
        if armed["on"]:  # one tensor of the next shard written: its .partial is incomplete
            os.kill(os.getpid(), signal.SIGKILL)
    shard_writer.ShardSetWriter._complete_shard = complete
    shard_writer.ShardSetWriter.write = write
"""
KILL_BEFORE_RECORD = """
    real_record = shard_writer.record_shard
    def record(path, *args):
        if f"-{KILL_AFTER + 1:05d}-of-" in path.name:  # renamed into place, not yet recorded
            os.kill(os.getpid(), signal.SIGKILL)
        return real_record(path, *args)
    shard_writer.record_shard = record
"""


def _run_killed(hf_dir: Path, out: Path, patch: str, kill_after: int, kind: str = "convert") -> None:
    """Convert in a child that SIGKILLs itself where ``patch`` says (``kill_after``: 0-based shard index)."""
    call = (f"convert_checkpoint({str(hf_dir)!r}, {str(out)!r}, dtype='f16', max_shard_size={SHARD}, progress=False)"
            if kind == "convert" else
            f"compress_checkpoint({str(hf_dir)!r}, {str(out)!r}, CompressOptions(codec='matryoshka_floor', "
            f"group_size=32), max_shard_size={SHARD}, progress=False)")
    code = textwrap.dedent(f"""
        import os, signal, sys
        from moestream.convert import shard_writer
        from moestream.convert.convert import convert_checkpoint
        from moestream.convert.compress import CompressOptions, compress_checkpoint
        KILL_AFTER = {kill_after}
        armed = {{"on": False}}
    """) + textwrap.dedent(patch) + textwrap.dedent(f"""
        {call}
        sys.exit(0)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr


def _kept_after_kill(out: Path) -> list[Path]:
    """Shards an interrupted run completed and recorded (what a resumed run must keep)."""
    state = ResumeState.load(out)
    assert state is not None, "no resume record after the kill"
    return [out / r.name for r in state.complete.values()]


@pytest.mark.parametrize("kind,patch,kill_after", [
    ("convert", KILL_MID_SHARD, 3),
    ("convert", KILL_BEFORE_RECORD, 3),
    ("compress", KILL_MID_SHARD, 2),
])
def test_resumed_conversion_is_byte_identical_and_keeps_completed_shards(
        hf: Path, reference: dict[str, Path], tmp_path: Path, caplog, kind: str, patch: str, kill_after: int) -> None:
    out = tmp_path / "out"
    _run_killed(hf, out, patch, kill_after, kind)
    kept = _kept_after_kill(out)
    n_kept = kill_after if patch is KILL_MID_SHARD else kill_after - 1  # shards 2..k (shard 1 is always redone)
    assert len(kept) == n_kept, kept
    with pytest.raises(ModelFormatError, match="conversion incomplete"):
        ShardedModel.open(out)
    before = _identity(kept)
    with caplog.at_level(logging.INFO, logger="moestream"):
        paths = _convert(hf, out, kind)
    assert f"resuming an interrupted conversion: {n_kept} of {len(paths)} shards" in caplog.text
    assert _identity(kept) == before, "a completed shard was rewritten"
    assert _hashes(out) == _hashes(reference[kind])  # every file, byte for byte; no record or .partial left
    with ShardedModel.open(out, verify="always") as m:
        for layer, e in m.expert_keys():
            m.read_expert(layer, e)


def test_cli_rerun_resumes_and_no_resume_starts_clean(hf: Path, reference: dict[str, Path], tmp_path: Path,
                                                      caplog) -> None:
    args = ["-q", "convert", str(hf), "", "--max-shard-size", str(SHARD)]
    for flag in ([], ["--no-resume"]):
        out = tmp_path / f"out{len(flag)}"
        _run_killed(hf, out, KILL_MID_SHARD, 4)
        kept = _kept_after_kill(out)
        before = _identity(kept)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="moestream"):
            assert cli_main(args[:3] + [str(out)] + args[4:] + flag) == 0
        assert _hashes(out) == _hashes(reference["convert"])
        if flag:
            assert "resume disabled" in caplog.text and "starting clean" in caplog.text
            assert _identity(kept) != before
        else:
            assert "resuming an interrupted conversion: 4 of 7 shards" in caplog.text
            assert _identity(kept) == before


@pytest.mark.parametrize("change", ["options", "input"])
def test_different_input_or_options_start_clean(hf: Path, tmp_path: Path, caplog, change: str) -> None:
    src = hf
    if change == "input":
        src = tmp_path / "hf"
        shutil.copytree(hf, src)  # copies keep mtimes: same fingerprint until touched
    out = tmp_path / "out"
    _run_killed(src, out, KILL_MID_SHARD, 3)
    kept = _kept_after_kill(out)
    before = _identity(kept)
    dtype = "f16"
    if change == "input":
        st = (src / "model.safetensors").stat()
        os.utime(src / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    else:
        dtype = "bf16"
    with caplog.at_level(logging.INFO, logger="moestream"):
        convert_checkpoint(src, out, dtype=dtype, max_shard_size=SHARD, progress=False)
    assert "different input or with different options; starting clean" in caplog.text
    assert "resuming" not in caplog.text
    assert all(_identity([p])[p.name] != before[p.name] for p in kept if p.exists())
    fresh = tmp_path / "fresh"
    convert_checkpoint(src, fresh, dtype=dtype, max_shard_size=SHARD, progress=False)
    assert _hashes(out) == _hashes(fresh)


def test_corrupted_completed_shard_is_converted_again(hf: Path, reference: dict[str, Path], tmp_path: Path,
                                                      caplog) -> None:
    out = tmp_path / "out"
    _run_killed(hf, out, KILL_MID_SHARD, 3)
    bad = sorted(_kept_after_kill(out))[-1]
    data = bytearray(bad.read_bytes())
    data[-5000] ^= 0xFF  # inside the last tensor's data
    bad.write_bytes(bytes(data))
    with caplog.at_level(logging.INFO, logger="moestream"):
        convert_checkpoint(hf, out, max_shard_size=SHARD, progress=False)
    assert f"{bad.name}: checksum mismatch" in caplog.text and "converting it again" in caplog.text
    assert "resuming an interrupted conversion: 2 of 7 shards" in caplog.text
    assert _hashes(out) == _hashes(reference["convert"])


def test_failure_keeps_completed_shards_for_the_next_run(hf: Path, reference: dict[str, Path], tmp_path: Path,
                                                         monkeypatch, caplog) -> None:
    out = tmp_path / "out"
    real_write = ShardSetWriter.write
    calls = {"n": 0}

    def failing_write(self, name, array):
        calls["n"] += 1
        if calls["n"] == 40:
            raise KeyboardInterrupt  # Ctrl-C
        return real_write(self, name, array)

    monkeypatch.setattr(ShardSetWriter, "write", failing_write)
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(hf, out, max_shard_size=SHARD, progress=False)
    assert not list(out.glob("*" + C.PARTIAL_SUFFIX))  # shard 1 and the shard in progress are removed
    kept = _kept_after_kill(out)
    assert kept and all(p.is_file() for p in kept)
    with pytest.raises(ModelFormatError, match="conversion incomplete.*re-run convert to resume"):
        ShardedModel.open(out)
    monkeypatch.setattr(ShardSetWriter, "write", real_write)
    with caplog.at_level(logging.INFO, logger="moestream"):
        convert_checkpoint(hf, out, max_shard_size=SHARD, progress=False)
    assert f"resuming an interrupted conversion: {len(kept)} of 7 shards" in caplog.text
    assert _hashes(out) == _hashes(reference["convert"])


def test_writer_without_resume_key_leaves_nothing(tmp_path: Path) -> None:
    """A plain ShardSetWriter (no resume key) keeps the old contract: abort removes every file it wrote."""
    import numpy as np
    from gguf import GGMLQuantizationType as T

    from moestream.convert.shard_writer import TensorDecl

    w = ShardSetWriter(tmp_path, {C.KEY_MODEL_TYPE: "x"}, max_shard_size=4096)
    for n in ("a.weight", "b.weight", "c.weight"):
        w.add_dense(TensorDecl(n, (4, 4), T.F32))
    w.begin()
    w.write("a.weight", np.zeros((4, 4), np.float32))
    w.write("b.weight", np.zeros((4, 4), np.float32))  # shard 2 complete: renamed into place
    assert (tmp_path / C.shard_name(C.DEFAULT_STEM, 2, 3)).is_file()
    w.abort()
    assert list(tmp_path.iterdir()) == []
