"""The code-object runtime on a real GPU: the committed smoke CUBINs load on this driver and
compute what torch computes, eagerly, with PDL, and inside CUDA-graph capture/replay."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

FP8 = torch.float8_e4m3fn


@pytest.fixture(scope="module")
def rt():
    from vllm_moe_aot.runtime import Runtime

    return Runtime.get(torch.device("cuda", torch.cuda.current_device()))


def test_record_versions(rt, record_property):
    from cuda.bindings import driver

    err, ver = driver.cuDriverGetVersion()
    assert int(err) == 0
    info = {
        "device": torch.cuda.get_device_name(),
        "driver_cuda_api": f"{ver // 1000}.{ver % 1000 // 10}",
        "torch_cuda": torch.version.cuda,
        "target": rt.target,
        "built_with": rt.manifest.compiler,
    }
    for k, v in info.items():
        record_property(k, str(v))
    print("\nruntime GPU versions:", info)
    assert rt.target == "sm_90a"


def axpy(rt, x, y, out, alpha, pdl=False):
    k = rt.kernel("smoke_axpy")
    block = rt.manifest.constexprs("smoke_axpy")["BLOCK"]
    n = x.numel()
    k.launch(((n + block - 1) // block,), x, y, out, n, alpha, pdl=pdl)


def gemm(rt, a, b, sa, sb, c):
    k = rt.kernel("smoke_fp8_gemm")
    cfg = rt.manifest.constexprs("smoke_fp8_gemm")
    M, K = a.shape
    N = b.shape[0]
    grid = ((M + cfg["BLOCK_M"] - 1) // cfg["BLOCK_M"], (N + cfg["BLOCK_N"] - 1) // cfg["BLOCK_N"])
    k.launch(grid, a, b, c, sa, sb, M, N, K, a.stride(0), b.stride(0), c.stride(0))


def gemm_ref(a, b, sa, sb):
    return ((a.double() @ b.double().T) * (sa.double() * sb.double())).float()


def assert_gemm_close(c, a, b, sa, sb):
    """bf16 rounding of the result plus the fp32 (and Hopper's reduced-precision fp8 wgmma)
    accumulation error, which scales with sum |a_k b_k|, not with the (cancelling) result."""
    ref = gemm_ref(a, b, sa, sb)
    mag = ((a.double().abs() @ b.double().abs().T) * (sa.double() * sb.double())).float()
    err = (c.float() - ref).abs()
    bound = ref.abs() * 2 ** -8 + mag * 2 ** -10 + 1e-6
    bad = err > bound
    assert not bad.any(), (f"{int(bad.sum())} of {bad.numel()} outside the bound; worst "
                           f"err/bound {float((err / bound).max()):.2f}")
    # and a wrong kernel would be far off: errors are small against the magnitudes
    assert float(err.max()) <= 2 ** -8 * float(mag.max()) + 1e-6


def make_gemm(M, N, K, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    a = (torch.randn(M, K, device="cuda", generator=g) * 8).to(FP8)
    b = (torch.randn(N, K, device="cuda", generator=g) * 8).to(FP8)
    sa = torch.tensor([0.25], device="cuda")
    sb = torch.tensor([0.125], device="cuda")
    c = torch.full((M, N), float("nan"), dtype=torch.bfloat16, device="cuda")
    return a, b, sa, sb, c


@pytest.mark.parametrize("n", [1, 1000, 1 << 20])
@pytest.mark.parametrize("pdl", [False, True])
def test_axpy_eager(rt, n, pdl):
    x = torch.randn(n, device="cuda")
    y = torch.randn(n, device="cuda")
    out = torch.full((n + 3,), 7.0, device="cuda")
    axpy(rt, x, y, out, 0.75, pdl=pdl)
    torch.cuda.synchronize()
    torch.testing.assert_close(out[:n], x * 0.75 + y)
    assert torch.all(out[n:] == 7.0)


@pytest.mark.parametrize("M, N, K", [(64, 64, 128), (200, 136, 520), (1024, 1024, 4096)])
def test_fp8_gemm_eager(rt, M, N, K):
    a, b, sa, sb, c = make_gemm(M, N, K)
    gemm(rt, a, b, sa, sb, c)
    torch.cuda.synchronize()
    assert_gemm_close(c, a, b, sa, sb)


def test_launches_allocate_nothing(rt):
    x = torch.randn(4096, device="cuda")
    out = torch.empty_like(x)
    axpy(rt, x, x, out, 1.0)  # loads the module
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(100):
        axpy(rt, x, x, out, 1.0)
    assert torch.cuda.memory_allocated() == before


def test_cuda_graph_capture_and_replay(rt):
    n = 5000
    x = torch.randn(n, device="cuda")
    y = torch.randn(n, device="cuda")
    out = torch.empty(n, device="cuda")
    a, b, sa, sb, c = make_gemm(96, 80, 384, seed=1)
    # load both modules before capture (loading is not capturable; launching is)
    axpy(rt, x, y, out, 2.0)
    gemm(rt, a, b, sa, sb, c)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        axpy(rt, x, y, out, 2.0)
        gemm(rt, a, b, sa, sb, c)
    for seed in range(3):
        g = torch.Generator(device="cuda").manual_seed(100 + seed)
        x.copy_(torch.randn(n, device="cuda", generator=g))
        a.copy_((torch.randn(a.shape, device="cuda", generator=g) * 8).to(FP8))
        sb.fill_(0.5 + seed)
        out.zero_()
        c.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, x * 2.0 + y)
        assert_gemm_close(c, a, b, sa, sb)


def test_other_stream(rt):
    x = torch.randn(10_000, device="cuda")
    out = torch.zeros_like(x)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        axpy(rt, x, x, out, 1.0)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    torch.testing.assert_close(out, 2 * x)
