"""Conversion memory does not grow with the model: ``convert`` inside a cgroup limit below the model's size.

A ~450 MB synthetic qwen3_moe checkpoint (bf16, written tensor by tensor into
tmp_path) is converted by the CLI (``python -m moestream.convert.commands``)
as a child in a cgroup v1 memory group (no swap: anonymous memory above the
limit is an OOM kill) limited to the interpreter's own baseline (measured
first, the same imports in the same kind of group) plus 256 MB — less than
the checkpoint. It must finish (no OOM kill), its peak usage
(``memory.max_usage_in_bytes``, page cache included) must stay ≤ the limit,
the sampled anonymous memory may exceed the baseline's by far less than the
model, and the result must load. Needs root and cgroup v1's memory
controller; skipped otherwise. The full-size run (7.5 GB under 2 GB) is
``bench/convert_under_cgroup.py`` (results in ``bench/results/convert_large.md``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from runtime_model import subprocess_env  # noqa: E402

from moestream.bench.cgroup import cgroup_unavailable_reason, run_limited  # noqa: E402

_UNAVAILABLE = cgroup_unavailable_reason()
pytestmark = pytest.mark.skipif(_UNAVAILABLE is not None, reason=str(_UNAVAILABLE))

HEADROOM = 256 * 2**20  # what the limit allows beyond the interpreter's baseline
BASELINE_CODE = "import torch, moestream.convert.commands, moestream.convert.convert, moestream.convert.compress"


def test_convert_larger_than_the_limit(tmp_path: Path) -> None:
    from moestream.bench.synthetic import SyntheticSpec, write_hf_folder
    from moestream.convert.shard_reader import ShardedModel

    spec = SyntheticSpec(layers=2, hidden=1024, experts=64, expert_inter=512, heads=8, kv_heads=2, head_dim=128)
    hf = write_hf_folder(tmp_path / "hf", spec, progress=False)
    model_bytes = (hf / "model.safetensors").stat().st_size
    assert model_bytes > HEADROOM + 128 * 2**20

    env = subprocess_env()
    base = run_limited([sys.executable, "-c", BASELINE_CODE], None, env=env, timeout_s=300, sample_stats=True)
    assert base.status == "ok", base.stderr
    limit = base.cgroup_max_usage_bytes + HEADROOM
    assert limit < model_bytes + base.cgroup_max_usage_bytes

    out = tmp_path / "out"
    argv = [sys.executable, "-m", "moestream.convert.commands", "-q", "convert", str(hf), str(out),
            "--max-shard-size", "200MB"]
    run = run_limited(argv, limit, env=env, timeout_s=600, sample_stats=True)
    report = (f"model {model_bytes / 2**20:.0f} MiB, limit {limit / 2**20:.0f} MiB (baseline "
              f"{base.cgroup_max_usage_bytes / 2**20:.0f} + {HEADROOM / 2**20:.0f}), peak "
              f"{(run.cgroup_max_usage_bytes or 0) / 2**20:.0f} MiB, failcnt {run.cgroup_failcnt}, "
              f"memory.stat peaks {run.cgroup_stat_peaks}, baseline {base.cgroup_stat_peaks}, {run.wall_s:.1f} s")
    print(report)
    assert run.status == "ok" and run.returncode == 0, report + run.stderr
    assert run.cgroup_oom_kills == 0, report
    assert run.cgroup_max_usage_bytes <= run.limit_bytes, report
    # streaming: anonymous memory beyond the interpreter's is a few tensors, not the model
    assert run.cgroup_stat_peaks["rss"] - base.cgroup_stat_peaks["rss"] < model_bytes // 3, report
    with ShardedModel.open(out, verify="always") as m:
        assert len(m.expert_keys()) == spec.layers * spec.experts
        m.read_expert(*m.expert_keys()[-1])
