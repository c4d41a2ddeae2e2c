"""Streaming routed experts from moestream shards through one fixed arena.

Owns :class:`StreamingExperts`, the :class:`~moestream.engine.experts.ExpertProvider`
that wraps the scheduler's :class:`~moestream.scheduler.pipeline.StreamingExpertCache`
over a :class:`~moestream.convert.shard_reader.ShardedModel`:

- arena slots are sized from the plan (``MemoryPlan.arena_bytes``) and never
  grow; expert bytes are read straight into them (O_DIRECT when aligned, else
  pread + ``POSIX_FADV_DONTNEED``) and verified with the reader's checksum rule
  (``verify_expert_bytes``, per plane, once per process by default);
- decoding builds an :class:`ExpertView` with ``torch.frombuffer`` over the
  slot: fp32 experts whose gate and up projections are adjacent on disk are
  used in place (zero copies, ``gate_up`` is one ``[2I, H]`` view); other
  layouts (f16/bf16 storage, padded projections) are widened into a fixed pool
  of fp32 scratch buffers allocated once (the planner counts them);
- ``hint`` forwards layer l+1's predicted experts to the cache (prefetch in
  hottest-expert-bit-first order); ``stats`` adds the plan and hint counts.

and :func:`load_streaming_model`, which opens the shards (headers only), plans
the budget BEFORE reading any weight (refusing with the minimum when it is too
small), then loads dense weights one tensor at a time (parameters are built on
``meta`` and assigned as read; Q8_0/Q4_0 matrices stay packed on the CPU,
``engine/quantized_dense.py``) and installs the provider. Shard models are
ALWAYS served through the arena: when every expert fits, the arena simply holds
them all after their first use (one code path, one memory accounting).
:func:`load_resident_shard_model` is the reference path: every expert decoded
to fp32 in a :class:`ResidentExperts`, dense matrices widened to fp32.

Knows nothing about tokenization, the generate loop or the CLI.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from moestream.convert import constants as C
from moestream.convert.errors import ModelFormatError, SettingError
from moestream.convert.nested_planes import HEADER_BYTES, PlaneDecoder, compiled_decode_failure
from moestream.convert.page_cache import drop_cached_file
from moestream.convert.shard_reader import ShardedModel, tensor_from_buffer
from moestream.engine import native_kernels
from moestream.engine.experts import ExpertView, ResidentExperts
from moestream.engine.models.base import MoECausalLM
from moestream.engine.planning import ModelFootprint, model_footprint, plan_for, resolve_budget
from moestream.engine.quantized_dense import held_weight_bytes, install_quantized, quantized_targets
from moestream.scheduler.arena import ExpertArena
from moestream.scheduler.budget import MemoryPlan, align_up, format_bytes
from moestream.scheduler.loader import ExpertLoader
from moestream.scheduler.pipeline import CacheCapacityError, StreamingExpertCache
from moestream.scheduler.planner import split_arena
from moestream.scheduler.policies import POLICIES, make_policy
from moestream.scheduler.transfer import DeviceStaging

log = logging.getLogger("moestream")

#: How a device arena decodes nested experts: ``auto`` (default: the torch.compile'd decode on CUDA,
#: eager elsewhere), ``1`` (compiled on any device, e.g. to test it on the CPU's staged path), ``0`` (eager).
COMPILE_DECODE_ENV = "MOESTREAM_COMPILE_DECODE"


def compiled_decode_wanted(device: torch.device) -> bool:
    """Whether a device arena on ``device`` decodes nested experts with the compiled decode (``COMPILE_DECODE_ENV``).

    Raises:
        SettingError: the variable is not ``auto``, ``0`` or ``1``.
    """
    mode = os.environ.get(COMPILE_DECODE_ENV, "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SettingError(f"{COMPILE_DECODE_ENV} must be auto, 0 or 1, got {mode!r}")
    return mode == "1" or (mode == "auto" and device.type == "cuda")

CACHE_POLICIES = tuple(POLICIES)  # lru, lfu, consistency
#: Tokens of history the consistency policy counts (window = tokens x MoE layers x k accesses).
CONSISTENCY_WINDOW_TOKENS = 4
#: I/O threads: 4 reads in flight gave the best O_DIRECT bandwidth for expert-sized reads here
#: (bench/results/io_depth.json: median 0.92 / 1.39 / 1.58 / 1.50 GB/s with 1 / 2 / 4 / 8).
DEFAULT_IO_WORKERS = 4

# Legend: H hidden, I expert intermediate.


@dataclass(frozen=True)
class ExpertLayout:
    """How one routed expert's projections sit in its stored bytes (same for every expert of a model)."""

    hidden: int
    inter: int
    stored_dtype: torch.dtype | None  # None for nested / GGML codecs (decoded by the codec)
    in_place: bool  # fp32 and gate directly followed by up: views alias the arena
    codec: str = C.CODEC_NONE

    @property
    def fp32_bytes(self) -> int:
        """One expert at fp32."""
        return 3 * self.hidden * self.inter * 4


def expert_layout(reader: ShardedModel) -> ExpertLayout:
    """Inspect the first stored expert.

    Codec ``none`` (one plane of fp32/f16/bf16 projections) is used in place when fp32 and gate is
    followed by up; nested (``matryoshka*``, ``residual``) experts are computed from their plane
    buffers by the native kernels on the CPU (``engine/native_kernels.py``), else (and GGML codecs)
    decoded per use from their plane buffers into fp32 scratch.

    Raises:
        ModelFormatError: the shards hold no routed experts.
    """
    keys = reader.expert_keys()
    if not keys:
        raise ModelFormatError(f"{reader.paths[0]}: no routed experts stored; is this an MoE model?")
    layer, expert = keys[0]
    if reader.codec != C.CODEC_NONE:
        gate = reader.read_expert(layer, expert, 0)["gate_proj"]
        inter, hidden = gate.shape
        return ExpertLayout(hidden=int(hidden), inter=int(inter), stored_dtype=None, in_place=False,
                            codec=reader.codec)
    recs = {}
    for rec in reader.tensor_records():
        parsed = C.parse_expert_tensor_name(rec.name)
        if parsed is not None and parsed[:2] == (layer, expert):
            recs[parsed[2]] = rec
    gate, up = recs["gate_proj"], recs["up_proj"]
    inter, hidden = gate.shape
    dtype = tensor_from_buffer(torch.zeros(gate.nbytes, dtype=torch.uint8), gate, 0).dtype
    in_place = dtype == torch.float32 and gate.offset + gate.nbytes == up.offset
    return ExpertLayout(hidden=int(hidden), inter=int(inter), stored_dtype=dtype, in_place=in_place)


@dataclass(frozen=True)
class PlaneSizes:
    """Per stored plane j: the largest expert's bytes and how many experts store it."""

    nbytes: tuple[int, ...]
    counts: tuple[int, ...]

    @classmethod
    def of(cls, reader: ShardedModel) -> "PlaneSizes":
        """Scan the shard index (headers only)."""
        sizes: list[int] = []
        counts: list[int] = []
        for layer, expert in reader.expert_keys():
            for j in range(reader.n_levels(layer, expert)):
                n = reader.expert_plane_range(layer, expert, j).nbytes
                if j == len(sizes):
                    sizes.append(0)
                    counts.append(0)
                sizes[j] = max(sizes[j], n)
                counts[j] += 1
        return cls(tuple(sizes), tuple(counts))

    @property
    def level_bytes(self) -> tuple[int, ...]:
        """Cumulative: level j = planes 0..j."""
        out, total = [], 0
        for b in self.nbytes:
            total += b
            out.append(total)
        return tuple(out)


#: Acquires per MoE layer with every expert resident after which prefetch hints pause (until a miss).
HINT_PAUSE_AFTER_HITS = 4


class StreamingExperts:
    """ExpertProvider streaming experts from shards through a fixed arena.

    Args:
        reader: the opened shard set.
        plan: the memory plan (its ``arena_bytes`` sizes the arena).
        cache_policy: ``lru`` | ``lfu`` | ``consistency``.
        precision_policy: ``exact`` (wait for every plane up to the expert's level) | ``adaptive``
            (use the highest level already resident when the rest is late, or has no room); with one
            stored level both wait for the exact bytes.
        n_moe_layers: MoE layers (for the consistency window).
        top_k: experts per token per layer.
        n_workers: I/O threads.
        device: where the arena and the expert compute live. ``cpu``: reads land in the arena directly.
            ``cuda``/``mps``: the arena is one device tensor; reads land in ``n_workers`` pinned host
            staging buffers (one slot each), are verified there and copied on a separate CUDA stream.
        staged: force (True) or forbid (False) the staging path; None = staged exactly when
            ``device`` is not the CPU. ``staged=True`` on the CPU runs the GPU path's logic without a GPU.
            Nested codecs keep their plane bytes in the device arena and decode there into fp32 scratch
            (on CUDA with the torch.compile'd decode; ``MOESTREAM_COMPILE_DECODE``); GGML
            expert codecs decode on the host (numpy), so their arena stays in host memory and the
            decoded fp32 expert is copied into device scratch.
        level_cap: highest nested level to use (None: each expert's highest stored level); planes above
            it are never read.

    Raises:
        ValueError: unknown policy names.
        BudgetError: never (the plan was checked); ``CacheCapacityError`` only on a scheduler bug.
    """

    def __init__(self, reader: ShardedModel, plan: MemoryPlan, *, cache_policy: str = "lru",
                 precision_policy: str = "exact", n_moe_layers: int = 1, top_k: int = 1,
                 n_workers: int = DEFAULT_IO_WORKERS, device: torch.device | str = "cpu",
                 staged: bool | None = None, level_cap: int | None = None) -> None:
        if cache_policy not in POLICIES:
            raise ValueError(f"unknown cache policy {cache_policy!r}; choose one of {sorted(POLICIES)}")
        if level_cap is not None and level_cap < 0:
            raise ValueError(f"level must be >= 0, got {level_cap}")
        self.reader = reader
        self.plan = plan
        self.layout = expert_layout(reader)
        self.n_experts_total = len(reader.expert_keys())
        self.level_cap = level_cap
        self._top = {(l, e): reader.n_levels(l, e) - 1 for l, e in reader.expert_keys()}
        self._needed_keys: list[tuple[int, int, int]] | None = None  # every expert's planes (wants_hints)
        self._resident_checked_at = -1  # cache.loads_started when everything was last found resident
        self._hit_streak = 0  # consecutive acquires whose experts were all resident
        self._hint_pause_after = HINT_PAUSE_AFTER_HITS * max(1, n_moe_layers)
        planes = PlaneSizes.of(reader)
        n_planes = len(planes.nbytes) if level_cap is None else min(len(planes.nbytes), level_cap + 1)
        plane_bytes, plane_counts = planes.nbytes[:n_planes], planes.counts[:n_planes]
        slot_sizes = [align_up(b, plan.alignment) for b in plane_bytes]
        one_token = top_k * n_moe_layers
        min_slots = [min(c, one_token) if j == 0 or precision_policy == "exact" else 0
                     for j, c in enumerate(plane_counts)]
        counts = split_arena(plan.arena_bytes - plan.alignment, slot_sizes, plane_counts, min_slots)
        self.device = torch.device(device)
        self._compiled_decode = compiled_decode_wanted(self.device)  # checks the setting before any allocation
        # GGML expert codecs decode with numpy: their bytes must be in host memory. Nested codecs
        # decode with torch wherever their planes are (PlaneDecoder), so their arena can be on the device.
        host_codec = self.layout.codec not in (C.CODEC_NONE, *native_kernels.NESTED_CODECS)
        on_host = (self.device.type == "cpu" or host_codec) if staged is None else not staged
        if on_host and self.device.type != "cpu" and not host_codec:
            raise ValueError(f"an arena on {self.device} needs staged=True (reads cannot land in device memory)")
        nested = self.layout.codec in native_kernels.NESTED_CODECS  # a device arena decodes them in place:
        self._plane_decoder = nested_plane_decoder(reader) if nested and not on_host else None  # header read now
        self.arena = ExpertArena(list(plane_bytes), counts, alignment=plan.alignment,
                                 device=None if on_host else self.device)
        self.staging = None if on_host else DeviceStaging(self.device, n_workers, max(slot_sizes), plan.alignment)
        n_slots = counts[0]
        self.loader = ExpertLoader(n_workers=n_workers, block_size=plan.alignment)
        # nested codecs on the CPU: the native kernel computes from the plane buffers, no fp32 scratch;
        # in a device arena they are decoded on the device into fp32 scratch
        self._native = native_kernels.nested_views_for(self.layout.codec, self.device) if on_host else None
        kwargs = {"window": CONSISTENCY_WINDOW_TOKENS * n_moe_layers * top_k} if cache_policy == "consistency" else {}
        self.cache = StreamingExpertCache(self, self._decode, self.arena, self.loader,
                                          policy=make_policy(cache_policy, **kwargs),
                                          precision_policy=precision_policy, verify=self._verify,
                                          staging=self.staging,
                                          stable_views=self._native is not None or self.layout.in_place)
        self.max_experts_per_acquire = n_slots if self.layout.in_place else min(n_slots, top_k)
        n_scratch = 0 if self.layout.in_place or self._native is not None else self.max_experts_per_acquire
        h, i = self.layout.hidden, self.layout.inter
        self._scratch = [(torch.empty(2 * i, h, device=self.device), torch.empty(h, i, device=self.device))
                         for _ in range(n_scratch)]
        self._scratch_next = 0
        self._lock = threading.Lock()
        self._hints = 0
        self._acquires = 0
        self._retries = 0
        self._closed = False

    # ------------------------------------------------------------------ scheduler callbacks
    def range_of(self, layer: int, expert: int, level: int) -> Any:
        """Byte range of one stored plane (``ExpertSource`` protocol)."""
        return self.reader.expert_plane_range(layer, expert, level)

    def to(self, device: torch.device | str) -> "StreamingExperts":
        """Keep serving on ``device``; the arena is placed at construction (``load_streaming_model(device=...)``).

        Raises:
            RuntimeError: ``device`` differs from the one the arena was built on.
        """
        if torch.device(device) != self.device:
            raise RuntimeError(f"the expert arena was allocated on {self.device}; load the model with "
                               f"device={torch.device(device)} instead of moving it")
        return self

    def _verify(self, key: tuple[int, int, int], buf: np.ndarray) -> None:
        layer, expert, plane = key
        self.reader.verify_expert_plane(layer, expert, plane, buf)
        if plane == 0 and self._plane_decoder is not None:
            self._plane_decoder.check_header(buf, f"expert {expert} of layer {layer}")

    def levels_for(self, layer: int, expert_ids: Sequence[int]) -> dict[int, int]:
        """The level each expert runs at when everything arrives in time: its highest, capped."""
        return {e: self._level(self._top[(layer, e)]) for e in expert_ids}

    def _decode(self, layer: int, expert: int, level: int, buffers: list[np.ndarray]) -> ExpertView:
        """Tensors over the slot bytes (in place for fp32 layouts, else decoded/widened into scratch).

        Nested codecs with the native kernels: a :class:`~moestream.engine.native_kernels.NestedPlaneView`
        over the plane buffers themselves (nothing decoded; valid until release).
        """
        if self._native is not None:
            return self._native.view(buffers, level)
        if self._plane_decoder is not None:  # device arena: decode on the device straight into scratch
            gate_up, down32 = self._take_scratch()
            i = gate_up.shape[0] // 2
            self._plane_decoder.decode(list(buffers), out={"gate_proj": gate_up[:i], "up_proj": gate_up[i:],
                                                           "down_proj": down32}, compiled=self._compiled_decode)
            return ExpertView(gate=gate_up[:i], up=gate_up[i:], down=down32, level=level, gate_up=gate_up)
        t = self.reader.decode_expert_planes(layer, expert, buffers)
        gate, up, down = t["gate_proj"], t["up_proj"], t["down_proj"]
        i, h = gate.shape
        if self.layout.in_place:
            gate_up = torch.empty(0, dtype=torch.float32, device=gate.device).set_(
                gate.untyped_storage(), gate.storage_offset(), (2 * i, h), (h, 1))  # [2I, H] over the slot
            return ExpertView(gate=gate_up[:i], up=gate_up[i:], down=down, level=level, gate_up=gate_up)
        gate_up, down32 = self._take_scratch()
        gate_up[:i].copy_(gate)
        gate_up[i:].copy_(up)
        down32.copy_(down)
        return ExpertView(gate=gate_up[:i], up=gate_up[i:], down=down32, level=level, gate_up=gate_up)

    def _take_scratch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next fp32 ``([2I, H] gate_up, [H, I] down)`` decode target of this acquire."""
        pair = self._scratch[self._scratch_next]
        self._scratch_next += 1
        return pair

    @property
    def wants_hints(self) -> bool:
        """Whether the MoE blocks should spend a router call per layer on a prefetch hint.

        False once every expert's planes (at the level it runs at) are READY in the arena (re-checked
        after each new load), and while the last ``HINT_PAUSE_AFTER_HITS`` acquires (about four tokens
        of every MoE layer) found all their experts resident: a hint cannot help then. The first miss
        turns hints back on.
        """
        if self._hit_streak >= self._hint_pause_after:
            return False
        loads = self.cache.loads_started
        if loads != self._resident_checked_at:
            if self._needed_keys is None:
                nested = self.cache.nested_levels
                self._needed_keys = [(l, e, lv) for (l, e), top in self._top.items()
                                     for lv in (range(self._level(top) + 1) if nested else [self._level(top)])]
            if not self.cache.holds_all(self._needed_keys):
                return True  # loads in flight or missing experts: check again next time
            self._resident_checked_at = loads
        return False

    def _level(self, top: int) -> int:
        """The level an expert whose highest stored level is ``top`` runs at (capped by ``--level``)."""
        return top if self.level_cap is None else min(self.level_cap, top)

    # ------------------------------------------------------------------ ExpertProvider
    def hint(self, layer: int, predicted_ids: torch.Tensor, predicted_weights: torch.Tensor) -> None:
        """Prefetch layer ``layer``'s predicted experts (never evicts pinned ones)."""
        self._hints += 1
        ids = predicted_ids.reshape(-1).tolist() if isinstance(predicted_ids, torch.Tensor) else list(predicted_ids)
        self.cache.hint(layer, predicted_ids, predicted_weights, levels=self.levels_for(layer, set(map(int, ids))))

    def prefetch(self, layer: int, expert_ids: Sequence[int]) -> None:
        """Start loading experts this layer is known to need next (the later acquire chunks of a prefill)."""
        ids = [int(e) for e in expert_ids]
        self.cache.hint(layer, ids, levels=self.levels_for(layer, ids), prediction=False)

    def acquire(self, layer: int, expert_ids: Sequence[int], gate_weights: Sequence[float]) -> dict[int, ExpertView]:
        """Pin and return the views (waits for loads; see ``StreamingExpertCache.acquire``).

        Raises:
            RuntimeError: more ids than ``max_experts_per_acquire`` (the MoE block chunks its requests).
        """
        ids = [int(e) for e in expert_ids]
        if len(ids) > self.max_experts_per_acquire:
            raise RuntimeError(f"acquire of {len(ids)} experts exceeds max_experts_per_acquire="
                               f"{self.max_experts_per_acquire}; the caller must chunk its requests")
        self._acquires += 1
        self._scratch_next = 0
        levels = self.levels_for(layer, ids)
        fast = self.cache.acquire_resident(layer, list(dict.fromkeys(ids)), levels)
        if fast is not None:
            self._hit_streak += 1
            return fast
        misses = self.cache.layer_misses(layer)
        try:
            views = self.cache.acquire(layer, ids, gate_weights, levels=levels)
            self._hit_streak = self._hit_streak + 1 if self.cache.layer_misses(layer) == misses else 0
            return views
        except CacheCapacityError:
            # Slots taken by prefetches still in flight: undo the partial pins, let them land, retry once.
            self.cache.release(layer, ids)
            self.cache.wait_idle()
            self._retries += 1
            self._scratch_next = 0
            self._hit_streak = 0
            return self.cache.acquire(layer, ids, gate_weights, levels=levels)

    def release(self, layer: int, expert_ids: Sequence[int]) -> None:
        """Unpin (the slots stay cached until evicted)."""
        self.cache.release(layer, [int(e) for e in expert_ids])

    def stats(self) -> dict:
        """Cache counters (hits, misses, prefetch accuracy, bytes read, stalls, per layer) plus the plan."""
        s = self.cache.stats()
        s.update(provider="streaming", hints=self._hints, acquires=self._acquires, capacity_retries=self._retries,
                 arena_slots=sum(self.arena.slot_counts), experts_total=self.n_experts_total,
                 in_place_views=self.layout.in_place, native_nested_kernel=self._native is not None,
                 device_decode=self._plane_decoder is not None,
                 compiled_decode=(self._plane_decoder is not None and self._compiled_decode
                                  and self._plane_decoder.compilable and compiled_decode_failure() is None),
                 plan=self.plan.as_dict())
        return s

    def close(self) -> None:
        """Wait for in-flight reads and stop the I/O workers."""
        if self._closed:
            return
        self._closed = True
        try:
            self.cache.wait_idle(timeout=30)
        finally:
            self.loader.close()


def nested_plane_decoder(reader: ShardedModel) -> PlaneDecoder:
    """The decoder of a nested-codec model's experts, from the header of its first expert's plane 0.

    Every expert of a model shares one header (codec, group size, H, I); ``StreamingExperts._verify``
    checks each plane 0 it reads against it.

    Raises:
        ModelFormatError: the model has no experts, or the header is not a valid nested header.
    """
    keys = reader.expert_keys()
    if not keys:
        raise ModelFormatError(f"{reader.paths[0]}: nested expert codec but no expert tensors; re-run convert")
    layer, expert = keys[0]
    raw = reader.read_expert_bytes(layer, expert, 0)
    return PlaneDecoder.from_header(np.frombuffer(raw, dtype=np.uint8)[:HEADER_BYTES])


# ---------------------------------------------------------------------------------- loading
def _largest_dense_bytes(reader: ShardedModel) -> int:
    return max((reader.dense_record(n).nbytes for n in reader.dense_names()), default=0)


def shard_footprint(reader: ShardedModel, ctx: int, device: torch.device | str = "cpu",
                    staged: bool | None = None) -> ModelFootprint:
    """The footprint of a shard model at context ``ctx`` (reads headers, plus one expert for nested codecs).

    Decode scratch: none when fp32 experts are used in place; else top-k fp32 experts, plus one being
    decoded for nested/GGML codecs (the codec's output before it is copied into scratch); none for nested
    codecs served by the native kernels on the CPU (``device``, unless ``staged``), which compute from
    the arena bytes (a staged or device arena decodes nested planes into scratch). Dense weights count
    as :func:`load_dense` holds them on ``device``: packed bytes for Q8_0/Q4_0 matrices kept quantized,
    fp32 for the rest.
    """
    layout = expert_layout(reader)
    planes = PlaneSizes.of(reader)
    top_k = _top_k(reader)
    native = native_kernels.serves(layout.codec, device) and not staged
    scratch = 0 if layout.in_place or native else top_k + (0 if layout.codec == C.CODEC_NONE else 1)
    return model_footprint(reader.model_type, reader.config, planes.level_bytes, ctx,
                           largest_dense_stored_bytes=_largest_dense_bytes(reader), scratch_experts=scratch,
                           expert_plane_bytes=planes.nbytes, experts_per_plane=planes.counts,
                           held_weight_bytes=lambda model: held_weight_bytes(model, reader, device))


def _top_k(reader: ShardedModel) -> int:
    from moestream.engine.models import get_model_classes

    _, args_cls = get_model_classes(reader.model_type)
    return int(args_cls.from_config(reader.config).top_k)


def default_ctx(config: dict, ctx: int | None, default: int = 2048) -> int:
    """``ctx`` or min(default, the model's ``max_position_embeddings``)."""
    if ctx is not None:
        return int(ctx)
    return min(default, int(config.get("max_position_embeddings") or default))


def load_dense(model: MoECausalLM, reader: ShardedModel, progress: bool = False, *,
               device: torch.device | str = "cpu", quantized: bool = True) -> None:
    """Load every dense tensor into the model, one read at a time (peak: about one stored tensor).

    Q8_0 / Q4_0 matrices of ``nn.Linear`` / ``nn.Embedding`` modules stay packed
    (``engine/quantized_dense.py``: the module is replaced by its quantized form) when ``quantized``
    and the integer-dot kernels serve ``device``; every other tensor is widened to the parameter's
    dtype (fp32). Parameters still on ``meta`` (``build_model(meta_parameters=True)``) are assigned
    as they are read, so no full-size fp32 model exists before its weights do.

    Args:
        model: the built model (its dense parameters are overwritten or assigned).
        reader: the opened shards.
        progress: show a tqdm bar on stderr ("loading dense weights", stored bytes).
        device: where the model will run (blocks stay packed only for the CPU).
        quantized: False widens every block-typed matrix to fp32 (the reference).

    Raises:
        ModelFormatError: missing/unexpected tensors or shape mismatches (names them).
        ChecksumError: a corrupt dense tensor (names it and its file).
    """
    own = model.state_dict()  # names and shapes (parameters may be on meta)
    names = [n for n in reader.dense_names() if not (n == "lm_head.weight" and model.lm_head is None)]
    missing = sorted(set(own) - set(names))
    unexpected = sorted(set(names) - set(own))
    if missing or unexpected:
        raise ModelFormatError(f"{reader.paths[0]}: shards do not match {model.args.model_type}: missing "
                               f"{missing[:5]}, unexpected {unexpected[:5]}; re-run convert")
    from tqdm import tqdm

    targets = quantized_targets(model, reader, device, announce=True) if quantized else {}
    total = sum(reader.dense_record(n).nbytes for n in names)
    with torch.no_grad(), tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                               desc="loading dense weights", disable=not progress) as bar:
        for name in names:
            module, _, attr = name.rpartition(".")
            if attr == "weight" and module in targets:
                install_quantized(model, module, reader.read_dense_raw(name), str(reader.paths[0]))
            else:
                _assign(model, name, own[name], reader.read_dense(name), str(reader.paths[0]))
            bar.update(reader.dense_record(name).nbytes)
    assert not any(p.is_meta for p in model.parameters()), "a parameter was left unloaded"
    for p in reader.paths:  # dense bytes were read with buffered preads: drop them from the page cache
        drop_cached_file(p)


def _assign(model: MoECausalLM, name: str, target: torch.Tensor, t: torch.Tensor, where: str) -> None:
    """Copy ``t`` into the tensor ``name`` (``target`` is its state-dict entry), allocating it if on meta."""
    if tuple(t.shape) != tuple(target.shape):
        raise ModelFormatError(f"{where}: tensor {name} is {tuple(t.shape)}, the model expects "
                               f"{tuple(target.shape)}; re-run convert")
    if not target.is_meta:
        target.copy_(t)
        return
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = module._parameters[attr]
    value = torch.empty(target.shape, dtype=target.dtype)
    value.copy_(t)
    module._parameters[attr] = nn.Parameter(value, requires_grad=old.requires_grad)


def _build(reader: ShardedModel) -> tuple[MoECausalLM, Any]:
    """The family's model with parameters on ``meta`` (:func:`load_dense` assigns them)."""
    from moestream.engine.hf_loading import build_model

    return build_model(reader.model_type, reader.config, torch.float32, meta_parameters=True)


@dataclass
class StreamingLoad:
    """What :func:`load_streaming_model` returns."""

    model: MoECausalLM
    args: Any
    reader: ShardedModel
    plan: MemoryPlan
    footprint: ModelFootprint
    ctx: int


def load_streaming_model(path: str | Path, *, memory: str | int | None = None, ctx: int | None = None,
                         precision_policy: str = "exact", cache_policy: str = "lru",
                         n_workers: int = DEFAULT_IO_WORKERS, verify: str = "once",
                         device: torch.device | str = "cpu", staged: bool | None = None,
                         progress: bool = False, level: int | None = None) -> StreamingLoad:
    """Plan, then load a shard model whose experts stream through the arena.

    Args:
        path: shard folder or shard-1 file.
        memory: the budget (``"6GB"``, ``"75%"``, bytes; None: a safe fraction of available RAM).
        ctx: context length (default: min(2048, the model's maximum)).
        precision_policy: ``exact`` | ``adaptive``.
        cache_policy: ``lru`` | ``lfu`` | ``consistency``.
        n_workers: I/O threads.
        verify: checksum policy (``once`` | ``always`` | ``off``).
        progress: show a progress bar on stderr while the dense weights load.
        level: highest nested level to use (None: each expert's highest stored level).
        device: where the expert arena is allocated (the caller moves the dense model there too).
        staged: see :class:`StreamingExperts` (None: staged exactly when ``device`` is not the CPU).

    Returns:
        A :class:`StreamingLoad`; ``model.expert_provider`` is a :class:`StreamingExperts`.

    Raises:
        BudgetError: the budget is too small (raised before any weight is read; names the minimum).
        ModelFormatError / ChecksumError: bad shards. UnsupportedModelError: unknown family.
        ValueError: unknown policy names.
    """
    if precision_policy not in ("exact", "adaptive"):
        raise ValueError(f"precision_policy must be 'exact' or 'adaptive', got {precision_policy!r}")
    if cache_policy not in POLICIES:
        raise ValueError(f"cache_policy must be one of {sorted(POLICIES)}, got {cache_policy!r}")
    budget = resolve_budget(memory)
    reader = ShardedModel.open(path, verify=verify)
    try:
        ctx = default_ctx(reader.config, ctx)
        fp = shard_footprint(reader, ctx, device, staged)
        plan = plan_for(fp, budget, precision_policy=precision_policy)
        log.info("memory plan: budget %s = resident %s + KV %s + workspace %s + I/O %s + expert arena %s "
                 "(minimum %s)", format_bytes(budget), format_bytes(plan.resident_bytes), format_bytes(plan.kv_bytes),
                 format_bytes(plan.workspace_bytes), format_bytes(plan.io_buffer_bytes),
                 format_bytes(plan.arena_bytes), format_bytes(plan.min_budget_bytes))
        model, args = _build(reader)
        model.check_expert_counts(dict(Counter(layer for layer, _ in reader.expert_keys())), str(reader.paths[0]))
        load_dense(model, reader, progress=progress, device=device)
        provider = StreamingExperts(reader, plan, cache_policy=cache_policy, precision_policy=precision_policy,
                                    n_moe_layers=len(model.moe_layers()), top_k=int(args.top_k), n_workers=n_workers,
                                    device=device, staged=staged, level_cap=level)
    except BaseException:
        reader.close()
        raise
    model.set_expert_provider(provider)
    return StreamingLoad(model, args, reader, plan, fp, ctx)


def load_resident_shard_model(path: str | Path, verify: str = "once") -> tuple[MoECausalLM, Any, ShardedModel]:
    """The reference: a shard model with every expert and dense matrix decoded to fp32, resident (no budget).

    Returns:
        ``(model, args, reader)``; ``model.expert_provider`` is a :class:`ResidentExperts`.
    """
    reader = ShardedModel.open(path, verify=verify)
    model, args = _build(reader)
    load_dense(model, reader, quantized=False)

    def items():
        for layer, expert in reader.expert_keys():
            for proj, t in reader.read_expert(layer, expert, 0).items():
                yield f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight", t

    model.set_expert_provider(ResidentExperts.from_canonical(items(), torch.float32))
    return model, args, reader
