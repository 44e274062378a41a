"""The torch grouped-GEMM peer (the bench's second baseline) against the float64 reference.

On the CPU its two grouped GEMMs run as a per-expert loop (``torch._scaled_grouped_mm`` is
CUDA-only), so this checks the quantisation, sorting, gathering and top-k reduction around
them; tests/gpu/test_torch_peer_gpu.py checks the real grouped GEMM on the H100."""

from __future__ import annotations

import pytest
import torch

from tests._problems import ROW_SCHEMES
from vllm_moe_aot.measure.peers.torch_grouped import TorchGroupedMoE
from vllm_moe_aot.measure.reference import gate
from vllm_moe_aot.measure.workload import make_problem
from vllm_moe_aot.shapes import MoEShape, Scheme


@pytest.mark.parametrize("scheme", ROW_SCHEMES)
@pytest.mark.parametrize("M,topk", [(1, 1), (7, 3), (33, 4)])
def test_torch_peer_matches_reference(scheme, M, topk):
    p = make_problem(MoEShape(E=8, K=256, N=64, topk=topk), scheme, M, torch.device("cpu"),
                     seed=M * 10 + topk)
    out = torch.full((M, 256), float("nan"), dtype=torch.bfloat16)
    TorchGroupedMoE(scheme)(p, out=out)
    res = gate(out, p.reference(True))
    assert res.passed, res


def test_torch_peer_all_tokens_on_one_expert_and_empty_experts():
    p = make_problem(MoEShape(E=8, K=256, N=64, topk=2), Scheme.FP8_PTPC, 9,
                     torch.device("cpu"), seed=3)
    p.topk_ids[:, 0] = 5
    p.topk_ids[:, 1] = 2  # experts 0, 1, 3, 4, 6, 7 get nothing
    y = TorchGroupedMoE(Scheme.FP8_PTPC)(p)
    assert gate(y, p.reference(True)).passed


def test_torch_peer_routing_weights_matter():
    """A peer that ignored the routing weights would still look plausible: scale them."""
    p = make_problem(MoEShape(E=8, K=256, N=64, topk=2), Scheme.FP8_PER_TENSOR_DYNAMIC, 5,
                     torch.device("cpu"), seed=4)
    y1 = TorchGroupedMoE(p.scheme)(p).double()
    p.topk_weights.mul_(2.0)
    y2 = TorchGroupedMoE(p.scheme)(p).double()
    assert torch.allclose(y2, 2.0 * y1, rtol=2e-2, atol=1e-3)
    assert gate(y2, p.reference(True)).passed


def test_library_gemm_says_where_it_runs():
    """The peers' grouped GEMM: the CPU's per-expert loop stands in; a device that is neither
    the CPU nor CUDA sm_90 gets a reason (the bench lists the peer as skipped with it)."""
    from vllm_moe_aot import library_gemm

    assert library_gemm.unavailable_reason(torch.device("cpu")) is None
    assert "sm_90" in library_gemm.unavailable_reason(torch.device("meta"))
