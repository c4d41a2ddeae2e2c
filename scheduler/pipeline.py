"""StreamingExpertCache: acquire / release / hint over the arena, loader and a policy.

Owns the runtime expert cache the engine's ExpertProvider wraps: which
(layer, expert, level) slices are resident, pinning while an expert is in
use, eviction through a pluggable policy (capacity shared across layers or
capped per layer), prefetch on hints, hottest-expert-bit-first (HEBF) order
of missing slices, and the precision policy:

- ``exact``: wait until the requested level is resident;
- ``adaptive``: when the requested level is not resident within
  ``late_after_s``, use the highest level that is (counted as a fallback).

Levels are nested by default: level j needs the slices of levels 0..j (one
contiguous byte range each); with ``nested_levels=False`` every level is
self-contained. Knows nothing about tensors or models: the caller supplies
``source.range_of(layer, expert, level) -> (path, offset, nbytes)`` and
``decode(layer, expert, level, buffers) -> view`` where ``buffers`` are uint8
arrays aliasing arena slots (numpy for a host arena, device tensors for an
accelerator arena), valid until ``release``. Reads and checksum verification
run on the loader's worker threads, outside the cache lock; with an
accelerator arena they land in pinned staging buffers first and are copied to
the slot on a separate stream (``transfer.py``).
"""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Protocol, Sequence

import numpy as np

from .arena import ExpertArena, Key, Slot, SlotState
from .hebf import hebf_order
from .loader import ExpertLoader, as_byte_range
from .policies import CachePolicy, LRUPolicy

if TYPE_CHECKING:  # the host-only path never imports torch
    from .transfer import DeviceStaging

PRECISION_POLICIES = ("exact", "adaptive")
Decode = Callable[[int, int, int, list[np.ndarray]], Any]
Verify = Callable[[Key, np.ndarray], None]


class ExpertSource(Protocol):
    """Where each expert slice lives on disk."""

    def range_of(self, layer: int, expert: int, level: int) -> Any:
        """(path, offset, nbytes) — a tuple or an object with those attributes."""


class CacheCapacityError(RuntimeError):
    """Every slot that could take a slice is pinned or loading (arena too small for the request)."""


def _ids(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x).reshape(-1).astype(np.int64)


def _layer_stats() -> dict:
    return {"hits": 0, "misses": 0, "fallbacks": 0, "stall_s": 0.0, "prefetch_issued": 0,
            "prefetch_used": 0, "prefetch_wasted": 0, "prefetch_skipped": 0,
            "predicted": 0, "predicted_correct": 0, "capped": 0}


class StreamingExpertCache:
    """Expert cache over a fixed arena, fed by a loader.

    Args:
        source: byte ranges per (layer, expert, level).
        decode: builds what the kernel needs from a slice's bytes.
        arena: the pre-allocated arena (one pool per level).
        loader: reads ranges into slots on worker threads (owned by the caller).
        policy: eviction policy (default LRU); sees keys (layer, expert, level).
        precision_policy: "exact" or "adaptive".
        nested_levels: level j requires levels 0..j.
        per_layer_slots: cap of slots per layer and level (None: shared capacity).
        late_after_s: adaptive mode's patience before falling back.
        verify: optional check of a loaded slice; an exception fails the load.
        wait_timeout_s: give up waiting for a load after this long (None: wait).
        staging: required when the arena lives on an accelerator: reads land in its host buffers, are
            verified there and copied to the slot (``scheduler/transfer.py``).
        stable_views: ``decode`` returns views over the slot bytes alone (no shared scratch), so a view
            stays valid while its slots hold the same keys: the all-hit fast path then reuses the view it
            made last time for the same (layer, expert, level, slots) instead of decoding again.

    Raises:
        ValueError: unknown precision policy, or a device arena without staging.
    """

    def __init__(self, source: ExpertSource, decode: Decode, arena: ExpertArena, loader: ExpertLoader,
                 policy: CachePolicy | None = None, precision_policy: str = "exact",
                 nested_levels: bool = True, per_layer_slots: int | None = None,
                 late_after_s: float = 0.0, verify: Verify | None = None,
                 wait_timeout_s: float | None = None, staging: DeviceStaging | None = None,
                 stable_views: bool = False) -> None:
        if precision_policy not in PRECISION_POLICIES:
            raise ValueError(f"precision_policy must be one of {PRECISION_POLICIES}, got {precision_policy!r}")
        if not arena.on_host and staging is None:
            raise ValueError(f"the arena lives on {arena.device}: reads need staging buffers (DeviceStaging) to land in")
        self.staging = staging
        self.source, self.decode, self.arena, self.loader = source, decode, arena, loader
        self.policy = policy or LRUPolicy()
        self.precision_policy = precision_policy
        self.nested_levels = nested_levels
        self.per_layer_slots = per_layer_slots
        self.late_after_s = late_after_s
        self.verify = verify
        self.wait_timeout_s = wait_timeout_s
        self.n_levels = len(arena.slot_bytes)
        self._cond = threading.Condition()
        self._errors: dict[Key, BaseException] = {}
        self._pins: dict[tuple[int, int], list[list[Key]]] = defaultdict(list)
        self._prefetched: set[Key] = set()
        self._hinted: dict[int, set[int]] = {}
        self._held: Counter = Counter()  # (layer, level) -> slots held
        self._inflight: set[Future] = set()
        self.loads_started = 0  # slices claimed for loading (prefetch or demand) since construction
        self._stats: dict[int, dict] = defaultdict(_layer_stats)
        # (layer, expert, level, slot indices) -> view; bounded (cleared when full), only with stable_views
        self._views: dict[tuple, Any] | None = {} if stable_views else None
        self._views_limit = 2 * max(1, sum(arena.slot_counts))

    # ------------------------------------------------------------------ public API

    def hint(self, layer: int, predicted_ids: Any, predicted_weights: Any = None,
             levels: int | Mapping[int, int] | None = None, prediction: bool = True) -> None:
        """Prefetch the predicted experts of ``layer`` (HEBF order, never evicting pinned slices).

        Args:
            layer: the layer the prediction is for.
            predicted_ids: expert ids ([T, k] or flat).
            predicted_weights: unused except for API symmetry.
            levels: level per expert (default: the highest).
            prediction: count these ids as a routing prediction in the prefetch-accuracy stats (False for
                ids already known to be needed, e.g. the later chunks of a prefill).
        """
        ids = _ids(predicted_ids)
        demand = Counter(ids.tolist())
        experts = list(demand)
        with self._cond:
            if prediction:
                self._hinted[layer] = set(experts)
            wanted = {e: self._needed(e, levels) for e in experts}
            keys = [k for e in experts for k in self._required_keys(layer, e, wanted[e])]
            self.policy.on_hint(keys)
            missing = {e: [k[2] for k in self._required_keys(layer, e, wanted[e]) if self.arena.lookup(k) is None]
                       for e in experts}
            order = hebf_order(missing, {e: {wanted[e]: demand[e]} for e in experts})
            for e, level in order:
                key = (layer, e, level)
                if self._start_load(key, pin=False, protect=set(keys)):
                    self._prefetched.add(key)
                    self._stats[layer]["prefetch_issued"] += 1
                else:
                    self._stats[layer]["prefetch_skipped"] += 1

    def acquire(self, layer: int, expert_ids: Any, gate_weights: Any = None,
                levels: int | Mapping[int, int] | None = None) -> dict[int, Any]:
        """Pin and return the decoded experts of ``layer`` (all of them, once usable).

        Args:
            layer: the layer.
            expert_ids: the routed ids ([T, k] or flat); duplicates count as demand.
            gate_weights: unused by the cache (the engine combines outputs).
            levels: level per expert (int for all, mapping, default: the highest).

        Returns:
            {expert_id: decode(layer, expert, level_used, buffers)}.

        Raises:
            ExpertReadError (or the verify error): a slice could not be loaded.
            CacheCapacityError: no slot can take a needed slice.
            TimeoutError: ``wait_timeout_s`` passed.
        """
        return dict(self.acquire_iter(layer, expert_ids, gate_weights, levels))

    def acquire_resident(self, layer: int, experts: Sequence[int], levels: Mapping[int, int]) -> dict[int, Any] | None:
        """The all-hit fast path of :meth:`acquire`: when every needed slice of every expert (distinct ids)
        is READY, pin and decode them with the same stats, policy calls and pin records as ``acquire``;
        otherwise change nothing and return None (the caller takes the general path)."""
        if self.precision_policy == "adaptive" and not self.nested_levels:
            return None  # adaptive pins extra lower levels there: the general path handles it
        with self._cond:
            found = []
            for e in experts:
                keys = self._required_keys(layer, e, self._needed(e, levels))
                slots = [self.arena.lookup(k) for k in keys]
                if any(slot is None or slot.state is not SlotState.READY for slot in slots):
                    return None
                found.append((e, keys, slots))
            st = self._count_prediction(layer, experts)
            st["hits"] += len(found)
            for e, keys, slots in found:
                for key, slot in zip(keys, slots):
                    self.policy.on_access(key)
                    self._pin_held(key, slot, st)
                self._pins[(layer, e)].append(keys)
        return {e: self._resident_view(layer, e, len(keys) - 1 if self.nested_levels else keys[-1][2], slots)
                for e, keys, slots in found}

    def _resident_view(self, layer: int, expert: int, level: int, slots: list[Slot]) -> Any:
        """Decode a pinned, READY expert (reusing the view of the same slots when views are stable)."""
        if self._views is None:
            return self.decode(layer, expert, level, [self.arena.view(s) for s in slots])
        key = (layer, expert, level, *(s.index for s in slots))
        view = self._views.get(key)
        if view is None:
            view = self.decode(layer, expert, level, [self.arena.view(s) for s in slots])
            if len(self._views) >= self._views_limit:
                self._views.clear()
            self._views[key] = view
        return view

    def acquire_iter(self, layer: int, expert_ids: Any, gate_weights: Any = None,
                     levels: int | Mapping[int, int] | None = None) -> Iterator[tuple[int, Any]]:
        """Like ``acquire`` but yields (expert, view) as each becomes usable, resident ones first."""
        ids = _ids(expert_ids)
        demand = Counter(ids.tolist())
        experts = list(demand)
        with self._cond:
            wanted = self._begin_acquire(layer, experts, demand, levels)
        start = time.perf_counter()
        pending = list(experts)
        try:
            while pending:
                ready = self._wait_usable(layer, pending, wanted, start)
                for e, level in ready:
                    pending.remove(e)
                    yield e, self.decode(layer, e, level, self._buffers(layer, e, level))
        except BaseException:
            self.release(layer, experts)
            raise

    def release(self, layer: int, expert_ids: Any) -> None:
        """Unpin what the matching ``acquire`` pinned (once per acquired expert)."""
        with self._cond:
            for e in dict.fromkeys(_ids(expert_ids).tolist()):
                stack = self._pins.get((layer, e))
                if not stack:
                    continue
                for key in stack.pop():
                    slot = self.arena.lookup(key)
                    if slot is not None and slot.pins > 0:
                        self.arena.unpin(slot)
                if not stack:
                    del self._pins[(layer, e)]
            self._cond.notify_all()

    def wait_idle(self, timeout: float | None = None) -> None:
        """Block until no load is in flight."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._inflight:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError("loads still in flight")
                self._cond.wait(left)

    def layer_misses(self, layer: int) -> int:
        """Acquired experts of ``layer`` that were not resident, so far."""
        stats = self._stats.get(layer)
        return 0 if stats is None else stats["misses"]

    def holds_all(self, keys: Sequence[Key]) -> bool:
        """True when every key is READY in the arena and no load is in flight (O(1) when plainly not)."""
        with self._cond:
            if self._inflight or self.arena.n_held < len(keys):
                return False
            return all(self._ready(k) for k in keys)

    def resident_levels(self, layer: int, expert: int) -> list[int]:
        """Levels of (layer, expert) whose slice is READY."""
        with self._cond:
            return [lv for lv in range(self.n_levels) if self._ready((layer, expert, lv))]

    def stats(self) -> dict:
        """Per-layer and total counters, prefetch accuracy, loader and arena figures."""
        with self._cond:
            layers = {layer: dict(s) for layer, s in sorted(self._stats.items())}
        totals = _layer_stats()
        for s in layers.values():
            for name, value in s.items():
                totals[name] += value
        for s in [*layers.values(), totals]:
            s["prefetch_accuracy"] = s["predicted_correct"] / s["predicted"] if s["predicted"] else None
            s["hit_rate"] = s["hits"] / (s["hits"] + s["misses"]) if s["hits"] + s["misses"] else None
        return {"precision_policy": self.precision_policy, "policy": self.policy.name,
                "layers": layers, "totals": totals, "loader": self.loader.stats.as_dict(),
                "arena": {"nbytes": self.arena.nbytes, "slots_per_level": self.arena.slot_counts,
                          "slot_bytes": self.arena.slot_bytes, "device": str(self.arena.device or "cpu")},
                "transfer": self.staging.stats() if self.staging is not None else None}

    # ------------------------------------------------------------------ internals (hold self._cond)

    def _needed(self, expert: int, levels: int | Mapping[int, int] | None) -> int:
        if levels is None:
            level = self.n_levels - 1
        elif isinstance(levels, Mapping):
            level = int(levels.get(expert, self.n_levels - 1))
        else:
            level = int(levels)
        if not 0 <= level < self.n_levels:
            raise ValueError(f"level {level} outside 0..{self.n_levels - 1}")
        return level

    def _required_keys(self, layer: int, expert: int, level: int) -> list[Key]:
        lows = range(level + 1) if self.nested_levels else [level]
        return [(layer, expert, lv) for lv in lows]

    def _begin_acquire(self, layer: int, experts: list[int], demand: Counter,
                       levels: int | Mapping[int, int] | None) -> dict[int, int]:
        st = self._count_prediction(layer, experts)
        wanted = {e: self._needed(e, levels) for e in experts}
        pinned: dict[int, list[Key]] = {}
        missing: dict[int, list[int]] = {}
        all_keys = {k for e in experts for k in self._required_keys(layer, e, wanted[e])}
        for e in experts:
            keys = self._required_keys(layer, e, wanted[e])
            st["hits" if all(self._ready(k) for k in keys) else "misses"] += 1
            extra = [(layer, e, lv) for lv in range(wanted[e])] if self.precision_policy == "adaptive" else []
            pinned[e] = []
            for key in dict.fromkeys(keys + extra):
                if key in keys:
                    self.policy.on_access(key)
                slot = self.arena.lookup(key)
                if slot is not None:
                    self._pin_held(key, slot, st)
                    pinned[e].append(key)
                elif key in keys:
                    missing.setdefault(e, []).append(key[2])
        order = hebf_order(missing, {e: {wanted[e]: demand[e]} for e in experts})
        try:
            for e, level in order:
                if level > wanted[e]:
                    continue  # capped below this plane by an earlier lack of room (adaptive)
                key = (layer, e, level)
                if self._start_load(key, pin=True, protect=all_keys):
                    pinned[e].append(key)
                elif self.precision_policy == "adaptive" and level > 0:
                    wanted[e] = level - 1  # no room for this plane now: run at the level below
                    st["capped"] += 1
                else:
                    raise CacheCapacityError(
                        f"no arena slot for expert {e} level {level} of layer {layer}: every slot is "
                        "pinned or loading. Give a larger --memory or release experts before acquiring more.")
        finally:
            for e, keys in pinned.items():
                self._pins[(layer, e)].append(keys)
        return wanted

    def _count_prediction(self, layer: int, experts: Sequence[int]) -> dict:
        """Score the layer's pending routing prediction against the experts acquired; the layer's stats."""
        st = self._stats[layer]
        predicted = self._hinted.pop(layer, None)
        if predicted is not None:
            st["predicted"] += len(predicted)
            st["predicted_correct"] += len(predicted.intersection(experts))
        return st

    def _pin_held(self, key: Key, slot: Slot, st: dict) -> None:
        """Pin a slice already in the arena for an acquire (a prefetched one counts as used)."""
        self.arena.pin(slot)
        if key in self._prefetched:
            self._prefetched.discard(key)
            st["prefetch_used"] += 1

    def _ready(self, key: Key) -> bool:
        slot = self.arena.lookup(key)
        return slot is not None and slot.state is SlotState.READY

    def _usable_level(self, layer: int, expert: int, wanted: int, late: bool) -> int | None:
        if all(self._ready(k) for k in self._required_keys(layer, expert, wanted)):
            return wanted
        if self.precision_policy != "adaptive" or not late:
            return None
        for lv in range(wanted - 1, -1, -1):
            if all(self._ready(k) for k in self._required_keys(layer, expert, lv)):
                return lv
        return None

    def _wait_usable(self, layer: int, pending: list[int], wanted: dict[int, int],
                     start: float) -> list[tuple[int, int]]:
        with self._cond:
            while True:
                elapsed = time.perf_counter() - start
                late = elapsed >= self.late_after_s
                ready = []
                for e in pending:
                    self._raise_failed(layer, e, wanted[e])
                    level = self._usable_level(layer, e, wanted[e], late)
                    if level is not None:
                        ready.append((e, level))
                        if level < wanted[e]:
                            self._stats[layer]["fallbacks"] += 1
                if ready:
                    return ready
                waited = time.perf_counter()
                timeout = self.wait_timeout_s
                if not late:
                    remaining = self.late_after_s - elapsed
                    timeout = remaining if timeout is None else min(timeout, remaining)
                if not self._cond.wait(timeout) and self.wait_timeout_s is not None and late:
                    raise TimeoutError(f"layer {layer}: experts {pending} not loaded after {self.wait_timeout_s}s")
                self._stats[layer]["stall_s"] += time.perf_counter() - waited

    def _raise_failed(self, layer: int, expert: int, wanted: int) -> None:
        for key in self._required_keys(layer, expert, wanted):
            if self.arena.lookup(key) is None and key in self._errors:
                raise self._errors.pop(key)

    def _buffers(self, layer: int, expert: int, level: int) -> list[np.ndarray]:
        with self._cond:
            return [self.arena.view(self.arena.lookup(k)) for k in self._required_keys(layer, expert, level)]

    def _start_load(self, key: Key, pin: bool, protect: set[Key]) -> bool:
        rng = as_byte_range(self.source.range_of(*key))
        slot = self._claim_slot(key, rng.nbytes, protect)
        if slot is None:
            return False
        self.loads_started += 1
        if pin:
            self.arena.pin(slot)
        self._held[(key[0], key[2])] += 1
        self.policy.on_insert(key)
        self._errors.pop(key, None)
        dest = self.arena.view(slot, rng.nbytes) if self.staging is not None else self.arena.full_view(slot)
        future = self.loader.submit_job(lambda: self._load(key, rng, dest),
                                        callback=lambda f, k=key, i=slot.index: self._on_loaded(k, i, f))
        if not future.done():  # a finished future already ran its callback
            self._inflight.add(future)
        return True

    def _claim_slot(self, key: Key, nbytes: int, protect: set[Key]) -> Slot | None:
        layer, _, level = key
        same_layer_only = self.per_layer_slots is not None and self._held[(layer, level)] >= self.per_layer_slots
        if same_layer_only or self.arena.free_count(level) == 0:
            candidates = [s.key for s in self.arena.slots
                          if s.level == level and s.state is SlotState.READY and s.pins == 0
                          and s.key not in protect and (not same_layer_only or s.key[0] == layer)]
            if not candidates:
                return None
            self._evict(self.policy.victim(candidates))
        return self.arena.begin_load(key, nbytes)

    def _evict(self, key: Key) -> None:
        self.arena.evict(self.arena.lookup(key))
        self._held[(key[0], key[2])] -= 1
        self.policy.on_evict(key)
        if key in self._prefetched:
            self._prefetched.discard(key)
            self._stats[key[0]]["prefetch_wasted"] += 1

    def _load(self, key: Key, rng: Any, dest: Any) -> None:
        """Worker thread: read the slice, verify it, and (device arena) copy it from staging to its slot."""
        if self.staging is None:
            self.loader.read_into(rng, dest)
            if self.verify is not None:
                self.verify(key, dest[:rng.nbytes])
            return
        with self.staging.buffer() as host:
            self.loader.read_into(rng, host)
            if self.verify is not None:
                self.verify(key, host[:rng.nbytes])
            self.staging.upload(host[:rng.nbytes], dest)

    def _on_loaded(self, key: Key, index: int, future: Future) -> None:
        with self._cond:
            self._inflight.discard(future)
            slot = self.arena.slots[index]
            error = future.exception()
            if error is None:
                self.arena.finish_load(slot)
            else:
                self.arena.fail_load(slot)
                self._held[(key[0], key[2])] -= 1
                self.policy.on_evict(key)
                self._prefetched.discard(key)
                self._errors[key] = error
            self._cond.notify_all()
