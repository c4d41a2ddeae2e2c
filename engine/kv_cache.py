"""KV cache for incremental decoding: preallocated buffers, one entry per layer.

Owns :class:`LayerCache` (a set of preallocated buffers with one time axis,
filled by position) and :class:`KVCache` (the per-model container that knows
how many positions are filled). Standard attention stores ``k`` and ``v`` as
``[B, n_kv, max_len, D]`` (time axis 2); MLA stores its own latent form, e.g.
``[B, max_len, kv_lora_rank]`` and ``[B, max_len, rope_dim]`` (time axis 1) —
each attention module decides its entry's buffers via its ``new_cache_entry``.

Knows nothing about model families, attention math or experts.
"""

from __future__ import annotations

from typing import Sequence

import torch


class LayerCache:
    """Preallocated buffers for one layer, all sharing one time axis.

    Example (standard attention)::

        entry = LayerCache([(B, n_kv, max_len, D), (B, n_kv, max_len, D)], time_dim=2)
        k_all, v_all = entry.update(start, k_new, v_new)
    """

    def __init__(
        self,
        shapes: Sequence[tuple[int, ...]],
        time_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        """Allocate zeroed buffers.

        Args:
            shapes: full shape of each buffer, including the ``max_len`` time axis.
            time_dim: index of the time axis (same for every buffer).
            dtype: buffer dtype.
            device: buffer device.
        """
        self.time_dim = time_dim
        self.buffers = [torch.zeros(s, dtype=dtype, device=device) for s in shapes]
        self.max_len = shapes[0][time_dim]

    def update(self, start: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Write ``new`` tensors at positions ``start..start+T`` and return views up to ``start+T``.

        Args:
            start: first position to write.
            *new: one tensor per buffer, same shape except ``T`` on the time axis.

        Returns:
            Views of every buffer over positions ``0..start+T`` (no copies).

        Raises:
            ValueError: when the write would pass ``max_len``.
        """
        t = new[0].shape[self.time_dim]
        end = start + t
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions needed, {self.max_len} allocated; make a larger cache")
        out = []
        for buf, x in zip(self.buffers, new):
            buf.narrow(self.time_dim, start, t).copy_(x)
            out.append(buf.narrow(self.time_dim, 0, end))
        return tuple(out)

    def append_one(self, start: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """:meth:`update` for one position, with ``new`` tensors that have no time axis (the decode step).

        Args:
            start: the position to write.
            *new: one tensor per buffer, the buffer's shape without its time axis.

        Returns:
            Views of every buffer over positions ``0..start+1`` (no copies).

        Raises:
            ValueError: when ``start`` is past the last allocated position.
        """
        end = start + 1
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions needed, {self.max_len} allocated; make a larger cache")
        out = []
        for buf, x in zip(self.buffers, new):
            buf.select(self.time_dim, start).copy_(x)
            out.append(buf.narrow(self.time_dim, 0, end))
        return tuple(out)

    @property
    def nbytes(self) -> int:
        """Bytes allocated by this entry."""
        return sum(b.numel() * b.element_size() for b in self.buffers)


class KVCache:
    """Per-model cache: one :class:`LayerCache` per decoder layer plus the fill position.

    The model reads :attr:`seq_len` as the start position of a forward, every
    layer writes its entry at that start, and the model calls :meth:`advance`
    once after the last layer.
    """

    def __init__(self, entries: Sequence[LayerCache], max_len: int) -> None:
        """Args:
        entries: one entry per decoder layer, in layer order.
        max_len: positions allocated per entry.
        """
        self.entries = list(entries)
        self.max_len = max_len
        self.seq_len = 0

    def layer(self, i: int) -> LayerCache:
        """The entry of decoder layer ``i``."""
        return self.entries[i]

    def advance(self, n: int) -> None:
        """Mark ``n`` more positions as filled (called once per forward)."""
        self.seq_len += n

    def reset(self) -> None:
        """Forget every position (buffers are kept and overwritten)."""
        self.seq_len = 0

    @property
    def remaining(self) -> int:
        """Positions still free."""
        return self.max_len - self.seq_len

    @property
    def nbytes(self) -> int:
        """Bytes allocated by all entries."""
        return sum(e.nbytes for e in self.entries)
