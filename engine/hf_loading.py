"""Load a Hugging Face checkpoint straight into an engine model (the full-precision reference path).

Owns :func:`load_hf_model`: open the folder with ``HFCheckpoint``, pick the
family from ``model_type``, build ``ModelArgs`` and ``Model``, load the dense
weights by canonical name and put every routed expert in a
:class:`ResidentExperts` provider.

Knows nothing about the shard format or the streaming scheduler.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from moestream.convert.errors import ModelFormatError
from moestream.convert.hf_checkpoint import HFCheckpoint, is_expert_name
from moestream.engine.experts import ResidentExperts
from moestream.engine.models import get_model_classes
from moestream.engine.models.base import BaseModelArgs, MoECausalLM


@contextlib.contextmanager
def _skip_weight_init() -> Iterator[None]:
    """Make ``nn.Linear``/``nn.Embedding`` skip their random init (weights are loaded right after)."""
    names = ("kaiming_uniform_", "uniform_", "normal_")
    saved = {n: getattr(nn.init, n) for n in names}
    try:
        for n in names:
            setattr(nn.init, n, lambda t, *a, **k: t)
        yield
    finally:
        for n, fn in saved.items():
            setattr(nn.init, n, fn)


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Register every ``nn.Parameter`` on the ``meta`` device; buffers (RoPE tables) stay real.

    Each parameter's CPU tensor exists only until it is registered (never written: init is skipped),
    so no weight memory is held; the loader assigns each parameter when it reads it.
    """
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def build_model(model_type: str, config: dict, dtype: torch.dtype = torch.float32, *,
                meta_parameters: bool = False) -> tuple[MoECausalLM, BaseModelArgs]:
    """Build an (uninitialised) model for ``config``.

    Args:
        model_type: HF ``model_type``.
        config: the HF config dict.
        dtype: parameter dtype.
        meta_parameters: put every parameter on the ``meta`` device (buffers stay on the CPU): the
            caller assigns each one as it loads it (``engine/streaming.py: load_dense``), so no
            full-size model exists before its weights are read.

    Raises:
        UnsupportedModelError: unknown ``model_type``.
        ModelFormatError: config lacks required sizes.
    """
    model_cls, args_cls = get_model_classes(model_type)
    args = args_cls.from_config(config)
    with _skip_weight_init(), (_parameters_on_meta() if meta_parameters else contextlib.nullcontext()):
        model = model_cls(args)
    return model.to(dtype).eval(), args


def load_hf_model(path: str | Path, dtype: torch.dtype = torch.float32,
                  progress: bool = False) -> tuple[MoECausalLM, BaseModelArgs]:
    """Load an HF model folder with every expert resident in memory.

    Args:
        path: folder with ``config.json`` and safetensors weights (single or sharded).
        dtype: compute/storage dtype for dense weights and experts (fp32 is the reference).
        progress: show a tqdm bar on stderr ("loading weights", stored bytes of every tensor read).

    Returns:
        ``(model, args)``; ``model.expert_provider`` is a :class:`ResidentExperts`.

    Raises:
        ModelFormatError: missing/invalid config or weights, or tensors that do not match the family.
        UnsupportedModelError: unknown ``model_type`` (names the supported ones).
    """
    from tqdm import tqdm

    ckpt = HFCheckpoint.open(path)
    model, args = build_model(ckpt.model_type, ckpt.config, dtype)
    names = ckpt.canonical_names()
    total = ckpt.canonical_nbytes() if progress else 0
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="loading weights",
              disable=not progress) as bar:

        def read(name: str) -> torch.Tensor:
            t = ckpt.read_canonical(name)
            bar.update(t.numel() * t.element_size())
            return t

        dense = {n: read(n) for n in names if not is_expert_name(n)}
        model.load_canonical(dense)
        experts = ResidentExperts.from_canonical(((n, read(n)) for n in names if is_expert_name(n)), dtype)
    _check_experts(model, args, experts, ckpt.path)
    model.set_expert_provider(experts)
    ckpt.close()
    return model, args


def _check_experts(model: MoECausalLM, args: BaseModelArgs, experts: ResidentExperts, path: Path) -> None:
    """Every MoE layer must hold exactly as many experts as its router has rows (per-layer counts allowed)."""
    model.check_expert_counts({layer: experts.num_experts(layer) for layer in experts.layers}, str(path))
