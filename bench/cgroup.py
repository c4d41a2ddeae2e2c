"""Run one benchmark arm as a child process inside a kernel memory limit (cgroup v1).

Owns :func:`cgroup_unavailable_reason` (why a limit cannot be enforced here, or
None), :class:`MemoryCgroup` (create a ``/sys/fs/cgroup/memory/<name>`` group,
set ``memory.limit_in_bytes`` (and ``memsw`` when present), read
``max_usage_in_bytes``, ``failcnt``, the OOM-kill count and ``memory.stat``, tear down: wait
for its tasks to leave, ``force_empty`` so its page cache is not re-charged to
the parent — the cgroup v1 trap of bench-protocol.md — then ``rmdir``),
:func:`drop_page_cache` and :func:`run_limited`, which runs a command in a fresh
group and returns a :class:`LimitedRun` whatever happens (exit, OOM kill,
timeout), optionally sampling ``memory.stat`` while it runs (peak anonymous
memory, page cache, mapped files, dirty and writeback pages: what the peak
usage consists of). Where cgroups cannot be used (not root, no v1 memory controller,
macOS) the command still runs and the record says ``cgroup: "unavailable"``
with the reason; peak RSS then comes from the child's own rusage only.

Knows nothing about what the child runs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

CGROUP_V1_ROOT = Path("/sys/fs/cgroup/memory")
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
PREFIX = "moestream_bench_"
#: ``memory.stat`` fields whose peaks :func:`run_limited` records when sampling.
STAT_FIELDS = ("rss", "cache", "mapped_file", "dirty", "writeback")


def cgroup_unavailable_reason(root: Path = CGROUP_V1_ROOT) -> str | None:
    """Why a v1 memory cgroup cannot be created here, or None when it can.

    Args:
        root: the v1 memory controller mount.

    Returns:
        A human-readable reason, or None.
    """
    if not hasattr(os, "geteuid"):
        return "no POSIX user ids on this system (cgroups are Linux only)"
    if os.geteuid() != 0:
        return "needs root to create memory cgroups"
    if not (root / "memory.limit_in_bytes").is_file():
        return f"cgroup v1 memory controller not mounted at {root}"
    probe = root / f"{PREFIX}probe_{uuid.uuid4().hex[:8]}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        return f"cannot create a memory cgroup under {root}: {exc}"
    return None


def parse_oom_control(text: str) -> dict[str, int]:
    """``memory.oom_control`` (lines ``name value``) as a dict of ints."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.strip().partition(" ")
        if name and value.strip().lstrip("-").isdigit():
            out[name] = int(value)
    return out


def drop_page_cache() -> str | None:
    """``sync`` then drop the page cache (needs root).

    Returns:
        None when dropped, else the reason it could not be done.
    """
    try:
        os.sync()
        DROP_CACHES.write_text("1\n")
        return None
    except OSError as exc:
        return f"could not drop the page cache: {exc}"


class MemoryCgroup:
    """One v1 memory cgroup with a hard limit; use as a context manager.

    Args:
        limit_bytes: ``memory.limit_in_bytes`` (the kernel rounds it down to whole pages).
        root: the v1 memory controller mount.
        name: directory name (default: a unique ``moestream_bench_...``).

    Raises:
        OSError: the group cannot be created or limited (check :func:`cgroup_unavailable_reason` first).
    """

    def __init__(self, limit_bytes: int, root: Path = CGROUP_V1_ROOT, name: str | None = None) -> None:
        self.path = root / (name or f"{PREFIX}{uuid.uuid4().hex[:10]}")
        self.requested_limit = int(limit_bytes)
        self.path.mkdir()
        try:
            (self.path / "memory.limit_in_bytes").write_text(str(self.requested_limit))
            memsw = self.path / "memory.memsw.limit_in_bytes"
            if memsw.is_file():
                memsw.write_text(str(self.requested_limit))
        except OSError:
            self.path.rmdir()
            raise

    def _read(self, name: str) -> str:
        return (self.path / name).read_text()

    def add(self, pid: int) -> None:
        """Move ``pid`` into the group."""
        (self.path / "cgroup.procs").write_text(str(pid))

    def stats(self) -> dict[str, int]:
        """``limit_bytes``, ``max_usage_bytes``, ``usage_bytes``, ``failcnt``, ``oom_kill`` and ``under_oom``."""
        oom = parse_oom_control(self._read("memory.oom_control"))
        return {"limit_bytes": int(self._read("memory.limit_in_bytes")),
                "max_usage_bytes": int(self._read("memory.max_usage_in_bytes")),
                "usage_bytes": int(self._read("memory.usage_in_bytes")),
                "failcnt": int(self._read("memory.failcnt")),
                "oom_kill": oom.get("oom_kill", 0), "under_oom": oom.get("under_oom", 0)}

    def memory_stat(self) -> dict[str, int]:
        """``memory.stat`` (this group's own counters, bytes) as a dict."""
        out = {}
        for line in self._read("memory.stat").splitlines():
            name, _, value = line.partition(" ")
            if value.strip().isdigit():
                out[name] = int(value)
        return out

    def tasks(self) -> list[int]:
        """Pids still in the group."""
        return [int(x) for x in self._read("cgroup.procs").split()]

    def close(self, timeout_s: float = 10.0) -> None:
        """Kill what is left, reclaim the group's page cache (``force_empty``) and remove it."""
        if not self.path.exists():
            return
        deadline = time.monotonic() + timeout_s
        while self.tasks() and time.monotonic() < deadline:
            for pid in self.tasks():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
        try:
            (self.path / "memory.force_empty").write_text("0")
        except OSError:
            pass  # best effort: the page cache is dropped before every cold run anyway
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)
        self.path.rmdir()

    def __enter__(self) -> "MemoryCgroup":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class LimitedRun:
    """What one child run produced, including how it ended.

    ``status``: ``ok`` (exit 0), ``oom`` (killed by the kernel's OOM killer in
    its group, or SIGKILL under the limit), ``error`` (non-zero exit),
    ``timeout``. ``cgroup`` is ``"v1"`` or ``"unavailable"`` (then
    ``cgroup_reason`` says why and the ``cgroup_*`` numbers are None).
    """

    argv: list[str]
    status: str
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float
    child_maxrss_bytes: int | None
    cgroup: str
    cgroup_reason: str | None = None
    limit_bytes: int | None = None
    cgroup_max_usage_bytes: int | None = None
    cgroup_failcnt: int | None = None
    cgroup_oom_kills: int | None = None
    page_cache_dropped: bool | None = None
    notes: list[str] = field(default_factory=list)
    cgroup_stat_peaks: dict[str, int] | None = None  # peak of each STAT_FIELDS entry (bytes), when sampled

    def as_dict(self, keep_output: bool = False) -> dict:
        """JSON-ready; stdout/stderr only as their last 2000 characters unless ``keep_output``."""
        d = asdict(self)
        if not keep_output:
            d["stdout"] = self.stdout[-2000:]
            d["stderr"] = self.stderr[-2000:]
        return d


def _wait(pid: int, timeout_s: float,
          tick: Callable[[], None] | None = None) -> tuple[int | None, object | None, bool]:
    """``os.wait4`` with a deadline: ``(wait status, rusage, timed_out)``; kills the group on timeout.

    ``tick`` is called about every 20 ms while the child runs (sampling).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        got, status, ru = os.wait4(pid, os.WNOHANG)
        if got == pid:
            return status, ru, False
        if tick is not None:
            tick()
        if time.monotonic() > deadline:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _, status, ru = os.wait4(pid, 0)
            return status, ru, True
        time.sleep(0.02)


def run_limited(argv: Sequence[str], limit_bytes: int | None, *, env: Mapping[str, str] | None = None,
                timeout_s: float = 1800.0, drop_caches: bool = True, cwd: str | None = None,
                sample_stats: bool = False) -> LimitedRun:
    """Run ``argv`` in a fresh memory cgroup limited to ``limit_bytes`` and report how it went.

    Args:
        argv: the command.
        limit_bytes: the hard limit (None: no limit, still measured in a group when available).
        env: environment for the child.
        timeout_s: kill the child (its whole process group) after this long.
        drop_caches: drop the page cache first (a cold run).
        cwd: working directory.
        sample_stats: record the peaks of :data:`STAT_FIELDS` of ``memory.stat`` while the child runs.

    Returns:
        A :class:`LimitedRun` (never raises for the child's own failures).
    """
    reason = cgroup_unavailable_reason()
    notes: list[str] = []
    dropped = None
    if drop_caches:
        why = drop_page_cache()
        dropped = why is None
        if why:
            notes.append(why)
    group = None
    if reason is None:
        group = MemoryCgroup(limit_bytes if limit_bytes is not None else 2**62)
    out_f = tempfile.TemporaryFile(mode="w+b")
    err_f = tempfile.TemporaryFile(mode="w+b")
    try:
        cg_procs = str(group.path / "cgroup.procs") if group else None

        def enter_group() -> None:  # runs in the child between fork and exec
            if cg_procs:
                with open(cg_procs, "w") as f:
                    f.write(str(os.getpid()))

        peaks: dict[str, int] = {}

        def sample() -> None:
            assert group is not None
            try:
                stat = group.memory_stat()
            except OSError:
                return
            for name in STAT_FIELDS:
                peaks[name] = max(peaks.get(name, 0), stat.get(name, 0))

        t0 = time.perf_counter()
        proc = subprocess.Popen(list(argv), stdout=out_f, stderr=err_f, stdin=subprocess.DEVNULL,
                                env=dict(env) if env is not None else None, cwd=cwd, start_new_session=True,
                                preexec_fn=enter_group)
        status, ru, timed_out = _wait(proc.pid, timeout_s, sample if sample_stats and group else None)
        wall = time.perf_counter() - t0
        rc = os.waitstatus_to_exitcode(status) if status is not None else None
        proc.returncode = rc  # already reaped by wait4
        cg = group.stats() if group else {}
        out_f.seek(0)
        err_f.seek(0)
        stdout = out_f.read().decode("utf-8", "replace")
        stderr = err_f.read().decode("utf-8", "replace")
    finally:
        out_f.close()
        err_f.close()
        if group is not None:
            group.close()
    oom_kills = cg.get("oom_kill") if cg else None
    if timed_out:
        state = "timeout"
    elif rc == 0:
        state = "ok"
    elif (oom_kills or 0) > 0 or (rc == -signal.SIGKILL and group is not None):
        state = "oom"
    else:
        state = "error"
    maxrss = int(ru.ru_maxrss) * 1024 if ru is not None else None  # Linux reports KiB
    return LimitedRun(argv=list(argv), status=state, returncode=rc, stdout=stdout, stderr=stderr, wall_s=wall,
                      child_maxrss_bytes=maxrss, cgroup="v1" if group else "unavailable", cgroup_reason=reason,
                      limit_bytes=cg.get("limit_bytes") if cg else None,
                      cgroup_max_usage_bytes=cg.get("max_usage_bytes") if cg else None,
                      cgroup_failcnt=cg.get("failcnt") if cg else None, cgroup_oom_kills=oom_kills,
                      page_cache_dropped=dropped, notes=notes,
                      cgroup_stat_peaks=dict(peaks) if sample_stats and group else None)
