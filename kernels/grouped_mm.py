"""Kernels of the ``grouped_mm`` regime: the glue around the library's grouped GEMMs.

The regime runs the grouped regime's routing (prep, align, scatter), then

    gather -> torch._scaled_grouped_mm (gate/up) -> silu_quant -> torch._scaled_grouped_mm
    (down) -> reduce

where the two GEMMs are PyTorch's (CUTLASS on sm_90) and these kernels do the rest: gather puts
each sorted row's quantised token (and its scale) in row order and records the row of each
(token, slot) pair; silu_quant turns the bf16 gate/up product into the fp8 intermediate with
one scale per row; reduce sums each token's top-k rows, weighted by routing weight, in fp32.

Rows are those of the grouped regime's sort: experts' rows contiguous, each expert's block
padded to align's BLOCK_M with the sentinel pair ``num_pairs``. Padding rows get zeros, so the
GEMMs compute zeros there; nothing reads them afterwards.
All element offsets that can pass 2**31 are computed in int64.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.common import _chain, _row_scale, _silu_mul, _to_fp8


@triton.jit
def moe_mm_gather(
    xq_ptr, a_scale_ptr, static_scale_ptr, sorted_ids_ptr, total_ptr, rows_ptr,
    row_scale_ptr, row_of_ptr, K, topk, num_pairs,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, STATIC: tl.constexpr,
    USE_GDC: tl.constexpr,
):
    """Sorted rows [BLOCK_R * pid, +BLOCK_R): each row's quantised token row and its scale (the
    static scale under STATIC), zeros for a padding row, and ``row_of[pair] = row``."""
    _chain(USE_GDC)
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = offs_r < tl.load(total_ptr)
    pair = tl.load(sorted_ids_ptr + offs_r, mask=live, other=num_pairs)
    valid = pair < num_pairs
    tok = tl.where(valid, pair // topk, 0).to(tl.int64)
    if STATIC:
        s = tl.load(static_scale_ptr) + tl.zeros([BLOCK_R], dtype=tl.float32)
    else:
        s = tl.load(a_scale_ptr + tok, mask=valid, other=0.0)
    tl.store(row_scale_ptr + offs_r, tl.where(valid, s, 0.0), mask=live)
    tl.store(row_of_ptr + pair, offs_r.to(tl.int32), mask=valid)
    offs_k = tl.arange(0, BLOCK_K)
    src = xq_ptr + tok[:, None] * K
    dst = rows_ptr + offs_r.to(tl.int64)[:, None] * K
    for k0 in range(0, K, BLOCK_K):
        mk = ((k0 + offs_k) < K)[None, :]
        v = tl.load(src + k0 + offs_k[None, :], mask=mk & valid[:, None], other=0.0)
        tl.store(dst + k0 + offs_k[None, :], v, mask=mk & live[:, None])


@triton.jit
def moe_mm_silu_quant(
    h_ptr, a2_static_ptr, sorted_ids_ptr, total_ptr, actq_ptr, act_scale_ptr, N, num_pairs,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, STATIC: tl.constexpr,
    FP8_MAX: tl.constexpr, EXACT_CAST: tl.constexpr, USE_GDC: tl.constexpr,
):
    """Rows [BLOCK_R * pid, +BLOCK_R): ``actq[r] = q2(silu(h[r, :N]) * h[r, N:])`` with one
    dynamic scale per row (or the static scale), stored in ``act_scale[r]`` either way (the
    library GEMM takes a scale per row). Two passes over the rows: their largest magnitude,
    then the quantisation (the second reads them again from L1/L2, not from memory)."""
    _chain(USE_GDC)
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = offs_r < tl.load(total_ptr)
    valid = tl.load(sorted_ids_ptr + offs_r, mask=live, other=num_pairs) < num_pairs
    offs_n = tl.arange(0, BLOCK_N)
    row = h_ptr + offs_r.to(tl.int64)[:, None] * (2 * N)
    if STATIC:
        scale = tl.load(a2_static_ptr) + tl.zeros([BLOCK_R], dtype=tl.float32)
    else:
        amax = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
        nan = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.int32)
        for n0 in range(0, N, BLOCK_N):
            m = valid[:, None] & ((n0 + offs_n) < N)[None, :]
            g = tl.load(row + n0 + offs_n[None, :], mask=m, other=0.0).to(tl.float32)
            u = tl.load(row + N + n0 + offs_n[None, :], mask=m, other=0.0).to(tl.float32)
            a = _silu_mul(g, u)
            amax = tl.maximum(amax, tl.where(m, tl.abs(a), 0.0))
            nan = tl.maximum(nan, (a != a).to(tl.int32))
        scale = _row_scale(tl.max(amax, axis=1), tl.max(nan, axis=1) > 0, FP8_MAX)
    tl.store(act_scale_ptr + offs_r, scale, mask=live)
    dst = actq_ptr + offs_r.to(tl.int64)[:, None] * N
    for n0 in range(0, N, BLOCK_N):
        mn = ((n0 + offs_n) < N)[None, :]
        m = valid[:, None] & mn
        g = tl.load(row + n0 + offs_n[None, :], mask=m, other=0.0).to(tl.float32)
        u = tl.load(row + N + n0 + offs_n[None, :], mask=m, other=0.0).to(tl.float32)
        q = _to_fp8(_silu_mul(g, u) / scale[:, None], actq_ptr.dtype.element_ty, FP8_MAX,
                    EXACT_CAST)
        tl.store(dst + n0 + offs_n[None, :], q, mask=live[:, None] & mn)


@triton.jit
def moe_mm_reduce(
    y_ptr, row_of_ptr, topk_weights_ptr, topk_ids_ptr, out_ptr, K, topk,
    BLOCK_K: tl.constexpr, TOPK_PAD: tl.constexpr, USE_GDC: tl.constexpr,
):
    """``out[tok] = bf16(sum_j w[tok, j] * y[row_of[tok, j]])`` over the token's local slots
    (an expert id below zero is another rank's: no row, skipped), the top-k rows loaded as one
    [TOPK_PAD, BLOCK_K] tile."""
    _chain(USE_GDC)
    tok = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = offs < K
    offs_t = tl.arange(0, TOPK_PAD)
    slot = tok * topk + offs_t
    local = (offs_t < topk) & (tl.load(topk_ids_ptr + slot, mask=offs_t < topk, other=-1) >= 0)
    r = tl.load(row_of_ptr + slot, mask=local, other=0).to(tl.int64)
    w = tl.load(topk_weights_ptr + slot, mask=local, other=0.0)
    y = tl.load(y_ptr + r[:, None] * K + offs[None, :], mask=local[:, None] & mask[None, :],
                other=0.0).to(tl.float32)
    acc = tl.sum(y * w[:, None], axis=0)
    tl.store(out_ptr + tok * K + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
