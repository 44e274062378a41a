"""Issue 13 on the CPU (Triton interpreter, committed manifest): the grouped regime at N past
one stage-1 tile for the dynamic schemes (per-tile intermediate scales), and expert
parallelism (``expert_map``) in both regimes, against the float64 reference."""

from __future__ import annotations

import pytest
import torch

from tests._problems import ROW_SCHEMES, check, make, run
from vllm_moe_aot.pipeline import FusedMoE, Workspace
from vllm_moe_aot.shapes import MoEShape, Scheme

DYNAMIC = [Scheme.FP8_PTPC, Scheme.FP8_PER_TENSOR_DYNAMIC]
#: per-tile-scale variants: the looped stage 2 after stage-1 N tiles of 128 and 256, and the
#: one-tile-per-program stage 2 after 64-wide tiles (also with A and B swapped, and with two
#: such tiles per 128-wide chunk), and the BLOCK_M=128 pair
WIDE = ("grouped_m64_fastacc_wloop4", "grouped_m64n256_fastacc_wloop4n128",
        "grouped_m16n64_wstd", "grouped_m16n64_swab_wstd", "grouped_m16n64_swab_wstdk64h128",
        "grouped_m128_fastacc_wloop4n128",
        "grouped_m64n256_fastacc_wloop4k256", "grouped_m64n256_fastacc_wloop4n256",
        "grouped_m64n256_fastacc_wloop4k256kf")


@pytest.mark.parametrize("scheme", DYNAMIC, ids=lambda s: s.value)
@pytest.mark.parametrize("N", [160, 288, 384], ids=lambda n: f"N{n}")
def test_wide_n_dynamic_grouped(scheme, N):
    """N = one 128 tile + 32, one 256 tile + 32 (not a multiple of either), three 128 tiles."""
    shape = MoEShape(E=4, K=128, N=N, topk=2)
    moe = FusedMoE(shape, scheme, "cpu", max_tokens=16)
    p = make(shape, scheme, 9, seed=N)
    for v in WIDE:
        assert v in moe.variants, moe.skipped.get(v)
        assert moe.act_group(v) in (64, 128, 256)
        check(moe, v, p, run(moe, v, p))


def test_per_tile_scales_follow_the_tiles_not_the_row():
    """One column of huge values in the second tile: with one scale per row the first tile
    would be flushed towards zero; the per-tile reference and the kernel agree, and the
    per-row reference does not (so the test can tell the two apart)."""
    shape = MoEShape(E=2, K=128, N=160, topk=1)
    scheme = Scheme.FP8_PTPC
    moe = FusedMoE(shape, scheme, "cpu", max_tokens=8)
    p = make(shape, scheme, 4, seed=7)
    p["w13_scale"][:, 150] *= 1e4  # gate channel 150 (tile 2) dominates its rows' amax
    v = WIDE[0]
    out = run(moe, v, p)
    check(moe, v, p, out)
    from vllm_moe_aot.measure.reference import gate, reference_moe
    row_ref = reference_moe(p["x"], p["w13"], p["w2"], p["w13_scale"], p["w2_scale"],
                            p["topk_weights"], p["topk_ids"], scheme)
    assert not gate(out, row_ref, rel_fro_max=1e-3, mean_rel_abs_max=1e-3).passed


def test_narrow_variants_keep_their_n_bound():
    """Variants with one scale per row still refuse N past their stage-1 tile."""
    moe = FusedMoE(MoEShape(E=4, K=128, N=160, topk=2), Scheme.FP8_PTPC, "cpu", max_tokens=4)
    assert "grouped_m64" not in moe.variants
    assert "N <= 128" in moe.skipped["grouped_m64"]
    assert {"gemv", "grouped"} <= {moe.regime(v) for v in moe.variants}


def _ep_problem(shape: MoEShape, scheme: Scheme, M: int, local: str, seed: int):
    """Tokens routed over E * ep global experts; ``local`` says which of them this rank holds:
    'half' (every other of the first 2E), 'none' or 'all'."""
    G = shape.global_experts
    emap = torch.full((G,), -1, dtype=torch.int32)
    if local == "half":
        emap[0:2 * shape.E:2] = torch.arange(shape.E, dtype=torch.int32)
    elif local == "all":
        emap[:] = torch.arange(G, dtype=torch.int32) % shape.E  # (ep=1 maps: the identity)
    g = torch.Generator().manual_seed(seed)
    ids = torch.rand(M, G, generator=g).argsort(dim=1)[:, :shape.topk]
    p = make(MoEShape(shape.E, shape.K, shape.N, shape.topk), scheme, M, seed=seed, ids=ids)
    p["expert_map"] = emap
    return p


@pytest.mark.parametrize("scheme", ROW_SCHEMES, ids=lambda s: s.value)
@pytest.mark.parametrize("local", ["half", "none", "all"])
def test_expert_map_both_regimes(scheme, local):
    ep = 1 if local == "all" else 2
    shape = MoEShape(E=4, K=128, N=64, topk=3, ep=ep)
    moe = FusedMoE(shape, scheme, "cpu", max_tokens=16)
    p = _ep_problem(shape, scheme, 11, local, seed=5)
    for v in ("gemv_n8_k512.k8_n64", "grouped_m16", "grouped_m64_atomic"):
        out = run(moe, v, p)
        if local == "none":
            assert torch.count_nonzero(out) == 0  # nothing local: a zero row per token
        check(moe, v, p, out)


def test_expert_map_with_wide_n_and_a_token_without_local_experts():
    shape = MoEShape(E=4, K=128, N=160, topk=2, ep=2)
    scheme = Scheme.FP8_PTPC
    moe = FusedMoE(shape, scheme, "cpu", max_tokens=16)
    p = _ep_problem(shape, scheme, 6, "half", seed=9)
    p["topk_ids"][0] = torch.tensor([1, 3], dtype=torch.int32)  # both on the other rank
    for v in (WIDE[0], WIDE[2], "gemv_n8_k512.k8_n64"):
        out = run(moe, v, p)
        assert torch.count_nonzero(out[0]) == 0
        check(moe, v, p, out)


def test_expert_map_is_checked():
    shape = MoEShape(E=4, K=128, N=64, topk=2, ep=2)
    moe = FusedMoE(shape, Scheme.FP8_PTPC, "cpu", max_tokens=4)
    p = _ep_problem(shape, Scheme.FP8_PTPC, 2, "half", seed=1)
    p["expert_map"] = p["expert_map"].long()
    with pytest.raises(ValueError, match="expert_map must be contiguous 1-D int32"):
        run(moe, "grouped_m16", p)
    # global ids without their map would index past the E local slots: refused before any
    # launch, the histogram the next call relies on still all zeros
    p["expert_map"] = None
    for v in ("grouped_m16", "gemv_n8_k512.k8_n64"):
        with pytest.raises(ValueError, match=r"ep=2\) are global ids over 8 experts"):
            run(moe, v, p)
    assert torch.count_nonzero(moe.ws.counts) == 0


def test_wide_layers_get_a_token_chunk_within_the_workspace_budget():
    wide = MoEShape(E=16, K=8192, N=16384, topk=8)
    tokens = Workspace.chunk_tokens(wide, 1 << 17, 128, scale_tiles=128)
    assert 256 <= tokens < 16384
    assert Workspace.nbytes(wide, tokens, 128, 128) <= 2 << 30 or tokens == 256
    qwen = MoEShape(E=512, K=4096, N=128, topk=10)
    assert Workspace.chunk_tokens(qwen, 8192, 128) == 8192
