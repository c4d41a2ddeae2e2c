"""moestream.engine: the runtime (model families, KV cache, sampling, generation, CLI, server, API)."""

from moestream.convert.errors import (  # noqa: E402  re-exported for users of the engine
    BudgetError,
    ChecksumError,
    ModelFormatError,
    MoestreamError,
    UnsupportedModelError,
)

__all__ = ["BudgetError", "ChecksumError", "ModelFormatError", "MoestreamError", "UnsupportedModelError"]
