"""The budget holds under a kernel memory limit: ``moestream run`` in a memory cgroup (v1) of exactly the budget.

The page cache is dropped first so the child starts cold; the cgroup limit is
the budget given with ``--memory`` (the planner's minimum, so the expert arena
holds only one token's experts and every decode step streams). The child must
finish (not OOM-killed) and the cgroup's max usage must stay within the limit.
Below the minimum the engine must refuse before loading (exit 2, the message
names the minimum). Needs root and cgroup v1's memory controller; skipped
otherwise.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from runtime_model import build_runtime_model, subprocess_env  # noqa: E402

from moestream.bench.cgroup import CGROUP_V1_ROOT as CGROUP_ROOT, cgroup_unavailable_reason  # noqa: E402
CTX = 256


_UNAVAILABLE = cgroup_unavailable_reason(CGROUP_ROOT)
pytestmark = pytest.mark.skipif(_UNAVAILABLE is not None, reason=str(_UNAVAILABLE))


@pytest.fixture(scope="module")
def shard_model(tmp_path_factory):
    from moestream.convert.convert import convert_checkpoint

    root = tmp_path_factory.mktemp("cgroup")
    hf = build_runtime_model(root / "hf")
    convert_checkpoint(hf, root / "shards", dtype="f16", progress=False)
    return root / "shards"


def _minimum(path: Path) -> int:
    from moestream.convert.shard_reader import ShardedModel
    from moestream.engine.planning import min_streaming_budget
    from moestream.engine.streaming import shard_footprint

    with ShardedModel.open(path, verify="off") as r:
        return min_streaming_budget(shard_footprint(r, CTX))


def _drop_page_cache() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("1\n")


def _run_in_cgroup(limit: int, argv: list[str]) -> tuple[subprocess.CompletedProcess, dict]:
    cg = CGROUP_ROOT / f"moestream_test_{uuid.uuid4().hex[:8]}"
    cg.mkdir()
    try:
        (cg / "memory.limit_in_bytes").write_text(str(limit))
        if (cg / "memory.memsw.limit_in_bytes").is_file():
            (cg / "memory.memsw.limit_in_bytes").write_text(str(limit))
        _drop_page_cache()
        cmd = ["sh", "-c", f'echo $$ > "{cg}/cgroup.procs" && exec "$0" "$@"', sys.executable, "-m",
               "moestream.engine.cli", *argv]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=600)
        info = {"max_usage": int((cg / "memory.max_usage_in_bytes").read_text()),
                "limit": int((cg / "memory.limit_in_bytes").read_text()),
                "oom_control": (cg / "memory.oom_control").read_text()}
        return proc, info
    finally:
        cg.rmdir()


def _oom_kills(oom_control: str) -> int:
    for line in oom_control.splitlines():
        name, _, value = line.partition(" ")
        if name == "oom_kill":
            return int(value)
    return 0


def test_run_at_minimum_budget_stays_within_cgroup_limit(shard_model):
    budget = _minimum(shard_model)
    proc, info = _run_in_cgroup(budget, ["run", str(shard_model), "-p", "Memory budgets decide", "-n", "160",
                                         "--memory", str(budget), "--ctx", str(CTX), "--json"])
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert _oom_kills(info["oom_control"]) == 0
    assert info["limit"] <= budget + 4096  # the kernel rounds the limit to whole pages
    assert info["max_usage"] <= info["limit"]
    import json

    out = json.loads(proc.stdout)
    experts = out["engine"]["experts"]
    assert out["engine"]["memory_budget_bytes"] == budget
    assert experts["totals"]["misses"] > 0 and experts["loader"]["bytes_read"] > 0  # it streamed
    assert out["stats"]["generated_tokens"] > 0


def test_below_minimum_refuses_before_loading(shard_model):
    budget = _minimum(shard_model) - 1
    proc, info = _run_in_cgroup(budget + 1, ["run", str(shard_model), "-p", "hi", "-n", "4",
                                             "--memory", str(budget), "--ctx", str(CTX)])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "minimum" in proc.stderr and str(budget + 1) in proc.stderr
    assert "memory plan:" not in proc.stderr and "loaded " not in proc.stderr
    assert _oom_kills(info["oom_control"]) == 0
