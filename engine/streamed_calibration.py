"""Calibration forward of an HF checkpoint one decoder layer at a time (bounded memory).

Owns :class:`LayerStreamedModel`, the layer-streaming runner that
``convert/calibration.py``'s :func:`~moestream.convert.calibration.collect_stats`
drives through its ``stream_layers`` contract (:class:`moestream.convert.calibration.LayerObserver`):

- the model skeleton (the family's ``Model``) is built on the ``meta`` device:
  no weight is allocated until its layer runs;
- token embeddings of every window are gathered from the stored table, then
  each decoder layer in turn gets its dense weights loaded (fp32, from the
  checkpoint), every window passes through it, and the weights are dropped;
- in a MoE layer, attention, the post-attention norm and the router run per
  window (the family's own modules, as in the whole-model forward); then the
  routed experts run expert by expert: each expert is read from the
  checkpoint ONCE, applied to the rows each window routes to it (the same
  rows and the same GEMM shapes as the whole-model forward, so bit-identical
  outputs), reported to the observer, added into the windows' outputs in
  increasing expert id (the order ``MoEBlock._routed_grouped`` uses), and
  freed; shared experts follow per window.

Memory: the windows' hidden states (three ``[tokens, hidden]`` fp32 copies:
residual stream, MoE input, MoE output), one layer's dense weights and one
expert — never the whole model, never a whole layer of experts. glibc's
mmap threshold is fixed at 1 MiB for the process (:func:`_release_large_frees`).

Knows nothing about calibration statistics (the observer does) or the
shard format.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moestream.convert.errors import ModelFormatError
from moestream.convert.hf_checkpoint import HFCheckpoint, expert_name, is_expert_name, parse_expert_name
from moestream.engine.experts import ExpertView
from moestream.engine.models import get_model_classes
from moestream.engine.models.base import MoECausalLM
from moestream.engine.models.blocks import MoEBlock

# Legend: T tokens of one window, H hidden, I expert intermediate, k experts per token, E experts.


class LayerStreamedModel:
    """An HF MoE checkpoint run for calibration layer by layer (see the module docstring).

    Attributes:
        path: the HF folder.
        model: the family's model skeleton on the ``meta`` device (config, layer structure, routers'
            shapes); its ``rope`` is real.
    """

    def __init__(self, path: str | Path) -> None:
        """Open ``path`` and build the skeleton.

        Raises:
            ModelFormatError: unreadable model, or stored experts that do not match the routers.
            UnsupportedModelError: unknown ``model_type``.
        """
        self.path = Path(path)
        ckpt = HFCheckpoint.open(self.path)
        try:
            model_cls, args_cls = get_model_classes(ckpt.model_type)
            args = args_cls.from_config(ckpt.config)
            with torch.device("meta"):
                model: MoECausalLM = model_cls(args)
            model.rope = model.build_rope()  # real buffers (cos/sin tables), built outside the meta context
            self.model = model.eval()
            self._names = ckpt.canonical_names()
        finally:
            ckpt.close()
        counts: dict[int, int] = {}
        for name in self._names:
            if is_expert_name(name):
                key = parse_expert_name(name)
                counts[key.layer] = max(counts.get(key.layer, 0), key.expert + 1)
        self.model.check_expert_counts(counts, str(self.path))

    # --- the stream_layers contract ---------------------------------------------------------------
    def stream_layers(self, windows: Sequence[Sequence[int]], observer: Any) -> None:
        """Run every window through every decoder layer, layer by layer, reporting MoE layers to ``observer``.

        Args:
            windows: token-id windows (each run from position 0, no KV cache).
            observer: a :class:`moestream.convert.calibration.LayerObserver`-like object.

        Raises:
            ModelFormatError: a layer's stored weights do not match the family.
        """
        _release_large_frees()
        ckpt = HFCheckpoint.open(self.path, drop_cache=True)  # page cache: only what is being read
        try:
            with torch.no_grad():
                xs = self._embed(ckpt, windows)
                ropes = {t: self.model.rope(0, t) for t in {len(w) for w in windows}}  # T -> (cos, sin)
                for i, layer in enumerate(self.model.model.layers):
                    self._load_layer(ckpt, i, layer)
                    try:
                        if isinstance(layer.mlp, MoEBlock):
                            self._moe_layer(ckpt, i, layer, xs, ropes, observer)
                        else:
                            for w, x in enumerate(xs):
                                xs[w] = layer(x, *ropes[x.shape[1]], 0, None)
                    finally:
                        layer.to("meta")  # frees the layer's weights
        finally:
            ckpt.close()

    # --- pieces -------------------------------------------------------------------------------------
    def _embed(self, ckpt: HFCheckpoint, windows: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """``[1, T, H]`` fp32 embeddings per window: rows of the stored table (exact: the cast is per element)."""
        table = ckpt.read_canonical("model.embed_tokens.weight")  # [V, H] stored dtype
        dtype = self.model.model.embed_tokens.weight.dtype
        out = [F.embedding(torch.tensor([list(w)], dtype=torch.long), table).to(dtype) for w in windows]
        del table
        return out

    def _load_layer(self, ckpt: HFCheckpoint, i: int, layer: nn.Module) -> None:
        prefix = f"model.layers.{i}."
        dtype = self.model.model.embed_tokens.weight.dtype
        tensors = {n[len(prefix):]: ckpt.read_canonical(n).to(dtype) for n in self._names
                   if n.startswith(prefix) and not is_expert_name(n)}
        layer.to_empty(device="cpu")
        try:
            layer.load_state_dict(tensors, strict=True)
        except RuntimeError as exc:
            raise ModelFormatError(f"{self.path}: decoder layer {i} does not match {self.model.args.model_type}: "
                                   f"{exc}") from exc

    def _expert(self, ckpt: HFCheckpoint, i: int, e: int) -> ExpertView:
        """Expert ``e`` of layer ``i`` in fp32, laid out as ``ResidentExperts`` lays it (same GEMMs)."""
        dtype = self.model.model.embed_tokens.weight.dtype
        w = {p: ckpt.read_canonical(expert_name(i, e, p)).to(dtype) for p in ("gate_proj", "up_proj", "down_proj")}
        gu = torch.cat([w["gate_proj"], w["up_proj"]], dim=0).contiguous()  # [2I, H]
        inter = w["gate_proj"].shape[0]
        return ExpertView(gate=gu[:inter], up=gu[inter:], down=w["down_proj"].contiguous(), gate_up=gu)

    def _moe_layer(self, ckpt: HFCheckpoint, i: int, layer: nn.Module, xs: list[torch.Tensor],
                   ropes: dict[int, tuple[torch.Tensor, torch.Tensor]], observer: Any) -> None:
        """DecoderLayer.forward for every window, the routed experts expert-major (module docstring)."""
        block: MoEBlock = layer.mlp
        observer.begin_layer(i)
        flat: list[torch.Tensor] = []  # per window [T, H] MoE input
        plans: list[dict[int, tuple[torch.Tensor, torch.Tensor]]] = []  # per window: expert -> (tokens, weights)
        for w, x in enumerate(xs):
            x = x + layer.self_attn(layer.input_layernorm(x), *ropes[x.shape[1]], 0, None)
            xs[w] = x  # residual stream after attention
            xf = layer.post_attention_layernorm(x).reshape(-1, x.shape[-1])  # [T, H]
            ids, weights = block.gate(xf)  # [T, k] each
            observer.routing(i, w, ids, weights)
            flat.append(xf)
            plans.append(_expert_slots(ids, weights, block.num_experts))
        outs = [torch.zeros_like(xf) for xf in flat]  # [T, H] routed output per window
        for e in range(block.num_experts):
            users = [w for w, plan in enumerate(plans) if e in plan]
            if not users:
                continue
            view = self._expert(ckpt, i, e)
            for w in users:
                tok, wt = plans[w][e]
                x_in = flat[w][tok]  # [c, H]
                y = view.ffn(x_in)  # [c, H]
                observer.expert(i, w, e, view, x_in, y)
                outs[w].index_add_(0, tok, y * wt[:, None])
            del view
        for w, x in enumerate(xs):
            out = outs[w]
            if block._shared_name is not None:
                s = getattr(block, block._shared_name)(flat[w])  # [T, H]
                if block.shared_expert_gate is not None:
                    s = torch.sigmoid(block.shared_expert_gate(flat[w])) * s
                out = out + s
            xs[w] = x + out.view(x.shape)
            outs[w] = flat[w] = None  # type: ignore[call-overload]
        observer.end_layer(i)


def _release_large_frees() -> None:
    """Make glibc return freed blocks of 1 MiB and more to the kernel (process-wide, glibc only).

    Each expert's weights (tens of MB) are allocated and freed once per expert; glibc's default raises
    its mmap threshold after such frees and then serves them from the heap, which fragments and keeps
    growing (measured: +100 MB RSS per layer on a 30B-shaped model, and a higher peak). A fixed
    threshold keeps big tensors in their own mappings, unmapped on free.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def _expert_slots(ids: torch.Tensor, weights: torch.Tensor, n_experts: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per chosen expert: its tokens and their gate weights, in ``MoEBlock._routed_grouped``'s slot order."""
    k = ids.shape[1]
    flat_ids = ids.reshape(-1)  # [T*k]
    flat_w = weights.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=n_experts)  # [E]
    token_of_slot = order // k
    w_sorted = flat_w[order]
    out, offset = {}, 0
    for e in torch.nonzero(counts).flatten().tolist():
        c = int(counts[e])
        out[e] = (token_of_slot[offset:offset + c], w_sorted[offset:offset + c])
        offset += c
    return out

