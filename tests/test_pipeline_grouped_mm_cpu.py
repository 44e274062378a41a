"""The ``grouped_mm`` regime on the CPU (Triton interpreter for our kernels, the library GEMM's
per-expert float32 loop for the two GEMMs): its routing, gather, SiLU-and-quantise and
reduce, against the float64 reference and against the torch peer (the same semantics: bf16
GEMM outputs, one intermediate scale per row), across schemes, N past one tile, expert maps
and NaN inputs. tests/gpu/ runs it with the real ``torch._scaled_grouped_mm``."""

from __future__ import annotations

import pytest
import torch

from tests._problems import ROW_SCHEMES, check, make, run
from tests.test_pipeline_wide_ep_cpu import _ep_problem
from vllm_moe_aot import library_gemm
from vllm_moe_aot.contract import Regime, Role
from vllm_moe_aot.measure.peers.torch_grouped import TorchGroupedMoE, _row_scales
from vllm_moe_aot.pipeline import FusedMoE
from vllm_moe_aot.shapes import MoEShape, Scheme

V = "grouped_mm"


def _peer(moe: FusedMoE, p: dict) -> torch.Tensor:
    s13, s2 = _row_scales(moe.scheme, p["w13"], p["w13_scale"], p["w2_scale"])
    return TorchGroupedMoE(moe.scheme).forward(
        p["x"], p["w13"], p["w2"], s13, s2, p["topk_weights"], p["topk_ids"], p["a13_scale"],
        p["a2_scale"], p.get("expert_map"))


@pytest.mark.parametrize("scheme", ROW_SCHEMES, ids=lambda s: s.value)
@pytest.mark.parametrize("N", [64, 288], ids=lambda n: f"N{n}")
def test_grouped_mm_matches_reference_and_peer(scheme, N):
    shape = MoEShape(E=4, K=128, N=N, topk=2)
    moe = FusedMoE(shape, scheme, "cpu", max_tokens=16)
    assert moe.regime(V) == Regime.GROUPED_MM.value
    for M, seed in ((1, N), (9, N + 1), (16, N + 2)):
        p = make(shape, scheme, M, seed=seed)
        out = run(moe, V, p)
        tol = moe.tolerance(V)
        check(moe, V, p, out, rel_fro_max=tol, mean_rel_abs_max=tol)
        # the peer's arithmetic but the reduce (fp32 here, bf16 products there: 2-5e-3)
        check(moe, V, p, out, ref=_peer(moe, p).double())
    assert int(moe.ws.counts.abs().sum()) == 0


@pytest.mark.parametrize("local", ["half", "none", "all"])
def test_grouped_mm_expert_map(local):
    ep = 1 if local == "all" else 2
    shape = MoEShape(E=4, K=128, N=96, topk=3, ep=ep)
    moe = FusedMoE(shape, Scheme.FP8_PTPC, "cpu", max_tokens=16)
    p = _ep_problem(shape, Scheme.FP8_PTPC, 11, local, seed=5)
    out = run(moe, V, p)
    if local == "none":
        assert torch.count_nonzero(out) == 0  # nothing local: a zero row per token
    check(moe, V, p, out, rel_fro_max=moe.tolerance(V), mean_rel_abs_max=moe.tolerance(V))


def test_grouped_mm_nan_row_propagates_and_routing_weights_matter():
    shape = MoEShape(E=4, K=128, N=160, topk=2)
    moe = FusedMoE(shape, Scheme.FP8_PTPC, "cpu", max_tokens=8)
    p = make(shape, Scheme.FP8_PTPC, 6, seed=3)
    y1 = run(moe, V, p).double()
    p["topk_weights"][2] *= 2.0
    y2 = run(moe, V, p).double()
    assert torch.allclose(y2[2], 2.0 * y1[2], rtol=1e-2, atol=1e-3)
    assert torch.equal(y2[[0, 1, 3, 4, 5]], y1[[0, 1, 3, 4, 5]])
    p["x"][1, 7] = float("nan")
    out = run(moe, V, p)
    assert torch.isfinite(out[[0, 2, 3, 4, 5]].float()).all(), "clean rows must stay finite"
    assert not torch.isfinite(out[1].float()).all(), "a NaN row must propagate"


def test_grouped_mm_chain_and_where_it_runs():
    moe = FusedMoE(MoEShape(E=4, K=128, N=64, topk=2), Scheme.FP8_PER_TENSOR_STATIC, "cpu",
                   max_tokens=4)
    v = moe.variant(V)
    assert list(v.chain("fp8_per_tensor_static")) == [
        Role.PREP, Role.ALIGN, Role.SCATTER, Role.GATHER, Role.ACTIVATION, Role.REDUCE]
    block = FusedMoE(MoEShape(E=4, K=256, N=256, topk=2), Scheme.FP8_BLOCK, "cpu", max_tokens=4)
    assert V not in block.variants and "fp8_block" in block.skipped[V]
    assert library_gemm.unavailable_reason(torch.device("cpu")) is None
    assert "sm_90" in library_gemm.unavailable_reason(torch.device("meta"))
