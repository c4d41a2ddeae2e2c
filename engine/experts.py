"""The seam between the MoE blocks and whoever holds expert weights.

Owns :class:`ExpertView` (what one expert's kernel needs), the
:class:`ExpertProvider` protocol (``hint`` / ``acquire`` / ``release`` /
``stats``) and :class:`ResidentExperts`, the reference provider that keeps
every routed expert in memory in full precision.

Knows nothing about model families, files on disk, the shard format or the
streaming scheduler: a provider is built from canonical tensors
(``model.layers.{L}.mlp.experts.{E}.{gate_proj,up_proj,down_proj}.weight``)
and answers by ``(layer, expert)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F

from moestream.convert.hf_checkpoint import ExpertKey, parse_expert_name
from moestream.engine.native_kernels import NestedPlaneView, moe_ffn

# Legend for shape comments: N tokens routed to one expert, H hidden, I expert intermediate, E experts.



@dataclass
class ExpertView:
    """One routed expert, ready for its kernel.

    The MoE block only ever calls ``view.ffn(x)``; views of quantized levels
    (``engine/kernels.py``) carry what their kernel needs and override it.

    Level numbering (docs/DESIGN.md): level ``j`` = planes ``0..j`` of the
    expert's stored bytes; higher level = more bytes = more precision. A v1
    unquantized model has only level 0 (full precision); a nested codec's
    level 0 is its lowest precision (e.g. 2 bits) and its last level the
    highest (e.g. 8 bits).

    Attributes:
        gate: ``[I, H]`` fp32 gate projection.
        up: ``[I, H]`` fp32 up projection.
        down: ``[H, I]`` fp32 down projection.
        level: stored level the weights came from (0 = the lowest stored; for codec ``none``, full precision).
        gate_up: optional ``[2I, H]`` with gate rows first then up rows; when
            present the kernel does one matmul instead of two.
    """

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    level: int = 0
    gate_up: torch.Tensor | None = None

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the expert: ``down(silu(gate x) * up x)``.

        Args:
            x: ``[N, H]`` activations (fp32).

        Returns:
            ``[N, H]`` expert output (unweighted).
        """
        if self.gate_up is not None:
            gu = F.linear(x, self.gate_up)  # [N, 2I]
            inter = self.gate.shape[0]
            h = F.silu(gu[:, :inter]) * gu[:, inter:]  # [N, I]
        else:
            h = F.silu(F.linear(x, self.gate)) * F.linear(x, self.up)  # [N, I]
        return F.linear(h, self.down)  # [N, H]

    @property
    def nbytes(self) -> int:
        """Bytes held by this view's weights."""
        return sum(t.numel() * t.element_size() for t in (self.gate, self.up, self.down))


def weighted_expert_sum(views: Sequence[Any], weights: Sequence[float], x: torch.Tensor) -> torch.Tensor:
    """``Σ_j weights[j] · views[j].ffn(x)`` in the given order (x ``[N, H]``).

    Native nested views (``engine/native_kernels.py``) run as one fused call that shares the activation
    quantization; any other view runs its own ``ffn``. Both sum in the same order with the same fp32
    operations.
    """
    if views and x.device.type == "cpu" and x.dtype == torch.float32 and all(type(v) is NestedPlaneView for v in views):
        return moe_ffn(views, weights, x)
    out = None
    for view, w in zip(views, weights):
        y = view.ffn(x) * w
        out = y if out is None else out + y
    return out if out is not None else torch.zeros_like(x)


@runtime_checkable
class ExpertProvider(Protocol):
    """Where MoE blocks get routed-expert weights from.

    Call order per MoE layer and forward: (optional) ``hint`` for a later
    layer, ``acquire`` for the experts this layer's tokens chose, compute,
    then ``release`` the same ids. Views are valid only between acquire and
    release.
    """

    def hint(self, layer: int, predicted_ids: torch.Tensor, predicted_weights: torch.Tensor) -> None:
        """Prefetch hint for ``layer`` (``[T, k]`` ids and weights); may do nothing."""

    def acquire(self, layer: int, expert_ids: Sequence[int], gate_weights: Sequence[float]) -> dict[int, ExpertView]:
        """Return a view per requested expert id.

        Args:
            layer: decoder layer index.
            expert_ids: unique expert ids needed now.
            gate_weights: for each id, the summed routing weight over the tokens
                that chose it (a priority hint; same order as ``expert_ids``).

        Returns:
            ``{expert_id: ExpertView}`` covering every requested id.
        """

    def release(self, layer: int, expert_ids: Sequence[int]) -> None:
        """Tell the provider the views for these ids are no longer used."""

    def stats(self) -> dict:
        """Counters for reporting (hits, misses, bytes read, ...)."""


__all__ = ["ExpertKey", "ExpertProvider", "ExpertView", "ResidentExperts", "parse_expert_name"]


class ResidentExperts:
    """Every routed expert in memory, full precision: the reference provider.

    Per MoE layer the experts are stacked as ``gate_up [E, 2I, H]`` and
    ``down [E, H, I]``; views are slices of those stacks (no copies per call).
    """

    def __init__(self, gate_up: Mapping[int, torch.Tensor], down: Mapping[int, torch.Tensor]) -> None:
        """Build from stacked per-layer tensors.

        Args:
            gate_up: ``{layer: [E, 2I, H]}`` gate rows first, then up rows.
            down: ``{layer: [E, H, I]}``.
        """
        assert set(gate_up) == set(down), "gate_up and down must cover the same layers"
        self._gate_up = dict(gate_up)
        self._down = dict(down)
        self._views: dict[int, list[ExpertView]] = {}
        for layer, gu in self._gate_up.items():
            inter = gu.shape[1] // 2
            dn = self._down[layer]
            self._views[layer] = [
                ExpertView(gate=gu[e, :inter], up=gu[e, inter:], down=dn[e], gate_up=gu[e]) for e in range(gu.shape[0])
            ]
        self._acquired = 0

    @classmethod
    def from_canonical(
        cls, items: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype = torch.float32
    ) -> "ResidentExperts":
        """Build from ``(canonical_name, tensor)`` pairs; non-expert names are ignored.

        Args:
            items: pairs such as those of ``HFCheckpoint.canonical_items`` read out.
            dtype: storage/compute dtype (fp32 is the reference).

        Returns:
            A provider holding every expert found.

        Raises:
            ValueError: if a layer's expert ids are not ``0..E-1`` or a projection is missing.
        """
        found: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
        for name, tensor in items:
            parsed = parse_expert_name(name)
            if parsed is None:
                continue
            layer, expert, proj = parsed
            found.setdefault(layer, {}).setdefault(expert, {})[proj] = tensor.to(dtype)
        gate_up: dict[int, torch.Tensor] = {}
        down: dict[int, torch.Tensor] = {}
        for layer, experts in found.items():
            ids = sorted(experts)
            if ids != list(range(len(ids))):
                raise ValueError(f"layer {layer}: expert ids are not contiguous from 0: {ids[:8]}...")
            for e in ids:
                missing = {"gate_proj", "up_proj", "down_proj"} - set(experts[e])
                if missing:
                    raise ValueError(f"layer {layer} expert {e}: missing {sorted(missing)}")
            gate_up[layer] = torch.stack(
                [torch.cat([experts[e]["gate_proj"], experts[e]["up_proj"]], dim=0) for e in ids]
            ).contiguous()  # [E, 2I, H]
            down[layer] = torch.stack([experts[e]["down_proj"] for e in ids]).contiguous()  # [E, H, I]
        return cls(gate_up, down)

    def to(self, device: torch.device | str) -> "ResidentExperts":
        """Move every stacked expert tensor to ``device`` (views are rebuilt over the moved stacks)."""
        moved = type(self)({l: t.to(device) for l, t in self._gate_up.items()},
                           {l: t.to(device) for l, t in self._down.items()})
        self._gate_up, self._down, self._views = moved._gate_up, moved._down, moved._views
        return self

    @property
    def layers(self) -> list[int]:
        """MoE layer indices this provider holds."""
        return sorted(self._views)

    def num_experts(self, layer: int) -> int:
        """Routed experts in ``layer``."""
        return len(self._views[layer])

    def hint(self, layer: int, predicted_ids: torch.Tensor, predicted_weights: torch.Tensor) -> None:
        """Nothing to prefetch: every expert is resident."""

    def acquire(self, layer: int, expert_ids: Sequence[int], gate_weights: Sequence[float]) -> dict[int, ExpertView]:
        """Return the resident views (see :meth:`ExpertProvider.acquire`)."""
        views = self._views[layer]
        self._acquired += len(expert_ids)
        return {int(e): views[int(e)] for e in expert_ids}

    def release(self, layer: int, expert_ids: Sequence[int]) -> None:
        """Nothing to free: views stay valid."""

    def stats(self) -> dict:
        """``{"provider": "resident", "acquired": n, "resident_bytes": b}``."""
        return {"provider": "resident", "acquired": self._acquired, "resident_bytes": self.nbytes}

    @property
    def nbytes(self) -> int:
        """Bytes of all resident expert weights."""
        return sum(t.numel() * t.element_size() for t in [*self._gate_up.values(), *self._down.values()])
