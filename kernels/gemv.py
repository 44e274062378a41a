"""The ``gemv`` regime (single token and decode, no sorting at all).

stage 1: one program per (token, slot) pair and N tile reads ``topk_ids`` directly, dequantises
gate and up rows of w13 in registers (W8A16: activations are never quantised), applies
SiLU-and-mul and writes the fp32 intermediate ``[M*topk, N]``; stage 2: one program per (token,
slice of K output columns) loops over the token's top-k experts, applies w2's scale and the
routing weight in registers and writes bf16 ``[M, K]`` once (no atomics, no partials,
deterministic). Pairs whose expert id is below zero (another rank's, under expert parallelism)
cost no weight reads: stage 1 skips them and stage 2 masks them out.

All element offsets that can pass 2**31 are computed in int64.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from kernels.common import _silu_mul

#: rows x columns of one block-FP8 weight scale (shapes.WEIGHT_BLOCK)
QBLOCK: tl.constexpr = tl.constexpr(128)


@triton.jit
def moe_gemv_stage1(
    x_ptr, w13_ptr, w13_scale_ptr, topk_ids_ptr, act_ptr,
    N, K, topk,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PER_CHANNEL: tl.constexpr,
    USE_GDC: tl.constexpr, BLOCK_SCALES: tl.constexpr = False,
):
    """USE_GDC: let stage 2 (launched with programmatic dependent launch) start as soon as
    every program of this grid is running, so its launch and weight loads overlap our tail.
    BLOCK_SCALES (block FP8): w13 is dequantised with its 128 x 128 block scales in the loop
    (BLOCK_N divides 128, so a program's rows share one block row)."""
    if USE_GDC:
        gdc_launch_dependents()
    pair = tl.program_id(0)
    pid_n = tl.program_id(1)
    tok = (pair // topk).to(tl.int64)
    e = tl.load(topk_ids_ptr + pair).to(tl.int64)
    if e < 0:
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    g_ptrs = w13_ptr + e * 2 * N * K + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
    u_ptrs = g_ptrs + N * K
    x_ptrs = x_ptr + tok * K + offs_k
    acc_g = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    if BLOCK_SCALES:
        kblocks = K // QBLOCK
        s_g = w13_scale_ptr + (e * (2 * N // QBLOCK) + (pid_n * BLOCK_N) // QBLOCK) * kblocks
        s_u = s_g + (N // QBLOCK) * kblocks
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + offs_k) < K
        xk = tl.load(x_ptrs + k0, mask=mask_k, other=0.0).to(tl.float32)
        wmask = mask_n[:, None] & mask_k[None, :]
        wg = tl.load(g_ptrs + k0, mask=wmask, other=0.0).to(tl.float32)
        wu = tl.load(u_ptrs + k0, mask=wmask, other=0.0).to(tl.float32)
        if BLOCK_SCALES:
            kb = (k0 + offs_k) // QBLOCK
            xg = xk * tl.load(s_g + kb, mask=mask_k, other=0.0)
            xu = xk * tl.load(s_u + kb, mask=mask_k, other=0.0)
            acc_g += wg * xg[None, :]
            acc_u += wu * xu[None, :]
        else:
            acc_g += wg * xk[None, :]
            acc_u += wu * xk[None, :]
    g = tl.sum(acc_g, axis=1)
    u = tl.sum(acc_u, axis=1)
    if BLOCK_SCALES:
        pass  # applied per K block
    elif PER_CHANNEL:
        srow = w13_scale_ptr + e * 2 * N
        g = g * tl.load(srow + offs_n, mask=mask_n, other=0.0)
        u = u * tl.load(srow + N + offs_n, mask=mask_n, other=0.0)
    else:
        s = tl.load(w13_scale_ptr + e)
        g = g * s
        u = u * s
    tl.store(act_ptr + pair.to(tl.int64) * N + offs_n, _silu_mul(g, u), mask=mask_n)


@triton.jit
def _gemv2_slots(topk_ids_ptr, topk_weights_ptr, K, topk, BLOCK_K: tl.constexpr,
                 TOPK_PAD: tl.constexpr):
    """The gemv stage-2 program's token, its local top-k slots (padded to TOPK_PAD; a slot of
    another rank is masked like a padding slot), their experts and routing weights, and its
    BLOCK_K output columns."""
    tok = tl.program_id(0).to(tl.int64)
    offs_j = tl.arange(0, TOPK_PAD)
    pairs = tok * topk + offs_j
    e = tl.load(topk_ids_ptr + pairs, mask=offs_j < topk, other=-1).to(tl.int64)
    mask_j = e >= 0
    e = tl.where(mask_j, e, 0)
    rw = tl.load(topk_weights_ptr + pairs, mask=mask_j, other=0.0)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    return tok, mask_j, pairs, e, rw, offs_k, offs_k < K


@triton.jit
def _gemv2_scales(w2_scale_ptr, e, offs_k, mask_j, mask_k, K, PER_CHANNEL: tl.constexpr,
                  BLOCK_SCALES: tl.constexpr = False):
    """w2's scales per (slot, output column): [TOPK_PAD, BLOCK_K], or [TOPK_PAD, 1] per tensor
    (block FP8: ones; the block scales are applied per N chunk, :func:`_gemv2_block_scale`)."""
    if BLOCK_SCALES:
        s = tl.where(mask_j, 1.0, 0.0)[:, None]
    elif PER_CHANNEL:
        s = tl.load(w2_scale_ptr + e[:, None] * K + offs_k[None, :],
                    mask=mask_j[:, None] & mask_k[None, :], other=0.0)
    else:
        s = tl.load(w2_scale_ptr + e, mask=mask_j, other=0.0)[:, None]
    return s


@triton.jit
def _gemv2_block_scale(w2_scale_ptr, e, k_first, n0, mask_j, N, K):
    """Block FP8: each slot's w2 block scale for the program's columns (BLOCK_K divides 128, so
    they share one block row) and the N chunk at ``n0`` (within one block column):
    [TOPK_PAD]."""
    return tl.load(w2_scale_ptr + (e * (K // QBLOCK) + k_first // QBLOCK) * (N // QBLOCK)
                   + n0 // QBLOCK, mask=mask_j, other=0.0)


@triton.jit
def moe_gemv_stage2(
    act_ptr, w2_ptr, w2_scale_ptr, topk_ids_ptr, topk_weights_ptr, out_ptr,
    N, K, topk,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, TOPK_PAD: tl.constexpr,
    PER_CHANNEL: tl.constexpr, USE_GDC: tl.constexpr, BLOCK_SCALES: tl.constexpr = False,
):
    """All top-k experts of one token are loaded as one [TOPK_PAD, BLOCK_K, BLOCK_N] tile, so
    every weight byte of the program is in flight at once (a loop over experts would pay the
    memory latency topk times).

    USE_GDC (launched with programmatic dependent launch after stage 1): the first weight
    chunk and the scales, which stage 1 does not write, are loaded before ``gdc_wait``; only
    the intermediate waits for stage 1 to finish."""
    tok, mask_j, pairs, e, rw, offs_k, mask_k = _gemv2_slots(
        topk_ids_ptr, topk_weights_ptr, K, topk, BLOCK_K, TOPK_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    w_ptrs = (w2_ptr + e[:, None, None] * K * N + offs_k.to(tl.int64)[None, :, None] * N
              + offs_n[None, None, :])
    a_ptrs = act_ptr + pairs[:, None] * N + offs_n[None, :]
    mask_jk = mask_j[:, None, None] & mask_k[None, :, None]
    mask_n = offs_n < N
    w = tl.load(w_ptrs, mask=mask_jk & mask_n[None, None, :], other=0.0)
    s = _gemv2_scales(w2_scale_ptr, e, offs_k, mask_j, mask_k, K, PER_CHANNEL, BLOCK_SCALES)
    k_first = tl.program_id(1) * BLOCK_K
    if USE_GDC:
        gdc_wait()
    a = tl.load(a_ptrs, mask=mask_j[:, None] & mask_n[None, :], other=0.0)
    acc = tl.sum(w.to(tl.float32) * a[:, None, :], axis=2)
    if BLOCK_SCALES:
        acc = acc * _gemv2_block_scale(w2_scale_ptr, e, k_first, 0, mask_j, N, K)[:, None]
    for n0 in range(BLOCK_N, N, BLOCK_N):
        mask_n = (n0 + offs_n) < N
        a = tl.load(a_ptrs + n0, mask=mask_j[:, None] & mask_n[None, :], other=0.0)
        w = tl.load(w_ptrs + n0, mask=mask_jk & mask_n[None, None, :], other=0.0)
        part = tl.sum(w.to(tl.float32) * a[:, None, :], axis=2)
        if BLOCK_SCALES:
            part = part * _gemv2_block_scale(w2_scale_ptr, e, k_first, n0, mask_j, N, K)[:, None]
        acc += part
    y = tl.sum(acc * s * rw[:, None], axis=0)
    tl.store(out_ptr + tok * K + offs_k, y.to(out_ptr.dtype.element_ty), mask=mask_k)


@triton.jit
def moe_gemv_stage2_wide(
    act_ptr, w2_ptr, w2_scale_ptr, topk_ids_ptr, topk_weights_ptr, out_ptr,
    N, K, topk,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, TOPK_PAD: tl.constexpr, VEC: tl.constexpr,
    PER_CHANNEL: tl.constexpr, USE_GDC: tl.constexpr, BLOCK_SCALES: tl.constexpr = False,
):
    """:func:`moe_gemv_stage2` with the reduction dimension split as [BLOCK_N // VEC, VEC]:
    each thread first sums the VEC values of its own 16-byte load, so fewer values cross
    threads (fewer shared-memory round trips and barriers per program)."""
    tok, mask_j, pairs, e, rw, offs_k, mask_k = _gemv2_slots(
        topk_ids_ptr, topk_weights_ptr, K, topk, BLOCK_K, TOPK_PAD)
    nn = tl.arange(0, BLOCK_N // VEC)[:, None] * VEC + tl.arange(0, VEC)[None, :]
    w_ptrs = (w2_ptr + e[:, None, None, None] * K * N
              + offs_k.to(tl.int64)[None, :, None, None] * N + nn[None, None, :, :])
    a_ptrs = act_ptr + pairs[:, None, None] * N + nn[None, :, :]
    mask_jk = mask_j[:, None, None, None] & mask_k[None, :, None, None]
    mask_n = nn < N
    w = tl.load(w_ptrs, mask=mask_jk & mask_n[None, None, :, :], other=0.0)
    s = _gemv2_scales(w2_scale_ptr, e, offs_k, mask_j, mask_k, K, PER_CHANNEL, BLOCK_SCALES)
    k_first = tl.program_id(1) * BLOCK_K
    if USE_GDC:
        gdc_wait()
    a = tl.load(a_ptrs, mask=mask_j[:, None, None] & mask_n[None, :, :], other=0.0)
    acc = tl.sum(tl.sum(w.to(tl.float32) * a[:, None, :, :], axis=3), axis=2)
    if BLOCK_SCALES:
        acc = acc * _gemv2_block_scale(w2_scale_ptr, e, k_first, 0, mask_j, N, K)[:, None]
    for n0 in range(BLOCK_N, N, BLOCK_N):
        mask_n = (n0 + nn) < N
        a = tl.load(a_ptrs + n0, mask=mask_j[:, None, None] & mask_n[None, :, :], other=0.0)
        w = tl.load(w_ptrs + n0, mask=mask_jk & mask_n[None, None, :, :], other=0.0)
        part = tl.sum(tl.sum(w.to(tl.float32) * a[:, None, :, :], axis=3), axis=2)
        if BLOCK_SCALES:
            part = part * _gemv2_block_scale(w2_scale_ptr, e, k_first, n0, mask_j, N, K)[:, None]
        acc += part
    y = tl.sum(acc * s * rw[:, None], axis=0)
    tl.store(out_ptr + tok * K + offs_k, y.to(out_ptr.dtype.element_ty), mask=mask_k)
