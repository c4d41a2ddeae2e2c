"""Native nested-expert kernels (engine/native_kernels.py) against decode-then-matmul.

Tolerance. The kernel forms every weight exactly as the codec's decode does (matryoshka: the integer
m + centre − z, exact in fp32, scaled by α once per group; residual: the decoded ŵ bit for bit) and
differs from ``torch_decode`` + ``F.linear`` only in the ORDER of the fp32 sums over K (8 lanes,
several accumulator chains, one α per group, a final 8-lane reduction). The classical bound for any
summation order of n terms gives |y − y_exact| ≤ γ_n · Σ_k |ŵ_k||x_k| with γ_n ≈ n·u, u = 2^-24;
we take n = K + G + 8 (K products, G group scalings, the reduction) against a float64 product of
the decoded weights, and 2γ_n between the kernel and F.linear (each within γ_n of the exact value).
A wrong code, shift, zero point or scale is O(α·Σ|x|), ~10^5 times this bound at these sizes.

Random planes (every bit pattern is a valid code) exercise every code value, zero point and
subnormal-free f16 scale, independent of the encoder; group sizes below 64, f32 scales and 5-bit
planes take the kernel's natural-order path, the rest its blocked AVX2 path.
"""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moestream.convert.codecs import get_codec
from moestream.convert.nested_planes import decode_planes, planes_from_encoded
from moestream.engine import kernels as K
from moestream.engine import native_kernels as nk

torch.set_num_threads(1)
U = 2.0 ** -24

pytestmark = pytest.mark.skipif(not nk.available(), reason="native kernels unavailable (no C compiler, or MOESTREAM_NATIVE_KERNELS=0)")

@pytest.fixture(autouse=True)
def exact_activations():
    """These tests pin the exact (fp32-activation) path; tests/test_native_int8.py covers the int8 one."""
    nk.set_activation_mode("fp32")
    yield
    nk.set_activation_mode(None)


CODECS = [
    ("matryoshka_floor", {}),  # 2/2/4-bit planes: levels 2, 4, 8 bits (the default codec)
    ("matryoshka", {}),  # 3/2/3-bit planes, rounded slices
    ("residual", {}),  # 2-bit base + 2 sign planes
    ("residual", {"base_bits": 3, "n_planes": 3}),
    ("matryoshka_floor", {"level_bits": (8,)}),  # one 8-bit plane
    ("matryoshka_floor", {"level_bits": (1, 4, 8)}),
    ("matryoshka_floor", {"level_bits": (3, 8)}),  # a 5-bit plane: natural-order path
    ("matryoshka", {"level_bits": (4, 8)}),
    ("matryoshka_floor", {"scale_dtype": "f32"}),  # f32 scales: natural-order path
]


def check_linear(enc, level: int, x: torch.Tensor, portable: bool = False) -> None:
    w = enc.torch_decode(level)  # [N, K] the reference decode
    exact = x.double() @ w.double().T
    scale = x.double().abs() @ w.double().abs().T
    n_terms = enc.shape[1] + enc.shape[1] // enc.group_size + 8
    got = nk.linear(nk.encoded_operand(enc, level), x, portable=portable)
    assert got.dtype == torch.float32 and got.shape == exact.shape
    err = (got.double() - exact).abs()
    assert bool((err <= n_terms * U * scale).all()), float((err / (n_terms * U * scale)).max())
    ref = F.linear(x, w)
    assert bool(((got - ref).double().abs() <= 2 * n_terms * U * scale).all())


@pytest.mark.parametrize("name,params", CODECS)
def test_linear_equals_decode_then_matmul(name, params):
    rng = np.random.default_rng(len(name) + len(params))
    codec = get_codec(name, **params)
    sdt = np.float32 if params.get("scale_dtype") == "f32" else np.float16
    for gs, (n, k), m in itertools.product((128, 64, 32), ((24, 256), (64, 128)), (1, 2, 3, 5, 8, 13, 16, 33)):
        if k % gs:
            continue
        enc = nk.random_encoded(codec, n, k, gs, rng, sdt)
        x = torch.randn(m, k) * 3
        for level in range(1, enc.n_levels + 1):
            check_linear(enc, level, x)


@pytest.mark.parametrize("name,params", CODECS[:4])
def test_portable_loop_equals_decode_then_matmul(name, params):
    """The scalar loop builds without AVX2 on other CPUs; here it is called directly."""
    rng = np.random.default_rng(7)
    enc = nk.random_encoded(get_codec(name, **params), 16, 128, 64, rng)
    for level in range(1, enc.n_levels + 1):
        check_linear(enc, level, torch.randn(3, 128), portable=True)


def test_real_encodings_and_small_groups():
    """Encoder output (not random planes), group size 8, and an expert-sized projection."""
    rng = np.random.default_rng(1)
    w = (rng.standard_t(5, (48, 96)) * 0.03).astype(np.float32)
    w[:, :8] = 0.0  # an all-zero group: the smallest positive scale
    for name in ("matryoshka_floor", "matryoshka", "residual"):
        for gs in (8, 32):
            enc = get_codec(name).encode(w, gs)
            for level in range(1, enc.n_levels + 1):
                check_linear(enc, level, torch.randn(4, 96))


def test_threads_split_rows_without_changing_results():
    """Two threads split output rows; each row's sum is computed the same way: bit-identical."""
    enc = nk.random_encoded(get_codec("matryoshka_floor"), 256, 512, 128, np.random.default_rng(2))
    op = nk.encoded_operand(enc, 2)
    x = torch.randn(3, 512)
    try:
        torch.set_num_threads(2)
        two = nk.linear(op, x)
    finally:
        torch.set_num_threads(1)
    assert torch.equal(two, nk.linear(op, x))


@pytest.mark.parametrize("name", ["matryoshka_floor", "matryoshka", "residual"])
def test_plane_view_ffn_equals_decoded_expert(name):
    """The engine's view over plane blobs (the arena layout) equals the decoded expert at every level."""
    rng = np.random.default_rng(3)
    codec = get_codec(name)
    hidden, inter, gs = 128, 64, 64
    shapes = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    enc = {p: nk.random_encoded(codec, *shapes[p], gs, rng) for p in shapes}
    blobs = [b.view(np.uint8) for b in planes_from_encoded(codec, gs, shapes, enc)]
    views = nk.NestedViews()
    x = torch.randn(5, hidden)
    for level in range(len(blobs)):
        view = views.view(blobs[:level + 1], level)
        assert isinstance(view, nk.NestedPlaneView) and view.level == level
        assert view.nbytes == sum(b.nbytes for b in blobs[:level + 1])
        w = decode_planes(blobs[:level + 1])
        ref = F.linear(F.silu(F.linear(x, w["gate_proj"])) * F.linear(x, w["up_proj"]), w["down_proj"])
        torch.testing.assert_close(view.ffn(x), ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
        assert view.ffn(x[:0]).shape == (0, hidden)
    assert len(views._by_header) == 1  # one descriptor set per plane layout


def test_registered_in_kernel_table():
    enc = {p: nk.random_encoded(get_codec("matryoshka_floor"), *s, 64, np.random.default_rng(4))
           for p, s in (("gate_proj", (64, 128)), ("up_proj", (64, 128)), ("down_proj", (128, 64)))}
    assert K.kernel_reason("native", enc, 3) is None
    view = K.prepare(enc, 2, "native")
    assert view.nbytes == sum(e.nbytes(2) for e in enc.values())  # holds the stored bytes only
    x = torch.randn(3, 128)
    ref = K.run_expert(K.prepare(enc, 2, "fp32"), x)  # SwiGLU of sums with cancellation: compare loosely
    torch.testing.assert_close(view.ffn(x), ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


def test_bad_descriptor_raises():
    op = nk.encoded_operand(nk.random_encoded(get_codec("residual"), 8, 64, 32, np.random.default_rng(5)), 2)
    op.desc[nk.D_GS] = 12  # not a multiple of 8
    with pytest.raises(ValueError, match="descriptor"):
        nk.linear(op, torch.randn(1, 64))
    with pytest.raises(ValueError, match="fp32"):
        nk.linear(op, torch.randn(1, 64, dtype=torch.float64))


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv(nk.ENV_SWITCH, "0")
    assert not nk.available() and not nk.serves("matryoshka_floor")
    assert nk.nested_views_for("matryoshka_floor") is None
    enc = {"gate_proj": nk.random_encoded(get_codec("matryoshka_floor"), 8, 64, 32, np.random.default_rng(6))}
    assert "MOESTREAM_NATIVE_KERNELS=0" in K.kernel_reason("native", enc, 1)
    with pytest.raises(RuntimeError, match="not available"):
        nk.linear(nk.encoded_operand(enc["gate_proj"], 1), torch.randn(1, 64))
    monkeypatch.delenv(nk.ENV_SWITCH)
    assert nk.available() and not nk.serves("gguf_q8_0") and not nk.serves("residual", "meta")


def test_no_compiler_warns_once_and_falls_back(monkeypatch, caplog):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    nk.library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="moestream"):
            assert not nk.available() and not nk.available()
        assert len([r for r in caplog.records if "C compiler" in r.getMessage()]) == 1
        assert nk.nested_views_for("matryoshka_floor") is None
    finally:
        monkeypatch.delenv("CC")
        nk.library.cache_clear()
    assert nk.available()  # the cached build loads again
