"""HEBF ordering/timeline and the StreamingExpertCache (exact, adaptive, prefetch, eviction)."""

import threading

import numpy as np
import pytest

from moestream.scheduler.arena import ExpertArena
from moestream.scheduler.hebf import hebf_order, simulate_timeline
from moestream.scheduler.loader import ExpertLoader, ExpertReadError
from moestream.scheduler.pipeline import CacheCapacityError, StreamingExpertCache
from moestream.scheduler.policies import ConsistencyPolicy

LEVEL_BYTES = [1000, 3000]  # level 0 and level 1 slice sizes
N_LAYERS, N_EXPERTS = 2, 4


class FileSource:
    """Expert slices laid out one after another in a temp file, 4 KiB aligned."""

    def __init__(self, path):
        self.path = path

    def range_of(self, layer, expert, level):
        index = (layer * N_EXPERTS + expert) * 2 + level
        return (self.path, index * 4096, LEVEL_BYTES[level])


def expected_bytes(data, layer, expert, level):
    index = (layer * N_EXPERTS + expert) * 2 + level
    return data[index * 4096: index * 4096 + LEVEL_BYTES[level]]


def decode(layer, expert, level, buffers):
    return {"level": level, "bytes": [bytes(b) for b in buffers]}


@pytest.fixture
def model_file(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, N_LAYERS * N_EXPERTS * 2 * 4096, dtype=np.uint8).tobytes()
    path = tmp_path / "experts.bin"
    path.write_bytes(data)
    return str(path), data


def make_cache(path, slots=(4, 4), reader=None, **kw):
    arena = ExpertArena(LEVEL_BYTES, list(slots))
    loader = ExpertLoader(n_workers=2, reader=reader, retry_delay_s=0)
    return StreamingExpertCache(FileSource(path), decode, arena, loader, **kw), loader


def test_hebf_order_hand_computed():
    # expert 0: 5 tokens at level 1; expert 1: 3 tokens at level 0 and 4 at level 1; expert 2: 1 token at 0
    demand = {0: {1: 5}, 1: {0: 3, 1: 4}, 2: {0: 1}}
    missing = {0: [1, 0], 1: [0, 1], 2: [0]}
    # heads: e0 L0 needs 5, e1 L0 needs 7 -> e1L0; then e1L1 4 vs e0L0 5 -> e0L0; e0L1 5 -> e0L1; e1L1; e2L0
    assert hebf_order(missing, demand) == [(1, 0), (0, 0), (0, 1), (1, 1), (2, 0)]


def test_timeline_hand_computed():
    demand = {0: {0: 2}, 1: {1: 1}}
    order = [(0, 0), (1, 0), (1, 1)]
    tl = simulate_timeline(order, demand, t_io=lambda lv: 1.0, t_comp=lambda lv: 1.5, resident_jobs=[])
    # loads end 1,2,3; (0,0) computes 1..4; (1,0) has no own tokens: 4..4; (1,1) 4..5.5
    assert [e.comp_start for e in tl.entries] == [1.0, 4.0, 4.0]
    assert tl.bubble == 1.0 and tl.makespan == 5.5


def test_exact_returns_requested_level_bytes(model_file):
    path, data = model_file
    cache, loader = make_cache(path)
    with loader:
        views = cache.acquire(0, np.array([[1, 2], [2, 3]]), levels=1)
        assert sorted(views) == [1, 2, 3]
        for e, v in views.items():
            assert v["level"] == 1
            assert v["bytes"] == [expected_bytes(data, 0, e, 0), expected_bytes(data, 0, e, 1)]
        cache.release(0, [1, 2, 3])
        views = cache.acquire(0, [2], levels={2: 0})
        assert views[2] == {"level": 0, "bytes": [expected_bytes(data, 0, 2, 0)]}
        cache.release(0, [2])
        s = cache.stats()
        assert s["totals"]["misses"] == 3 and s["totals"]["hits"] == 1 and s["totals"]["fallbacks"] == 0
        assert s["loader"]["bytes_read"] == 3 * sum(LEVEL_BYTES)


def _blocking_reader(block_offsets, gate):
    import os

    def reader(fd, buf, offset):
        if offset in block_offsets:
            gate.wait(10)
        return os.preadv(fd, [buf], offset)
    return reader


def test_adaptive_falls_back_when_level_is_late(model_file):
    path, data = model_file
    gate = threading.Event()
    late_offset = FileSource(path).range_of(0, 1, 1)[1]
    cache, loader = make_cache(path, reader=_blocking_reader({late_offset}, gate),
                               precision_policy="adaptive", late_after_s=0.0)
    with loader:
        cache.acquire(0, [1], levels=0)  # level 0 becomes resident
        cache.release(0, [1])
        views = cache.acquire(0, [1], levels=1)  # level 1 is held back by the gate
        assert views[1] == {"level": 0, "bytes": [expected_bytes(data, 0, 1, 0)]}
        assert cache.stats()["totals"]["fallbacks"] == 1
        cache.release(0, [1])
        gate.set()
        cache.wait_idle(10)
        assert cache.acquire(0, [1], levels=1)[1]["level"] == 1
        cache.release(0, [1])


def test_exact_waits_for_late_level(model_file):
    path, data = model_file
    gate = threading.Event()
    late_offset = FileSource(path).range_of(0, 1, 1)[1]
    cache, loader = make_cache(path, reader=_blocking_reader({late_offset}, gate), precision_policy="exact")
    with loader:
        cache.acquire(0, [1], levels=0)
        cache.release(0, [1])
        threading.Timer(0.05, gate.set).start()
        views = cache.acquire(0, [1], levels=1)
        assert views[1]["level"] == 1 and views[1]["bytes"][1] == expected_bytes(data, 0, 1, 1)
        assert cache.stats()["totals"]["fallbacks"] == 0
        cache.release(0, [1])


def test_eviction_keeps_arena_fixed_and_pins_protect(model_file):
    path, data = model_file
    cache, loader = make_cache(path, slots=(2, 2))
    address = cache.arena.address
    with loader:
        for step in range(6):
            e = step % N_EXPERTS
            assert cache.acquire(step % 2, [e], levels=1)[e]["bytes"][1] == expected_bytes(data, step % 2, e, 1)
            cache.release(step % 2, [e])
        assert cache.arena.address == address
        cache.acquire(0, [0, 1], levels=1)  # pins both level-1 slots
        with pytest.raises(CacheCapacityError):
            cache.acquire(1, [2], levels=1)
        cache.release(0, [0, 1])
        assert cache.acquire(1, [2], levels=1)[2]["level"] == 1


def test_per_layer_capacity(model_file):
    path, _ = model_file
    cache, loader = make_cache(path, slots=(4, 4), per_layer_slots=1, nested_levels=False)
    with loader:
        for e in range(3):
            cache.acquire(0, [e], levels=1)
            cache.release(0, [e])
        cache.acquire(1, [0], levels=1)
        cache.release(1, [0])
        layers = [k[0] for k in cache.arena.keys()]
        assert layers.count(0) == 1 and layers.count(1) == 1


def test_hint_prefetches_and_counts_accuracy(model_file):
    path, _ = model_file
    cache, loader = make_cache(path, policy=ConsistencyPolicy(window=8))
    with loader:
        cache.hint(1, [[0, 3]], levels=1)
        cache.wait_idle(10)
        assert cache.resident_levels(1, 0) == [0, 1] and cache.resident_levels(1, 3) == [0, 1]
        cache.acquire(1, [0, 2], levels=1)
        cache.release(1, [0, 2])
        layer = cache.stats()["layers"][1]
        assert layer["prefetch_issued"] == 4 and layer["prefetch_used"] == 2
        assert layer["prefetch_accuracy"] == 0.5 and layer["hits"] == 1 and layer["misses"] == 1


def test_read_failure_surfaces_as_error(model_file):
    path, _ = model_file

    def broken(fd, buf, offset):
        raise OSError(5, "Input/output error")
    cache, loader = make_cache(path, reader=broken)
    with loader:
        with pytest.raises(ExpertReadError):
            cache.acquire(0, [1], levels=0)
        assert all(s.pins == 0 for s in cache.arena.slots)


def test_staged_device_arena_path_returns_the_same_bytes(model_file):
    """An arena held as a torch tensor is filled through staging buffers (verify sees the staged bytes).

    ``DeviceStaging("cpu")`` runs the exact code path CUDA uses (read into a staging buffer, verify there,
    copy into the slot) with a plain copy; tests/test_gpu.py runs it on a real GPU.
    """
    torch = pytest.importorskip("torch")
    from moestream.scheduler.transfer import DeviceStaging

    path, data = model_file
    verified = []

    def verify(key, buf):
        assert isinstance(buf, np.ndarray)  # host staging bytes, never the device slot
        assert bytes(buf) == expected_bytes(data, *key)
        verified.append(key)

    arena = ExpertArena(LEVEL_BYTES, [2, 2], device=torch.device("cpu"))
    assert not arena.on_host and isinstance(arena.buffer, torch.Tensor)
    staging = DeviceStaging("cpu", n_buffers=2, buffer_bytes=max(arena.slot_bytes))
    with pytest.raises(ValueError, match="staging"):
        StreamingExpertCache(FileSource(path), decode, arena, ExpertLoader(n_workers=1))
    loader = ExpertLoader(n_workers=2, retry_delay_s=0)
    cache = StreamingExpertCache(FileSource(path), lambda l, e, lv, bufs: [b.clone() for b in bufs], arena, loader,
                                 verify=verify, staging=staging)
    with loader:
        for layer, experts in [(0, [0, 1]), (1, [2, 3]), (0, [1, 3])]:  # evictions reuse slots
            views = cache.acquire(layer, experts, levels=1)
            for e, bufs in views.items():
                assert [bytes(b.numpy()) for b in bufs] == [expected_bytes(data, layer, e, 0),
                                                           expected_bytes(data, layer, e, 1)]
            cache.release(layer, experts)
        st = cache.stats()
    assert st["transfer"]["copies"] == len(verified) == st["loader"]["reads"]
    assert st["transfer"]["bytes_copied"] == st["loader"]["bytes_read"]
    assert st["arena"]["device"] == "cpu" and st["transfer"]["pinned"] is False


@pytest.mark.parametrize("policy", ["exact", "adaptive"])
def test_acquire_resident_fast_path_matches_the_general_path(model_file, policy):
    """All-hit acquires through acquire_resident give the same views, stats, pins and policy state."""
    path, _ = model_file
    steps = [(0, [1, 2]), (1, [0, 3]), (0, [2, 1]), (0, [1, 3]), (1, [3]), (0, [1, 2])]
    runs = []
    for fast in (True, False):
        cache, loader = make_cache(path, precision_policy=policy, late_after_s=60.0)  # no timing-dependent fallback
        with loader:
            got = []
            for i, (layer, ids) in enumerate(steps):
                if i % 2:
                    cache.hint(layer, ids, levels=1)
                    cache.wait_idle()  # deterministic: hinted experts are READY before the acquire
                views = cache.acquire_resident(layer, ids, {e: 1 for e in ids}) if fast else None
                if views is None:
                    views = cache.acquire(layer, ids, levels=1)
                got.append(views)
                cache.release(layer, ids)
            cache.wait_idle()
            totals = {k: v for k, v in cache.stats()["totals"].items() if k != "stall_s"}  # stall_s is wall time
            runs.append((got, totals, sorted(cache.arena.keys()), dict(cache._pins)))
    assert runs[0] == runs[1]
    assert runs[0][1]["hits"] > 0 and runs[0][1]["misses"] > 0


def test_acquire_resident_changes_nothing_on_a_miss(model_file):
    path, _ = model_file
    cache, loader = make_cache(path)
    with loader:
        before = cache.stats()["totals"]
        assert cache.acquire_resident(0, [1], {1: 1}) is None
        assert cache.stats()["totals"] == before and not cache._pins and cache.arena.n_held == 0


def test_stable_views_are_reused_while_their_slots_hold_the_same_keys(model_file):
    """stable_views: an all-hit acquire returns the view made for the same (layer, expert, level, slots)
    without decoding again; after an eviction the general path decodes the expert anew, with the
    same bytes (a cached view is keyed by its slots, so it is reused only when the expert is back in the
    very same slots). Without stable_views every acquire decodes."""
    path, data = model_file
    calls = []

    def counting_decode(layer, expert, level, bufs):
        calls.append((layer, expert, level))
        return decode(layer, expert, level, bufs)

    for stable in (True, False):
        calls.clear()
        arena = ExpertArena(LEVEL_BYTES, [2, 2])
        loader = ExpertLoader(n_workers=1, retry_delay_s=0)
        cache = StreamingExpertCache(FileSource(path), counting_decode, arena, loader, stable_views=stable)
        with loader:
            first = cache.acquire(0, [1], levels=1)[1]
            cache.release(0, [1])
            again = []
            for _ in range(3):
                again.append(cache.acquire_resident(0, [1], {1: 1})[1])
                cache.release(0, [1])
            assert all(v == first for v in again)  # same bytes either way
            assert (all(v is again[0] for v in again) and len(calls) == 2) if stable else len(calls) == 4
            for e in (2, 3):  # two more experts through a 2-slot pool evict expert 1
                cache.acquire(0, [e], levels=1)
                cache.release(0, [e])
            assert cache.acquire_resident(0, [1], {1: 1}) is None
            fresh = cache.acquire(0, [1], levels=1)[1]
            cache.release(0, [1])
            assert fresh == first
            back = cache.acquire_resident(0, [1], {1: 1})[1]
            cache.release(0, [1])
            assert back == first  # reused only when expert 1 is back in the very same slots: the same bytes
