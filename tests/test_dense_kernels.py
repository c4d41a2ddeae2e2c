"""Q8_0 / Q4_0 dense kernels (engine/dense_kernels.py) against gguf-py and the fp64 reference.

The block dot products are exact integers, so the native kernel equals ``reference_linear``
(dequantized weights times the dequantized Q8_0 activations, fp64) within fp32 rounding of the
per-block scaling and the sum over K/32 blocks: |err| ≤ (K/32 + 8)·u·Σ|w||x̂|.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from moestream.engine import dense_kernels as dk

torch.set_num_threads(1)
U = 2.0 ** -24
QTYPE = {"q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0}


@pytest.mark.parametrize("kind", dk.DENSE_KINDS)
def test_packing_matches_gguf_dequantize(kind):
    w = np.random.default_rng(0).standard_normal((12, 96)).astype(np.float32)
    raw = quants.quantize(w, QTYPE[kind])
    p = dk.pack_ggml(raw, kind, (12, 96))
    np.testing.assert_array_equal(dk.dequantize(p).numpy(), quants.dequantize(raw, QTYPE[kind]).reshape(12, 96))
    rows = torch.tensor([[3, 0], [11, 3]])
    torch.testing.assert_close(dk.dequantize_rows(p, rows), dk.dequantize(p)[rows], rtol=0, atol=0)
    assert p.nbytes == (12 * 96 if kind == "q8_0" else 12 * 48) + 12 * 3 * 4


def test_activation_quantization_is_q8_0():
    x = torch.randn(3, 64) * 5
    x[1, :32] = 0.0  # an all-zero block: scale 0, codes 0
    q, d = dk.quantize_activations(x)
    raw = quants.quantize(x.numpy(), GGMLQuantizationType.Q8_0)
    ref = quants.dequantize(raw, GGMLQuantizationType.Q8_0).reshape(3, 64)
    got = (q.view(3, 2, 32).float() * d.unsqueeze(-1)).view(3, 64).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-6)  # gguf stores d in fp16, we keep fp32
    assert int(q[1, :32].abs().sum()) == 0 and float(d[1, 0]) == 0.0


@pytest.mark.skipif(not dk.available(), reason="dense kernels unavailable (no C compiler / AVX2)")
@pytest.mark.parametrize("kind", dk.DENSE_KINDS)
def test_native_equals_reference(kind):
    g = torch.Generator().manual_seed(1)
    for (n, k), m in itertools.product(((40, 96), (96, 256), (17, 2048)), (1, 2, 3, 4, 5, 8, 13)):
        p = dk.quantize(torch.randn(n, k, generator=g) * 0.05, kind)
        x = torch.randn(m, k, generator=g) * 4
        got = dk.linear(x, p).double()
        ref = dk.reference_linear(x, p).double()
        xq, dx = dk.quantize_activations(x)
        xd = (xq.view(m, -1, 32).double() * dx.double().unsqueeze(-1)).view(m, k)
        bound = (k // 32 + 8) * U * (xd.abs() @ dk.dequantize(p).double().abs().T) + 1e-30
        assert bool(((got - ref).abs() <= bound).all()), float(((got - ref).abs() / bound).max())
        exact = x.double() @ dk.dequantize(p).double().T  # unquantized activations: int8 rounding only
        assert float((got - exact).norm() / exact.norm()) < 2e-2


@pytest.mark.skipif(not dk.available(), reason="dense kernels unavailable (no C compiler / AVX2)")
@pytest.mark.parametrize("kind", dk.DENSE_KINDS)
def test_tiles_and_remainders(kind):
    """Row counts off the 2-row tile, token counts off the 4-token tile (M = 1..17), K = 32·n off the 8-block
    scale chunk; every output equals the reference and does not depend on the tile that computed it."""
    g = torch.Generator().manual_seed(2)
    for n, nblk in ((1, 1), (3, 7), (5, 8), (7, 9), (9, 17), (34, 24)):
        k = 32 * nblk
        p = dk.quantize(torch.randn(n, k, generator=g) * 0.05, kind)
        x = torch.randn(17, k, generator=g) * 3
        x[4, :32] = 0.0  # an all-zero activation block
        one = torch.cat([dk.linear(x[i:i + 1], p) for i in range(17)])
        for m in range(1, 18):
            got = dk.linear(x[:m], p)
            assert torch.equal(got, one[:m]), (n, k, m)  # the same bits in any tile
            ref = dk.reference_linear(x[:m], p).double()
            xq, dx = dk.quantize_activations(x[:m])
            xd = (xq.view(m, -1, 32).double() * dx.double().unsqueeze(-1)).view(m, k)
            bound = (nblk + 8) * U * (xd.abs() @ dk.dequantize(p).double().abs().T) + 1e-30
            assert bool(((got.double() - ref).abs() <= bound).all()), (n, k, m)
        sub = dk.PackedDense(kind, p.qs[1:].clone(), p.d[1:].clone(), (n - 1, k)) if n > 1 else None
        if sub is not None:  # a row's result does not depend on its neighbours (tile pairing shifted by one)
            assert torch.equal(dk.linear(x[:6], sub), dk.linear(x[:6], p)[:, 1:])


@pytest.mark.skipif(not dk.available(), reason="dense kernels unavailable (no C compiler / AVX2)")
@pytest.mark.parametrize("kind", dk.DENSE_KINDS)
@pytest.mark.parametrize("m", [1, 3, 16])
def test_threads_give_identical_rows_tiled(kind, m):
    p = dk.quantize(torch.randn(517, 1024), kind)  # odd row count: the threads' halves split a 2-row tile
    x = torch.randn(m, 1024)
    try:
        torch.set_num_threads(2)
        two = dk.linear(x, p)
    finally:
        torch.set_num_threads(1)
    assert torch.equal(two, dk.linear(x, p))


@pytest.mark.skipif(not dk.available(), reason="dense kernels unavailable (no C compiler / AVX2)")
def test_threads_give_identical_rows():
    p = dk.quantize(torch.randn(512, 1024), "q8_0")
    x = torch.randn(3, 1024)
    try:
        torch.set_num_threads(2)
        two = dk.linear(x, p)
    finally:
        torch.set_num_threads(1)
    assert torch.equal(two, dk.linear(x, p))


def test_reference_when_switched_off(monkeypatch):
    p = dk.quantize(torch.randn(8, 64), "q4_0")
    x = torch.randn(2, 64)
    monkeypatch.setenv("MOESTREAM_NATIVE_KERNELS", "0")
    assert not dk.available()
    torch.testing.assert_close(dk.linear(x, p), dk.reference_linear(x, p), rtol=0, atol=0)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="multiple of 32"):
        dk.pack_ggml(bytes(34), "q8_0", (1, 40))
    with pytest.raises(ValueError, match="block bytes"):
        dk.pack_ggml(bytes(33), "q8_0", (1, 32))
    with pytest.raises(ValueError, match="unknown dense kind"):
        dk.pack_ggml(bytes(34), "q5_k", (1, 32))
    with pytest.raises(ValueError, match="features"):
        dk.linear(torch.randn(1, 64), dk.quantize(torch.randn(4, 32), "q8_0"))
