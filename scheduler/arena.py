"""The expert arena: one pre-allocated, page-aligned byte buffer cut into fixed slots.

Owns slot bookkeeping: which key ``(layer, expert, level)`` a slot holds, its
state (EMPTY -> LOADING -> READY -> EMPTY), pin counts, and free lists. Slots
are grouped in one pool per stored level (each level has its own slot size).
All memory is allocated in the constructor; nothing here allocates buffers at
run time. The buffer is host memory (a numpy array, page-aligned so O_DIRECT
can read straight into it) or, with ``device=``, one torch uint8 tensor on an
accelerator (CUDA/MPS): then views are torch tensors on that device and the
loader reaches it through pinned staging (``scheduler/transfer.py``). Knows
nothing about files, policies or what the bytes mean.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .budget import align_up

Key = tuple[int, int, int]  # (layer, expert, level)


class SlotState(enum.Enum):
    """Life cycle of one slot."""

    EMPTY = "empty"
    LOADING = "loading"
    READY = "ready"


class SlotStateError(RuntimeError):
    """A slot was used in a state that does not allow it (a scheduler bug)."""


class ArenaFullError(RuntimeError):
    """No free or evictable slot: every slot of the pool is pinned or loading."""


@dataclass
class Slot:
    """One fixed region of the arena."""

    index: int
    level: int
    offset: int
    capacity: int
    state: SlotState = SlotState.EMPTY
    key: Key | None = None
    nbytes: int = 0
    pins: int = 0


class ExpertArena:
    """Fixed slots in one pre-allocated aligned buffer, one pool per level.

    Args:
        slot_bytes: bytes of one slot for each level (rounded up to ``alignment``).
        slot_counts: number of slots for each level.
        alignment: base and slot alignment in bytes (4096 allows O_DIRECT).
        device: None (host numpy buffer) or a torch device for an accelerator-resident arena.

    Raises:
        ValueError: mismatched lengths, non-positive sizes, or no slots at all.
    """

    def __init__(self, slot_bytes: Sequence[int], slot_counts: Sequence[int], alignment: int = 4096,
                 device: Any = None) -> None:
        if len(slot_bytes) != len(slot_counts) or not slot_bytes:
            raise ValueError("slot_bytes and slot_counts need one entry per level")
        if min(slot_bytes) <= 0 or min(slot_counts) < 0 or sum(slot_counts) == 0:
            raise ValueError(f"need positive slot sizes and at least one slot, got {slot_bytes}, {slot_counts}")
        self.alignment = alignment
        self.slot_bytes = [align_up(int(b), alignment) for b in slot_bytes]
        self.slot_counts = [int(c) for c in slot_counts]
        self.nbytes = sum(b * c for b, c in zip(self.slot_bytes, self.slot_counts))
        self.device = device
        self.buffer: Any
        if device is None:
            self._raw = np.zeros(self.nbytes + alignment, dtype=np.uint8)  # the only allocation
            start = (-self._raw.ctypes.data) % alignment
            self.buffer = self._raw[start:start + self.nbytes]
        else:
            import torch  # only accelerator arenas need torch

            self.buffer = torch.empty(self.nbytes, dtype=torch.uint8, device=device)  # the only allocation
        self.slots: list[Slot] = []
        self._free: list[list[int]] = [[] for _ in self.slot_bytes]
        offset = 0
        for level, (size, count) in enumerate(zip(self.slot_bytes, self.slot_counts)):
            for _ in range(count):
                self._free[level].append(len(self.slots))
                self.slots.append(Slot(len(self.slots), level, offset, size))
                offset += size
        for free in self._free:
            free.reverse()  # pop() hands out low indices first
        self._by_key: dict[Key, int] = {}

    @staticmethod
    def required_bytes(slot_bytes: Sequence[int], slot_counts: Sequence[int], alignment: int = 4096) -> int:
        """Bytes an arena with these pools allocates (including base alignment)."""
        return sum(align_up(b, alignment) * c for b, c in zip(slot_bytes, slot_counts)) + alignment

    @property
    def on_host(self) -> bool:
        """True when the buffer is host memory the loader can read into directly."""
        return self.device is None

    @property
    def address(self) -> int:
        """Address of the aligned buffer (constant for the arena's life)."""
        return int(self.buffer.ctypes.data) if self.on_host else int(self.buffer.data_ptr())

    def lookup(self, key: Key) -> Slot | None:
        """The slot holding ``key`` (LOADING or READY), or None."""
        index = self._by_key.get(key)
        return None if index is None else self.slots[index]

    @property
    def n_held(self) -> int:
        """How many keys are held (LOADING or READY)."""
        return len(self._by_key)

    def keys(self) -> Iterator[Key]:
        """Keys currently held (LOADING or READY)."""
        return iter(list(self._by_key))

    def free_count(self, level: int) -> int:
        """EMPTY slots left in ``level``'s pool."""
        return len(self._free[level])

    def view(self, slot: Slot, nbytes: int | None = None) -> Any:
        """uint8 view of a slot (no copy; a numpy array, or a device tensor). ``nbytes`` defaults to the bytes loaded."""
        n = slot.nbytes if nbytes is None else nbytes
        return self.buffer[slot.offset:slot.offset + n]

    def full_view(self, slot: Slot) -> Any:
        """uint8 view of the slot's whole capacity (the loader, or the staging copy, writes into this)."""
        return self.buffer[slot.offset:slot.offset + slot.capacity]

    def begin_load(self, key: Key, nbytes: int) -> Slot:
        """Claim an EMPTY slot of the key's level for loading ``nbytes``.

        Raises:
            SlotStateError: the key is already held.
            ValueError: ``nbytes`` exceeds the slot size.
            ArenaFullError: the pool has no EMPTY slot (evict first).
        """
        level = key[2]
        if key in self._by_key:
            raise SlotStateError(f"key {key} is already in the arena")
        if nbytes > self.slot_bytes[level]:
            raise ValueError(f"{nbytes} bytes do not fit a level-{level} slot of {self.slot_bytes[level]} bytes")
        if not self._free[level]:
            raise ArenaFullError(f"no EMPTY slot for level {level}")
        slot = self.slots[self._free[level].pop()]
        slot.state, slot.key, slot.nbytes, slot.pins = SlotState.LOADING, key, nbytes, 0
        self._by_key[key] = slot.index
        return slot

    def finish_load(self, slot: Slot) -> None:
        """LOADING -> READY."""
        self._expect(slot, SlotState.LOADING)
        slot.state = SlotState.READY

    def fail_load(self, slot: Slot) -> None:
        """LOADING -> EMPTY (the read failed); pins are dropped."""
        self._expect(slot, SlotState.LOADING)
        self._release(slot)

    def evict(self, slot: Slot) -> None:
        """READY and unpinned -> EMPTY."""
        self._expect(slot, SlotState.READY)
        if slot.pins:
            raise SlotStateError(f"slot {slot.index} ({slot.key}) is pinned {slot.pins}x and cannot be evicted")
        self._release(slot)

    def pin(self, slot: Slot) -> None:
        """Protect a LOADING or READY slot from eviction."""
        if slot.state is SlotState.EMPTY:
            raise SlotStateError(f"cannot pin EMPTY slot {slot.index}")
        slot.pins += 1

    def unpin(self, slot: Slot) -> None:
        """Undo one ``pin``."""
        if slot.pins <= 0:
            raise SlotStateError(f"slot {slot.index} ({slot.key}) is not pinned")
        slot.pins -= 1

    def _expect(self, slot: Slot, state: SlotState) -> None:
        if slot.state is not state:
            raise SlotStateError(f"slot {slot.index} ({slot.key}) is {slot.state.value}, expected {state.value}")

    def _release(self, slot: Slot) -> None:
        del self._by_key[slot.key]
        slot.state, slot.key, slot.nbytes, slot.pins = SlotState.EMPTY, None, 0, 0
        self._free[slot.level].append(slot.index)
