"""Format fuzzing: mutated shard files never crash the readers with anything but the project's own errors.

Proves, over 10,000 generated cases (hypothesis, derandomized so CI
runs are reproducible, split into CI-sized batches):

- moestream shard files (``ShardedModel``): any mutation of the GGUF header
  (magic, version, tensor/kv counts), of a metadata or tensor-info field
  (string lengths, value types, array counts, dimension counts, dimensions,
  storage types, data offsets), random byte flips in the header, and any
  truncation either open and read back cleanly or raise a
  :class:`~moestream.convert.errors.MoestreamError` subclass: never an
  ``IndexError``/``ValueError``/``MemoryError``/numpy or torch error;
- a flipped byte anywhere in a tensor's data range is reported as
  :class:`ChecksumError` naming the file, the first time it is read;
- the llama.cpp GGUF reader (``LlamaCppGGUF``) under the same header
  mutations and truncations raises only ``MoestreamError`` subclasses.

A case "reads back cleanly" when ``open`` succeeds and every dense tensor and
expert can be read; reading goes through the same code as the engine.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))

from moestream.convert import constants as C  # noqa: E402
from moestream.convert.errors import ChecksumError, MoestreamError  # noqa: E402
from moestream.convert.shard_reader import ShardedModel  # noqa: E402
from moestream.convert.shard_writer import ShardSetWriter, TensorDecl  # noqa: E402

torch.set_num_threads(1)

H, I, LAYERS, EXPERTS = 8, 4, 2, 2


def fuzz(n: int) -> settings:
    """Reproducible CI settings for ``n`` cases (no example database, no deadline)."""
    return settings(max_examples=n, deadline=None, derandomize=True, database=None, print_blob=True,
                    suppress_health_check=list(HealthCheck))


# Batches (examples per test): header fields 3000 + raw header bytes 3500 + truncations 1500 + data flips 1500
# = 9,500 shard cases (~10 ms each), plus llama.cpp fields 300 + bytes/truncations 200 (~150 ms each: gguf-py
# parses the 320-entry vocabulary of every case).
N_FIELDS, N_BYTES, N_TRUNC, N_DATA, N_LC_FIELDS, N_LC_BYTES = 3000, 3500, 1500, 1500, 300, 200


# ------------------------------------------------------------------------------------ base files
def _write_shard(folder: Path) -> Path:
    """A tiny one-shard moestream model (f32 dense + f16 experts); returns the file."""
    rng = np.random.default_rng(0)
    meta = {C.KEY_HF_CONFIG: json.dumps({"model_type": "synthetic", "hidden_size": H}),
            C.KEY_MODEL_TYPE: "synthetic", C.KEY_EXPERT_CODEC: C.CODEC_NONE,
            C.KEY_TOKENIZER_HF_JSON: '{"model": {}}', C.KEY_CHAT_TEMPLATE: "{{ messages }}"}
    w = ShardSetWriter(folder, meta, 0)
    data: dict[str, np.ndarray] = {}
    w.add_dense(TensorDecl("model.embed_tokens.weight", (16, H), T.F32))
    data["model.embed_tokens.weight"] = rng.standard_normal((16, H)).astype(np.float32)
    for layer in range(LAYERS):
        for e in range(EXPERTS):
            decls = []
            for proj, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
                name = C.expert_tensor_name(layer, e, proj)
                decls.append(TensorDecl(name, shape, T.F16))
                data[name] = rng.standard_normal(shape).astype(np.float16)
            w.add_expert_plane(layer, e, 0, decls)
    w.begin()
    for decl in w.pending():
        w.write(decl.name, data[decl.name])
    paths = w.finish()
    return Path(paths[0])


@dataclass(frozen=True)
class Slot:
    """One numeric header field: where it is and how wide (bytes)."""

    offset: int
    size: int
    what: str


def _slots(path: Path) -> tuple[list[Slot], int]:
    """Every numeric part of the GGUF header (counts, lengths, types, dims, offsets) and the header's end."""
    r = GGUFReader(path)
    base = r.data.__array_interface__["data"][0]
    out = [Slot(4, 4, "version"), Slot(8, 8, "tensor_count"), Slot(16, 8, "kv_count")]
    fields = [(name, f) for name, f in r.fields.items() if not name.startswith("GGUF.")]
    fields += [(f"tensor:{t.name}", t.field) for t in r.tensors]
    end = 0
    for name, f in fields:
        for part in f.parts:
            off = part.__array_interface__["data"][0] - base
            end = max(end, off + part.nbytes)
            if part.dtype.kind in "iuf" and part.nbytes <= 8 and part.dtype != np.uint8:
                out.append(Slot(off, part.nbytes, name))
    return out, end


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> tuple[bytes, list[Slot], int]:
    path = _write_shard(tmp_path_factory.mktemp("fuzz_shard"))
    slots, header_end = _slots(path)
    return path.read_bytes(), slots, header_end


@pytest.fixture(autouse=True)
def memory_cap():
    """Cap the address space at 2 GiB above the current size while fuzzing.

    A mutated length or count that makes a reader allocate without bound then fails the
    case with MemoryError (shown as the falsifying example) instead of swapping the machine.
    """
    import psutil

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = psutil.Process().memory_info().vms + (2 << 30)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """One file rewritten per case (a fresh folder per case would dominate the run time)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        d = Path(tempfile.mkdtemp(prefix="moestream-fuzz-", dir=shm))
    else:
        d = tmp_path_factory.mktemp("fuzz_case")
    yield d / C.shard_name(C.DEFAULT_STEM, 1, 1)
    for p in d.rglob("*"):
        if p.is_file():
            p.unlink()
    for p in sorted(d.rglob("*"), reverse=True):
        p.rmdir()
    d.rmdir()


# ------------------------------------------------------------------------------------ mutations
INTERESTING = [0, 1, 2, 3, 7, 8, 31, 32, 63, 64, 255, 4095, 4096, 65535, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
               2**63 - 1, 2**64 - 1]


def _set_int(buf: bytearray, slot: Slot, value: int) -> None:
    buf[slot.offset:slot.offset + slot.size] = (value % (1 << (8 * slot.size))).to_bytes(slot.size, "little")


def _get_int(buf: bytes, slot: Slot) -> int:
    return int.from_bytes(buf[slot.offset:slot.offset + slot.size], "little")


@st.composite
def field_mutation(draw, slots: list[Slot]) -> tuple[Slot, str, int]:
    slot = draw(st.sampled_from(slots))
    how = draw(st.sampled_from(["interesting", "plus", "minus", "times2", "random"]))
    arg = draw(st.integers(0, 2**64 - 1)) if how == "random" else draw(st.sampled_from(INTERESTING))
    return slot, how, arg


def _mutate_field(buf: bytearray, slot: Slot, how: str, arg: int) -> None:
    old = _get_int(buf, slot)
    new = {"interesting": arg, "plus": old + 1 + arg % 4096, "minus": old - 1 - arg % 4096,
           "times2": old * 2, "random": arg}[how]
    _set_int(buf, slot, new)


def _exercise(path: Path) -> None:
    """Open and read everything through the same calls the engine uses."""
    with ShardedModel.open(path, verify="once") as m:
        for name in m.dense_names():
            m.read_dense(name)
        for layer, e in m.expert_keys():
            for level in range(m.n_levels(layer, e)):
                m.read_expert(layer, e, level)
        m.summary()


def _only_project_errors(path: Path, data: bytes | bytearray, exercise=_exercise) -> BaseException | None:
    """Write ``data`` to ``path`` and run ``exercise``; re-raise anything that is not a MoestreamError."""
    path.write_bytes(data)
    try:
        exercise(path)
    except MoestreamError as exc:
        assert str(exc), "an error without a message"
        return exc
    return None


# ------------------------------------------------------------------------------------ moestream shards
def test_base_file_reads_back(shard, scratch) -> None:
    data, slots, header_end = shard
    assert len(slots) > 50 and header_end < len(data)
    assert _only_project_errors(scratch, data) is None


def test_header_field_mutations(shard, scratch) -> None:
    data, slots, _ = shard

    @fuzz(N_FIELDS)
    @given(muts=st.lists(field_mutation(slots), min_size=1, max_size=3))
    def case(muts) -> None:
        buf = bytearray(data)
        for slot, how, arg in muts:
            _mutate_field(buf, slot, how, arg)
        _only_project_errors(scratch, buf)

    case()


def test_raw_header_byte_mutations(shard, scratch) -> None:
    data, _, header_end = shard

    @fuzz(N_BYTES)
    @given(edits=st.lists(st.tuples(st.integers(0, header_end - 1), st.integers(0, 255)), min_size=1, max_size=8))
    def case(edits) -> None:
        buf = bytearray(data)
        for pos, value in edits:
            buf[pos] = value
        _only_project_errors(scratch, buf)

    case()


def test_truncations_and_appends(shard, scratch) -> None:
    data, _, header_end = shard

    @fuzz(N_TRUNC)
    @given(cut=st.one_of(st.integers(0, header_end + 64), st.integers(0, len(data) - 1)),
           tail=st.binary(max_size=64))
    def case(cut, tail) -> None:
        err = _only_project_errors(scratch, data[:cut] + tail)
        if not tail:
            assert err is not None, f"a file cut at byte {cut} of {len(data)} opened and read as complete"

    case()


def test_data_byte_flips_are_checksum_errors(shard, scratch) -> None:
    data, _, header_end = shard
    with ShardedModel.open(_base_copy(scratch.parent, data), verify="off") as m:
        ranges = [(m.expert_range(layer, e).offset, m.expert_range(layer, e).nbytes) for layer, e in m.expert_keys()]
        ranges += [(m.dense_record(n).offset, m.dense_record(n).padded_nbytes) for n in m.dense_names()]

    @fuzz(N_DATA)
    @given(which=st.integers(0, len(ranges) - 1), where=st.floats(0, 1, exclude_max=True), xor=st.integers(1, 255))
    def case(which, where, xor) -> None:
        off, n = ranges[which]
        pos = off + int(where * n)
        buf = bytearray(data)
        buf[pos] ^= xor
        err = _only_project_errors(scratch, buf)
        assert isinstance(err, ChecksumError), f"flip at byte {pos} gave {err!r}"
        assert str(scratch) in str(err) and "checksum mismatch" in str(err)

    case()


def _base_copy(folder: Path, data: bytes) -> Path:
    p = folder / "base" / C.shard_name(C.DEFAULT_STEM, 1, 1)
    p.parent.mkdir(exist_ok=True)
    p.write_bytes(data)
    return p


# ------------------------------------------------------------------------------------ llama.cpp GGUF reader
@pytest.fixture(scope="module")
def llamacpp_file(tmp_path_factory) -> tuple[bytes, list[Slot], int]:
    from moestream.convert.llamacpp_export import export_llamacpp

    from runtime_model import train_tokenizer
    from tiny_models import build_tiny_hf_model

    root = tmp_path_factory.mktemp("fuzz_llamacpp")
    hf = root / "hf"
    tok = train_tokenizer()
    # llama.cpp's qwen3moe has no dense layers between MoE layers
    build_tiny_hf_model("qwen3_moe", hf, seed=0, overrides={"mlp_only_layers": [], "vocab_size": tok.get_vocab_size()})
    tok.save(str(hf / "tokenizer.json"))
    out = export_llamacpp(hf, root / "m.gguf", qtype="q8_0", progress=False)
    slots, header_end = _slots(out)
    return out.read_bytes(), slots, header_end


def _exercise_llamacpp(path: Path) -> None:
    from moestream.convert.llamacpp_gguf import LlamaCppGGUF

    m = LlamaCppGGUF.open(path)
    try:
        for name in m.dense_names():
            m.read_dense(name)
        for layer in m.moe_layers:
            for e in range(m.num_experts):
                m.read_expert(layer, e)
        m.tokenizer_metadata()
        m.chat_template()
    finally:
        m.close()


def test_llamacpp_base_file_reads_back(llamacpp_file, tmp_path) -> None:
    data, slots, _ = llamacpp_file
    assert len(slots) > 50
    assert _only_project_errors(tmp_path / "m.gguf", data, _exercise_llamacpp) is None


def test_llamacpp_header_field_mutations(llamacpp_file, tmp_path) -> None:
    data, slots, _ = llamacpp_file
    path = tmp_path / "m.gguf"

    @fuzz(N_LC_FIELDS)
    @given(muts=st.lists(field_mutation(slots), min_size=1, max_size=2))
    def case(muts) -> None:
        buf = bytearray(data)
        for slot, how, arg in muts:
            _mutate_field(buf, slot, how, arg)
        _only_project_errors(path, buf, _exercise_llamacpp)

    case()


def test_llamacpp_header_bytes_and_truncations(llamacpp_file, tmp_path) -> None:
    data, _, header_end = llamacpp_file
    path = tmp_path / "m.gguf"

    @fuzz(N_LC_BYTES)
    @given(edits=st.lists(st.tuples(st.integers(0, header_end - 1), st.integers(0, 255)), max_size=6),
           cut=st.one_of(st.none(), st.integers(0, len(data) - 1)))
    def case(edits, cut) -> None:
        buf = bytearray(data)
        for pos, value in edits:
            buf[pos] = value
        if cut is not None:
            buf = buf[:cut]
        _only_project_errors(path, buf, _exercise_llamacpp)

    case()
