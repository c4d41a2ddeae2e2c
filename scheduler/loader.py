"""Positioned reads of expert byte ranges into caller-owned buffers, on worker threads.

Owns file descriptors, the O_DIRECT / buffered choice, retries, and I/O
counters. A read uses O_DIRECT when the platform has it and the offset, the
destination address and the destination capacity (rounded-up length) are all
multiples of the block size; otherwise it uses a buffered ``preadv`` followed
by ``posix_fadvise(POSIX_FADV_DONTNEED)`` so the page cache does not keep a
second copy. EIO, EINTR, EAGAIN and short reads are retried, then raised as
``ExpertReadError``. Knows nothing about experts, levels or the arena's
bookkeeping: it only sees ``(path, offset, nbytes)`` and a writable buffer.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from .budget import align_up

RETRYABLE_ERRNOS = frozenset({errno.EIO, errno.EINTR, errno.EAGAIN})

# reader(fd, buffer, offset) -> bytes read; os.preadv semantics. Injectable for tests.
Reader = Callable[[int, memoryview, int], int]


class ByteRange(NamedTuple):
    """One contiguous range of a file (same fields as convert's ByteRange)."""

    path: str
    offset: int
    nbytes: int


class ExpertReadError(OSError):
    """A byte range could not be read after retries; the message says what to check."""


def as_byte_range(obj: Any) -> ByteRange:
    """Accept a ByteRange, any object with ``path/offset/nbytes``, or a 3-tuple.

    Raises:
        TypeError: the object has none of these shapes.
    """
    if isinstance(obj, ByteRange):
        return obj
    if all(hasattr(obj, a) for a in ("path", "offset", "nbytes")):
        return ByteRange(os.fspath(obj.path), int(obj.offset), int(obj.nbytes))
    if isinstance(obj, tuple) and len(obj) == 3:
        return ByteRange(os.fspath(obj[0]), int(obj[1]), int(obj[2]))
    raise TypeError(f"expected (path, offset, nbytes), got {obj!r}")


def _default_reader(fd: int, buffer: memoryview, offset: int) -> int:
    return os.preadv(fd, [buffer], offset)


@dataclass
class LoaderStats:
    """Counters; ``read_seconds`` is summed over worker threads."""

    reads: int = 0
    direct_reads: int = 0
    buffered_reads: int = 0
    bytes_read: int = 0
    bytes_transferred: int = 0
    retries: int = 0
    failures: int = 0
    read_seconds: float = 0.0

    def as_dict(self) -> dict:
        """JSON-ready counters plus bandwidth in bytes/s."""
        d = dict(self.__dict__)
        d["read_bandwidth_bytes_per_s"] = self.bytes_read / self.read_seconds if self.read_seconds > 0 else 0.0
        return d


class ExpertLoader:
    """Reads byte ranges into buffers, synchronously or on worker threads.

    Args:
        n_workers: worker threads for ``submit``.
        direct: True forces trying O_DIRECT when aligned, False never uses it,
            None (default) uses it when aligned and the file system accepts it.
        block_size: O_DIRECT alignment unit.
        retries: extra attempts after a retryable error or short read.
        retry_delay_s: pause between attempts.
        reader: ``reader(fd, buffer, offset) -> n`` (defaults to ``os.preadv``).
    """

    def __init__(
        self,
        n_workers: int = 2,
        direct: bool | None = None,
        block_size: int = 4096,
        retries: int = 2,
        retry_delay_s: float = 0.01,
        reader: Reader | None = None,
    ) -> None:
        self.direct = direct
        self.block_size = block_size
        self.retries = retries
        self.retry_delay_s = retry_delay_s
        self.reader = reader or _default_reader
        self.stats = LoaderStats()
        self.direct_disabled_reason: dict[str, str] = {}
        self._fds: dict[tuple[str, bool], int] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="moestream-io")

    def submit(self, rng: Any, dest: np.ndarray,
               callback: Callable[[Future], None] | None = None) -> Future:
        """Read on a worker thread; the future's result is the byte count.

        Args:
            rng: (path, offset, nbytes).
            dest: writable uint8 buffer with at least nbytes.
            callback: called with the finished future (on the worker thread).

        Returns:
            A Future[int]; its exception is an ExpertReadError on failure.
        """
        future = self._pool.submit(self.read_into, rng, dest)
        if callback is not None:
            future.add_done_callback(callback)
        return future

    def submit_job(self, job: Callable[[], Any], callback: Callable[[Future], None] | None = None) -> Future:
        """Run ``job()`` on a worker thread (a read plus the caller's follow-up, e.g. verify and upload).

        Args:
            job: called without arguments on a worker; it typically calls :meth:`read_into`.
            callback: called with the finished future (on the worker thread).

        Returns:
            A Future with the job's result or exception.
        """
        future = self._pool.submit(job)
        if callback is not None:
            future.add_done_callback(callback)
        return future

    def read_into(self, rng: Any, dest: np.ndarray) -> int:
        """Read ``rng`` into ``dest[:nbytes]`` now, retrying transient failures.

        Args:
            rng: (path, offset, nbytes).
            dest: writable uint8 buffer (numpy array or memoryview) of >= nbytes.

        Returns:
            nbytes.

        Raises:
            ValueError: ``dest`` is smaller than the range.
            ExpertReadError: the file is missing, or reads kept failing.
        """
        r = as_byte_range(rng)
        view = memoryview(dest).cast("B")
        if len(view) < r.nbytes:
            raise ValueError(f"destination holds {len(view)} bytes, range needs {r.nbytes}")
        start = time.perf_counter()
        last_problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self._count(retries=1)
                time.sleep(self.retry_delay_s)
            try:
                transferred, used_direct = self._read_once(r, view)
            except OSError as exc:
                if exc.errno not in RETRYABLE_ERRNOS:
                    self._count(failures=1)
                    raise ExpertReadError(exc.errno, f"cannot read {r.nbytes} bytes at offset {r.offset} "
                                          f"of {r.path}: {exc.strerror or exc}. Check that the model "
                                          "files exist and are readable.") from exc
                last_problem = f"{os.strerror(exc.errno)} (errno {exc.errno})"
                continue
            if transferred < r.nbytes:
                last_problem = f"short read: got {transferred} of {r.nbytes} bytes"
                continue
            self._count(reads=1, bytes_read=r.nbytes, bytes_transferred=transferred,
                        direct_reads=int(used_direct), buffered_reads=int(not used_direct),
                        read_seconds=time.perf_counter() - start)
            return r.nbytes
        self._count(failures=1)
        raise ExpertReadError(errno.EIO, f"reading {r.nbytes} bytes at offset {r.offset} of {r.path} "
                              f"failed {self.retries + 1} times ({last_problem}). The file may be "
                              "truncated or the disk failing: re-run the conversion or check the disk.")

    def close(self) -> None:
        """Stop the workers and close every file descriptor."""
        self._pool.shutdown(wait=True)
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __enter__(self) -> "ExpertLoader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def can_use_direct(self, rng: ByteRange, view: memoryview) -> bool:
        """Whether this read qualifies for O_DIRECT (platform, settings, alignment)."""
        if self.direct is False or not hasattr(os, "O_DIRECT") or rng.path in self.direct_disabled_reason:
            return False
        b = self.block_size
        address = np.frombuffer(view, dtype=np.uint8).ctypes.data if len(view) else 0
        return rng.offset % b == 0 and address % b == 0 and len(view) >= align_up(rng.nbytes, b)

    def _read_once(self, r: ByteRange, view: memoryview) -> tuple[int, bool]:
        if self.can_use_direct(r, view):
            fd = self._fd(r.path, direct=True)
            if fd is not None:
                length = align_up(r.nbytes, self.block_size)
                try:
                    n = self.reader(fd, view[:length], r.offset)
                    return n, True
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    self._disable_direct(r.path, f"O_DIRECT read rejected: {exc.strerror}")
        fd = self._fd(r.path, direct=False)
        got = 0
        while got < r.nbytes:
            n = self.reader(fd, view[got:r.nbytes], r.offset + got)
            if n <= 0:
                break
            got += n
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, r.offset, r.nbytes, os.POSIX_FADV_DONTNEED)
        return got, False

    def _fd(self, path: str, direct: bool) -> int | None:
        with self._lock:
            fd = self._fds.get((path, direct))
            if fd is not None:
                return fd
            flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
            try:
                fd = os.open(path, flags)
            except OSError as exc:
                if direct and exc.errno == errno.EINVAL:
                    self.direct_disabled_reason[path] = f"open(O_DIRECT) rejected: {exc.strerror}"
                    return None
                raise
            self._fds[(path, direct)] = fd
            return fd

    def _disable_direct(self, path: str, reason: str) -> None:
        with self._lock:
            self.direct_disabled_reason[path] = reason

    def _count(self, **deltas: float) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self.stats, name, getattr(self.stats, name) + delta)
