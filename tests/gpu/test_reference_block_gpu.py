"""Issue 14 groundwork on the GPU: vLLM's own block-FP8 Triton path (the vllm-stock tool,
``scheme="fp8_block"``) against the float64 reference's block semantics, at the Qwen3.5 block
layer (TP8: E=512, K=4096, N=128, topk=10): the reference is what vLLM computes."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from vllm_moe_aot.measure.reference import gate, reference_moe
from vllm_moe_aot.shapes import Scheme

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not (ROOT / ".vllm_stock").is_dir(),
                       reason="needs .vllm_stock (python3 ../shared/tools/vllm-stock/prepare.py)"),
]


def _vllm_stock():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.fail("TRITON_INTERPRET=1 in this process: vLLM's Triton path would run in Triton's "
                    "interpreter, whose fp8 conversion mis-rounds; run the GPU tests with -m gpu "
                    "(tests/conftest.py)")
    if "vllm" in sys.modules and not getattr(sys.modules["vllm"], "__vllm_stock_shim__", False):
        pytest.skip("a real vLLM is imported in this process (vllm_stock refuses to load)")
    if importlib.util.find_spec("vllm_stock") is None:
        sys.path.insert(0, str(ROOT / ".vllm_stock"))
    return importlib.import_module("vllm_stock")


@pytest.mark.parametrize("M", [1, 64, 4096])
def test_vllm_block_path_matches_the_block_reference(M):
    vs = _vllm_stock()
    E, K, N, topk = 512, 4096, 128, 10
    g = torch.Generator(device="cuda").manual_seed(M)
    fp8 = torch.float8_e4m3fn
    w13 = (torch.randn(E, 2 * N, K, device="cuda", generator=g) * 64).clamp(-448, 448).to(fp8)
    w2 = (torch.randn(E, K, N, device="cuda", generator=g) * 64).clamp(-448, 448).to(fp8)
    s13 = torch.rand(E, 2 * N // 128, K // 128, device="cuda", generator=g) * 2e-3 + 5e-4
    s2 = torch.rand(E, K // 128, N // 128, device="cuda", generator=g) * 2e-3 + 5e-4
    x = torch.randn(M, K, device="cuda", generator=g).bfloat16()
    ids = torch.rand(M, E, device="cuda", generator=g).argsort(dim=1)[:, :topk].int()
    tw = torch.rand(M, topk, device="cuda", generator=g)
    tw = (tw / tw.sum(1, keepdim=True)).float()
    y = vs.fused_experts(x, w13, w2, tw, ids, scheme="fp8_block", w13_scale=s13, w2_scale=s2)
    rows = torch.randperm(M)[:32]
    ref = reference_moe(x[rows.cuda()], w13, w2, s13, s2, tw[rows.cuda()], ids[rows.cuda()],
                        Scheme.FP8_PTPC, weight_block=(128, 128))
    result = gate(y[rows.cuda()], ref)
    print(f"vLLM fp8_block M={M}: {result}")
    assert result.passed, result
