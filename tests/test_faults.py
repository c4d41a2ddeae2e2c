"""Fault injection: I/O errors while streaming, vanished or unreadable shards, disk full and SIGKILL in convert.

Proves:

- transient EIO and short reads during expert streaming are retried and the
  answer is the same as without faults; persistent EIO ends the request with
  ``ExpertReadError`` naming the file (no hang) and the engine serves the next
  request once the disk is healthy again;
- a shard deleted while the engine runs: generation goes on from the open file
  descriptors (POSIX keeps unlinked files readable), and a model folder
  deleted before loading is a one-line ``ModelFormatError``;
- permission denied: opening an unreadable shard is a ``ModelFormatError``
  (checked in a child process without root's override); EACCES while
  streaming is not retried and is an ``ExpertReadError``;
- disk full during conversion (a 96 KiB tmpfs): ``moestream convert`` exits 2
  with a one-line error, leaves no file that loads as complete and no
  ``.partial`` file; re-running with space converts cleanly;
- SIGKILL of a conversion mid-write and mid-rename: nothing loads as
  complete (the reader says "conversion incomplete"), and re-running the same
  command (no ``--force``) resumes or starts clean and produces a verified
  model (byte-identity of resumed conversions: tests/test_convert_resume.py).
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from runtime_model import build_runtime_model, subprocess_env  # noqa: E402

from moestream.convert import constants as C  # noqa: E402
from moestream.convert.convert import convert_checkpoint  # noqa: E402
from moestream.convert.errors import ModelFormatError  # noqa: E402
from moestream.convert.shard_reader import ShardedModel  # noqa: E402
from moestream.engine.api import Engine  # noqa: E402
from moestream.engine.planning import min_streaming_budget  # noqa: E402
from moestream.engine.streaming import shard_footprint  # noqa: E402
from moestream.scheduler.loader import ExpertReadError  # noqa: E402

torch.set_num_threads(1)
CTX = 64
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> Path:
    return build_runtime_model(tmp_path_factory.mktemp("faults") / "hf")


@pytest.fixture(scope="module")
def shards(hf: Path) -> Path:
    out = hf.parent / "shards"
    convert_checkpoint(hf, out, dtype="f32", progress=False)
    return out


def min_budget(path: Path) -> int:
    with ShardedModel.open(path, verify="off") as r:
        return min_streaming_budget(shard_footprint(r, CTX))


def load(path: Path) -> Engine:
    """An engine at the minimum budget: every token streams experts through the arena."""
    return Engine.load(str(path), memory=min_budget(path), ctx=CTX)


@pytest.fixture(scope="module")
def reference(shards: Path) -> list[int]:
    with load(shards) as eng:
        return eng.generate(PROMPT, max_tokens=8, temperature=0).token_ids


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


class FlakyReader:
    """``os.preadv`` that fails with ``error`` (or reads short) on selected calls."""

    def __init__(self, fail_calls: set[int] | None = None, error: int = errno.EIO, short_calls: set[int] = frozenset(),
                 always: bool = False) -> None:
        self.fail_calls, self.error, self.short_calls, self.always = fail_calls or set(), error, short_calls, always
        self.calls = 0

    def __call__(self, fd: int, view: memoryview, offset: int) -> int:
        self.calls += 1
        if self.always or self.calls in self.fail_calls:
            raise OSError(self.error, os.strerror(self.error))
        if self.calls in self.short_calls:
            return os.preadv(fd, [view[:max(1, len(view) // 3)]], offset)
        return os.preadv(fd, [view], offset)


def _loader(engine: Engine):
    return engine.model.expert_provider.loader


# ------------------------------------------------------------------------------------ streaming reads
def test_transient_eio_and_short_reads_are_retried(shards: Path, reference: list[int]) -> None:
    with load(shards) as eng:
        loader = _loader(eng)
        faults = {1, 4, 9, 10}, {2, 6, 15}
        loader.reader = FlakyReader(fail_calls=faults[0], short_calls=faults[1])
        # more attempts than injected faults: no read can run out of retries, however the I/O threads interleave
        loader.retries = sum(map(len, faults))
        loader.retry_delay_s = 0.0
        got = eng.generate(PROMPT, max_tokens=8, temperature=0).token_ids
        assert got == reference
        assert loader.stats.retries >= 4 and loader.stats.failures == 0
        assert eng.stats()["experts"]["totals"]["misses"] > 0


def test_persistent_eio_is_a_clear_error_then_recovers(shards: Path, reference: list[int]) -> None:
    with load(shards) as eng:
        loader = _loader(eng)
        loader.retry_delay_s = 0.0
        loader.reader = FlakyReader(always=True)
        with pytest.raises(ExpertReadError) as info:
            eng.generate(PROMPT, max_tokens=8, temperature=0)
        msg = str(info.value)
        assert info.value.errno == errno.EIO and f"failed {loader.retries + 1} times" in msg
        assert str(shards) in msg and "check the disk" in msg
        assert not eng.busy and loader.stats.failures >= 1
        # reads still in flight from the failing request (prefetches on other I/O threads) finish failing
        # first; a request that waits on one of them gets its error. Then the disk is healthy again.
        eng.model.expert_provider.cache.wait_idle(timeout=30)
        loader.reader = FlakyReader()
        assert eng.generate(PROMPT, max_tokens=8, temperature=0).token_ids == reference


def test_permission_denied_while_streaming_is_not_retried(shards: Path) -> None:
    with load(shards) as eng:
        loader = _loader(eng)
        loader.reader = FlakyReader(always=True, error=errno.EACCES)
        with pytest.raises(ExpertReadError) as info:
            eng.generate(PROMPT, max_tokens=4, temperature=0)
        assert info.value.errno == errno.EACCES and "readable" in str(info.value)
        assert loader.stats.retries == 0


def test_shard_deleted_while_running(shards: Path, reference: list[int], tmp_path: Path) -> None:
    model = copy_model(shards, tmp_path / "m")
    with load(model) as eng:
        first = eng.generate(PROMPT, max_tokens=8, temperature=0).token_ids
        for p in model.glob("*.gguf"):
            p.unlink()
        # Every later expert read comes from descriptors opened while the file existed.
        again = eng.generate(PROMPT, max_tokens=8, temperature=0).token_ids
    assert first == reference and again == reference
    with pytest.raises(ModelFormatError, match="holds neither|run `moestream convert` first"):
        Engine.load(str(model), memory="1GB", ctx=CTX)


def test_shard_deleted_before_first_read(shards: Path, tmp_path: Path) -> None:
    model = copy_model(shards, tmp_path / "m")
    with load(model) as eng:
        for p in model.glob("*.gguf"):
            p.unlink()
        try:
            out = eng.generate(PROMPT, max_tokens=4, temperature=0)
        except ExpertReadError as exc:  # the loader had not opened the file yet: a clear error
            assert str(model) in str(exc) and "exist" in str(exc)
        else:  # the descriptors were opened at load time: it keeps working
            assert len(out.token_ids) == 4
        assert not eng.busy


def test_unreadable_shard_is_a_format_error(shards: Path) -> None:
    # root ignores file modes: check in a child that drops to nobody first.
    folder = Path(tempfile.mkdtemp(prefix="moestream-perm-"))
    try:
        os.chmod(folder, 0o755)
        model = copy_model(shards, folder / "m")
        os.chmod(model, 0o755)
        for p in model.glob("*.gguf"):
            os.chmod(p, 0o000)
        code = textwrap.dedent(f"""
            import os, sys
            from moestream.convert.errors import ModelFormatError
            from moestream.convert.shard_reader import ShardedModel
            if os.geteuid() == 0:  # imports first: root's Python install is not readable by nobody
                os.setgid(65534); os.setuid(65534)
            try:
                ShardedModel.open({str(model)!r})
            except ModelFormatError as exc:
                print("MFE", exc)
                sys.exit(0)
            sys.exit(3)
        """)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(),
                           timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "MFE" in r.stdout and "Permission denied" in r.stdout and "model-00001-of-00001.gguf" in r.stdout
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------------------------ conversion
def _complete_or_refused(out: Path) -> bool:
    """True when ``out`` loads as a complete, verified model; False when the reader refuses it."""
    try:
        with ShardedModel.open(out, verify="always") as m:
            for name in m.dense_names():
                m.read_dense(name)
            for layer, e in m.expert_keys():
                m.read_expert(layer, e)
        return True
    except ModelFormatError as exc:
        assert "re-run convert" in str(exc) or "run `moestream convert`" in str(exc), str(exc)
        return False


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moestream.engine.cli", *args], capture_output=True, text=True,
                          env=subprocess_env(), timeout=timeout)


def _run_killed(hf: Path, out: Path, patch: str) -> subprocess.CompletedProcess:
    """Run the converter in a child that SIGKILLs itself where ``patch`` says."""
    code = textwrap.dedent("""
        import os, signal, sys
        from moestream.convert import shard_writer
        from moestream.convert.convert import convert_checkpoint
        calls = {"n": 0}
    """) + textwrap.dedent(patch) + textwrap.dedent(f"""
        convert_checkpoint({str(hf)!r}, {str(out)!r}, dtype="f16", max_shard_size=60_000, progress=False)
        sys.exit(0)
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(),
                          timeout=300)


KILL_MID_WRITE = """
    real = shard_writer.ShardSetWriter.write
    def write(self, name, array):
        calls["n"] += 1
        if calls["n"] == 25:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, name, array)
    shard_writer.ShardSetWriter.write = write
"""
KILL_MID_RENAME = """
    real = os.replace
    def replace(src, dst):
        real(src, dst)
        if str(dst).endswith(".gguf"):  # shard renames (not the resume record's)
            calls["n"] += 1
            if calls["n"] == 1:  # one shard renamed into place, shard 1 (renamed last) not
                os.kill(os.getpid(), signal.SIGKILL)
    shard_writer.os.replace = replace
"""


@pytest.mark.parametrize("where", ["mid_write", "mid_rename"])
def test_sigkill_during_conversion_then_rerun(hf: Path, tmp_path: Path, where: str) -> None:
    out = tmp_path / "out"
    r = _run_killed(hf, out, KILL_MID_WRITE if where == "mid_write" else KILL_MID_RENAME)
    assert r.returncode == -signal.SIGKILL, r.stderr
    left = sorted(p.name for p in out.iterdir())
    assert any(n.endswith(C.PARTIAL_SUFFIX) for n in left), left
    assert not _complete_or_refused(out)
    # re-running the same command (no --force) resumes from what the killed run completed
    r = _cli("convert", str(hf), str(out), "--dtype", "f16", "--max-shard-size", "60000", "--quiet")
    assert r.returncode == 0, r.stderr
    assert not list(out.glob("*" + C.PARTIAL_SUFFIX))
    assert _complete_or_refused(out)


def test_sigkill_of_cli_conversion_at_a_random_moment(hf: Path, tmp_path: Path) -> None:
    """A real `moestream convert` killed as soon as it has started writing: never a half model."""
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "moestream.engine.cli", "convert", str(hf), str(out), "--dtype",
                          "f32", "--max-shard-size", "60000", "--quiet"], env=subprocess_env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(20_000):  # bounded: about 100 s
            if p.poll() is not None or (out.is_dir() and any(out.iterdir())):
                break
            try:
                p.wait(timeout=0.005)
            except subprocess.TimeoutExpired:
                pass
        p.send_signal(signal.SIGKILL)
    finally:
        p.wait(timeout=60)
    if out.is_dir() and any(out.iterdir()):
        _complete_or_refused(out)  # either complete and verified, or refused as incomplete
    r = _cli("convert", str(hf), str(out), "--dtype", "f32", "--max-shard-size", "60000", "--quiet", "--force")
    assert r.returncode == 0, r.stderr
    assert _complete_or_refused(out)


@pytest.fixture()
def small_tmpfs():
    if os.geteuid() != 0 or not sys.platform.startswith("linux"):
        pytest.skip("mounting a tmpfs needs root on Linux")
    mnt = Path(tempfile.mkdtemp(prefix="moestream-full-"))
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        mnt.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        mnt.rmdir()


def test_disk_full_during_conversion(hf: Path, small_tmpfs: Path) -> None:
    out = small_tmpfs / "out"
    r = _cli("convert", str(hf), str(out), "--dtype", "f32", "--quiet")
    assert r.returncode == 2, r.stdout + r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "space" in err[0], r.stderr
    assert not list(out.glob("*" + C.PARTIAL_SUFFIX)), "partial files left behind on a full disk"
    if any(out.glob("*.gguf")):
        assert not _complete_or_refused(out)
    else:
        with pytest.raises(ModelFormatError):
            ShardedModel.open(out)
    # with room again the same command succeeds
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_tmpfs)], check=True, capture_output=True)
    r = _cli("convert", str(hf), str(out), "--dtype", "f32", "--quiet")
    assert r.returncode == 0, r.stderr
    assert _complete_or_refused(out)
