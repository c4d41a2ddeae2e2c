"""Model families, one file per HF ``model_type``, found by name plus a small alias table.

Owns the registry: :func:`get_model_classes` imports
``moestream.engine.models.<model_type>`` and returns its ``(Model, ModelArgs)``.
Knows nothing about files or checkpoints.
"""

from __future__ import annotations

import importlib

from moestream.convert.errors import UnsupportedModelError

#: Families moestream implements (the module name is the HF ``model_type``).
SUPPORTED_MODEL_TYPES: tuple[str, ...] = (
    "qwen3_moe",
    "qwen2_moe",
    "mixtral",
    "olmoe",
    "deepseek_v2",
    "deepseek_v3",
)

#: Other spellings seen in the wild -> the family that implements them.
MODEL_TYPE_ALIASES: dict[str, str] = {
    "qwen3moe": "qwen3_moe",
    "qwen2moe": "qwen2_moe",
    "kimi_k2": "deepseek_v3",
}


def resolve_model_type(model_type: str) -> str:
    """Map ``model_type`` through the alias table.

    Raises:
        UnsupportedModelError: naming the supported families.
    """
    name = MODEL_TYPE_ALIASES.get(model_type, model_type)
    if name not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type '{model_type}' is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return name


def get_model_classes(model_type: str) -> tuple[type, type]:
    """Return ``(Model, ModelArgs)`` for an HF ``model_type``.

    Args:
        model_type: the ``model_type`` field of ``config.json`` (aliases accepted).

    Returns:
        The family's ``Model`` class and ``ModelArgs`` dataclass.

    Raises:
        UnsupportedModelError: for an unknown type (the message lists the supported ones).
    """
    name = resolve_model_type(model_type)
    try:
        module = importlib.import_module(f"moestream.engine.models.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"moestream.engine.models.{name}":
            raise
        raise UnsupportedModelError(
            f"model_type '{model_type}' is listed but its implementation is missing from this install"
        ) from exc
    return module.Model, module.ModelArgs
