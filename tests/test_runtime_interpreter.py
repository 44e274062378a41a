"""The CPU launcher: smoke kernels under Triton's interpreter through the same runtime API."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests._aot_helpers import smoke_artifacts
from vllm_moe_aot.runtime import AotRuntimeError, LaunchArgumentError, Runtime
from vllm_moe_aot.runtime.interpreter import InterpretedKernel, InterpreterLauncher


@pytest.fixture(scope="module")
def rt() -> Runtime:
    return Runtime.get("cpu", artifacts=smoke_artifacts())


@pytest.mark.parametrize("n", [1, 1000, 3000])
def test_axpy_matches_torch(rt, n):
    k = rt.kernel("smoke_axpy")
    block = rt.manifest.constexprs("smoke_axpy")["BLOCK"]
    g = torch.Generator().manual_seed(n)
    x, y = torch.randn(n, generator=g), torch.randn(n, generator=g)
    out = torch.full((n + 5,), 7.0)  # elements past n must stay untouched
    k.launch(((n + block - 1) // block,), x, y, out, n, -1.5)
    torch.testing.assert_close(out[:n], x * -1.5 + y)
    assert torch.all(out[n:] == 7.0)


@pytest.mark.parametrize("M, N, K", [(64, 64, 128), (70, 80, 200)])
def test_fp8_gemm_matches_torch(rt, M, N, K):
    k = rt.kernel("smoke_fp8_gemm")
    c = rt.manifest.constexprs("smoke_fp8_gemm")
    g = torch.Generator().manual_seed(M)
    a = (torch.randn(M, K, generator=g) * 8).to(torch.float8_e4m3fn)
    b = (torch.randn(N, K, generator=g) * 8).to(torch.float8_e4m3fn)
    sa, sb = torch.tensor([0.25]), torch.tensor([0.125])
    out = torch.empty(M, N, dtype=torch.bfloat16)
    grid = ((M + c["BLOCK_M"] - 1) // c["BLOCK_M"], (N + c["BLOCK_N"] - 1) // c["BLOCK_N"])
    k.launch(grid, a, b, out, sa, sb, M, N, K, a.stride(0), b.stride(0), out.stride(0))
    ref = (a.double() @ b.double().T) * (0.25 * 0.125)
    # bf16 output: one bf16 ulp (the interpreter truncates its stores)
    torch.testing.assert_close(out.double(), ref, rtol=2 ** -7, atol=1e-2)


def test_same_argument_contract_as_the_gpu_launchers(rt):
    k = rt.kernel("smoke_axpy")
    x = torch.zeros(4)
    with pytest.raises(LaunchArgumentError, match="takes 5 launch arguments"):
        k.launch((1,), x, x, x, 4)  # forgot alpha
    with pytest.raises(LaunchArgumentError, match="does not fit i32"):
        k.launch((1,), x, x, x, 2**31, 1.0)
    k.launch((0,), x, x, x, 4, 1.0)  # empty grid: nothing runs


def test_exact_cast_is_forced_on(rt):
    e = rt.manifest.get("smoke_axpy")
    e = dataclasses.replace(e, constexprs={**e.constexprs, "EXACT_CAST": False})
    k = InterpretedKernel(e, object())
    assert k.constexprs["EXACT_CAST"] is True and k.constexprs["BLOCK"] == 1024


def test_needs_triton_interpret(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(AotRuntimeError, match="TRITON_INTERPRET=1"):
        InterpreterLauncher()


def test_kernel_imported_for_gpu_is_refused(rt):
    e = dataclasses.replace(rt.manifest.get("smoke_axpy"), source="kernels.build:build")
    with pytest.raises(AotRuntimeError, match="TRITON_INTERPRET=1 must be set before"):
        InterpreterLauncher().load(e)
