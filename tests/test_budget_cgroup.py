"""The budget holds under a kernel memory limit: ``moestream run`` in a memory cgroup (v1) of exactly the budget.

The page cache is dropped first so the child starts cold; the cgroup limit is
the budget given with ``--memory`` (the planner's minimum, so the expert arena
holds only one token's experts and every decode step streams). The child must
finish (not OOM-killed) and the cgroup's max usage must stay within the limit.
Below the minimum the engine must refuse before loading (exit 2, the message
names the minimum).

Long generations with varied prompts: ONE process (the Python API) under a
cgroup limit equal to ``memory=`` serves 20 requests on the embedded default
model converted to shards, at its minimum budget: prompts of 40 to 570
characters from the four held-out domains (fortunes, kernel, perl, python),
greedy and sampled, whole and streamed, about 1,800 prompt and 500 generated
tokens in all. It must exit 0 with no OOM kill, its own peak RSS and the
cgroup's peak usage must stay within the limit, and the stats must add up
(every request counted, experts streamed: misses and bytes read > 0, every
read one expert slot, no failed read).

Needs root and cgroup v1's memory controller; skipped otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from runtime_model import build_runtime_model, subprocess_env  # noqa: E402

from moestream.bench.cgroup import CGROUP_V1_ROOT as CGROUP_ROOT, cgroup_unavailable_reason, run_limited  # noqa: E402
CTX = 256
N_REQUESTS = 20


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


# ------------------------------------------------------------------------------------------- long, varied
#: What the child process runs: ONE Engine (Python API) serving every request, then one JSON line of results.
SERVE_MANY = """
import json, sys
import torch
torch.set_num_threads(1)
from moestream.engine.api import Engine

spec = json.load(open(sys.argv[1]))
done = []
with Engine.load(spec["model"], memory=spec["memory"], ctx=spec["ctx"], device="cpu") as engine:
    for req in spec["requests"]:
        kw = {"max_tokens": req["max_tokens"], "temperature": req["temperature"], "seed": req["seed"],
              "top_p": 0.95 if req["temperature"] else 1.0}
        if req["stream"]:
            with engine.generate(req["prompt"], stream=True, **kw) as chunks:
                n = sum(len(c.token_ids) for c in chunks)
            stats = chunks.stats
        else:
            result = engine.generate(req["prompt"], **kw)
            n, stats = len(result.token_ids), result.stats
        done.append({"tokens": n, "generated": stats.generated_tokens, "prompt_tokens": stats.prompt_tokens})
    print(json.dumps({"requests": done, "engine": engine.stats()}))
"""


@pytest.fixture(scope="module")
def default_shards(tmp_path_factory):
    from moestream.convert.convert import convert_checkpoint
    from moestream.engine.api import DEFAULT_MODEL_DIR

    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        pytest.skip("the embedded default model is not in this install")
    out = tmp_path_factory.mktemp("cgroup_default") / "shards"
    convert_checkpoint(DEFAULT_MODEL_DIR, out, dtype="f16", progress=False)
    return out


def _varied_requests() -> list[dict]:
    """20 prompts: 5 per held-out domain, 40 to 570 characters, each starting at a line; mixed sampling."""
    from moestream.engine.api import DEFAULT_MODEL_DIR

    files = sorted((DEFAULT_MODEL_DIR / "heldout").glob("*.txt"))
    assert len(files) >= 4, files
    requests = []
    for i in range(N_REQUESTS):
        text = files[i % len(files)].read_text(encoding="utf-8")
        n_chars = 40 + (i * 97) % 560
        start = text.find("\n", (i * 102_947) % (len(text) - 2 * n_chars)) + 1
        requests.append({"prompt": text[start:start + n_chars], "max_tokens": 16 + (i * 11) % 33,
                         "temperature": 0.0 if i % 2 == 0 else 0.8, "seed": i, "stream": i % 3 == 1})
    return requests


def test_many_varied_generations_in_one_process_stay_within_cgroup_limit(default_shards, tmp_path):
    budget = _minimum(default_shards)
    requests = _varied_requests()
    assert len({r["prompt"] for r in requests}) == N_REQUESTS
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"model": str(default_shards), "memory": budget, "ctx": CTX, "requests": requests}))
    script = tmp_path / "serve_many.py"
    script.write_text(SERVE_MANY)
    run = run_limited([sys.executable, str(script), str(spec)], budget, env=subprocess_env(), timeout_s=600)
    facts = {k: v for k, v in run.as_dict().items() if k != "stdout"}
    assert run.cgroup == "v1", facts
    assert run.status == "ok" and run.returncode == 0, facts  # not OOM-killed (that is SIGKILL, status "oom")
    assert run.cgroup_oom_kills == 0, facts
    assert run.limit_bytes <= budget and budget - run.limit_bytes < 4096, facts  # the kernel rounds to pages
    assert run.cgroup_max_usage_bytes <= run.limit_bytes, facts
    assert run.child_maxrss_bytes <= run.limit_bytes, facts  # the process itself, page cache aside

    out = json.loads(run.stdout.strip().splitlines()[-1])
    done, eng = out["requests"], out["engine"]
    assert len(done) == N_REQUESTS
    for req, got in zip(requests, done):
        assert 0 < got["tokens"] == got["generated"] <= req["max_tokens"], (req, got)
    assert sum(d["prompt_tokens"] for d in done) >= 1000 and sum(d["tokens"] for d in done) >= 300
    assert len({d["prompt_tokens"] for d in done}) >= 10  # the prompts really differ in length
    assert eng["requests"] == N_REQUESTS and eng["generated_tokens_total"] == sum(d["tokens"] for d in done)
    assert eng["memory_budget_bytes"] == budget and eng["peak_rss_bytes"] <= budget and not eng["busy"]
    ex = eng["experts"]
    loader, totals = ex["loader"], ex["totals"]
    assert totals["misses"] > 0 and loader["bytes_read"] > 0  # it streamed
    assert loader["failures"] == 0 and loader["bytes_read"] == loader["reads"] * ex["arena"]["slot_bytes"][0]
    assert loader["reads"] <= totals["misses"] + totals["prefetch_issued"]
    assert totals["prefetch_used"] + totals["prefetch_wasted"] <= totals["prefetch_issued"]
    assert totals["hit_rate"] == pytest.approx(totals["hits"] / (totals["hits"] + totals["misses"]))
    assert ex["arena_slots"] < ex["experts_total"], "the minimum budget must force streaming"
