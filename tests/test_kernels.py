"""Expert kernels: every registered kernel equals dequantize-then-matmul within fp32 rounding.

Tolerance: a kernel computes Σ_k x_k·ŵ_k where each ŵ_k is assembled from at most three
fp32 terms (e.g. (q − 8)·scale + zero) whose magnitudes are bounded per group by A
(matryoshka: |ŵ| + 1024·α ≥ every scale·code and zero term of the int4/int8 forms;
residual: |ŵ| + 16·s1 + 32·Σ s_k). The classical summation bound gives
|y − y_exact| ≤ γ_{K+4}·(|x| @ Aᵀ) with γ_n ≈ n·u, u = 2^-24; we assert 2× that against a
float64 reference. A formula mistake (wrong zero point, scale or plane) is O(α·Σ|x|), i.e.
~10^4 times larger than this bound at these sizes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moestream.convert.codecs import EncodedTensor, get_codec
from moestream.engine import kernels as K
from moestream.engine import native_kernels

torch.set_num_threads(1)
U = 2.0 ** -24
I, H, GS = 64, 256, 64


def expert(name: str, seed: int = 0, gs: int = GS) -> dict[str, EncodedTensor]:
    rng = np.random.default_rng(seed)
    c = get_codec(name)
    mk = lambda r, k: (rng.standard_t(5, (r, k)) * 0.03).astype(np.float32)  # noqa: E731
    return {"gate_proj": c.encode(mk(I, H), gs), "up_proj": c.encode(mk(I, H), gs),
            "down_proj": c.encode(mk(H, I), gs)}


def magnitude(enc: EncodedTensor, level: int) -> np.ndarray:
    """Per-element bound A on the terms a kernel combines into ŵ (see module docstring)."""
    w = np.abs(enc.reference_decode(level)).astype(np.float64)
    N, Kc = enc.shape
    rep = lambda a: np.repeat(np.asarray(a, np.float64), enc.group_size, axis=1)  # noqa: E731
    if enc.codec == "residual":
        extra = 16 * rep(enc.segments[0]["scale"])
        for seg in enc.segments[1:level]:
            extra += 32 * rep(seg["scale"])
        return w + extra
    return w + 1024 * rep(enc.segments[0]["scale"])


CASES = [(name, lv) for name in ("matryoshka", "matryoshka_floor", "residual") for lv in (1, 2, 3)]


@pytest.mark.parametrize("name,level", CASES)
@pytest.mark.parametrize("batch", [1, 7])
def test_every_supported_kernel_matches_dequant_matmul(name, level, batch):
    enc = expert(name)
    x = torch.randn(batch, H) * 2
    tried = 0
    for kname in K.KERNELS:
        if K.kernel_reason(kname, enc, level) is not None:
            continue
        tried += 1
        view = K.prepare(enc, level, kname)
        for proj, e in enc.items():
            xin = x if proj != "down_proj" else torch.randn(batch, I)
            w64 = torch.from_numpy(e.reference_decode(level).astype(np.float64))
            exact = xin.double() @ w64.T
            got = K.linear(view, proj, xin)
            assert got.dtype == torch.float32 and got.shape == exact.shape
            bound = 2 * (e.shape[1] + 4) * U * (xin.double().abs() @ torch.from_numpy(magnitude(e, level)).T)
            err = (got.double() - exact).abs()
            assert bool((err <= bound).all()), (kname, proj, float((err / bound).max()))
        # whole expert vs fp32 dequantize-then-matmul
        ref = K.run_expert(K.prepare(enc, level, "fp32"), x)
        torch.testing.assert_close(view.ffn(x), ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    assert tried >= 3  # fp32, dequant and at least one packed kernel ran


@pytest.mark.parametrize("name", ["matryoshka", "residual"])
def test_dequant_kernel_is_bit_identical_to_fp32_weights(name):
    enc = expert(name, seed=3)
    x = torch.randn(4, H)
    for level in (1, 2, 3):
        a = K.prepare(enc, level, "dequant").ffn(x)
        b = K.prepare(enc, level, "fp32").ffn(x)
        assert torch.equal(a, b)
        # and equals a plain fp32 computation on the numpy reference decode
        w = {p: torch.from_numpy(e.reference_decode(level)) for p, e in enc.items()}
        ref = F.linear(F.silu(F.linear(x, w["gate_proj"])) * F.linear(x, w["up_proj"]), w["down_proj"])
        assert torch.equal(a, ref)


def test_compact_kernels_hold_fewer_bytes_than_fp32_and_record_prepare_cost():
    enc = expert("matryoshka")
    fp32 = K.prepare(enc, 2, "fp32")
    for kname, ratio in (("dequant", 3), ("int4", 6)):  # dequant holds 1 B/weight, int4 0.5 B/weight
        v = K.prepare(enc, 2, kname)
        assert v.nbytes < fp32.nbytes / ratio
        assert v.prepare_s > 0 and v.level == 2 and v.bits == 4
        assert not any(isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.shape == (I, H)
                       for t in v.data["gate_proj"].values())


def test_auto_choice_and_errors(monkeypatch):
    m, r = expert("matryoshka"), expert("residual")
    if native_kernels.available():  # the measured decode choice when a C compiler built it
        assert K.default_kernel(m, 1) == K.default_kernel(m, 3) == K.default_kernel(r, 2) == "native"
    monkeypatch.setenv(native_kernels.ENV_SWITCH, "0")
    assert K.default_kernel(m, 1) == "int4" and K.default_kernel(m, 3) == "dequant"  # 8 bit: no int4
    assert K.default_kernel(m, 1, batch=32) == "dequant"
    assert K.default_kernel(r, 2) == "int4_planes" and K.default_kernel(r, 2, batch=32) == "dequant"
    assert K.prepare(m, 2, batch=64).kernel == "dequant"
    odd = expert("matryoshka", gs=16)  # group 16: int4 op refuses, falls back
    assert K.default_kernel(odd, 1) != "int4"
    assert "group size" in K.kernel_reason("int4", odd, 1)
    with pytest.raises(NotImplementedError, match="registered"):
        K.prepare(m, 1, "cuda_magic")
    with pytest.raises(NotImplementedError, match="8 bits > 4"):
        K.prepare(m, 3, "int4")
    with pytest.raises(ValueError, match="down_proj"):
        K.prepare({"gate_proj": m["gate_proj"]}, 1)


def test_view_prepared_from_truncated_bytes_matches_full():
    from moestream.convert.codecs import deserialize_expert, serialize_expert
    enc = expert("matryoshka_floor", seed=9)
    buf, layout = serialize_expert(enc)
    x = torch.randn(3, H)
    for level in (1, 2, 3):
        part = deserialize_expert(buf[: layout["level_nbytes"][level - 1]], layout, level)
        kname = K.default_kernel(part, level)
        assert torch.equal(K.prepare(part, level, kname).ffn(x), K.prepare(enc, level, kname).ffn(x))
