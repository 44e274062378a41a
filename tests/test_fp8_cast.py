"""The exact fp32 -> e4m3 rounding the kernels use under Triton's CPU interpreter.

The interpreter's own conversion rounds 124.3 to 64 and -7.9 to -4 (rounding that carries
into the exponent) and rounds ties away from zero; torch's conversion is correct (RNE), so it
is the oracle here. On the GPU the kernels use the hardware conversion (checked by the GPU
tests against the float64 reference).
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from kernels.common import _to_fp8


@triton.jit
def _cast_kernel(x_ptr, out_ptr, n, FP8_MAX: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    y = _to_fp8(tl.load(x_ptr + offs, mask=m, other=0.0), out_ptr.dtype.element_ty, FP8_MAX,
                True)
    tl.store(out_ptr + offs, y, mask=m)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e4m3fnuz])
def test_exact_cast_matches_torch(dtype):
    fmax = float(torch.finfo(dtype).max)
    g = torch.Generator().manual_seed(0)
    every = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    every = every[torch.isfinite(every)]
    mids = (every.sort().values[1:] + every.sort().values[:-1]) / 2  # exact ties
    vals = torch.cat([
        torch.tensor([124.3, -7.9, 0.0, -0.0, 1e-9, 3e-3, fmax, -fmax, fmax * 1.01, 1e6,
                      -1e6, 0.5 * 2.0**-9, 1.5 * 2.0**-9]),
        every, mids, torch.randn(4000, generator=g) * 50, torch.rand(1000, generator=g) * 1e-2,
    ]).float()
    out = torch.empty(vals.numel(), dtype=dtype)
    _cast_kernel[(triton.cdiv(vals.numel(), 256),)](vals, out, vals.numel(), FP8_MAX=fmax,
                                                   BLOCK=256)
    expect = vals.clamp(-fmax, fmax).to(dtype)
    got, want = out.float(), expect.float()
    bad = (got != want) & ~(got == 0) | ((got == 0) & (want != 0))
    assert not bad.any(), f"{vals[bad][:8].tolist()} -> {got[bad][:8].tolist()} " \
                          f"expected {want[bad][:8].tolist()}"


def test_nan_survives_the_clamp():
    vals = torch.tensor([float("nan"), 1.0, float("inf"), -float("inf")])
    out = torch.empty(4, dtype=torch.float8_e4m3fn)
    _cast_kernel[(1,)](vals, out, 4, FP8_MAX=448.0, BLOCK=4)
    got = out.float()
    assert torch.isnan(got[0])
    assert got[1:].tolist() == [1.0, 448.0, -448.0]
