"""Disk read bandwidth of expert-sized O_DIRECT reads versus the number of I/O workers.

Picks ``--experts`` random routed experts of a shard model, drops the page
cache, and reads their byte ranges through :class:`moestream.scheduler.loader.ExpertLoader`
with 1, 2, 4 and 8 worker threads (one aligned buffer per worker), interleaved
over ``--reps`` repetitions. The engine's default worker count
(``engine/streaming.py`` ``DEFAULT_IO_WORKERS``) is chosen from this.

    python bench/io_depth.py /work/bench_data/qwen3_30b_a3b_shape_6l/shards_bf16 --out bench/results/io_depth.json
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from moestream.bench.harness import machine_info
from moestream.convert.shard_reader import ShardedModel
from moestream.scheduler.loader import ExpertLoader


def read_all(ranges: list, n_workers: int, slot: int) -> float:
    """Read every range with ``n_workers`` threads; bytes per second."""
    raw = np.zeros(n_workers * slot + 4096, np.uint8)
    base = (-raw.ctypes.data) % 4096
    free: queue.Queue = queue.Queue()
    for i in range(n_workers):
        free.put(raw[base + i * slot: base + (i + 1) * slot])
    with ExpertLoader(n_workers=n_workers) as loader:
        def job(rng) -> None:
            buf = free.get()
            try:
                loader.read_into(rng, buf)
            finally:
                free.put(buf)
        start = time.perf_counter()
        for f in [loader.submit_job(lambda r=r: job(r)) for r in ranges]:
            f.result()
        return sum(r.nbytes for r in ranges) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="moestream shard folder")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--experts", type=int, default=48, help="expert reads per measurement")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    results: dict[int, list[float]] = {n: [] for n in args.workers}
    with ShardedModel.open(args.model, verify="off") as reader:
        keys = reader.expert_keys()
        for _ in range(args.reps):
            for n in args.workers:
                pick = rng.choice(len(keys), min(args.experts, len(keys)), replace=False)
                ranges = [reader.expert_plane_range(*keys[i], 0) for i in pick]
                slot = -(-max(r.nbytes for r in ranges) // 4096) * 4096
                os.sync()
                Path("/proc/sys/vm/drop_caches").write_text("1\n")
                results[n].append(read_all(ranges, n, slot))
                print(f"{n} workers: {results[n][-1] / 1e9:.2f} GB/s", flush=True)
    doc = {"benchmark": "io_depth", "machine": machine_info(), "model": str(args.model),
           "expert_bytes": int(ranges[0].nbytes), "experts_per_measurement": len(ranges),
           "gb_per_s": {str(n): [v / 1e9 for v in vs] for n, vs in results.items()},
           "median_gb_per_s": {str(n): statistics.median(vs) / 1e9 for n, vs in results.items()}}
    args.out.write_text(json.dumps(doc, indent=2))
    print(json.dumps(doc["median_gb_per_s"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
