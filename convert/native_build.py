"""Building small C kernels once per machine and loading them with ctypes.

Owns where compiled kernels live (``$MOESTREAM_CACHE_DIR/kernels``, else
``$XDG_CACHE_HOME`` or ``~/.cache`` + ``moestream/kernels``), the cache key
(source, flags, compiler and the CPU's feature flags, so a copied home
directory never loads a library built for another CPU), and the atomic build
(compile into a temporary name in the same folder, then rename, so concurrent
builders each install a whole file). Used by the converter's matryoshka range
search (``convert/codecs/range_search.py``) and the engine's nested-expert
kernels (``engine/native_kernels.py``); each owns its C source, flags, ctypes
signatures and self-check. Knows nothing about what the kernels compute.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("moestream")


def cache_dir() -> Path:
    """Folder of compiled kernels."""
    env = os.environ.get("MOESTREAM_CACHE_DIR")
    if env:
        return Path(env) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "moestream" / "kernels"


def cpu_key() -> str:
    """Machine type and CPU feature flags (part of every cache key)."""
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = next((ln for ln in f if ln.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine()} {flags}"


def find_compiler() -> str | None:
    """``$CC`` or ``cc`` when it is on PATH, else None."""
    cc = os.environ.get("CC") or "cc"
    return cc if shutil.which(cc) else None


def library_path(stem: str, source: str, cflags: Sequence[str], cc: str) -> Path:
    """Where the library built from ``source`` with ``cflags`` by ``cc`` on this CPU lives."""
    key = hashlib.sha256("\n".join([source, " ".join(cflags), cc, cpu_key()]).encode()).hexdigest()[:16]
    return cache_dir() / f"{stem}_{key}.so"


def compile_library(cc: str, source: str, cflags: Sequence[str], out: Path, timeout_s: float = 300) -> str | None:
    """Compile ``source`` into the shared library ``out`` (atomic rename).

    Returns:
        None on success, else the compiler's error text (its last 2,000 characters).
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src = Path(tmp) / (out.stem + ".c")
        src.write_text(source)
        tmp_so = Path(tmp) / out.name
        try:
            res = subprocess.run([cc, *cflags, str(src), "-o", str(tmp_so), "-lm"],
                                 capture_output=True, text=True, timeout=timeout_s)
        except (OSError, subprocess.SubprocessError) as exc:
            return str(exc)
        if res.returncode != 0:
            return res.stderr.strip()[-2000:]
        os.replace(tmp_so, out)
        return None


def build_first_working(stem: str, source: str, base_flags: Sequence[str], variants: Sequence[Sequence[str]],
                        cc: str, load: Callable[[Path], Any],
                        accept: Callable[[Any], str | None]) -> tuple[Any | None, list[str]]:
    """The first build variant that compiles (or is cached), loads and is accepted.

    Args:
        stem: library file name stem; source: the C source; base_flags: flags of every variant.
        variants: extra flags per variant, tried in order ([] = portable).
        cc: the compiler; load: opens a built library (ctypes, signatures set).
        accept: None when the loaded library may be used, else why not (ABI mismatch, failed self-check).

    Returns:
        (library or None, one line per variant that failed).
    """
    errors: list[str] = []
    for flags in variants:
        label = " ".join(flags) or "portable"
        path = library_path(stem, source, [*base_flags, *flags], cc)
        try:
            if not path.is_file():
                err = compile_library(cc, source, [*base_flags, *flags], path)
                if err is not None:
                    errors.append(f"{label}: {err.splitlines()[-1] if err else err}")
                    continue
            lib = load(path)
        except OSError as exc:  # unwritable cache dir, or a library the loader refuses
            errors.append(f"{label}: {exc}")
            continue
        why = accept(lib)
        if why is not None:
            errors.append(f"{path}: {why}")
            continue
        return lib, errors
    return None, errors


def build_or_warn(stem: str, source: str, base_flags: Sequence[str], variants: Sequence[Sequence[str]],
                  load: Callable[[Path], Any], accept: Callable[[Any], str | None], *, what: str,
                  fallback: str) -> Any | None:
    """:func:`build_first_working` with the system compiler, or None after one warning.

    Args:
        what: what is being built, for the warning ("quantized dense kernels").
        fallback: what runs instead ("using the torch reference (slower)").
    """
    cc = find_compiler()
    if cc is None:
        log.warning("no C compiler (%s) found: %s unavailable, %s; install gcc or clang",
                    os.environ.get("CC") or "cc", what, fallback)
        return None
    lib, errors = build_first_working(stem, source, base_flags, variants, cc, load, accept)
    if lib is None:
        log.warning("%s unavailable (%s); %s", what, "; ".join(errors), fallback)
    return lib
