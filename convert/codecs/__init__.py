"""moestream.convert.codecs: nested (bit-prefix) expert codecs and dense quantizers.

Owns the codec registry: every nested codec registers itself in :data:`CODECS`
under its name; :func:`get_codec` builds one, unknown names raise ValueError
listing the known ones. Per-expert serialisation with the prefix property
lives in :mod:`.base`.

Knows nothing about shard files, the scheduler or the engine.
"""

from __future__ import annotations

from typing import Any, Callable

from moestream.convert.codecs.base import (
    EXPERT_PROJS, Codec, EncodedTensor, deserialize_expert, pack_bits, serialize_expert, unpack_bits,
)
from moestream.convert.codecs.dense import DENSE_TYPES, dequantize_dense, quantize_dense
from moestream.convert.codecs.matryoshka import MatryoshkaCodec, MatryoshkaFloorCodec, slice_code
from moestream.convert.codecs.residual import ResidualCodec

#: name -> codec factory (keyword parameters -> Codec)
CODECS: dict[str, Callable[..., Codec]] = {}


def register_codec(name: str, factory: Callable[..., Codec]) -> None:
    """Add a codec to the registry (names are unique)."""
    if name in CODECS:
        raise ValueError(f"codec {name!r} is already registered")
    CODECS[name] = factory


def get_codec(name: str, **params: Any) -> Codec:
    """Build the codec registered as ``name`` with constructor ``params``.

    Raises:
        ValueError: unknown name (the message lists the registered codecs).
    """
    try:
        factory = CODECS[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; known codecs: {', '.join(sorted(CODECS))}") from None
    if name == "matryoshka_floor":
        params = {k: v for k, v in params.items() if k != "slicing"}
    return factory(**params)


register_codec("matryoshka", MatryoshkaCodec)
register_codec("matryoshka_floor", MatryoshkaFloorCodec)
register_codec("residual", ResidualCodec)

__all__ = [
    "CODECS", "Codec", "DENSE_TYPES", "EXPERT_PROJS", "EncodedTensor", "MatryoshkaCodec",
    "MatryoshkaFloorCodec", "ResidualCodec", "dequantize_dense", "deserialize_expert", "get_codec",
    "pack_bits", "quantize_dense", "register_codec", "serialize_expert", "slice_code", "unpack_bits",
]
