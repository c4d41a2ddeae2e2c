"""The memory-budget benchmark: every arm a child process in its own kernel memory limit.

Owns the suite logic of ../shared/specs/bench-protocol.md:

- :class:`Arm` (one engine + model + options) and :func:`arm_argv` (the child
  command: ``bench/run_arm.py`` for moestream, ``bench/llama_runner.py`` for
  llama.cpp through llama-cpp-python);
- :func:`budget_limits`: budgets as fractions of the reference model's file
  bytes plus the runtime overhead moestream reports for itself
  (``moestream doctor --json``: dense weights at fp32, KV, workspace, I/O
  staging, interpreter reserve); every arm of a row gets the SAME limit;
- :func:`run_suite`: repetitions x budgets, arms interleaved A B, B A (each
  run cold: page cache dropped, fresh cgroup), each child running a cold pass
  then a warm pass (same tokens, KV cache reset, caches kept); OOM kills,
  refusals, errors and timeouts are recorded as results;
- :func:`make_records`: one flat record per arm x repetition x pass
  (:data:`RECORD_FIELDS`), with the physical limits measured in the same run
  (:func:`odirect_read_bandwidth` of the model's disk; achieved miss-path
  bandwidth = bytes read while decoding / decode time) and the machine
  (:func:`machine_info`: git commit, CPU, cores, RAM, versions, load average).

Rendering (Markdown table, PNG plots) is in ``bench/report.py``. Imports no
engine internals: children are driven through their command lines and a
``BENCH_RESULT {json}`` line; ``tokenizers`` (not the engine) turns the text
into ids once so both engines see the same ids.
"""

from __future__ import annotations

import datetime as _dt
import json
import mmap
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence

from moestream.bench.arm_common import parse_result
from moestream.bench.cgroup import drop_page_cache, run_limited

REPO = Path(__file__).resolve().parent.parent
SCHEMA = "moestream.bench.record/1"
#: Fields every record has (None where an engine cannot report it).
RECORD_FIELDS = (
    "schema", "suite", "model", "arm", "engine", "format", "cache_policy", "precision_policy", "budget_label",
    "budget_fraction", "limit_bytes", "rep", "order", "pass", "status", "error", "mode", "threads",
    "prompt_tokens", "decode_steps", "load_s", "prefill_tok_s", "ttft_s", "decode_tok_s", "decode_tok_s_steady",
    "cgroup_peak_bytes", "cgroup_failcnt", "oom_kills", "peak_rss_bytes", "hit_rate", "decode_hit_rate",
    "bytes_read_per_token", "disk_read_bytes_per_token", "miss_path_bandwidth_bytes_per_s", "stall_s",
    "decode_stall_s_per_token", "arena_slots", "experts_total", "page_cache_dropped", "cgroup", "wall_s",
    "loadavg", "started_utc",
)


@dataclass(frozen=True)
class Arm:
    """One contestant.

    Attributes:
        name: label in tables (e.g. ``moestream-bf16-lru``).
        engine: ``moestream`` or ``llamacpp``.
        model: model path (moestream shard folder / ``default``; llama.cpp ``.gguf``).
        fmt: storage description (``bf16``, ``Q8_0``, ...).
        cache_policy: moestream expert cache policy.
        precision_policy: moestream precision policy.
        memory_flag: pass the cgroup limit as ``--memory`` (moestream plans within it).
        memory_override: ``--memory`` bytes to pass whatever the limit (e.g. "every expert fits" for
            resident runs without a kernel limit).
        extra: more child arguments (e.g. ``--profile-dir DIR``).
    """

    name: str
    engine: str
    model: str
    fmt: str
    cache_policy: str | None = None
    precision_policy: str | None = None
    memory_flag: bool = True
    memory_override: int | None = None
    extra: tuple[str, ...] = ()


@dataclass
class SuiteConfig:
    """One benchmark suite (one model, several arms, several budgets)."""

    name: str
    arms: list[Arm]
    budgets: list[tuple[str, float | None]]  # (label, fraction of reference bytes; None = no limit)
    reference_bytes: int
    overhead_bytes: int
    tokens_file: str
    mode: str = "teacher"
    decode_steps: int = 32
    reps: int = 3
    threads: int = 2
    ctx: int = 256
    passes: int = 2
    timeout_s: float = 1800.0
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ machine
def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``, else ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """SIMD flags that decide kernel speed (avx2, avx512f, fma, f16c, amx...)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return sorted(have & {"avx", "avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni",
                                      "amx_tile", "amx_bf16", "amx_int8", "avx_vnni"})
    except OSError:
        pass
    return []


def machine_info() -> dict[str, Any]:
    """Git commit, CPU, cores, RAM, OS, versions and load average, for every results file."""
    import psutil

    return {"git_commit": _git("rev-parse", "HEAD"), "git_dirty": bool(_git("status", "--porcelain", "--",
                                                                             "bench", "engine", "convert",
                                                                             "scheduler")),
            "cpu_model": cpu_model(), "cpu_flags": cpu_flags(), "cores_logical": os.cpu_count(),
            "cores_physical": psutil.cpu_count(logical=False), "ram_bytes": psutil.virtual_memory().total,
            "os": platform.platform(), "python": platform.python_version(),
            "torch": _version("torch"), "llama_cpp_python": _version("llama_cpp_python"),
            "numpy": _version("numpy"), "loadavg": list(os.getloadavg()),
            "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


# ------------------------------------------------------------------------------------------ physical limits
def odirect_read_bandwidth(path: str | Path, max_bytes: int = 1 << 30, block: int = 8 << 20) -> dict[str, Any]:
    """Sequential read bandwidth of the disk holding ``path`` (O_DIRECT; page cache dropped first).

    Args:
        path: a large file (the model).
        max_bytes: read at most this much.
        block: bytes per read (a multiple of 4096).

    Returns:
        ``{"bytes", "seconds", "bandwidth_bytes_per_s", "method"}``; ``method`` is ``O_DIRECT``
        or ``buffered after drop_caches`` where O_DIRECT is refused.
    """
    path = Path(path)
    size = path.stat().st_size
    n = min(size, max_bytes) // block * block
    if n == 0:
        return {"bytes": 0, "seconds": 0.0, "bandwidth_bytes_per_s": None, "method": "file too small"}
    drop_page_cache()
    buf = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT needs
    method = "O_DIRECT"
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    except OSError:
        fd, method = os.open(path, os.O_RDONLY), "buffered after drop_caches"
    try:
        t0 = time.perf_counter()
        done = 0
        while done < n:
            try:
                got = os.preadv(fd, [buf], done)
            except OSError:
                if method != "O_DIRECT":
                    raise
                os.close(fd)
                fd, method = os.open(path, os.O_RDONLY), "buffered after drop_caches"
                continue
            if got <= 0:
                break
            done += got
        dt = time.perf_counter() - t0
    finally:
        os.close(fd)
        buf.close()
    return {"file": str(path), "bytes": done, "seconds": dt, "bandwidth_bytes_per_s": done / dt if dt > 0 else None,
            "method": method, "block_bytes": block}


def memory_bandwidth(nbytes: int = 256 << 20, rounds: int = 3) -> float:
    """Best-of-``rounds`` copy bandwidth (bytes read + written per second) of a ``nbytes`` numpy buffer."""
    import numpy as np

    src = np.ones(nbytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    best = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        dt = time.perf_counter() - t0
        best = max(best, 2 * nbytes / dt)
    return best


#: Bytes touched per parameter in decode: llama.cpp reads its stored type; moestream computes dense
#: weights at fp32 and experts from the arena (f32: in place; bf16/f16: read 2 B, write + read a 4 B scratch).
BYTES_PER_PARAM = {"F32": (4.0, 4.0), "F16": (2.0, 2.0), "Q8_0": (34 / 32, 34 / 32), "Q4_0": (18 / 32, 18 / 32),
                   "f32": (4.0, 4.0), "bf16": (4.0, 10.0), "f16": (4.0, 10.0)}


def active_params_per_token(config: dict) -> dict[str, int]:
    """Dense and routed-expert parameters one decode token reads (qwen3_moe-style config; embeddings: one row)."""
    h = int(config["hidden_size"])
    layers = int(config["num_hidden_layers"])
    hd = int(config.get("head_dim") or h // int(config["num_attention_heads"]))
    q, kv = int(config["num_attention_heads"]) * hd, int(config["num_key_value_heads"]) * hd
    attn = h * q + 2 * h * kv + q * h
    router = h * int(config.get("num_experts", 0))
    expert = 3 * h * int(config["moe_intermediate_size"]) * int(config["num_experts_per_tok"])
    return {"dense": layers * (attn + router) + h * int(config["vocab_size"]), "experts": layers * expert}


def memory_bound_tok_s(config: dict, fmt: str, bandwidth: float) -> float | None:
    """Decode tok/s if every active weight byte is read once at ``bandwidth`` (None for an unknown format)."""
    if fmt not in BYTES_PER_PARAM:
        return None
    a = active_params_per_token(config)
    dense_b, expert_b = BYTES_PER_PARAM[fmt]
    return bandwidth / (a["dense"] * dense_b + a["experts"] * expert_b)


def model_file_bytes(path: str | Path) -> int:
    """Bytes of a model file, or of every ``.gguf``/``.safetensors`` file in a folder."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.iterdir() if f.suffix in (".gguf", ".safetensors"))


def largest_model_file(path: str | Path) -> Path:
    """The biggest model file (what the disk bandwidth probe reads)."""
    p = Path(path)
    if p.is_file():
        return p
    return max((f for f in p.iterdir() if f.suffix in (".gguf", ".safetensors")), key=lambda f: f.stat().st_size)


# ------------------------------------------------------------------------------------------ inputs
def make_tokens_file(tokenizer_json: str | Path, text: str, prompt_tokens: int, forced_tokens: int,
                     out: str | Path) -> dict:
    """Tokenize real text once (``tokenizers``) and write ``{"prompt": [...], "forced": [...]}``.

    Raises:
        ValueError: the text is too short.
    """
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tokenizer_json)).encode(text).ids
    if len(ids) < prompt_tokens + forced_tokens:
        raise ValueError(f"text has {len(ids)} tokens, need {prompt_tokens + forced_tokens}")
    d = {"prompt": ids[:prompt_tokens], "forced": ids[prompt_tokens:prompt_tokens + forced_tokens],
         "text_head": text[:200]}
    Path(out).write_text(json.dumps(d))
    return d


def moestream_overhead(model: str, ctx: int, env: dict[str, str] | None = None) -> dict[str, Any]:
    """``moestream doctor --json --no-measure`` (child process): the runtime overhead and expert bytes.

    Returns:
        ``{"overhead_bytes", "total_expert_bytes", "min_budget_bytes", "all_experts_budget_bytes", "doctor"}``
        where overhead = everything but the expert arena (dense at fp32, KV, workspace, I/O, reserve).

    Raises:
        RuntimeError: doctor failed.
    """
    proc = subprocess.run([sys.executable, "-m", "moestream.engine.cli", "doctor", model, "--no-measure", "--json",
                           "--ctx", str(ctx), "--memory", "1TB"], capture_output=True, text=True, env=env,
                          timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"moestream doctor failed: {proc.stderr[-1000:]}")
    d = json.loads(proc.stdout)
    fp = d["footprint"]
    total = int(fp["total_expert_bytes"])
    over = int(d["all_experts_budget_bytes"]) - total
    return {"overhead_bytes": over, "total_expert_bytes": total, "min_budget_bytes": d["min_budget_bytes"],
            "all_experts_budget_bytes": d["all_experts_budget_bytes"], "doctor": d}


def budget_limits(budgets: Sequence[tuple[str, float | None]], reference_bytes: int,
                  overhead_bytes: int) -> list[tuple[str, float | None, int | None]]:
    """``(label, fraction, limit bytes)``: limit = overhead + fraction x reference file bytes (None: unlimited)."""
    out = []
    for label, frac in budgets:
        out.append((label, frac, None if frac is None else int(overhead_bytes + frac * reference_bytes)))
    return out


# ------------------------------------------------------------------------------------------ children
def arm_argv(arm: Arm, cfg: SuiteConfig, limit: int | None) -> list[str]:
    """The child command line of one arm."""
    common = ["--tokens", cfg.tokens_file, "--mode", cfg.mode, "-n", str(cfg.decode_steps),
              "--threads", str(cfg.threads), "--ctx", str(cfg.ctx), "--passes", str(cfg.passes)]
    if arm.engine == "moestream":
        argv = [sys.executable, "-m", "moestream.bench.run_arm", arm.model, *common]
        if arm.memory_override is not None:
            argv += ["--memory", str(arm.memory_override)]
        elif limit is not None and arm.memory_flag:
            argv += ["--memory", str(limit)]
        if arm.cache_policy:
            argv += ["--cache-policy", arm.cache_policy]
        if arm.precision_policy:
            argv += ["--precision-policy", arm.precision_policy]
        return argv + list(arm.extra)
    if arm.engine == "llamacpp":
        return [sys.executable, "-m", "moestream.bench.llama_runner", arm.model, *common, *arm.extra]
    raise ValueError(f"unknown engine {arm.engine!r}")


def child_env(threads: int) -> dict[str, str]:
    """The children's environment: quiet, thread counts pinned, this repo importable."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TQDM_DISABLE="1",
               TOKENIZERS_PARALLELISM="false")
    return env


def _delta(a: dict | None, b: dict | None, key: str) -> float | None:
    if not a or not b or a.get(key) is None or b.get(key) is None:
        return None
    return b[key] - a[key]


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def make_records(run: dict, arm: Arm, cfg: SuiteConfig, label: str, frac: float | None, limit: int | None,
                 rep: int, order: int) -> list[dict]:
    """Flatten one child run into records (one per pass; one ``status`` record if it produced none).

    Args:
        run: ``LimitedRun.as_dict()`` plus ``result`` (the parsed ``BENCH_RESULT``, or None).
        arm, cfg, label, frac, limit, rep, order: where it sits in the suite.

    Returns:
        Records with every field of :data:`RECORD_FIELDS`.
    """
    res = run.get("result") or {}
    base = {k: None for k in RECORD_FIELDS}
    base.update(schema=SCHEMA, suite=cfg.name, model=arm.model, arm=arm.name, engine=arm.engine, format=arm.fmt,
                cache_policy=arm.cache_policy, precision_policy=arm.precision_policy, budget_label=label,
                budget_fraction=frac, limit_bytes=run.get("limit_bytes") or limit, rep=rep, order=order,
                mode=cfg.mode, threads=cfg.threads, cgroup_peak_bytes=run.get("cgroup_max_usage_bytes"),
                cgroup_failcnt=run.get("cgroup_failcnt"), oom_kills=run.get("cgroup_oom_kills"),
                peak_rss_bytes=run.get("child_maxrss_bytes"), page_cache_dropped=run.get("page_cache_dropped"),
                cgroup=run.get("cgroup"), wall_s=run.get("wall_s"), loadavg=res.get("loadavg") or run.get("loadavg_start"),
                started_utc=run.get("started_utc"), load_s=res.get("load_s"), arena_slots=res.get("arena_slots"),
                experts_total=res.get("experts_total"))
    status = run["status"]
    if status == "error" and res and not res.get("ok", True):
        err = res.get("error", "")
        status = "refused" if res.get("error_type") == "BudgetError" or "minimum" in err else "error"
        base["error"] = err[:500]
    elif status != "ok":
        base["error"] = (run.get("stderr") or "")[-500:]
    passes = res.get("passes") or []
    if status != "ok" or not passes:
        rec = dict(base, status=status if status != "ok" else "error")
        if status == "ok":
            rec["error"] = "child exited 0 without a BENCH_RESULT line"
        return [rec]
    out = []
    for p in passes:
        rec = dict(base, status="ok")
        rec.update({"pass": p["pass"], "prompt_tokens": p["prompt_tokens"], "decode_steps": p["decode_steps"],
                    "prefill_tok_s": p["prefill_tok_s"], "ttft_s": p["ttft_s"], "decode_tok_s": p["decode_tok_s"],
                    "decode_tok_s_steady": p["decode_tok_s_steady"]})
        s0, s1, s2 = p.get("stats_before"), p.get("stats_after_prefill"), p.get("stats_after")
        hits, misses = _delta(s0, s2, "hits"), _delta(s0, s2, "misses")
        if hits is not None and misses is not None and hits + misses:
            rec["hit_rate"] = hits / (hits + misses)
        dh, dm = _delta(s1, s2, "hits"), _delta(s1, s2, "misses")
        if dh is not None and dm is not None and dh + dm:
            rec["decode_hit_rate"] = dh / (dh + dm)
        n = p["decode_steps"]
        rd = _delta(s1, s2, "bytes_read")
        if rd is not None:
            rec["bytes_read_per_token"] = rd / n
            rec["miss_path_bandwidth_bytes_per_s"] = _ratio(rd, p["decode_s"])
        st = _delta(s0, s2, "stall_s")
        rec["stall_s"] = st
        dst = _delta(s1, s2, "stall_s")
        rec["decode_stall_s_per_token"] = dst / n if dst is not None else None
        disk = _delta(p.get("io_after_prefill"), p.get("io_after"), "read_bytes")
        if disk is not None:
            rec["disk_read_bytes_per_token"] = disk / n
            if rec["miss_path_bandwidth_bytes_per_s"] is None:
                rec["miss_path_bandwidth_bytes_per_s"] = _ratio(disk, p["decode_s"])
        out.append(rec)
    return out


def run_suite(cfg: SuiteConfig, out_json: str | Path, *, log: Callable[[str], None] = print,
              physical: dict | None = None) -> dict:
    """Run every arm at every budget, interleaved, and write the results file after each run.

    Args:
        cfg: the suite.
        out_json: results file (rewritten after every run, so an interrupted suite keeps its records).
        log: progress lines.
        physical: physical limits measured beforehand (stored in the file).

    Returns:
        ``{"suite", "machine", "config", "physical", "records", "runs"}``.
    """
    limits = budget_limits(cfg.budgets, cfg.reference_bytes, cfg.overhead_bytes)
    doc: dict[str, Any] = {"schema": "moestream.bench.results/1", "suite": cfg.name, "machine": machine_info(),
                           "config": {**asdict(cfg), "limits": limits}, "physical": physical or {},
                           "records": [], "runs": []}
    env = child_env(cfg.threads)
    order = 0
    # Repetitions outermost: an interrupted suite still has every budget, and the repetitions of one
    # budget are spread over the whole run (drift in machine load hits every arm alike).
    for rep in range(cfg.reps):
        for label, frac, limit in limits:
            arms = cfg.arms if rep % 2 == 0 else list(reversed(cfg.arms))  # A B, B A: no arm always goes first
            for arm in arms:
                argv = arm_argv(arm, cfg, limit)
                started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
                lr = run_limited(argv, limit, env=env, timeout_s=cfg.timeout_s, drop_caches=True, cwd=str(REPO))
                run = lr.as_dict()
                run["started_utc"] = started
                run["loadavg_start"] = list(os.getloadavg())
                run["result"] = parse_result(lr.stdout)
                recs = make_records(run, arm, cfg, label, frac, limit, rep, order)
                order += 1
                doc["records"].extend(recs)
                slim = {k: v for k, v in run.items() if k not in ("stdout", "result")}
                slim["result_passes_step_s"] = [p.get("step_s") for p in (run["result"] or {}).get("passes", [])]
                slim["result_passes_tokens"] = [p.get("tokens") for p in (run["result"] or {}).get("passes", [])]
                doc["runs"].append({"arm": arm.name, "budget": label, "rep": rep, **slim})
                first = recs[0]
                log(f"[{cfg.name}] {label:>6} rep {rep} {arm.name:<24} {first['status']:<8} "
                    + " | ".join(f"{r.get('pass')}: decode {_fmt(r.get('decode_tok_s'))} tok/s "
                                 f"hit {_fmt(r.get('decode_hit_rate'))}" for r in recs)
                    + f" | cgroup peak {_gb(first.get('cgroup_peak_bytes'))} / limit {_gb(first.get('limit_bytes'))}"
                    + f" | {lr.wall_s:.0f} s")
                Path(out_json).write_text(json.dumps(doc, indent=1))
    doc["machine"]["loadavg_end"] = list(os.getloadavg())
    Path(out_json).write_text(json.dumps(doc, indent=1))
    return doc


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _gb(x: int | None) -> str:
    return "-" if x is None else f"{x / 1e9:.2f} GB"


def median_range(values: Sequence[float | None]) -> tuple[float | None, float | None, float | None]:
    """(median, min, max) of the non-None values."""
    v = [x for x in values if x is not None]
    if not v:
        return None, None, None
    return statistics.median(v), min(v), max(v)
