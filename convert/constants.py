"""Every on-disk name of the moestream shard format: metadata keys, tensor names, file names.

Owns the vocabulary of format v1 (gguf-py ``constants.py`` style: format
strings filled with ``.format(...)``), so the writer, the reader, ``info`` and
any later codec agree on one spelling. Knows nothing about how tensors are
produced, read or computed with.

Layout rules the names encode (details in ``shard_writer.py``):

- dense tensors keep their canonical name (``hf_checkpoint.py``);
- a routed expert's tensors are grouped into *planes*; plane ``p`` of expert
  ``(layer, expert)`` is written as consecutive tensors, planes in increasing
  order, so *level* ``j`` (0-based) = planes ``0..j`` = one contiguous range;
- format v1 (codec ``none``) has one plane per expert whose tensors use the
  canonical names ``model.layers.{L}.mlp.experts.{E}.{proj}.weight``; a nested
  codec names its plane tensors ``...{proj}.p{plane}_{kind}`` (for example
  ``p0_codes``, ``p0_scale``, ``p1_codes``).
"""

from __future__ import annotations

import re

import gguf

# --- format identity ---------------------------------------------------------------
ARCH = "moestream"  # general.architecture; llama.cpp rejects it cleanly (unknown arch)
FORMAT_VERSION = 1
ALIGNMENT = 4096  # general.alignment: every tensor (hence every plane) starts on a page
GGUF_MAX_NAME_BYTES = 63  # GGML_MAX_NAME is 64 including the terminating NUL

# --- file names --------------------------------------------------------------------
DEFAULT_STEM = "model"
SHARD_NAME = "{stem}-{no:05d}-of-{count:05d}.gguf"  # no is 1-based, as llama.cpp's gguf-split
SHARD_NAME_RE = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
PARTIAL_SUFFIX = ".partial"  # shards being written; renamed away when each is complete (shard 1 last)
#: Beside the shards while a conversion is unfinished: what it is (fingerprint) and which shards are done.
CONVERT_STATE_FILE = ".convert-state.json"

# --- generic GGUF keys (from gguf-py) ------------------------------------------------
KEY_ARCHITECTURE = gguf.Keys.General.ARCHITECTURE
KEY_ALIGNMENT = gguf.Keys.General.ALIGNMENT
KEY_NAME = gguf.Keys.General.NAME
KEY_SPLIT_NO = gguf.Keys.Split.LLM_KV_SPLIT_NO  # u16, 0-based
KEY_SPLIT_COUNT = gguf.Keys.Split.LLM_KV_SPLIT_COUNT  # u16
KEY_SPLIT_TENSORS_COUNT = gguf.Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT  # i32, all shards
KEY_TOKENIZER_HF_JSON = gguf.Keys.Tokenizer.HF_JSON  # tokenizer.huggingface.json
KEY_CHAT_TEMPLATE = gguf.Keys.Tokenizer.CHAT_TEMPLATE  # tokenizer.chat_template

# --- hyper-parameters, gguf-py spelling under our arch ("{arch}.block_count") --------
KEY_BLOCK_COUNT = gguf.Keys.LLM.BLOCK_COUNT.format(arch=ARCH)
KEY_EMBEDDING_LENGTH = gguf.Keys.LLM.EMBEDDING_LENGTH.format(arch=ARCH)
KEY_VOCAB_SIZE = gguf.Keys.LLM.VOCAB_SIZE.format(arch=ARCH)
KEY_CONTEXT_LENGTH = gguf.Keys.LLM.CONTEXT_LENGTH.format(arch=ARCH)
KEY_FEED_FORWARD_LENGTH = gguf.Keys.LLM.FEED_FORWARD_LENGTH.format(arch=ARCH)
KEY_EXPERT_FEED_FORWARD_LENGTH = gguf.Keys.LLM.EXPERT_FEED_FORWARD_LENGTH.format(arch=ARCH)
KEY_EXPERT_COUNT = gguf.Keys.LLM.EXPERT_COUNT.format(arch=ARCH)
KEY_EXPERT_USED_COUNT = gguf.Keys.LLM.EXPERT_USED_COUNT.format(arch=ARCH)
KEY_HEAD_COUNT = gguf.Keys.Attention.HEAD_COUNT.format(arch=ARCH)
KEY_HEAD_COUNT_KV = gguf.Keys.Attention.HEAD_COUNT_KV.format(arch=ARCH)

# --- moestream keys -----------------------------------------------------------------
KEY_FORMAT_VERSION = "moestream.format_version"  # u32
KEY_MODEL_ID = "moestream.model_id"  # str (uuid), in EVERY shard: detects mixed shard sets (see resume.py)
KEY_MODEL_TYPE = "moestream.model_type"  # str, HF model_type
KEY_HF_CONFIG = "moestream.hf_config"  # str, the HF config.json as JSON
KEY_DTYPE = "moestream.dtype"  # str, requested storage dtype (f16 | bf16 | f32)
KEY_EXPERT_CODEC = "moestream.expert.codec"  # str, "none" in v1
KEY_EXPERT_LEVEL_COUNT = "moestream.expert.level_count"  # u32, max stored levels per expert
KEY_EXPERT_LEVEL_NAMES = "moestream.expert.level_names"  # str JSON list, e.g. ["f16"]
KEY_CHECKSUM_ALGO = "moestream.checksum.algorithm"  # str, "sha256"
KEY_CHECKSUM_DIGESTS = "moestream.checksum.digests"  # str, hex digests, one per unit in file order

CHECKSUM_ALGO = "sha256"
CHECKSUM_HEX_LEN = 64
CODEC_NONE = "none"

# --- tensor names -------------------------------------------------------------------
EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")
EXPERT_TENSOR = "model.layers.{layer}.mlp.experts.{expert}.{proj}.{part}"
EXPERT_PART_FULL = "weight"  # codec none: the single plane 0
EXPERT_PART_PLANE = "p{plane}_{kind}"  # nested codecs: p0_codes, p0_scale, p1_codes, ...
EXPERT_TENSOR_RE = re.compile(
    r"^model\.layers\.(?P<layer>\d+)\.mlp\.experts\.(?P<expert>\d+)\.(?P<proj>[A-Za-z0-9_]+)\."
    r"(?:(?P<full>weight)|p(?P<plane>\d+)_(?P<kind>[A-Za-z0-9_]+))$"
)


def shard_name(stem: str, no: int, count: int) -> str:
    """File name of shard ``no`` (1-based) of ``count``."""
    return SHARD_NAME.format(stem=stem, no=no, count=count)


def expert_tensor_name(layer: int, expert: int, proj: str, plane: int = 0, kind: str | None = None) -> str:
    """Name of one expert tensor.

    Args:
        layer: decoder layer index.
        expert: routed expert index within the layer.
        proj: ``gate_proj`` / ``up_proj`` / ``down_proj`` (or a codec's own part name).
        plane: plane index (0-based); codec ``none`` only has plane 0.
        kind: ``None`` for the unquantized canonical ``.weight``; otherwise the
            codec's tensor kind in that plane (``codes``, ``scale``, ...).

    Returns:
        The GGUF tensor name.
    """
    if kind is None:
        if plane != 0:
            raise ValueError("unquantized experts have a single plane 0")
        part = EXPERT_PART_FULL
    else:
        part = EXPERT_PART_PLANE.format(plane=plane, kind=kind)
    return EXPERT_TENSOR.format(layer=layer, expert=expert, proj=proj, part=part)


def parse_expert_tensor_name(name: str) -> tuple[int, int, str, int, str | None] | None:
    """Inverse of :func:`expert_tensor_name`.

    Returns:
        ``(layer, expert, proj, plane, kind)`` (kind ``None`` for ``.weight``),
        or ``None`` when ``name`` is not a routed-expert tensor.
    """
    m = EXPERT_TENSOR_RE.match(name)
    if m is None:
        return None
    if m.group("full") is not None:
        return int(m.group("layer")), int(m.group("expert")), m.group("proj"), 0, None
    return int(m.group("layer")), int(m.group("expert")), m.group("proj"), int(m.group("plane")), m.group("kind")
