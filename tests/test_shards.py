"""Shard format v1 writer/reader on synthetic canonical tensors (no HF checkpoint needed).

Proves: bit-exact round trip in f32/f16/bf16; each expert (and each nested
level, planes 0..j) is one contiguous page-aligned range in one shard; reading
one expert issues positioned reads of exactly that range; splitting never cuts
an expert; truncated / missing / foreign / incomplete shards, bad magic,
flipped bytes and missing metadata raise the right error naming the file.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from moestream.convert import constants as C
from moestream.convert.errors import ChecksumError, ModelFormatError
from moestream.convert.shards import (
    ShardedModel,
    ShardSetWriter,
    TensorDecl,
    WriterState,
    format_model_info,
    model_info,
    register_expert_decoder,
)

H, I, LAYERS, EXPERTS = 16, 8, 2, 3
PROJ_SHAPES = {"gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}
NP = {T.F32: np.float32, T.F16: np.float16}


def _array(shape: tuple[int, ...], ggml_type: T, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    if ggml_type == T.BF16:
        return torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy()
    return x.astype(NP[ggml_type])


def _as_torch(arr: np.ndarray, ggml_type: T) -> torch.Tensor:
    t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if ggml_type == T.BF16 else t


def _metadata() -> dict:
    return {C.KEY_HF_CONFIG: json.dumps({"model_type": "synthetic", "hidden_size": H}),
            C.KEY_MODEL_TYPE: "synthetic", C.KEY_EXPERT_CODEC: C.CODEC_NONE,
            C.KEY_TOKENIZER_HF_JSON: '{"model": {}}', C.KEY_CHAT_TEMPLATE: "{{ messages }}"}


def write_synthetic(out: Path, ggml_type: T = T.F16, max_shard_size: int = 0, seed: int = 0,
                    metadata: dict | None = None) -> dict[str, np.ndarray]:
    """Write a tiny model: embeddings, a norm, a router per layer and LAYERS x EXPERTS experts."""
    rng = np.random.default_rng(seed)
    data: dict[str, tuple[np.ndarray, T]] = {}
    w = ShardSetWriter(out, metadata if metadata is not None else _metadata(), max_shard_size)
    for name, shape, t in [("model.embed_tokens.weight", (32, H), ggml_type), ("model.norm.weight", (H,), T.F32)]:
        w.add_dense(TensorDecl(name, shape, t))
        data[name] = (_array(shape, t, rng), t)
    for layer in range(LAYERS):
        name = f"model.layers.{layer}.mlp.gate.weight"
        w.add_dense(TensorDecl(name, (EXPERTS, H), T.F32))
        data[name] = (_array((EXPERTS, H), T.F32, rng), T.F32)
        for e in range(EXPERTS):
            decls = []
            for proj, shape in PROJ_SHAPES.items():
                name = C.expert_tensor_name(layer, e, proj)
                decls.append(TensorDecl(name, shape, ggml_type))
                data[name] = (_array(shape, ggml_type, rng), ggml_type)
            w.add_expert_plane(layer, e, 0, decls)
    w.begin()
    for decl in w.pending():
        w.write(decl.name, data[decl.name][0])
    w.finish()
    return {k: _as_torch(a, t) for k, (a, t) in data.items()}


@pytest.fixture
def model_dir(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    return tmp_path, write_synthetic(tmp_path, T.F16, max_shard_size=3 * 4096 * 2)


# ------------------------------------------------------------------------------------ round trip
@pytest.mark.parametrize("ggml_type", [T.F32, T.F16, T.BF16])
@pytest.mark.parametrize("max_shard_size", [0, 20000])
def test_round_trip_bit_exact(tmp_path: Path, ggml_type: T, max_shard_size: int) -> None:
    src = write_synthetic(tmp_path, ggml_type, max_shard_size)
    with ShardedModel.open(tmp_path, verify="always") as m:
        assert (len(m.paths) == 1) == (max_shard_size == 0)
        assert m.model_type == "synthetic" and m.config["hidden_size"] == H
        assert m.tokenizer_json == '{"model": {}}' and m.chat_template == "{{ messages }}"
        assert sorted(m.dense_names()) == sorted(n for n in src if C.parse_expert_tensor_name(n) is None)
        for name in m.dense_names():
            got = m.read_dense(name)
            assert got.dtype == src[name].dtype and torch.equal(got, src[name]), name
        assert m.experts_by_layer() == {layer: list(range(EXPERTS)) for layer in range(LAYERS)}
        for layer, e in m.expert_keys():
            assert m.n_levels(layer, e) == 1
            got = m.read_expert(layer, e)
            assert set(got) == set(PROJ_SHAPES)
            for proj, t in got.items():
                assert tuple(t.shape) == PROJ_SHAPES[proj]
                assert torch.equal(t, src[C.expert_tensor_name(layer, e, proj)])


def test_open_by_shard_file_and_any_shard(model_dir) -> None:
    folder, _ = model_dir
    m = ShardedModel.open(folder)
    assert len(m.paths) > 2
    for p in m.paths:
        assert ShardedModel.open(p).paths == m.paths


def test_every_shard_has_split_keys_and_metadata_only_in_shard1(model_dir) -> None:
    from gguf import GGUFReader

    folder, _ = model_dir
    paths = ShardedModel.open(folder).paths
    for i, p in enumerate(paths):
        r = GGUFReader(p)
        assert r.fields[C.KEY_SPLIT_NO].contents() == i
        assert r.fields[C.KEY_SPLIT_COUNT].contents() == len(paths)
        assert r.fields[C.KEY_ALIGNMENT].contents() == C.ALIGNMENT
        assert (C.KEY_HF_CONFIG in r.fields) == (i == 0)


# ------------------------------------------------------------------------------------ layout
def test_expert_ranges_contiguous_aligned_in_one_shard(model_dir) -> None:
    folder, _ = model_dir
    m = ShardedModel.open(folder)
    recs = {r.name: r for r in m.tensor_records()}
    for layer, e in m.expert_keys():
        rng = m.expert_range(layer, e)
        assert rng.offset % C.ALIGNMENT == 0 and rng.nbytes % C.ALIGNMENT == 0
        parts = [recs[C.expert_tensor_name(layer, e, p)] for p in PROJ_SHAPES]
        assert all(r.path == rng.path for r in parts)
        assert parts[0].offset == rng.offset
        assert parts[-1].offset + parts[-1].padded_nbytes == rng.offset + rng.nbytes
        assert rng.offset + rng.nbytes <= os.path.getsize(rng.path)


def test_split_never_cuts_an_expert(tmp_path: Path) -> None:
    # one expert = 3 tensors of one page each; a 2-page limit would cut it if splitting were per tensor
    write_synthetic(tmp_path, T.F16, max_shard_size=2 * 4096)
    m = ShardedModel.open(tmp_path)
    assert len(m.paths) >= LAYERS * EXPERTS
    for layer, e in m.expert_keys():
        files = {r.path for r in m.tensor_records() if (C.parse_expert_tensor_name(r.name) or (None, None))[:2] == (layer, e)}
        assert len(files) == 1


def test_reading_one_expert_reads_only_its_range(model_dir, monkeypatch) -> None:
    folder, src = model_dir
    m = ShardedModel.open(folder)
    calls: list[tuple[str, int, int]] = []
    real_preadv, real_pread = os.preadv, os.pread

    def counting_preadv(fd, buffers, offset):
        n = real_preadv(fd, buffers, offset)
        calls.append((os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else "", offset, n))
        return n

    def counting_pread(fd, n, offset):
        calls.append(("pread", offset, n))
        return real_pread(fd, n, offset)

    monkeypatch.setattr(os, "preadv", counting_preadv)
    monkeypatch.setattr(os, "pread", counting_pread)
    rng = m.expert_range(1, 2)
    got = m.read_expert(1, 2)
    assert sum(n for _, _, n in calls) == rng.nbytes
    assert min(off for _, off, _ in calls) == rng.offset
    assert max(off + n for _, off, n in calls) == rng.offset + rng.nbytes
    if calls[0][0]:
        assert all(Path(p) == Path(rng.path) for p, _, _ in calls)
    assert rng.nbytes == 3 * C.ALIGNMENT  # gate, up, down: one page each here
    assert torch.equal(got["down_proj"], src[C.expert_tensor_name(1, 2, "down_proj")])


def test_decode_expert_bytes_views_the_buffer(model_dir) -> None:
    folder, src = model_dir
    m = ShardedModel.open(folder)
    rng = m.expert_range(0, 1)
    buf = np.zeros(rng.nbytes + 4096, dtype=np.uint8)  # e.g. an arena slot, larger than needed
    with open(rng.path, "rb") as f:
        f.seek(rng.offset)
        f.readinto(memoryview(buf)[:rng.nbytes])
    out = m.decode_expert_bytes(0, 1, 0, buf)
    lo, hi = buf.ctypes.data, buf.ctypes.data + buf.nbytes
    for proj, t in out.items():
        assert lo <= t.data_ptr() < hi, f"{proj} was copied"
        assert torch.equal(t, src[C.expert_tensor_name(0, 1, proj)])
    out_t = m.decode_expert_bytes(0, 1, 0, torch.from_numpy(buf))
    assert torch.equal(out_t["gate_proj"], out["gate_proj"])
    with pytest.raises(ValueError, match="buffer holds"):
        m.decode_expert_bytes(0, 1, 0, bytearray(16))


def _nested_decoder(planes: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Test codec: plane p holds an additive f32 correction per projection."""
    out: dict[str, torch.Tensor] = {}
    for plane in planes:
        for name, t in plane.items():
            proj = C.parse_expert_tensor_name(name)[2]
            out[proj] = out[proj] + t if proj in out else t.clone()
    return out


def test_nested_planes_make_prefix_levels(tmp_path: Path) -> None:
    register_expert_decoder("test_additive", _nested_decoder)
    rng = np.random.default_rng(1)
    meta = {**_metadata(), C.KEY_EXPERT_CODEC: "test_additive", C.KEY_EXPERT_LEVEL_COUNT: 3}
    w = ShardSetWriter(tmp_path, meta, max_shard_size=8 * 4096)
    w.add_dense(TensorDecl("model.norm.weight", (H,), T.F32))
    data = {"model.norm.weight": rng.standard_normal(H).astype(np.float32)}
    n_planes = {(0, 0): 3, (0, 1): 1, (0, 2): 2}  # bit allocation: experts keep different level counts
    for (layer, e), planes in n_planes.items():
        for p in range(planes):
            decls = [TensorDecl(C.expert_tensor_name(layer, e, proj, p, "delta"), shape, T.F32)
                     for proj, shape in PROJ_SHAPES.items()]
            for d in decls:
                data[d.name] = rng.standard_normal(d.shape).astype(np.float32)
            w.add_expert_plane(layer, e, p, decls)
    w.begin()
    for decl in w.pending():
        w.write(decl.name, data[decl.name])
    w.finish()
    m = ShardedModel.open(tmp_path)
    for (layer, e), planes in n_planes.items():
        assert m.n_levels(layer, e) == planes
        for level in range(planes):
            r = m.expert_range(layer, e, level)
            plane = m.expert_plane_range(layer, e, level)
            assert r.offset == m.expert_range(layer, e, 0).offset  # level j is a prefix extension
            assert plane.offset + plane.nbytes == r.offset + r.nbytes
            got = m.read_expert(layer, e, level)
            for proj in PROJ_SHAPES:
                want = sum(torch.from_numpy(data[C.expert_tensor_name(layer, e, proj, p, "delta")])
                           for p in range(level + 1))
                assert torch.equal(got[proj], want)
        with pytest.raises(ValueError, match="levels"):
            m.expert_range(layer, e, planes)


# ------------------------------------------------------------------------------------ writer rules
def test_writer_rejects_out_of_order_planes_and_long_names(tmp_path: Path) -> None:
    w = ShardSetWriter(tmp_path, _metadata())
    decl = [TensorDecl(C.expert_tensor_name(0, 0, "gate_proj", 1, "codes"), (I, H), T.F32)]
    with pytest.raises(ValueError, match="first plane must be 0"):
        w.add_expert_plane(0, 0, 1, decl)
    with pytest.raises(ModelFormatError, match="at most 63"):
        w.add_dense(TensorDecl("model." + "x" * 70 + ".weight", (4,), T.F32))
    w.add_expert_plane(0, 0, 0, [TensorDecl(C.expert_tensor_name(0, 0, "gate_proj"), (I, H), T.F32)])
    w.add_dense(TensorDecl("model.norm.weight", (H,), T.F32))
    with pytest.raises(ValueError, match="two places"):
        w.add_expert_plane(0, 0, 0, [TensorDecl(C.expert_tensor_name(0, 0, "up_proj"), (I, H), T.F32)])


def test_writer_checks_order_and_size_and_abort_leaves_nothing(tmp_path: Path) -> None:
    w = ShardSetWriter(tmp_path, _metadata(), max_shard_size=4096)
    for n in ("a.weight", "b.weight"):
        w.add_dense(TensorDecl(n, (4, 4), T.F32))
    w.begin()
    assert len(list(tmp_path.glob("*.partial"))) == 2
    with pytest.raises(ValueError, match="expected tensor 'a.weight'"):
        w.write("b.weight", np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="declared"):
        w.write("a.weight", np.zeros((4, 5), np.float32))
    w.write("a.weight", np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="not written"):
        w.finish()
    w.abort()
    assert w.state is WriterState.ABORTED
    assert list(tmp_path.iterdir()) == []


def test_context_manager_aborts_on_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with ShardSetWriter(tmp_path, _metadata()) as w:
            w.add_dense(TensorDecl("a.weight", (4, 4), T.F32))
            w.begin()
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ bad input
def test_truncated_shard(model_dir) -> None:
    folder, _ = model_dir
    last = sorted(folder.glob("*.gguf"))[-1]
    with open(last, "r+b") as f:
        f.truncate(os.path.getsize(last) - 5000)
    with pytest.raises(ModelFormatError, match=last.name) as exc:
        ShardedModel.open(folder)
    assert "truncated" in str(exc.value) or "not a valid GGUF" in str(exc.value)


def test_truncated_header(model_dir) -> None:
    folder, _ = model_dir
    second = sorted(folder.glob("*.gguf"))[1]
    with open(second, "r+b") as f:
        f.truncate(100)
    with pytest.raises(ModelFormatError, match=second.name):
        ShardedModel.open(folder)


def test_missing_shard(model_dir) -> None:
    folder, _ = model_dir
    victim = sorted(folder.glob("*.gguf"))[1]
    victim.unlink()
    with pytest.raises(ModelFormatError, match=f"{victim.name}: shard missing"):
        ShardedModel.open(folder)


def test_bad_magic(model_dir) -> None:
    folder, _ = model_dir
    first = sorted(folder.glob("*.gguf"))[0]
    with open(first, "r+b") as f:
        f.write(b"XXXX")
    with pytest.raises(ModelFormatError, match=f"{first.name}: not a valid GGUF"):
        ShardedModel.open(folder)


def test_flipped_byte_in_expert_raises_checksum_error_naming_file_and_expert(model_dir) -> None:
    folder, _ = model_dir
    m = ShardedModel.open(folder)
    rng = m.expert_range(1, 1)
    with open(rng.path, "r+b") as f:
        f.seek(rng.offset + 10)
        b = f.read(1)
        f.seek(rng.offset + 10)
        f.write(bytes([b[0] ^ 0x01]))
    m2 = ShardedModel.open(folder)  # open stays cheap: no data hashed
    m2.read_expert(1, 0)  # other experts still fine
    with pytest.raises(ChecksumError, match=rf"{Path(rng.path).name}.*expert 1 of layer 1"):
        m2.read_expert(1, 1)
    assert ShardedModel.open(folder, verify="off").read_expert(1, 1)  # explicit opt-out still reads


def test_flipped_byte_in_padding_and_dense(model_dir) -> None:
    folder, _ = model_dir
    m = ShardedModel.open(folder)
    rec = m.dense_record("model.embed_tokens.weight")
    with open(rec.path, "r+b") as f:  # padding after the data is part of the hashed range
        f.seek(rec.offset + rec.nbytes + 3)
        f.write(b"\x07")
    with pytest.raises(ChecksumError, match="tensor model.embed_tokens.weight"):
        ShardedModel.open(folder).read_dense("model.embed_tokens.weight")


def test_missing_config_metadata(tmp_path: Path) -> None:
    meta = _metadata()
    del meta[C.KEY_HF_CONFIG]
    write_synthetic(tmp_path, metadata=meta)
    with pytest.raises(ModelFormatError, match=r"00001-of-00001\.gguf: no moestream.hf_config"):
        ShardedModel.open(tmp_path)


def test_incomplete_conversion_does_not_load(model_dir) -> None:
    folder, _ = model_dir
    for p in sorted(folder.glob("*.gguf")):
        p.rename(p.with_name(p.name + C.PARTIAL_SUFFIX))
    with pytest.raises(ModelFormatError, match="conversion incomplete, re-run convert"):
        ShardedModel.open(folder)
    # shards 2..N renamed but shard 1 (renamed last) still partial
    for p in sorted(folder.glob("*.partial"))[1:]:
        p.rename(p.with_name(p.name[: -len(C.PARTIAL_SUFFIX)]))
    with pytest.raises(ModelFormatError, match="conversion incomplete"):
        ShardedModel.open(folder)


def test_shards_from_two_conversions_do_not_mix(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    write_synthetic(a, max_shard_size=20000, seed=0)
    write_synthetic(b, max_shard_size=20000, seed=1)
    victim = sorted(a.glob("*.gguf"))[1]
    shutil.copy(b / victim.name, victim)
    with pytest.raises(ModelFormatError, match=f"{victim.name}: belongs to a different conversion"):
        ShardedModel.open(a)


def test_not_a_model_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError, match="no moestream model"):
        ShardedModel.open(tmp_path)
    with pytest.raises(ModelFormatError, match="no such file"):
        ShardedModel.open(tmp_path / "nope.gguf")


def test_info_summary(model_dir) -> None:
    folder, _ = model_dir
    info = model_info(folder)
    assert info["expert_count"] == LAYERS * EXPERTS and info["moe_layers"] == LAYERS
    assert info["tensor_count"] == 2 + LAYERS + LAYERS * EXPERTS * 3
    assert info["expert_level_bytes"]["0"]["max"] == 3 * 4096
    text = format_model_info(info)
    assert "model-00001-of-" in text and "expert level 0: 12.00 KiB per expert" in text
    json.dumps(info)
