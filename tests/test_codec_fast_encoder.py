"""The fast matryoshka encoder (convert/codecs/range_search.py) equals the straightforward one byte for byte."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moestream.convert.codecs import get_codec, pack_bits, serialize_expert
from moestream.convert.codecs import range_search

torch.set_num_threads(1)
BACKENDS = ["torch"] + (["native"] if range_search.native_kernel() is not None else [])
CODECS = [
    ("matryoshka_floor", {}),
    ("matryoshka", {}),
    ("matryoshka", {"normalize": False}),
    ("matryoshka_floor", {"lambdas": [0.0, 1.0, 0.3], "scale_dtype": "f32"}),
    ("matryoshka", {"level_bits": [3, 8], "refine": [-0.05, 0.0, 0.05]}),
    ("matryoshka_floor", {"level_bits": [1, 2, 4, 8], "clip_grid": [0.9, 1.0, 0.8, 0.9]}),
]


def assert_same_bytes(fast, ref) -> None:
    assert fast.params == ref.params and fast.shape == ref.shape and fast.n_levels == ref.n_levels
    for sf, sr in zip(fast.segments, ref.segments):
        assert list(sf) == list(sr)
        for name in sf:
            assert sf[name].dtype == sr[name].dtype and sf[name].shape == sr[name].shape, name
    assert fast.to_bytes_per_level() == ref.to_bytes_per_level()


def weights(kind: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "gauss":
        return (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    if kind == "heavy":
        w = rng.standard_t(3, (rows, cols)) * 0.02
        w[:, rng.choice(cols, max(1, cols // 16), replace=False)] *= 8.0
        return w.astype(np.float32)
    if kind == "tiny":  # scales in f16's subnormal range: neighbouring candidates round to equal scales
        return (rng.standard_normal((rows, cols)) * 2e-6).astype(np.float32)
    if kind == "degenerate":  # zero groups, constant groups, one-sided groups, exact grid points
        w = (rng.standard_normal((rows, cols)) * 0.1).astype(np.float32)
        w[0] = 0.0
        w[1 % rows, :] = 0.25
        w[2 % rows] = np.abs(w[2 % rows])
        w[3 % rows] = np.round(w[3 % rows] * 64) / 64
        return w
    raise AssertionError(kind)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,params", CODECS)
@pytest.mark.parametrize("kind", ["gauss", "heavy", "tiny", "degenerate"])
def test_fast_encoder_bytes_equal_reference(backend, name, params, kind):
    rng = np.random.default_rng(zlib.crc32(f"{name}{params}{kind}".encode()))
    w = weights(kind, 24, 256, rng)
    codec = get_codec(name, **params)
    for gs, act in ((64, None), (32, rng.gamma(0.5, 2.0, 256)), (128, np.where(rng.random(256) < 0.2, 0.0, 1.0))):
        assert_same_bytes(codec.encode(w, gs, act, backend=backend), codec.encode_reference(w, gs, act))


@pytest.mark.parametrize("backend", BACKENDS)
def test_expert_bytes_equal_reference_at_model_shapes(backend):
    # one expert of the default model's shape family (gate/up [I, H], down [H, I]), group sizes 128 and 256
    rng = np.random.default_rng(7)
    codec = get_codec("matryoshka_floor")
    for gs in (128, 256):
        projs = {"gate_proj": weights("heavy", 64, 512, rng), "up_proj": weights("gauss", 64, 512, rng),
                 "down_proj": weights("heavy", 512, 256, rng)}
        fast = {p: codec.encode(w, gs, backend=backend) for p, w in projs.items()}
        ref = {p: codec.encode_reference(w, gs) for p, w in projs.items()}
        assert serialize_expert(fast)[0] == serialize_expert(ref)[0]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), rows=st.integers(1, 9), groups=st.integers(1, 4),
       gs=st.sampled_from([8, 16, 64, 136]), scale=st.sampled_from([1e-5, 1e-2, 3.0]),
       name=st.sampled_from(["matryoshka", "matryoshka_floor"]), act=st.booleans(),
       backend=st.sampled_from(BACKENDS))
def test_fast_encoder_property(seed, rows, groups, gs, scale, name, act, backend):
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(3, (rows, groups * gs)) * scale).astype(np.float32)
    a = rng.gamma(0.3, 1.0, groups * gs) if act else None
    codec = get_codec(name)
    assert_same_bytes(codec.encode(w, gs, a, backend=backend), codec.encode_reference(w, gs, a))


@pytest.mark.parametrize("backend", BACKENDS)
def test_near_ties_settled_by_the_reference_on_a_subset(backend, monkeypatch):
    # a margin so wide that every group counts as a near-tie: all of them go through the reference
    # search run on the subset of groups, which must give the whole-matrix reference's answer
    rng = np.random.default_rng(3)
    w = weights("heavy", 16, 256, rng)
    a = rng.gamma(0.5, 2.0, 256)
    codec = get_codec("matryoshka")
    monkeypatch.setattr(range_search, "REL_MARGIN", 10.0)
    wg = w.reshape(16, 4, 64)
    lo = np.minimum(wg.min(axis=2), 0.0).astype(np.float64)
    hi = np.maximum(wg.max(axis=2), 0.0).astype(np.float64)
    from moestream.convert.codecs.base import group_weights

    h = group_weights(a, 16, 256, 64)
    _, _, stats = range_search.search_ranges(codec, wg, h, lo, hi, backend)
    assert stats == {"groups": 64, "reference_groups": 64}
    assert_same_bytes(codec.encode(w, 64, a, backend=backend), codec.encode_reference(w, 64, a))


def test_backends_compute_the_reference_errors():
    rng = np.random.default_rng(9)
    R, G, gs, K = 6, 3, 32, 5
    w = (rng.standard_normal((R, G, gs)) * 0.05).astype(np.float32)
    h = rng.gamma(0.5, 2.0, (1, G, gs))
    a = (rng.uniform(1e-4, 2e-3, (K, R, G))).astype(np.float16).astype(np.float32)
    z = rng.integers(0, 256, (K, R, G)).astype(np.int32)
    codec = get_codec("matryoshka")
    want = np.stack([
        np.stack([(h * (w - wh).astype(np.float64) ** 2).sum(axis=2).reshape(-1)
                  for wh in codec._dequant_all(np.clip(np.round(w / a[k][:, :, None]).astype(np.int32)
                                                       + z[k][:, :, None], 0, 255), a[k], z[k])], axis=1)
        for k in range(K)])
    for backend in BACKENDS:
        got = range_search.candidate_errors(w, h, a, z, codec.stored_bits, codec.level_bits, True, backend)
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=0)
        codes = range_search.int8_codes(w, a[0], z[0], backend)
        assert np.array_equal(codes, codec._codes(w, a[0], z[0]).astype(np.uint8))


@pytest.mark.parametrize("k", [1, 2, 4])
def test_pack_bits_bytewise_path_matches_the_word_formula(k):
    v = np.random.default_rng(k).integers(0, 1 << k, size=8 * 129).astype(np.uint8)
    runs = v.reshape(-1, 8).astype(np.uint64)
    word = np.bitwise_or.reduce(runs << (np.arange(8, dtype=np.uint64) * np.uint64(k)), axis=1)
    want = word.astype("<u8").view(np.uint8).reshape(-1, 8)[:, :k].reshape(-1)
    assert np.array_equal(pack_bits(v, k), want)


def test_backend_choice(monkeypatch):
    with pytest.raises(ValueError, match="unknown codec backend"):
        range_search.resolve_backend("gpu")
    monkeypatch.setenv("MOESTREAM_CODEC_BACKEND", "torch")
    assert range_search.resolve_backend() == "torch"
    assert range_search.resolve_backend("torch") == "torch"
