"""Dropping a file's pages from the OS page cache, so reading or writing a model does not fill RAM.

Owns the one ``POSIX_FADV_DONTNEED`` call on a whole file (Linux starts
writeback of dirty pages and drops clean ones; a range would leave pages of
large files behind on some kernels). Best effort: a platform without
``posix_fadvise`` or a file system that refuses it changes nothing.
"""

from __future__ import annotations

import os
from pathlib import Path


def drop_cached_pages(fd: int) -> None:
    """Forget the cached pages of the open file ``fd`` (best effort)."""
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass


def drop_cached_file(path: str | Path) -> None:
    """Forget the cached pages of the file at ``path`` (best effort)."""
    if not hasattr(os, "posix_fadvise"):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        drop_cached_pages(fd)
    finally:
        os.close(fd)
