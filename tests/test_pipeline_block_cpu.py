"""Block FP8 (issue 14) through the committed manifest and Triton's CPU interpreter: both
regimes against the float64 block reference, K and N spanning several 128 blocks, a block of
all-zero weights, large magnitudes, expert maps, and the scale layout checks."""

from __future__ import annotations

import pytest
import torch

from kernels.tune_space import VARIANTS
from tests._problems import check, make, run
from vllm_moe_aot.pipeline import FusedMoE
from vllm_moe_aot.shapes import MoEShape, Scheme

BLOCK = Scheme.FP8_BLOCK
#: K = three 128 blocks, N = two (w13: four row blocks)
SHAPE = MoEShape(E=4, K=384, N=256, topk=2)
GEMV = "gemv_n8_k512.k8_n64"
GROUPED = ("grouped_m16_wstd", "grouped_m16n64_swab_wstd", "grouped_m64n64_wloop4",
           "grouped_m64n256_wstd")


@pytest.fixture(scope="module")
def moe():
    return FusedMoE(SHAPE, BLOCK, "cpu", max_tokens=16)


def test_block_variants_and_their_semantics(moe):
    grouped = [v for v in moe.variants if moe.regime(v) == "grouped"]
    assert set(GROUPED) <= set(grouped)
    assert {moe.act_group(v) for v in grouped} <= {64, 128, 256}
    assert GEMV in moe.variants and not moe.quantize_activations(GEMV)
    assert moe.scale_shapes == ((4, 4, 3), (4, 3, 2))


@pytest.mark.parametrize("M", [1, 7])
def test_both_regimes_against_the_block_reference(moe, M):
    p = make(SHAPE, BLOCK, M, seed=M)
    for v in (GEMV, *GROUPED):
        check(moe, v, p, run(moe, v, p))


def test_block_only_promoting_modes(moe):
    """The modes built for block FP8 alone (tune_space.BLOCK_ONLY_MODES): N in one 128-wide
    stage-2 chunk, and the BLOCK_M=128 stage 1 feeding a BLOCK_M=64 looped stage 2."""
    names = ("grouped_m64_wloop4n128", "grouped_m128_wloop4m64", "grouped_m128_wloop4m64n128",
             "grouped_m128_wloop4n128")
    built = {v.name: v for v in VARIANTS}
    assert all(set(built[v].kernels) == {BLOCK.value} for v in names)
    p = make(SHAPE, BLOCK, 7, seed=5)
    for v in names:
        check(moe, v, p, run(moe, v, p))


def test_a_block_of_zero_weights_and_large_magnitudes(moe):
    p = make(SHAPE, BLOCK, 6, seed=3, x_scale=1e3)
    p["w13"][:, 128:256, 128:256] = 0  # a gate block of every expert
    p["w2"][:, 0:128, 128:256] = 0  # a down block
    p["w13_scale"][:, 0, :] *= 50.0  # a gate row block with far larger scales
    for v in (GEMV, *GROUPED):
        out = run(moe, v, p)
        assert torch.isfinite(out).all()
        check(moe, v, p, out)


def test_block_with_an_expert_map():
    shape = MoEShape(E=2, K=256, N=128, topk=2, ep=2)
    moe = FusedMoE(shape, BLOCK, "cpu", max_tokens=8)
    g = torch.Generator().manual_seed(4)
    ids = torch.rand(5, 4, generator=g).argsort(dim=1)[:, :2]
    p = make(MoEShape(2, 256, 128, 2), BLOCK, 5, seed=4, ids=ids)
    p["expert_map"] = torch.tensor([1, -1, 0, -1], dtype=torch.int32)
    for v in (GEMV, "grouped_m16_wstd"):
        check(moe, v, p, run(moe, v, p))


def test_block_scale_layout_is_checked(moe):
    p = make(SHAPE, BLOCK, 2, seed=1)
    p["w13_scale"] = p["w13_scale"][:, :, :2].contiguous()  # K/128 = 3 columns expected
    with pytest.raises(ValueError, match=r"w13_scale must be contiguous fp32 \[4, 4, 3\]"):
        run(moe, GEMV, p)


def test_block_needs_n_in_whole_blocks():
    with pytest.raises(ValueError, match="multiple of the 128-row weight block"):
        FusedMoE(MoEShape(E=4, K=256, N=192, topk=2), BLOCK, "cpu")
