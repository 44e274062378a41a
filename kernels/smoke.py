"""Two small smoke kernels that exercise the AOT build and the runtime end to end.

* ``smoke_axpy``: ``out = x * alpha + y`` over fp32 vectors (pointer, i32 and fp32 params).
* ``smoke_fp8_gemm``: ``C = (A @ B^T) * a_scale * b_scale`` with A ``[M, K]`` and B ``[N, K]``
  in the target's fp8 e4m3 flavour (both K-major), fp32 scalar scales read from device memory,
  bf16 output; one program per ``BLOCK_M x BLOCK_N`` output tile, ``tl.dot`` on tensor cores.

They are not part of the MoE pipeline; tests and ``scripts/launch_overhead.py`` use them.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.spec import FP8_PTR, KernelSpec


@triton.jit
def axpy_kernel(x_ptr, y_ptr, out_ptr, n, alpha, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, x * alpha + y, mask=mask)


@triton.jit
def fp8_gemm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    a_scale_ptr,
    b_scale_ptr,
    M,
    N,
    K,
    stride_am,
    stride_bn,
    stride_cm,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k + k0 < K
        a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=(offs_n[None, :] < N) & k_mask[:, None], other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    scale = tl.load(a_scale_ptr) * tl.load(b_scale_ptr)
    c = (acc * scale).to(tl.bfloat16)
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, c, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


SPECS: list[KernelSpec] = [
    KernelSpec(
        name="smoke_axpy",
        source="kernels.smoke:axpy_kernel",
        family="smoke",
        signature={"x_ptr": "*fp32", "y_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32",
                   "alpha": "fp32"},
        constexprs={"BLOCK": 1024},
        divisible_by_16=("x_ptr", "y_ptr", "out_ptr"),
        num_warps=4,
        num_stages=1,
    ),
    KernelSpec(
        name="smoke_fp8_gemm",
        source="kernels.smoke:fp8_gemm_kernel",
        family="smoke",
        signature={"a_ptr": FP8_PTR, "b_ptr": FP8_PTR, "c_ptr": "*bf16", "a_scale_ptr": "*fp32",
                   "b_scale_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32",
                   "stride_am": "i32", "stride_bn": "i32", "stride_cm": "i32"},
        constexprs={"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128},
        divisible_by_16=("a_ptr", "b_ptr", "c_ptr", "stride_am", "stride_bn", "stride_cm"),
        num_warps=4,
        num_stages=3,
    ),
]
