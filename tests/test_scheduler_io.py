"""Arena states and allocation, and the loader (exact bytes, O_DIRECT, retries)."""

import errno
import os
import tracemalloc

import numpy as np
import pytest

from moestream.scheduler.arena import ArenaFullError, ExpertArena, SlotState, SlotStateError
from moestream.scheduler.loader import ByteRange, ExpertLoader, ExpertReadError


@pytest.fixture
def data_file(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=64 * 1024, dtype=np.uint8).tobytes()
    path = tmp_path / "experts.bin"
    path.write_bytes(data)
    return str(path), data


def test_arena_states_and_alignment():
    arena = ExpertArena([5000, 100], [2, 3])
    assert arena.address % 4096 == 0
    assert [s.capacity for s in arena.slots] == [8192, 8192, 4096, 4096, 4096]
    assert all(s.offset % 4096 == 0 for s in arena.slots)
    slot = arena.begin_load((0, 1, 0), 5000)
    assert slot.state is SlotState.LOADING and arena.lookup((0, 1, 0)) is slot
    with pytest.raises(SlotStateError):
        arena.evict(slot)  # LOADING cannot be evicted
    arena.finish_load(slot)
    arena.pin(slot)
    with pytest.raises(SlotStateError):
        arena.evict(slot)  # pinned
    arena.unpin(slot)
    arena.evict(slot)
    assert slot.state is SlotState.EMPTY and arena.lookup((0, 1, 0)) is None
    with pytest.raises(ValueError):
        arena.begin_load((0, 2, 1), 5000)  # too big for a level-1 slot
    arena.begin_load((0, 1, 0), 1)
    arena.begin_load((0, 2, 0), 1)
    with pytest.raises(ArenaFullError):
        arena.begin_load((0, 3, 0), 1)
    with pytest.raises(SlotStateError):
        arena.begin_load((0, 1, 0), 1)  # already held


def test_arena_never_allocates_after_construction(data_file):
    path, data = data_file
    arena = ExpertArena([16 * 1024], [4])
    address, nbytes = arena.address, arena.nbytes
    loader = ExpertLoader(n_workers=1)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(40):
            key = (0, i, 0)
            slot = arena.begin_load(key, 16 * 1024)
            loader.read_into(ByteRange(path, (i % 4) * 16 * 1024, 16 * 1024), arena.full_view(slot))
            arena.finish_load(slot)
            arena.evict(slot)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        loader.close()
    assert arena.address == address and arena.nbytes == nbytes
    assert grown < 16 * 1024  # less than one slot: no buffer was allocated per load


def test_loader_reads_exact_bytes_and_counts(data_file):
    path, data = data_file
    dest = np.zeros(3000, dtype=np.uint8)
    with ExpertLoader(n_workers=2, direct=False) as loader:
        assert loader.read_into((path, 1234, 2999), dest) == 2999
        assert dest[:2999].tobytes() == data[1234:1234 + 2999] and dest[2999] == 0
        fut = loader.submit(ByteRange(path, 100, 50), dest)
        assert fut.result() == 50 and dest[:50].tobytes() == data[100:150]
        assert loader.stats.bytes_read == 3049 and loader.stats.reads == 2
        assert loader.stats.buffered_reads == 2 and loader.stats.direct_reads == 0


def test_loader_uses_o_direct_when_aligned(data_file):
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("platform has no O_DIRECT")
    path, data = data_file
    arena = ExpertArena([8192], [1])
    slot = arena.begin_load((0, 0, 0), 5000)
    with ExpertLoader(direct=None) as loader:
        loader.read_into((path, 8192, 5000), arena.full_view(slot))
        if loader.direct_disabled_reason:
            pytest.skip(f"file system rejects O_DIRECT: {loader.direct_disabled_reason}")
        assert loader.stats.direct_reads == 1
        assert arena.view(slot).tobytes() == data[8192:8192 + 5000]
        # unaligned offset falls back to buffered reads
        loader.read_into((path, 100, 5000), arena.full_view(slot))
        assert loader.stats.buffered_reads == 1
        assert arena.view(slot).tobytes() == data[100:5100]


def _flaky_reader(failures, kind):
    state = {"calls": 0}

    def reader(fd, buf, offset):
        state["calls"] += 1
        if state["calls"] <= failures:
            if kind == "eio":
                raise OSError(errno.EIO, "Input/output error")
            return 0  # premature end of file: a short read
        return os.preadv(fd, [buf], offset)
    return reader, state


@pytest.mark.parametrize("kind", ["eio", "short"])
def test_loader_retries_then_succeeds(data_file, kind):
    path, data = data_file
    reader, state = _flaky_reader(2, kind)
    dest = np.zeros(100, dtype=np.uint8)
    with ExpertLoader(direct=False, retries=2, retry_delay_s=0, reader=reader) as loader:
        loader.read_into((path, 10, 100), dest)
        assert dest.tobytes() == data[10:110]
        assert loader.stats.retries == 2 and loader.stats.failures == 0


@pytest.mark.parametrize("kind", ["eio", "short"])
def test_loader_gives_clear_error_after_retries(data_file, kind):
    path, _ = data_file
    reader, state = _flaky_reader(100, kind)
    with ExpertLoader(direct=False, retries=2, retry_delay_s=0, reader=reader) as loader:
        with pytest.raises(ExpertReadError, match="failed 3 times") as err:
            loader.read_into((path, 10, 100), np.zeros(100, dtype=np.uint8))
        assert path in str(err.value)
        assert loader.stats.failures == 1 and state["calls"] == 3


def test_loader_short_file_and_missing_file(tmp_path, data_file):
    path, _ = data_file
    with ExpertLoader(direct=False, retries=1, retry_delay_s=0) as loader:
        with pytest.raises(ExpertReadError, match="short read"):
            loader.read_into((path, 64 * 1024 - 10, 100), np.zeros(100, dtype=np.uint8))
        with pytest.raises(ExpertReadError, match="exist"):
            loader.read_into((str(tmp_path / "nope.bin"), 0, 10), np.zeros(10, dtype=np.uint8))
