"""Staging buffers and host-to-device copies for an arena that lives on an accelerator.

Owns a fixed pool of host staging buffers (page-aligned for O_DIRECT, pinned
on CUDA so the copy engine can DMA from them), the dedicated copy stream, and
the ordering rules that make a device-resident arena safe:

- a slice is read from disk into a staging buffer on an I/O worker thread,
  verified there, then copied into its arena slot on the copy stream;
- before a copy overwrites a slot, the copy stream waits for the compute
  stream: kernels already issued may still read the slot's previous expert
  (the engine releases a slot when it has *issued* its kernels, not when the
  GPU has run them);
- the worker waits for the copy's event before the slot is marked READY, so
  compute never sees a half-copied slot, and the staging buffer is reused only
  after its bytes are on the device.

On CPU (used by tests to exercise the same path without a GPU) and MPS the
copy is a plain synchronous ``copy_``. Knows nothing about experts, policies
or files; the cache (``pipeline.py``) decides what to load where.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch


class DeviceStaging:
    """A fixed pool of staging buffers plus the copy into device memory.

    Args:
        device: where the arena lives (``cuda``, ``cuda:1``, ``mps``; ``cpu`` runs the same path for tests).
        n_buffers: staging buffers (one per I/O worker keeps workers from waiting on each other).
        buffer_bytes: capacity of each (at least the largest slice, rounded to ``alignment``).
        alignment: host address alignment (4096 lets the loader use O_DIRECT).

    Raises:
        ValueError: non-positive sizes.
    """

    def __init__(self, device: torch.device | str, n_buffers: int, buffer_bytes: int, alignment: int = 4096) -> None:
        if n_buffers <= 0 or buffer_bytes <= 0:
            raise ValueError(f"need at least one staging buffer of positive size, got {n_buffers} x {buffer_bytes}")
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"
        self.buffer_bytes = int(buffer_bytes)
        self.host_bytes = n_buffers * (self.buffer_bytes + alignment)
        self._raw = [torch.empty(self.buffer_bytes + alignment, dtype=torch.uint8, pin_memory=self.is_cuda)
                     for _ in range(n_buffers)]
        self._free: queue.SimpleQueue[torch.Tensor] = queue.SimpleQueue()
        for raw in self._raw:
            start = (-raw.data_ptr()) % alignment
            self._free.put(raw[start:start + self.buffer_bytes])
        self.copy_stream = torch.cuda.Stream(self.device) if self.is_cuda else None
        self.compute_stream = torch.cuda.current_stream(self.device) if self.is_cuda else None
        self._lock = threading.Lock()
        self.copies = 0
        self.bytes_copied = 0
        self.copy_seconds = 0.0

    @property
    def pinned(self) -> bool:
        """Whether the staging buffers are page-locked (CUDA only)."""
        return bool(self._raw[0].is_pinned()) if self.is_cuda else False

    @contextmanager
    def buffer(self) -> Iterator[np.ndarray]:
        """Borrow one staging buffer as a writable uint8 numpy array (blocks while all are in use)."""
        t = self._free.get()
        try:
            yield t.numpy()
        finally:
            self._free.put(t)

    def upload(self, host: np.ndarray, dest: Any) -> None:
        """Copy ``host`` (a staging buffer's first bytes) into the device tensor ``dest`` and wait for it.

        Args:
            host: uint8 numpy view of a borrowed staging buffer.
            dest: uint8 device tensor of the same length (an arena slot's bytes).
        """
        src = torch.from_numpy(host)
        start = time.perf_counter()
        if self.is_cuda:
            assert self.copy_stream is not None and self.compute_stream is not None
            self.copy_stream.wait_stream(self.compute_stream)  # kernels issued on the slot's old bytes go first
            with torch.cuda.stream(self.copy_stream):
                dest.copy_(src, non_blocking=True)
                done = torch.cuda.Event()
                done.record(self.copy_stream)
            done.synchronize()
        else:
            dest.copy_(src)
            if self.device.type == "mps":
                torch.mps.synchronize()
        with self._lock:
            self.copies += 1
            self.bytes_copied += src.numel()
            self.copy_seconds += time.perf_counter() - start

    def stats(self) -> dict:
        """Copies, bytes, seconds spent waiting for copies, staging size and whether it is pinned."""
        with self._lock:
            return {"device": str(self.device), "copies": self.copies, "bytes_copied": self.bytes_copied,
                    "copy_seconds": self.copy_seconds, "staging_bytes": self.host_bytes, "pinned": self.pinned,
                    "copy_stream": self.copy_stream is not None}
