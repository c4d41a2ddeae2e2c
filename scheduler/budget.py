"""Memory budgets: parsing the user's one number and the plan it turns into.

Owns ``parse_memory`` (the single place where ``--memory 6GB`` becomes bytes),
``default_budget`` (a safe fraction of available RAM), the ``MemoryPlan``
record the planner returns, and ``BudgetTooSmallError``. Knows nothing about
model families, files or the engine; ``convert/errors.BudgetError`` is
expected to reuse ``BudgetTooSmallError`` (the scheduler imports nothing of
the project, so the class lives here).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import psutil

KIB = 1024
MIB = 1024**2
GIB = 1024**3
TIB = 1024**4

# SI suffixes are powers of 1000, IEC ("iB") and bare letters powers of 1024.
_UNITS: dict[str, int] = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": KIB, "mib": MIB, "gib": GIB, "tib": TIB,
    "k": KIB, "m": MIB, "g": GIB, "t": TIB,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")
_PCT_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*%\s*$")

DEFAULT_FRACTION_OF_AVAILABLE = 0.8


class MemorySpecError(ValueError):
    """A memory size string could not be understood."""


class BudgetTooSmallError(ValueError):
    """The budget cannot hold the resident part plus one token's experts.

    Attributes:
        minimum_bytes: the smallest budget that would work.
        budget_bytes: the budget that was given.
    """

    def __init__(self, message: str, minimum_bytes: int, budget_bytes: int) -> None:
        super().__init__(message)
        self.minimum_bytes = minimum_bytes
        self.budget_bytes = budget_bytes


def format_bytes(n: int | float) -> str:
    """Human-readable binary size, e.g. ``1.50 GiB``.

    Args:
        n: a byte count.

    Returns:
        The size with a binary unit and two decimals (bytes printed exactly).
    """
    n = float(n)
    for unit, scale in (("TiB", TIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def parse_memory(spec: str | int | float, total_ram: int | None = None) -> int:
    """Turn a memory size into bytes.

    Accepts a byte count (int or digit string), a size with a unit
    (``"512MB"`` = 512·10^6, ``"6GiB"`` = 6·2^30, ``"6G"`` = 6·2^30, case
    insensitive), or a percentage of total RAM (``"75%"``).

    Args:
        spec: the size as given by the user.
        total_ram: total RAM in bytes for percentages (default: psutil's).

    Returns:
        The size in bytes (> 0).

    Raises:
        MemorySpecError: unparsable, non-positive or above-100% inputs.
    """
    if isinstance(spec, bool):
        raise MemorySpecError(f"memory size must be a number or a string like '6GB', got {spec!r}")
    if isinstance(spec, (int, float)):
        value = int(spec)
    else:
        value = _parse_string(str(spec), total_ram)
    if value <= 0:
        raise MemorySpecError(f"memory size must be positive, got {spec!r}")
    return value


def _parse_string(text: str, total_ram: int | None) -> int:
    pct = _PCT_RE.match(text)
    if pct:
        fraction = float(pct.group(1)) / 100.0
        if not 0.0 < fraction <= 1.0:
            raise MemorySpecError(f"memory percentage must be in (0, 100], got {text!r}")
        total = total_ram if total_ram is not None else psutil.virtual_memory().total
        return int(total * fraction)
    m = _SIZE_RE.match(text)
    if not m or m.group(2).lower() not in _UNITS:
        raise MemorySpecError(
            f"cannot read memory size {text!r}: use bytes, a unit "
            "(512MB, 6GB, 6GiB, 6G) or a percentage of RAM (75%)"
        )
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def default_budget(fraction: float = DEFAULT_FRACTION_OF_AVAILABLE) -> int:
    """A safe default budget: a fraction of the RAM available right now.

    Args:
        fraction: share of ``psutil.virtual_memory().available`` to use.

    Returns:
        Bytes.
    """
    return int(psutil.virtual_memory().available * fraction)


@dataclass(frozen=True)
class MemoryPlan:
    """How one budget is split. All sizes in bytes.

    ``arena_bytes`` is what the expert arena may allocate once; ``min_budget_bytes``
    is the smallest budget that would still have worked.
    """

    budget_bytes: int
    resident_bytes: int
    kv_bytes: int
    workspace_bytes: int
    io_buffer_bytes: int
    arena_bytes: int
    min_budget_bytes: int
    alignment: int
    expert_level_bytes: tuple[int, ...]
    experts_per_token_per_layer: int
    n_layers: int
    notes: tuple[str, ...] = field(default_factory=tuple)

    def slot_bytes(self, level: int) -> int:
        """Bytes one arena slot for ``level`` takes (rounded up to the alignment)."""
        return align_up(self.expert_level_bytes[level], self.alignment)

    def max_slots(self, level: int) -> int:
        """How many slots of ``level`` fit in the arena if it held only that level."""
        return self.arena_bytes // self.slot_bytes(level)

    def as_dict(self) -> dict:
        """JSON-ready view (for ``--stats`` and ``moestream doctor``)."""
        return {
            "budget_bytes": self.budget_bytes,
            "resident_bytes": self.resident_bytes,
            "kv_bytes": self.kv_bytes,
            "workspace_bytes": self.workspace_bytes,
            "io_buffer_bytes": self.io_buffer_bytes,
            "arena_bytes": self.arena_bytes,
            "min_budget_bytes": self.min_budget_bytes,
            "alignment": self.alignment,
            "expert_level_bytes": list(self.expert_level_bytes),
            "max_slots_per_level": [self.max_slots(j) for j in range(len(self.expert_level_bytes))],
            "notes": list(self.notes),
        }


def align_up(n: int, alignment: int) -> int:
    """Round ``n`` up to a multiple of ``alignment`` (alignment >= 1)."""
    return -(-n // alignment) * alignment
