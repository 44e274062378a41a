"""The torch grouped-GEMM peer with the real ``torch._scaled_grouped_mm`` on the GPU, both
presets, against the float64 reference; and CUDA-graph capture (the bench times it so)."""

from __future__ import annotations

import pytest
import torch

from vllm_moe_aot.measure.peers.torch_grouped import TorchGroupedMoE
from vllm_moe_aot.measure.reference import gate
from vllm_moe_aot.measure.workload import make_problem
from vllm_moe_aot.shapes import PRESETS

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
#: the presets with row-wise scales (block FP8 is not this peer's: the line-up says why)
ROW_PRESETS = [n for n, p in PRESETS.items() if not p.scheme.block_weights]


@pytest.mark.parametrize("preset", ROW_PRESETS)
@pytest.mark.parametrize("M", [1, 37, 4096])
def test_torch_peer_gpu(preset, M):
    pr = PRESETS[preset]
    p = make_problem(pr.shape, pr.scheme, M, torch.device("cuda"), seed=M)
    call = TorchGroupedMoE(pr.scheme).bind(p)
    eager = call()
    rows = torch.randperm(M)[:32].sort().values
    res = gate(eager[rows.cuda()], p.reference(True, rows=rows))
    print(f"torch peer {preset} M={M}: {res}")
    assert res.passed, res
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = call()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
