"""Routing kernels of the ``grouped`` regime.

prep: per-token input quantisation (dynamic per-token or static scale) fused with the
per-expert histogram; align: padded per-expert offsets and the block -> expert map (one program
per expert); scatter: pairs sorted by expert (its program 0 also re-zeroes the histogram for the
next call, so no memset launch is needed).

Expert ids below zero are pairs routed to another rank (expert parallelism: the pipeline maps
global ids through vLLM's ``expert_map`` first): prep does not count them and scatter does not
sort them, so no later kernel sees them.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.common import _chain, _group_scale, _row_scale, _to_fp8


@triton.jit
def moe_prep(
    x_ptr, xq_ptr, a_scale_ptr, static_scale_ptr, topk_ids_ptr, counts_ptr, acc_ptr,
    K, topk,
    BLOCK_K: tl.constexpr, TOPK_PAD: tl.constexpr, STATIC: tl.constexpr,
    ZERO_ACC: tl.constexpr, FP8_MAX: tl.constexpr, EXACT_CAST: tl.constexpr,
    USE_GDC: tl.constexpr, GROUP: tl.constexpr = 0,
):
    """Quantise one token row of x to fp8 and count its experts; with ZERO_ACC also clear the
    token's fp32 output accumulator row for the atomic stage 2. GROUP > 0 (block FP8): one
    scale per GROUP columns, ``a_scale[m * (K // GROUP) + g]``, else one per row."""
    _chain(USE_GDC)
    m = tl.program_id(0).to(tl.int64)
    offs_t = tl.arange(0, TOPK_PAD)
    ids = tl.load(topk_ids_ptr + m * topk + offs_t, mask=offs_t < topk, other=-1)
    tl.atomic_add(counts_ptr + ids, 1, mask=ids >= 0, sem="relaxed")
    offs_k = tl.arange(0, BLOCK_K)
    row = x_ptr + m * K
    if GROUP:
        offs_g = tl.arange(0, BLOCK_K // GROUP)
        offs_c = tl.arange(0, GROUP)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + offs_g[:, None] * GROUP + offs_c[None, :]
            mk = cols < K
            v = tl.load(row + cols, mask=mk, other=0.0).to(tl.float32)
            amax = tl.max(tl.abs(v), axis=1)
            nan = tl.max((v != v).to(tl.int32), axis=1) > 0
            s = _group_scale(amax, nan, FP8_MAX)
            g = k0 // GROUP + offs_g
            tl.store(a_scale_ptr + m * (K // GROUP) + g, s, mask=g < K // GROUP)
            q = _to_fp8(v / s[:, None], xq_ptr.dtype.element_ty, FP8_MAX, EXACT_CAST)
            tl.store(xq_ptr + m * K + cols, q, mask=mk)
            if ZERO_ACC:
                tl.store(acc_ptr + m * K + cols, tl.zeros([BLOCK_K // GROUP, GROUP],
                                                          tl.float32), mask=mk)
        return
    if STATIC:
        scale = tl.load(static_scale_ptr)
    else:
        amax = tl.zeros([BLOCK_K], dtype=tl.float32)
        nan = tl.zeros([BLOCK_K], dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            v = tl.load(row + k0 + offs_k, mask=(k0 + offs_k) < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(v))
            nan = tl.maximum(nan, (v != v).to(tl.int32))
        scale = _row_scale(tl.max(amax, axis=0), tl.max(nan, axis=0) > 0, FP8_MAX)
        tl.store(a_scale_ptr + m, scale)
    for k0 in range(0, K, BLOCK_K):
        mk = (k0 + offs_k) < K
        v = tl.load(row + k0 + offs_k, mask=mk, other=0.0).to(tl.float32)
        q = _to_fp8(v / scale, xq_ptr.dtype.element_ty, FP8_MAX, EXACT_CAST)
        tl.store(xq_ptr + m * K + k0 + offs_k, q, mask=mk)
        if ZERO_ACC:
            tl.store(acc_ptr + m * K + k0 + offs_k, tl.zeros([BLOCK_K], tl.float32), mask=mk)


@triton.jit
def moe_align(
    counts_ptr, cursor_ptr, block_expert_ptr, sorted_ids_ptr, total_ptr,
    E, num_pairs,
    BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, FILL: tl.constexpr, USE_GDC: tl.constexpr,
):
    """Program e: expert e's padded row range, its blocks in the block -> expert map, its
    scatter cursor, and sentinel fill of its padding rows."""
    _chain(USE_GDC)
    e = tl.program_id(0)
    offs = tl.arange(0, E_PAD)
    c = tl.load(counts_ptr + offs, mask=offs < E, other=0)
    padded = (c + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    start = tl.sum(tl.where(offs < e, padded, 0), axis=0)
    mine = tl.load(counts_ptr + e)
    end = start + (mine + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    if e == 0:
        tl.store(total_ptr, tl.sum(padded, axis=0))
    tl.store(cursor_ptr + e, start)
    offs_b = tl.arange(0, FILL)
    for b0 in range(start // BLOCK_M, end // BLOCK_M, FILL):
        tl.store(block_expert_ptr + b0 + offs_b, e, mask=(b0 + offs_b) < end // BLOCK_M)
    offs_r = tl.arange(0, BLOCK_M)
    pad_at = start + mine + offs_r
    tl.store(sorted_ids_ptr + pad_at, num_pairs, mask=pad_at < end)


@triton.jit
def moe_scatter(
    topk_ids_ptr, cursor_ptr, sorted_ids_ptr, counts_ptr,
    num_pairs, E,
    BLOCK: tl.constexpr, E_PAD: tl.constexpr, USE_GDC: tl.constexpr,
):
    """Sort (token, slot) pairs by expert. Program 0 also re-zeroes the histogram: align has
    consumed it, and the next call's prep needs it zero."""
    _chain(USE_GDC)
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < num_pairs
    e = tl.load(topk_ids_ptr + offs, mask=mask, other=-1)
    mask = e >= 0
    pos = tl.atomic_add(cursor_ptr + e, 1, mask=mask, sem="relaxed")
    tl.store(sorted_ids_ptr + pos, offs, mask=mask)
    if pid == 0:
        offs_e = tl.arange(0, E_PAD)
        tl.store(counts_ptr + offs_e, tl.zeros([E_PAD], dtype=tl.int32), mask=offs_e < E)
