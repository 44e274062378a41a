"""The DeepGEMM bound (built by scripts/build_deepgemm.py) on the GPU: for the block-FP8 preset
at TP8 and its EP8 layer, at several token counts (so several of DeepGEMM's kernel configs,
with and without TMA multicast, and the TP8 down projection's single 128-wide K block), both
grouped GEMMs against a float64 reference of the block-dequantised GEMMs on the same fp8
inputs (relative Frobenius error < 1e-2, padding rows exactly zero), the two stages together
against the layer's float64 reference, and CUDA-graph capture (the bench times it so)."""

from __future__ import annotations

import pytest
import torch

from vllm_moe_aot.measure.peers import deepgemm_bound as dgb
from vllm_moe_aot.measure.reference import block_dequant, gate
from vllm_moe_aot.measure.workload import make_problem
from vllm_moe_aot.shapes import PRESETS, MoEShape, Scheme

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

TP8 = PRESETS["qwen3.5-397b-a17b-fp8"].shape  # E=512, K=4096, N=128, topk=10
EP8 = MoEShape(E=64, K=4096, N=1024, topk=10, ep=8)  # preset_shape(preset, 8, 8)
#: rows compared per GEMM (all of them where fewer)
SAMPLE_ROWS = 768
REL_FRO = 1e-2


@pytest.fixture(scope="module")
def lib():
    why = dgb.unavailable_reason(Scheme.FP8_BLOCK)
    if why is not None:
        pytest.skip(why)
    return dgb.load_library()


def _reference_rows(lhs, lhs_scales, w, ws, m_indices, rows) -> torch.Tensor:
    """float64 (on the GPU) of the grouped GEMM at ``rows``: the row's fp8 LHS times its
    1 x 128 scales, times its expert's block-dequantised weight, transposed."""
    k = lhs.shape[1]
    a = lhs[rows].double() * lhs_scales[rows].double().repeat_interleave(128, 1)[:, :k]
    ids = m_indices[rows].long()
    out = torch.zeros(rows.numel(), w.shape[1], dtype=torch.float64, device=lhs.device)
    for e in torch.unique(ids).tolist():
        sel = (ids == e).nonzero(as_tuple=True)[0]
        out[sel] = a[sel] @ block_dequant(w[e], ws[e], (128, 128)).T
    return out


def _check_gemm(name, out, lhs, lhs_scales, w, ws, m_indices) -> float:
    real = (m_indices >= 0).nonzero(as_tuple=True)[0]
    assert torch.count_nonzero(out[m_indices < 0]) == 0, f"{name}: padding rows not zero"
    g = torch.Generator(device="cpu").manual_seed(real.numel())
    pick = torch.randperm(real.numel(), generator=g)[:SAMPLE_ROWS].to(real.device)
    rows = real[pick].sort().values
    ref = _reference_rows(lhs, lhs_scales, w, ws, m_indices, rows)
    got = out[rows].double()
    assert torch.isfinite(got).all(), f"{name}: non-finite output"
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < REL_FRO, f"{name}: rel. Frobenius error {rel:.3e} >= {REL_FRO}"
    return rel


CASES = [(TP8, M) for M in (1, 8, 64, 4096)] + [(EP8, M) for M in (1, 16, 256, 4096)]


@pytest.mark.parametrize("shape,M", CASES, ids=[f"{'ep8' if s.ep > 1 else 'tp8'}-M{M}"
                                                for s, M in CASES])
def test_both_gemms_match_float64_and_capture(lib, shape, M):
    dev = torch.device("cuda")
    p = make_problem(shape, Scheme.FP8_BLOCK, M, dev, seed=100 + M)
    bound = dgb.DeepGemmBound(Scheme.FP8_BLOCK, lib)
    call = bound.bind(p)
    inp = call.inputs
    if inp.m == 0:  # no pair routed to this rank's experts: nothing to launch
        assert shape.ep > 1 and call().numel() == 0
        pytest.skip(f"M={M}: no local pair on rank 0")
    torch.cuda.synchronize()
    m = inp.m
    sms = lib.init()[0]
    cfgs = [lib.kernel_for(m, n, k, e, sms)[1] for n, k, e in
            dgb.layer_gemms(shape.E, shape.K, shape.N)]
    eager2 = call().clone()
    eager1 = inp.out1.clone()
    r1 = _check_gemm("stage 1", eager1, inp.lhs1, inp.lhs1_scales, inp.w13, inp.s13,
                     inp.layout.m_indices)
    r2 = _check_gemm("stage 2", eager2, inp.lhs2, inp.lhs2_scales, inp.w2, inp.s2,
                     inp.layout.m_indices)
    print(f"deepgemm_bound {shape} M={M} m={m}: stage 1 rel {r1:.2e} "
          f"(block_n {cfgs[0].block_n}, {cfgs[0].num_stages} stages, multicast "
          f"{cfgs[0].num_tma_multicast}{'A' if cfgs[0].multicast_on_a else 'B'}), stage 2 rel "
          f"{r2:.2e} (block_n {cfgs[1].block_n}, {cfgs[1].num_stages} stages, multicast "
          f"{cfgs[1].num_tma_multicast}{'A' if cfgs[1].multicast_on_a else 'B'})")
    # CUDA graph: capture after the eager calls, replay into zeroed outputs
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = call()
    inp.out1.zero_()
    inp.out2.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert captured.data_ptr() == inp.out2.data_ptr()
    torch.testing.assert_close(inp.out1, eager1, rtol=0, atol=0)
    torch.testing.assert_close(captured, eager2, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [TP8, EP8], ids=["tp8", "ep8"])
def test_two_stages_give_the_layer(lib, shape):
    """The stage-2 rows, weighted and summed per token, are the layer (the bound times the
    layer's own GEMMs on the layer's data)."""
    M = 96
    p = make_problem(shape, Scheme.FP8_BLOCK, M, torch.device("cuda"), seed=5)
    call = dgb.DeepGemmBound(Scheme.FP8_BLOCK, lib).bind(p)
    inp = call.inputs
    y = call().float()
    lay = inp.layout
    real = lay.rows >= 0
    pairs = lay.pairs[real]
    out = torch.zeros(M, shape.K, dtype=torch.float32, device=y.device)
    out.index_add_(0, pairs // shape.topk, y[real] * p.topk_weights.reshape(-1)[pairs, None])
    rows = torch.arange(0, M, 2)
    res = gate(out[rows.cuda()].bfloat16(), p.reference(True, rows=rows))
    print(f"deepgemm_bound {shape} M={M} as a layer: {res}")
    assert res.passed, res


def test_lineup_runs_the_bound_for_block_layers_only(lib):
    from vllm_moe_aot.measure.peers import lineup

    dev = torch.device("cuda")
    peers, skipped = lineup.lineup(dev, Scheme.FP8_BLOCK, ("deepgemm_bound",), shape=TP8)
    assert "deepgemm_bound" in peers, skipped
    peer = peers["deepgemm_bound"]
    assert not peer.gated and not peer.complete and peer.source == lib.path.name
    peers, skipped = lineup.lineup(dev, Scheme.FP8_PTPC, ("deepgemm_bound",),
                                   shape=PRESETS["qwen3.5-397b-a17b"].shape)
    assert not peers and "fp8_block" in skipped[0]
    peers, skipped = lineup.lineup(dev, Scheme.FP8_BLOCK, ("deepgemm_bound",),
                                   shape=MoEShape(E=8, K=1024, N=256, topk=2))
    assert not peers and "not built" in skipped[0]
