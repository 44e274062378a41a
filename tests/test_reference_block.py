"""The float64 reference's block-FP8 semantics (issue 14 groundwork): 128 x 128 weight-scale
blocks and per-token, per-128-column activation groups, written out element by element here
to check ``reference_moe(..., weight_block=...)``."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_moe_aot.measure.reference import (
    GROUP_EPS,
    block_dequant,
    fp8_max,
    group_quant,
    reference_moe,
)
from vllm_moe_aot.shapes import Scheme

FP8 = torch.float8_e4m3fn
B = (128, 128)


def _problem(E=3, K=384, N=192, M=4, topk=2, seed=0):
    """K spans three blocks, N = 192 one and a half (the last block of w2's N is narrower)."""
    g = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(E, 2 * N, K, generator=g) * 64).clamp(-448, 448).to(FP8)
    w2 = (torch.randn(E, K, N, generator=g) * 64).clamp(-448, 448).to(FP8)
    s13 = torch.rand(E, math.ceil(2 * N / 128), math.ceil(K / 128), generator=g) * 2e-3 + 5e-4
    s2 = torch.rand(E, math.ceil(K / 128), math.ceil(N / 128), generator=g) * 2e-3 + 5e-4
    x = torch.randn(M, K, generator=g).bfloat16()
    ids = torch.rand(M, E, generator=g).argsort(dim=1)[:, :topk].int()
    tw = torch.rand(M, topk, generator=g)
    return x, w13, w2, s13, s2, (tw / tw.sum(1, keepdim=True)).float(), ids


def _q(v: float, scale: float) -> float:
    m = fp8_max(FP8)
    return float(torch.tensor(max(-m, min(m, v / scale))).float().to(FP8).double()) * scale


def _group_quant_slow(t: torch.Tensor, group: int) -> torch.Tensor:
    out = torch.empty_like(t, dtype=torch.float64)
    for r in range(t.shape[0]):
        for c0 in range(0, t.shape[1], group):
            seg = [float(v) for v in t[r, c0:c0 + group]]
            scale = max(max(abs(v) for v in seg), GROUP_EPS) / fp8_max(FP8)
            for i, v in enumerate(seg):
                out[r, c0 + i] = _q(v, scale)
    return out


def test_group_quant_matches_the_elementwise_definition():
    t = torch.randn(3, 300, dtype=torch.float64) * torch.tensor([1e-3, 1.0, 1e4])[:, None]
    t[1, 128:256] = 0.0  # an all-zero group stays zero (the eps floor keeps it finite)
    got = group_quant(t, 128, FP8)
    assert torch.equal(got, _group_quant_slow(t, 128))
    assert torch.count_nonzero(got[1, 128:256]) == 0


def test_block_dequant_scales_each_block_and_checks_shapes():
    w = (torch.randn(192, 300) * 64).clamp(-448, 448).to(FP8)
    s = torch.rand(2, 3) + 0.5
    d = block_dequant(w, s, B)
    assert torch.equal(d[127, 255], w[127, 255].double() * s[0, 1].double())
    assert torch.equal(d[191, 299], w[191, 299].double() * s[1, 2].double())
    with pytest.raises(ValueError, match="block scales for a 192x300 weight .* are 2x3"):
        block_dequant(w, torch.ones(2, 2), B)


def test_reference_follows_the_block_definition():
    x, w13, w2, s13, s2, tw, ids = _problem()
    got = reference_moe(x, w13, w2, s13, s2, tw, ids, Scheme.FP8_PTPC, weight_block=B)
    E, N2, K = w13.shape
    N = N2 // 2
    want = torch.zeros(x.shape[0], K, dtype=torch.float64)
    xq = _group_quant_slow(x.double(), 128)
    for m in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[m, j])
            w13e = block_dequant(w13[e], s13[e], B)
            w2e = block_dequant(w2[e], s2[e], B)
            h = xq[m] @ w13e.T
            act = torch.nn.functional.silu(h[:N]) * h[N:]
            want[m] += float(tw[m, j]) * (_group_quant_slow(act[None], 128)[0] @ w2e.T)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


def test_a_zero_weight_block_and_one_scaled_block():
    x, w13, w2, s13, s2, tw, ids = _problem(seed=3)
    ids[:] = torch.tensor([0, 1], dtype=torch.int32)
    base = reference_moe(x, w13, w2, s13, s2, tw, ids, Scheme.FP8_PTPC, weight_block=B)
    # expert 0's down-projection block (output rows 128-255, N columns 0-127) zeroed: exactly
    # those output columns lose expert 0's share, nothing else moves
    w2z = w2.clone()
    w2z[0, 128:256, 0:128] = 0
    z = reference_moe(x, w13, w2z, s13, s2, tw, ids, Scheme.FP8_PTPC, weight_block=B)
    assert torch.equal(z[:, :128], base[:, :128]) and torch.equal(z[:, 256:], base[:, 256:])
    assert not torch.equal(z[:, 128:256], base[:, 128:256])
    # that block's scale x 4: its share of those columns x 4 (to rounding of the sum)
    s2x = s2.clone()
    s2x[0, 1, 0] *= 4
    big = reference_moe(x, w13, w2, s13, s2x, tw, ids, Scheme.FP8_PTPC, weight_block=B)
    share = base[:, 128:256] - z[:, 128:256]
    assert torch.allclose(big[:, 128:256] - z[:, 128:256], 4 * share, rtol=1e-9, atol=1e-9)


def test_large_magnitudes_keep_their_relative_precision():
    """x ~ 1e4 (and so an intermediate ~ 1e8): per-group dynamic scales follow the values,
    nothing saturates, and the quantised layer stays within fp8 error of the unquantised."""
    x, w13, w2, s13, s2, tw, ids = _problem(seed=5)
    x = (x.float() * 1e4).bfloat16()
    q = reference_moe(x, w13, w2, s13, s2, tw, ids, Scheme.FP8_PTPC, weight_block=B)
    exact = reference_moe(x, w13, w2, s13, s2, tw, ids, Scheme.FP8_PTPC, weight_block=B,
                          quantize_activations=False)
    assert torch.isfinite(q).all() and float(exact.abs().max()) > 1e6
    assert float((q - exact).norm() / exact.norm()) < 5e-2


def test_block_with_a_static_scheme_is_refused():
    x, w13, w2, s13, s2, tw, ids = _problem()
    with pytest.raises(ValueError, match="dynamically"):
        reference_moe(x, w13, w2, s13, s2, tw, ids, Scheme.FP8_PER_TENSOR_STATIC,
                      torch.ones(1), torch.ones(1), weight_block=B)
