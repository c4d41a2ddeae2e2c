"""The nested kernels' int8-activation path (engine/native_kernels.py, ``activation_mode() == "int8"``).

Reference: the codec's torch decode times the activations the kernel actually multiplies by
(``quantize_activations_perm128``: one int8 scale per 128 inputs, llama.cpp's Q8_K scheme), in
float64. Every chunk's dot product is an exact integer, so the kernel differs from that reference only
by fp32 rounding of the per-chunk scaling and the sums over chunks and groups: |err| ≤ γ_n·Σ|ŵ||x̂|
with n = K/32 + 2·K/128 + 16 (a loose count). Against unquantized activations the error is the int8 rounding of x
(≈ 0.5 % relative here), the trade llama.cpp makes; levels and layouts the int8 path does not take
stay exact.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moestream.convert.codecs import get_codec
from moestream.convert.errors import MoestreamError
from moestream.convert.nested_planes import decode_planes, planes_from_encoded
from moestream.engine import native_kernels as nk

torch.set_num_threads(1)
U = 2.0 ** -24

pytestmark = pytest.mark.skipif(not nk.available(), reason="native kernels unavailable (no C compiler, or MOESTREAM_NATIVE_KERNELS=0)")


@pytest.fixture(autouse=True)
def int8_activations():
    nk.set_activation_mode("int8")
    yield
    nk.set_activation_mode(None)


def assert_matches_quantized_reference(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, int8: bool = True) -> None:
    xq = nk.quantize_activations_perm128(x).double() if int8 else x.double()
    ref = xq @ w.double().T
    k = x.shape[1]
    bound = (k // 32 + 2 * (k // 128) + 16 if int8 else k + k // 128 + 8) * U * (xq.abs() @ w.double().abs().T) + 1e-30
    err = (got.double() - ref).abs()
    assert bool((err <= bound).all()), float((err / bound).max())


@pytest.mark.parametrize("level_bits", [(2, 4, 8), (4, 8), (6, 8), (1, 4, 8)])
def test_linear_equals_decode_on_quantized_activations(level_bits):
    codec = get_codec("matryoshka_floor", level_bits=level_bits)
    rng = np.random.default_rng(sum(level_bits))
    for gs, (n, k), m, sdt in itertools.product((128, 256), ((24, 256), (40, 512)), (1, 2, 3, 4, 5, 9, 16),
                                                 (np.float16, np.float32)):
        enc = nk.random_encoded(codec, n, k, gs, rng, sdt)
        x = torch.randn(m, k) * 3
        for level in range(1, enc.n_levels + 1):
            int8 = nk.int8_applies(codec, level, gs)
            assert int8 == all(b in (2, 4) for b in codec.plane_bits[:level])
            got = nk.linear(nk.encoded_operand(enc, level), x)
            assert_matches_quantized_reference(got, x, enc.torch_decode(level), int8)


@pytest.mark.parametrize("level_bits", [(2, 4, 8), (4, 8), (2, 6, 8), (2, 4, 6, 8)])
def test_tile_edges(level_bits):
    """Row counts off the 4-row tiles, token counts off the 8/4/2-token tiles, K an odd number of 128-chunks
    (and more than 8 of them: the per-row coefficients are read 8 chunks at a time), f16/f32 scales,
    groups of 128 and 256: every tile shape and edge of the kernel against the quantized reference.
    Level layouts: one 2-bit term, two 2-bit planes, 2+2+4 (two terms), two 4-bit planes, 2+4+2 (three)."""
    codec = get_codec("matryoshka_floor", level_bits=level_bits)
    rng = np.random.default_rng(11 + sum(level_bits))
    cases = [(1, 128, 128), (2, 384, 128), (3, 768, 128), (5, 768, 128), (7, 1152, 128), (13, 1280, 128),
             (6, 768, 256), (9, 1536, 256)]
    for (n, k, gs), sdt in itertools.product(cases, (np.float16, np.float32)):
        enc = nk.random_encoded(codec, n, k, gs, rng, sdt)
        for m in (1, 2, 3, 4, 5, 7, 8, 9, 12, 17):
            x = torch.randn(m, k) * 3
            for level in range(1, enc.n_levels + 1):
                if nk.int8_applies(codec, level, gs):
                    got = nk.linear(nk.encoded_operand(enc, level), x)
                    assert_matches_quantized_reference(got, x, enc.torch_decode(level))


def test_threads_split_rows_off_the_tiles():
    """Two threads take row ranges (multiples of 4 rows) of a projection whose N is not a multiple of 4."""
    codec = get_codec("matryoshka_floor")
    enc = nk.random_encoded(codec, 70, 1024, 128, np.random.default_rng(12))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for m in (1, 2, 16):
            x = torch.randn(m, 1024)
            for level in range(1, enc.n_levels + 1):
                got = nk.linear(nk.encoded_operand(enc, level), x)
                assert_matches_quantized_reference(got, x, enc.torch_decode(level))
    finally:
        torch.set_num_threads(threads)


def test_build_without_avx2_passes_its_self_check():
    """A portable build (no int8 path: it computes fp32 whatever the mode) is accepted, not rejected."""
    from moestream.convert.native_build import build_first_working, find_compiler

    lib, errors = build_first_working("nested_kernel", nk._C_SOURCE, nk._CFLAGS, [[]], find_compiler(), nk._load,
                                      lambda lib: None)
    assert lib is not None, errors
    assert lib.nq_abi() % 10 == 0  # no AVX2
    assert nk._self_check(lib) and nk._self_check_int8(lib)


def test_error_against_exact_activations_is_int8_rounding():
    """Real encoder output: the int8 path is within ~1 % of the exact product (and not bit-equal to it)."""
    rng = np.random.default_rng(1)
    w = (rng.standard_t(5, (96, 512)) * 0.03).astype(np.float32)
    enc = get_codec("matryoshka_floor").encode(w, 128)
    x = torch.randn(8, 512)
    for level in range(1, enc.n_levels + 1):
        exact = x.double() @ enc.torch_decode(level).double().T
        got = nk.linear(nk.encoded_operand(enc, level), x).double()
        rel = float((got - exact).norm() / exact.norm())
        assert 1e-5 < rel < 1e-2, rel


@pytest.mark.parametrize("name,params,gs", [("matryoshka", {}, 128), ("residual", {}, 128),
                                            ("matryoshka_floor", {}, 64), ("matryoshka_floor", {"level_bits": (8,)}, 128)])
def test_layouts_without_int8_path_stay_exact(name, params, gs):
    codec = get_codec(name, **params)
    enc = nk.random_encoded(codec, 16, 256, gs, np.random.default_rng(2))
    x = torch.randn(3, 256)
    for level in range(1, enc.n_levels + 1):
        assert not nk.int8_applies(codec, level, gs)
        w = enc.torch_decode(level).double()
        got = nk.linear(nk.encoded_operand(enc, level), x).double()
        bound = (256 + 16) * U * (x.double().abs() @ w.abs().T)
        assert bool(((got - x.double() @ w.T).abs() <= bound).all())


def test_plane_view_ffn_quantizes_gate_up_input_and_down_input():
    """The expert view at every level: gate/up on x̂, SwiGLU in fp32, down on the quantized hidden."""
    rng = np.random.default_rng(3)
    codec = get_codec("matryoshka_floor")
    hidden, inter, gs = 256, 128, 128
    shapes = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    enc = {p: nk.random_encoded(codec, *shapes[p], gs, rng) for p in shapes}
    blobs = [b.view(np.uint8) for b in planes_from_encoded(codec, gs, shapes, enc)]
    views = nk.NestedViews()
    x = torch.randn(5, hidden)
    for level in range(len(blobs)):
        w = {p: t.double() for p, t in decode_planes(blobs[:level + 1]).items()}
        xq = nk.quantize_activations_perm128(x).double()
        h = F.silu(xq @ w["gate_proj"].T) * (xq @ w["up_proj"].T)
        ref = nk.quantize_activations_perm128(h.float()).double() @ w["down_proj"].T
        got = views.view(blobs[:level + 1], level).ffn(x).double()
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_mode_switch_and_environment(monkeypatch):
    enc = nk.random_encoded(get_codec("matryoshka_floor"), 16, 256, 128, np.random.default_rng(4))
    op = nk.encoded_operand(enc, 3)
    x = torch.randn(2, 256)
    fast = nk.linear(op, x)
    nk.set_activation_mode("fp32")
    exact = nk.linear(op, x)
    assert not torch.equal(fast, exact)
    torch.testing.assert_close(exact.double(), x.double() @ enc.torch_decode(3).double().T, rtol=1e-5, atol=1e-5)
    nk.set_activation_mode(None)
    monkeypatch.setenv(nk.ACT_ENV, "fp32")
    assert nk.activation_mode() == "fp32"
    monkeypatch.setenv(nk.ACT_ENV, "int4")
    with pytest.raises(ValueError, match="int8 or fp32"):
        nk.activation_mode()
    with pytest.raises(MoestreamError, match="int8 or fp32"):  # the CLI turns it into one line
        nk.activation_mode()
    with pytest.raises(ValueError, match="int8 or fp32"):
        nk.set_activation_mode("bf16")


@pytest.mark.parametrize("mode", ["int8", "fp32"])
@pytest.mark.parametrize("name", ["matryoshka_floor", "residual"])
def test_fused_moe_equals_loop_over_views(mode, name):
    """One native call per MoE layer (shared activation quantization) == ffn per view, weighted, summed in order."""
    from moestream.engine.experts import weighted_expert_sum

    nk.set_activation_mode(mode)
    rng = np.random.default_rng(5)
    codec = get_codec(name)
    hidden, inter, gs = 256, 128, 128
    shapes = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    views, vs = [], nk.NestedViews()
    for e in range(6):
        enc = {p: nk.random_encoded(codec, *shapes[p], gs, rng) for p in shapes}
        blobs = [b.view(np.uint8) for b in planes_from_encoded(codec, gs, shapes, enc)]
        level = e % len(blobs)  # experts at different levels in one call
        views.append(vs.view(blobs[:level + 1], level))
    weights = [0.3, 0.05, 0.2, 0.15, 0.2, 0.1]
    for m in (1, 3):
        x = torch.randn(m, hidden)
        loop = None
        for v, w in zip(views, weights):
            y = v.ffn(x) * w
            loop = y if loop is None else loop + y
        assert torch.equal(nk.moe_ffn(views, weights, x), loop)
        assert torch.equal(weighted_expert_sum(views, weights, x), loop)
    assert torch.equal(nk.moe_ffn([], [], torch.randn(1, hidden)), torch.zeros(1, hidden))
