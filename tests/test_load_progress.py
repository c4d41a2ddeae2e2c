"""Loading progress bars: silent in the Python API by default, a tqdm bar in the CLI on a terminal.

Proves, on a tiny ``qwen3_moe`` as an HF folder and converted to moestream shards:

- ``Engine.load`` without ``progress`` (the API default) writes nothing to stderr;
- ``Engine.load(progress=True)`` draws a bar on stderr that ends at 100 % of the
  stored bytes it read: "loading dense weights" with the dense tensors' stored
  bytes for shards, "loading weights" with every tensor's bytes (computed from
  the safetensors file itself) for HF folders;
- the CLI decides from its stderr: ``moestream run`` with stderr on a terminal
  (a pty) draws the bar, with stderr a pipe/file it does not, and ``--quiet``
  or ``TQDM_DISABLE`` turn it off.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tqdm import tqdm

from moestream.engine import cli
from moestream.engine.api import Engine

from runtime_model import build_runtime_model, subprocess_env

torch.set_num_threads(1)
CTX = 64


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_runtime_model(tmp_path_factory.mktemp("progress") / "hf")


@pytest.fixture(scope="module")
def shard_dir(hf_dir: Path) -> Path:
    from moestream.convert.convert import convert_checkpoint

    out = hf_dir.parent / "shards"
    convert_checkpoint(hf_dir, out, dtype="f16", progress=False)
    return out


def _dense_stored_bytes(shards: Path) -> int:
    from moestream.convert.shard_reader import ShardedModel

    with ShardedModel.open(shards, verify="off") as r:
        return sum(r.dense_record(n).nbytes for n in r.dense_names())


def _safetensors_data_bytes(path: Path) -> int:
    """Tensor bytes of a single-file safetensors: file size minus the 8-byte length and the JSON header."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
    return path.stat().st_size - 8 - header_len


def _final_bar(err: str, desc: str) -> str:
    """The last state the bar with ``desc`` printed (tqdm redraws with \\r)."""
    states = [s for s in err.replace("\r\n", "\r").replace("\n", "\r").split("\r") if s.startswith(desc + ":")]
    assert states, f"no {desc!r} bar in stderr: {err!r}"
    return states[-1]


def _total_text(nbytes: int) -> str:
    """How the bar prints ``nbytes`` (``unit_scale`` with 1024 steps: ``194k``)."""
    return tqdm.format_sizeof(nbytes, divisor=1024)


def test_api_default_prints_nothing(shard_dir: Path, hf_dir: Path, capfd: pytest.CaptureFixture) -> None:
    for model in (shard_dir, hf_dir):
        with Engine.load(str(model), memory="1GB", ctx=CTX):
            pass
        out, err = capfd.readouterr()
        assert err == "" and out == "", (model, err)


def test_api_progress_bar_on_shards(shard_dir: Path, capfd: pytest.CaptureFixture) -> None:
    with Engine.load(str(shard_dir), memory="1GB", ctx=CTX, progress=True) as engine:
        assert engine.generate("Hello", max_tokens=2).stats.generated_tokens >= 1
    err = capfd.readouterr().err
    final = _final_bar(err, "loading dense weights")
    total = _total_text(_dense_stored_bytes(shard_dir))
    assert "100%" in final and f"{total}/{total}" in final, (final, total)
    assert err.count("loading dense weights: 100%") >= 1


def test_api_progress_bar_on_hf_folder(hf_dir: Path, capfd: pytest.CaptureFixture) -> None:
    with Engine.load(str(hf_dir), ctx=CTX, progress=True):
        pass
    final = _final_bar(capfd.readouterr().err, "loading weights")
    total = _total_text(_safetensors_data_bytes(hf_dir / "model.safetensors"))
    assert "100%" in final and f"{total}/{total}" in final, (final, total)


class _TTY:
    def isatty(self) -> bool:
        return True


def test_cli_progress_decision(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setattr(sys, "stderr", _TTY())
    assert cli.show_progress(argparse.Namespace(quiet=False))
    assert not cli.show_progress(argparse.Namespace(quiet=True))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert not cli.show_progress(argparse.Namespace(quiet=False))
    monkeypatch.delenv("TQDM_DISABLE")
    monkeypatch.setattr(sys, "stderr", open(os.devnull, "w"))  # noqa: SIM115 -- a file is not a terminal
    try:
        assert not cli.show_progress(argparse.Namespace(quiet=False))
    finally:
        sys.stderr.close()


def test_cli_run_without_terminal_has_no_bar(shard_dir: Path, capfd: pytest.CaptureFixture,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    rc = cli.main(["run", str(shard_dir), "-p", "Hello", "-n", "2", "--memory", "1GB", "--ctx", str(CTX), "--json"])
    out, err = capfd.readouterr()
    assert rc == 0 and json.loads(out)["stats"]["generated_tokens"] >= 1
    assert "loading dense weights" not in err and "%|" not in err


def _run_with_pty_stderr(argv: list[str]) -> tuple[int, str, str]:
    """Run the CLI with stderr on a pseudo-terminal; returns (exit code, stdout, what the terminal got)."""
    import fcntl
    import pty
    import termios

    env = subprocess_env()
    env.pop("TQDM_DISABLE", None)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a real terminal has a width
    try:
        proc = subprocess.Popen([sys.executable, "-m", "moestream.engine.cli", *argv], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=slave, env=env)
        os.close(slave)
        slave = -1
        chunks = []
        while True:  # read until the child closes the terminal (EIO), so it never blocks on a full pty
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        out = proc.stdout.read().decode()
        proc.stdout.close()
        rc = proc.wait(timeout=300)
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    return rc, out, b"".join(chunks).decode("utf-8", "replace")


def test_cli_run_on_terminal_draws_bar(shard_dir: Path) -> None:
    argv = ["run", str(shard_dir), "-p", "Hello", "-n", "2", "--memory", "1GB", "--ctx", str(CTX), "--json"]
    rc, out, term = _run_with_pty_stderr(argv)
    assert rc == 0, term[-2000:]
    assert json.loads(out)["stats"]["generated_tokens"] >= 1
    final = _final_bar(term, "loading dense weights")
    total = _total_text(_dense_stored_bytes(shard_dir))
    assert "100%" in final and f"{total}/{total}" in final, (final, total)
