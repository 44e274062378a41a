"""vLLM 0.33's CUTLASS MoE peer (built by scripts/build_vllm_cutlass.py) on the GPU against the
float64 reference, for all three FP8 schemes and vLLM's three sm90 tile configs (M4, M64,
default), and CUDA-graph capture (the bench times it so). Also the CUTLASS-class bound: its two
GEMMs agree with the full torch pipeline's."""

from __future__ import annotations

import pytest
import torch

from tests._problems import ROW_SCHEMES
from vllm_moe_aot.measure.peers import vllm_cutlass
from vllm_moe_aot.measure.reference import fp8_max, gate, min_scale, quantize, reference_moe
from vllm_moe_aot.measure.workload import make_problem
from vllm_moe_aot.shapes import PRESETS, MoEShape, Scheme

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
#: the presets with row-wise scales (block FP8 is not this peer's: the line-up says why)
ROW_PRESETS = [n for n, p in PRESETS.items() if not p.scheme.block_weights]


@pytest.fixture(scope="module")
def lib():
    why = vllm_cutlass.unavailable_reason()
    if why is not None:
        pytest.skip(why)
    return vllm_cutlass.load_library()


def _tensor_wide_reference(p) -> torch.Tensor:
    """float64 reference with vLLM's dynamic per-tensor semantics: one scale over the whole
    input and one over every (token, slot) intermediate (our reference quantises per token,
    a finer scale, and independent rounding alone puts vLLM ~6% from it)."""
    x, w13, w2, s13, s2, tw, ids = p.tensors()
    fp8 = w13.dtype
    a13 = torch.clamp(x.double().abs().amax().cpu() / fp8_max(fp8), min=min_scale(fp8))
    a1 = quantize(x.detach().cpu().double(), a13, fp8)
    N = w13.shape[1] // 2
    amax = torch.zeros((), dtype=torch.float64)
    for e in ids.unique().tolist():
        rows = (ids == e).nonzero(as_tuple=True)[0].cpu()
        h = a1[rows] @ (w13[e].cpu().double() * s13[e].cpu().double().reshape(-1, 1)).T
        amax = torch.maximum(amax, (torch.nn.functional.silu(h[:, :N]) * h[:, N:]).abs().amax())
    a2 = torch.clamp(amax / fp8_max(fp8), min=min_scale(fp8))
    return reference_moe(x, w13, w2, s13, s2, tw, ids, Scheme.FP8_PER_TENSOR_STATIC,
                         a13_scale=a13, a2_scale=a2)


# M=1 (topk rows <= 4 for topk 4: M4), 5 (M64), 37 and 4096 (default)
@pytest.mark.parametrize("scheme", ROW_SCHEMES)
@pytest.mark.parametrize("M", [1, 5, 37, 4096])
def test_vllm_cutlass_matches_float64(lib, scheme, M):
    dynamic_tensor = scheme is Scheme.FP8_PER_TENSOR_DYNAMIC
    if dynamic_tensor and M == 4096:
        pytest.skip("the tensor-wide reference needs every row: small M only")
    shape = MoEShape(E=64, K=1024, N=256, topk=4) if M < 4096 else PRESETS["hy3"].shape
    p = make_problem(shape, scheme, M, torch.device("cuda"), seed=M)
    peer = vllm_cutlass.VllmCutlassMoE(scheme, lib)
    call = peer.bind(p)
    eager = call().clone()
    rows = torch.randperm(M)[:64].sort().values
    # vLLM quantises activations (per token for ptpc, per tensor otherwise): the reference that
    # quantises them the same way
    ref = _tensor_wide_reference(p)[rows] if dynamic_tensor else p.reference(True, rows=rows)
    res = gate(eager[rows.cuda()], ref)
    print(f"vllm_cutlass {scheme.value} {shape} M={M}: {res} "
          f"config {lib.config_for(M * shape.topk, 2 * shape.N, shape.K)}")
    assert res.passed, res
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = call()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, eager, rtol=0, atol=0)


@pytest.mark.parametrize("preset", ROW_PRESETS)
def test_vllm_cutlass_presets(lib, preset):
    pr = PRESETS[preset]
    M = 256
    p = make_problem(pr.shape, pr.scheme, M, torch.device("cuda"), seed=7)
    y = vllm_cutlass.VllmCutlassMoE(pr.scheme, lib)(p)
    rows = torch.arange(0, M, 3)
    res = gate(y[rows.cuda()], p.reference(True, rows=rows))
    print(f"vllm_cutlass {preset} M={M}: {res}")
    assert res.passed, res


def test_bad_problem_is_refused_before_anything_runs(lib):
    p = make_problem(MoEShape(E=8, K=1024, N=256, topk=2), Scheme.FP8_PTPC, 4,
                     torch.device("cuda"), seed=1)
    with pytest.raises(ValueError, match="problem is fp8_ptpc"):
        vllm_cutlass.VllmCutlassMoE(Scheme.FP8_PER_TENSOR_STATIC, lib).bind(p)


def test_gemm_bound_runs_the_pipelines_two_gemms():
    from vllm_moe_aot.measure.peers.torch_grouped import GroupedGemmBound

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("torch._scaled_grouped_mm serves sm_90 only")
    pr = PRESETS["qwen3.5-397b-a17b"]
    p = make_problem(pr.shape, pr.scheme, 64, torch.device("cuda"), seed=3)
    call = GroupedGemmBound(pr.scheme).bind(p)
    y = call()
    # one row per (token, slot) pair, K wide, finite
    assert tuple(y.shape) == (64 * pr.shape.topk, pr.shape.K)
    assert torch.isfinite(y).all()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = call()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, y, rtol=0, atol=0)
