"""Fused FP8 MoE kernels (Triton sources for the AOT build) and their tune space.

Two regimes, each a small family of variants (see DESIGN.md, "The fused-MoE pipeline"):

``gemv`` (single token and decode, no sorting at all)
    stage 1: one program per (token, slot) pair and N tile reads ``topk_ids`` directly,
    dequantises gate and up rows of w13 in registers (W8A16: activations are never quantised),
    applies SiLU-and-mul and writes the fp32 intermediate ``[M*topk, N]``;
    stage 2: one program per (token, slice of K output columns) loops over the token's top-k
    experts, applies w2's scale and the routing weight in registers and writes bf16 ``[M, K]``
    once (no atomics, no partials, deterministic).

``grouped`` (prefill)
    prep: per-token input quantisation (dynamic per-token or static scale) fused with the
    per-expert histogram; align: padded per-expert offsets and the block -> expert map (one
    program per expert); scatter: pairs sorted by expert (its program 0 also re-zeroes the
    histogram for the next call, so no memset launch is needed); stage 1: FP8 x FP8 tensor-core
    GEMM over gate/up tile pairs with scales + SiLU-and-mul + re-quantisation in the epilogue;
    stage 2: FP8 x FP8 GEMM with the routing weight, bf16 partials per pair; reduce: top-k sum.

All element offsets that can pass 2**31 are computed in int64.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from kernels.spec import FP8_MAX, FP8_PTR, ON_CUDA, KernelSpec, PipelineVariant

_SRC = "kernels.moe"


# ----------------------------------------------------------------------------------- helpers
@triton.jit
def _silu_mul(g, u):
    return g / (1.0 + tl.exp(-g)) * u


@triton.jit
def _round_half_even(v):
    r = tl.floor(v + 0.5)
    tie = (r - v) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _to_fp8(y, fp8_dtype: tl.constexpr, FP8_MAX: tl.constexpr, EXACT_CAST: tl.constexpr):
    """Clamp ``y`` to +-FP8_MAX (NaN stays NaN) and convert to ``fp8_dtype`` (e4m3, RNE).

    EXACT_CAST is only set when Triton's CPU interpreter runs the kernel: its fp32 -> fp8
    conversion rounds wrongly when rounding carries into the exponent and mangles NaN, so
    there the e4m3 bit pattern is built arithmetically (round-half-even) and bit-cast. The
    compiled code objects use the hardware conversion (RNE, saturating) directly.
    """
    y = tl.clamp(y, -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
    if EXACT_CAST:
        # e4m3fn: exponent bias 7, NaN 0x7F; e4m3fnuz (max 240): bias 8, NaN 0x80, no -0
        if FP8_MAX > 300.0:
            bias = 7.0
            nan_bits = 127
        else:
            bias = 8.0
            nan_bits = 128
        a = tl.abs(y)
        e = tl.maximum(tl.floor(tl.log2(tl.maximum(a, 1e-30))), 1.0 - bias)
        mant = _round_half_even(a / tl.exp2(e - 3.0))  # 8..16 normal, 0..8 subnormal
        carry = mant >= 16.0
        e = tl.where(carry, e + 1.0, e)
        mant = tl.where(carry, mant * 0.5, mant)
        normal = mant >= 8.0
        efield = tl.where(normal, e + bias, 0.0)
        mfield = tl.where(normal, mant - 8.0, mant)
        bits = (efield * 8.0 + mfield).to(tl.int32)
        sign = tl.where((y < 0) & (bits > 0), 128, 0)
        bits = tl.where(y != y, nan_bits, bits + sign)
        return bits.to(tl.uint8).to(fp8_dtype, bitcast=True)
    return y.to(fp8_dtype)


@triton.jit
def _fp8_operand(q, FP8_MAX: tl.constexpr, EXACT_CAST: tl.constexpr):
    """An fp8 activation tile as an MMA operand. Compiled: unchanged (fp8 x fp8 MMA). Under
    the interpreter (EXACT_CAST) it is decoded to fp32 from its bits, because the interpreter
    decodes the e4m3 NaN pattern as 480 and a NaN input would silently turn finite."""
    if EXACT_CAST:
        if FP8_MAX > 300.0:
            bias = 7.0
        else:
            bias = 8.0
        bits = q.to(tl.uint8, bitcast=True).to(tl.int32)
        e = ((bits >> 3) & 15).to(tl.float32)
        m = (bits & 7).to(tl.float32)
        mag = tl.where(e == 0.0, m * tl.exp2(-2.0 - bias), (8.0 + m) * tl.exp2(e - bias - 3.0))
        if FP8_MAX > 300.0:
            nan = (bits & 127) == 127
            val = tl.where((bits & 128) != 0, -mag, mag)
        else:
            nan = bits == 128
            val = tl.where((bits & 128) != 0, -mag, mag)
        return tl.where(nan, float("nan"), val)
    return q


@triton.jit
def _row_scale(amax, has_nan, FP8_MAX: tl.constexpr):
    """Dynamic scale from a row's absolute max, floored like vLLM; NaN rows get a NaN scale."""
    s = tl.maximum(amax / FP8_MAX, 1.0 / (FP8_MAX * 512.0))
    return tl.where(has_nan, float("nan"), s)


@triton.jit
def _chain(USE_GDC: tl.constexpr):
    """Programmatic dependent launch inside a chain of kernels: let the next kernel's programs
    launch once all of ours run, then wait until the previous kernel has finished and its
    writes are visible. Everything a kernel reads from its predecessors comes after this; the
    first kernel of a chain is launched without PDL, so its wait returns at once."""
    if USE_GDC:
        gdc_launch_dependents()
        gdc_wait()


# ------------------------------------------------------------------------------ gemv regime
@triton.jit
def moe_gemv_stage1(
    x_ptr, w13_ptr, w13_scale_ptr, topk_ids_ptr, act_ptr,
    N, K, topk,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PER_CHANNEL: tl.constexpr,
    USE_GDC: tl.constexpr,
):
    """USE_GDC: let stage 2 (launched with programmatic dependent launch) start as soon as
    every program of this grid is running, so its launch and weight loads overlap our tail."""
    if USE_GDC:
        gdc_launch_dependents()
    pair = tl.program_id(0)
    pid_n = tl.program_id(1)
    tok = (pair // topk).to(tl.int64)
    e = tl.load(topk_ids_ptr + pair).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    g_ptrs = w13_ptr + e * 2 * N * K + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
    u_ptrs = g_ptrs + N * K
    x_ptrs = x_ptr + tok * K + offs_k
    acc_g = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + offs_k) < K
        xk = tl.load(x_ptrs + k0, mask=mask_k, other=0.0).to(tl.float32)
        wmask = mask_n[:, None] & mask_k[None, :]
        wg = tl.load(g_ptrs + k0, mask=wmask, other=0.0).to(tl.float32)
        wu = tl.load(u_ptrs + k0, mask=wmask, other=0.0).to(tl.float32)
        acc_g += wg * xk[None, :]
        acc_u += wu * xk[None, :]
    g = tl.sum(acc_g, axis=1)
    u = tl.sum(acc_u, axis=1)
    if PER_CHANNEL:
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
    """The gemv stage-2 program's token, its top-k slots (padded to TOPK_PAD), their experts
    and routing weights, and its BLOCK_K output columns."""
    tok = tl.program_id(0).to(tl.int64)
    offs_j = tl.arange(0, TOPK_PAD)
    mask_j = offs_j < topk
    pairs = tok * topk + offs_j
    e = tl.load(topk_ids_ptr + pairs, mask=mask_j, other=0).to(tl.int64)
    rw = tl.load(topk_weights_ptr + pairs, mask=mask_j, other=0.0)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    return tok, mask_j, pairs, e, rw, offs_k, offs_k < K


@triton.jit
def _gemv2_scales(w2_scale_ptr, e, offs_k, mask_j, mask_k, K, PER_CHANNEL: tl.constexpr):
    """w2's scales per (slot, output column): [TOPK_PAD, BLOCK_K], or [TOPK_PAD, 1] per tensor."""
    if PER_CHANNEL:
        s = tl.load(w2_scale_ptr + e[:, None] * K + offs_k[None, :],
                    mask=mask_j[:, None] & mask_k[None, :], other=0.0)
    else:
        s = tl.load(w2_scale_ptr + e, mask=mask_j, other=0.0)[:, None]
    return s


@triton.jit
def moe_gemv_stage2(
    act_ptr, w2_ptr, w2_scale_ptr, topk_ids_ptr, topk_weights_ptr, out_ptr,
    N, K, topk,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, TOPK_PAD: tl.constexpr,
    PER_CHANNEL: tl.constexpr, USE_GDC: tl.constexpr,
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
    s = _gemv2_scales(w2_scale_ptr, e, offs_k, mask_j, mask_k, K, PER_CHANNEL)
    if USE_GDC:
        gdc_wait()
    a = tl.load(a_ptrs, mask=mask_j[:, None] & mask_n[None, :], other=0.0)
    acc = tl.sum(w.to(tl.float32) * a[:, None, :], axis=2)
    for n0 in range(BLOCK_N, N, BLOCK_N):
        mask_n = (n0 + offs_n) < N
        a = tl.load(a_ptrs + n0, mask=mask_j[:, None] & mask_n[None, :], other=0.0)
        w = tl.load(w_ptrs + n0, mask=mask_jk & mask_n[None, None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * a[:, None, :], axis=2)
    y = tl.sum(acc * s * rw[:, None], axis=0)
    tl.store(out_ptr + tok * K + offs_k, y.to(out_ptr.dtype.element_ty), mask=mask_k)


@triton.jit
def moe_gemv_stage2_wide(
    act_ptr, w2_ptr, w2_scale_ptr, topk_ids_ptr, topk_weights_ptr, out_ptr,
    N, K, topk,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, TOPK_PAD: tl.constexpr, VEC: tl.constexpr,
    PER_CHANNEL: tl.constexpr, USE_GDC: tl.constexpr,
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
    s = _gemv2_scales(w2_scale_ptr, e, offs_k, mask_j, mask_k, K, PER_CHANNEL)
    if USE_GDC:
        gdc_wait()
    a = tl.load(a_ptrs, mask=mask_j[:, None, None] & mask_n[None, :, :], other=0.0)
    acc = tl.sum(tl.sum(w.to(tl.float32) * a[:, None, :, :], axis=3), axis=2)
    for n0 in range(BLOCK_N, N, BLOCK_N):
        mask_n = (n0 + nn) < N
        a = tl.load(a_ptrs + n0, mask=mask_j[:, None, None] & mask_n[None, :, :], other=0.0)
        w = tl.load(w_ptrs + n0, mask=mask_jk & mask_n[None, None, :, :], other=0.0)
        acc += tl.sum(tl.sum(w.to(tl.float32) * a[:, None, :, :], axis=3), axis=2)
    y = tl.sum(acc * s * rw[:, None], axis=0)
    tl.store(out_ptr + tok * K + offs_k, y.to(out_ptr.dtype.element_ty), mask=mask_k)


# --------------------------------------------------------------------------- grouped regime
@triton.jit
def moe_prep(
    x_ptr, xq_ptr, a_scale_ptr, static_scale_ptr, topk_ids_ptr, counts_ptr, acc_ptr,
    K, topk,
    BLOCK_K: tl.constexpr, TOPK_PAD: tl.constexpr, STATIC: tl.constexpr,
    ZERO_ACC: tl.constexpr, FP8_MAX: tl.constexpr, EXACT_CAST: tl.constexpr,
    USE_GDC: tl.constexpr,
):
    """Quantise one token row of x to fp8 and count its experts; with ZERO_ACC also clear the
    token's fp32 output accumulator row for the atomic stage 2."""
    _chain(USE_GDC)
    m = tl.program_id(0).to(tl.int64)
    offs_t = tl.arange(0, TOPK_PAD)
    ids = tl.load(topk_ids_ptr + m * topk + offs_t, mask=offs_t < topk, other=0)
    tl.atomic_add(counts_ptr + ids, 1, mask=offs_t < topk, sem="relaxed")
    offs_k = tl.arange(0, BLOCK_K)
    row = x_ptr + m * K
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
    e = tl.load(topk_ids_ptr + offs, mask=mask, other=0)
    pos = tl.atomic_add(cursor_ptr + e, 1, mask=mask, sem="relaxed")
    tl.store(sorted_ids_ptr + pos, offs, mask=mask)
    if pid == 0:
        offs_e = tl.arange(0, E_PAD)
        tl.store(counts_ptr + offs_e, tl.zeros([E_PAD], dtype=tl.int32), mask=offs_e < E)


@triton.jit
def moe_grouped_stage1(
    xq_ptr, a_scale_ptr, a13_static_ptr, w13_ptr, w13_scale_ptr, a2_static_ptr,
    sorted_ids_ptr, block_expert_ptr, total_ptr, actq_ptr, act_scale_ptr,
    N, K, topk, num_pairs,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PER_CHANNEL: tl.constexpr, STATIC: tl.constexpr, PROMOTE: tl.constexpr,
    FP8_MAX: tl.constexpr, EXACT_CAST: tl.constexpr, USE_GDC: tl.constexpr,
):
    """act_q[row] = q2(silu(x W_gate^T) * (x W_up^T)) for one BLOCK_M block of sorted rows.

    Dynamic schemes need the whole row of N in this tile (BLOCK_N >= N) for the per-row scale.
    PROMOTE adds each BLOCK_K chunk's MMA result into an fp32 accumulator: Hopper's fp8 MMA
    accumulates in reduced precision, and chaining it over K=4096 costs ~4x the error (still
    inside the gate, like vLLM's stock kernel) for ~15% more speed at large M.
    """
    _chain(USE_GDC)
    b = tl.program_id(0)
    pid_n = tl.program_id(1)
    if b * BLOCK_M >= tl.load(total_ptr):
        return
    e = tl.load(block_expert_ptr + b).to(tl.int64)
    offs_m = b * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + offs_m)
    valid = pair < num_pairs
    tok = tl.where(valid, pair // topk, 0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = xq_ptr + tok[:, None] * K + offs_k[None, :]
    g_ptrs = w13_ptr + e * 2 * N * K + offs_n.to(tl.int64)[None, :] * K + offs_k[:, None]
    u_ptrs = g_ptrs + N * K
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs + k0, mask=valid[:, None], other=0.0)
        bg = tl.load(g_ptrs + k0, mask=mask_n[None, :], other=0.0)
        bu = tl.load(u_ptrs + k0, mask=mask_n[None, :], other=0.0)
        if EXACT_CAST:
            a = _fp8_operand(a, FP8_MAX, EXACT_CAST)
            bg = bg.to(tl.float32)
            bu = bu.to(tl.float32)
        if PROMOTE:
            acc_g += tl.dot(a, bg)
            acc_u += tl.dot(a, bu)
        else:
            acc_g = tl.dot(a, bg, acc_g)
            acc_u = tl.dot(a, bu, acc_u)
    if STATIC:
        a_s = tl.load(a13_static_ptr)
        acc_g = acc_g * a_s
        acc_u = acc_u * a_s
    else:
        a_s = tl.load(a_scale_ptr + tok, mask=valid, other=0.0)
        acc_g = acc_g * a_s[:, None]
        acc_u = acc_u * a_s[:, None]
    if PER_CHANNEL:
        srow = w13_scale_ptr + e * 2 * N
        acc_g = acc_g * tl.load(srow + offs_n, mask=mask_n, other=0.0)[None, :]
        acc_u = acc_u * tl.load(srow + N + offs_n, mask=mask_n, other=0.0)[None, :]
    else:
        ws = tl.load(w13_scale_ptr + e)
        acc_g = acc_g * ws
        acc_u = acc_u * ws
    act = _silu_mul(acc_g, acc_u)
    if STATIC:
        s2 = tl.load(a2_static_ptr)
        q = _to_fp8(act / s2, actq_ptr.dtype.element_ty, FP8_MAX, EXACT_CAST)
    else:
        keep = mask_n[None, :]
        amax = tl.max(tl.where(keep, tl.abs(act), 0.0), axis=1)
        nan = tl.max(tl.where(keep & (act != act), 1, 0), axis=1) > 0
        s2 = _row_scale(amax, nan, FP8_MAX)
        tl.store(act_scale_ptr + offs_m, s2, mask=valid)
        q = _to_fp8(act / s2[:, None], actq_ptr.dtype.element_ty, FP8_MAX, EXACT_CAST)
    dst = actq_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(dst, q, mask=valid[:, None] & mask_n[None, :])


@triton.jit
def moe_grouped_stage2(
    actq_ptr, act_scale_ptr, a2_static_ptr, w2_ptr, w2_scale_ptr, topk_weights_ptr,
    sorted_ids_ptr, block_expert_ptr, total_ptr, partial_ptr, acc_ptr,
    N, K, topk, num_pairs,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    PER_CHANNEL: tl.constexpr, STATIC: tl.constexpr, ATOMIC: tl.constexpr,
    FP8_MAX: tl.constexpr, EXACT_CAST: tl.constexpr, USE_GDC: tl.constexpr,
):
    """y = w_pair * (act_q[row] W2_e^T)[cols] for one block of sorted rows, written as bf16
    partials per pair, or (ATOMIC) added into the token's fp32 accumulator row: no
    [pairs, K] round trip through memory, at the price of a non-deterministic sum order."""
    _chain(USE_GDC)
    b = tl.program_id(0)
    pid_k = tl.program_id(1)
    if b * BLOCK_M >= tl.load(total_ptr):
        return
    e = tl.load(block_expert_ptr + b).to(tl.int64)
    offs_m = b * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + offs_m)
    valid = pair < num_pairs
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    offs_n = tl.arange(0, BLOCK_N)
    a_ptrs = actq_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    b_ptrs = w2_ptr + e * K * N + offs_k.to(tl.int64)[None, :] * N + offs_n[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        mask_n = (n0 + offs_n) < N
        a = tl.load(a_ptrs + n0, mask=valid[:, None] & mask_n[None, :], other=0.0)
        w = tl.load(b_ptrs + n0, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        if EXACT_CAST:
            a = _fp8_operand(a, FP8_MAX, EXACT_CAST)
            w = w.to(tl.float32)
        acc += tl.dot(a, w)
    if STATIC:
        acc = acc * tl.load(a2_static_ptr)
    else:
        acc = acc * tl.load(act_scale_ptr + offs_m, mask=valid, other=0.0)[:, None]
    if PER_CHANNEL:
        acc = acc * tl.load(w2_scale_ptr + e * K + offs_k, mask=mask_k, other=0.0)[None, :]
    else:
        acc = acc * tl.load(w2_scale_ptr + e)
    rw = tl.load(topk_weights_ptr + pair, mask=valid, other=0.0)
    acc = acc * rw[:, None]
    safe = tl.where(valid, pair, 0).to(tl.int64)
    if ATOMIC:
        dst = acc_ptr + (safe // topk)[:, None] * K + offs_k[None, :]
        tl.atomic_add(dst, acc, mask=valid[:, None] & mask_k[None, :], sem="relaxed")
    else:
        dst = partial_ptr + safe[:, None] * K + offs_k[None, :]
        tl.store(dst, acc.to(partial_ptr.dtype.element_ty),
                 mask=valid[:, None] & mask_k[None, :])


@triton.jit
def _stage2_rows(b, sorted_ids_ptr, block_expert_ptr, topk_weights_ptr, act_scale_ptr,
                 a2_static_ptr, w2_scale_ptr, num_pairs, BLOCK_M: tl.constexpr,
                 ALIGN_M: tl.constexpr, PER_CHANNEL: tl.constexpr, STATIC: tl.constexpr):
    """Row block ``b`` of the looped stage-2 kernels: its expert, rows, which rows hold a
    pair, the per-row factor (routing weight x activation scale, x the weight scale when it
    is per tensor) and the pair index to write each row's partial to."""
    e = tl.load(block_expert_ptr + (b * BLOCK_M) // ALIGN_M).to(tl.int64)
    offs_m = b * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + offs_m)
    valid = pair < num_pairs
    if STATIC:
        row_mult = tl.load(topk_weights_ptr + pair, mask=valid, other=0.0) * \
            tl.load(a2_static_ptr)
    else:
        row_mult = tl.load(topk_weights_ptr + pair, mask=valid, other=0.0) * \
            tl.load(act_scale_ptr + offs_m, mask=valid, other=0.0)
    if not PER_CHANNEL:
        row_mult = row_mult * tl.load(w2_scale_ptr + e)
    safe = tl.where(valid, pair, 0).to(tl.int64)
    return e, offs_m, valid, row_mult, safe


@triton.jit
def _k_tiles(pid_k, K, BLOCK_K: tl.constexpr, K_SPLIT: tl.constexpr):
    """[kt0, kt1): the K tiles program ``pid_k`` of K_SPLIT walks."""
    k_tiles = tl.cdiv(K, BLOCK_K)
    per_prog = tl.cdiv(k_tiles, K_SPLIT)
    kt0 = pid_k * per_prog
    return kt0, tl.minimum(kt0 + per_prog, k_tiles)


@triton.jit
def _store_partials(acc, row_mult, w2_scale_ptr, e, offs_k, valid, safe, partial_ptr, K,
                    PER_CHANNEL: tl.constexpr):
    """One [BLOCK_M, BLOCK_K] tile of stage-2 partials: scaled, written at each row's pair."""
    y = acc * row_mult[:, None]
    mask_k = offs_k < K
    if PER_CHANNEL:
        y = y * tl.load(w2_scale_ptr + e * K + offs_k, mask=mask_k, other=0.0)[None, :]
    tl.store(partial_ptr + safe[:, None] * K + offs_k[None, :],
             y.to(partial_ptr.dtype.element_ty), mask=valid[:, None] & mask_k[None, :])


@triton.jit
def moe_grouped_stage2_loop(
    actq_ptr, act_scale_ptr, a2_static_ptr, w2_ptr, w2_scale_ptr, topk_weights_ptr,
    sorted_ids_ptr, block_expert_ptr, total_ptr, partial_ptr, acc_ptr,
    N, K, topk, num_pairs,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    K_SPLIT: tl.constexpr, ALIGN_M: tl.constexpr, PER_CHANNEL: tl.constexpr,
    STATIC: tl.constexpr, NUM_STAGES: tl.constexpr, FP8_MAX: tl.constexpr,
    EXACT_CAST: tl.constexpr, USE_GDC: tl.constexpr,
):
    """Stage 2 as a loop: one program per (block of sorted rows, 1/K_SPLIT of the K output
    columns) walks all its K tiles, so the row block's bookkeeping (pairs, scales, routing
    weights) is read once and the weight-tile loads of the next tiles are pipelined under the
    current MMA and store; the one-tile-per-program kernel pays a full load latency per
    64x128x128 MMA. Same partials and arguments as :func:`moe_grouped_stage2` (acc_ptr unused).

    ALIGN_M is the block size rows were sorted and padded to (stage 1's BLOCK_M, a multiple of
    BLOCK_M): a stage 1 with tall tiles can feed a stage 2 with short ones.
    """
    _chain(USE_GDC)
    b = tl.program_id(0)
    pid_k = tl.program_id(1)
    if b * BLOCK_M >= tl.load(total_ptr):
        return
    e, offs_m, valid, row_mult, safe = _stage2_rows(
        b, sorted_ids_ptr, block_expert_ptr, topk_weights_ptr, act_scale_ptr, a2_static_ptr,
        w2_scale_ptr, num_pairs, BLOCK_M, ALIGN_M, PER_CHANNEL, STATIC)
    n_chunks = tl.cdiv(N, BLOCK_N)
    kt0, kt1 = _k_tiles(pid_k, K, BLOCK_K, K_SPLIT)
    steps = (kt1 - kt0) * n_chunks
    offs_r = tl.arange(0, BLOCK_K)
    offs_c = tl.arange(0, BLOCK_N)
    a_rows = actq_ptr + offs_m.to(tl.int64)[:, None] * N
    w_base = w2_ptr + e * K * N
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for it in tl.range(0, steps, num_stages=NUM_STAGES):
        kt = kt0 + it // n_chunks
        nc = it % n_chunks
        offs_k = kt * BLOCK_K + offs_r
        offs_n = nc * BLOCK_N + offs_c
        mask_n = offs_n < N
        a = tl.load(a_rows + offs_n[None, :], mask=valid[:, None] & mask_n[None, :], other=0.0)
        w = tl.load(w_base + offs_k.to(tl.int64)[None, :] * N + offs_n[:, None],
                    mask=mask_n[:, None] & (offs_k < K)[None, :], other=0.0)
        if EXACT_CAST:
            a = _fp8_operand(a, FP8_MAX, EXACT_CAST)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc)
        if nc == n_chunks - 1:
            _store_partials(acc, row_mult, w2_scale_ptr, e, offs_k, valid, safe, partial_ptr, K,
                            PER_CHANNEL)
            acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)


@triton.jit
def moe_grouped_stage2_resident(
    actq_ptr, act_scale_ptr, a2_static_ptr, w2_ptr, w2_scale_ptr, topk_weights_ptr,
    sorted_ids_ptr, block_expert_ptr, total_ptr, partial_ptr, acc_ptr,
    N, K, topk, num_pairs,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    K_SPLIT: tl.constexpr, ALIGN_M: tl.constexpr, PER_CHANNEL: tl.constexpr,
    STATIC: tl.constexpr, NUM_STAGES: tl.constexpr, FP8_MAX: tl.constexpr,
    EXACT_CAST: tl.constexpr, USE_GDC: tl.constexpr,
):
    """:func:`moe_grouped_stage2_loop` for N <= BLOCK_N: the row block's whole [BLOCK_M, N]
    intermediate is loaded once and stays on chip while the program walks its K tiles, so
    each step loads only a weight tile (the looped kernel re-reads the A chunks from L1/L2
    at every K tile: 64 x N bytes per 64 x 128 output tile)."""
    _chain(USE_GDC)
    b = tl.program_id(0)
    pid_k = tl.program_id(1)
    if b * BLOCK_M >= tl.load(total_ptr):
        return
    e, offs_m, valid, row_mult, safe = _stage2_rows(
        b, sorted_ids_ptr, block_expert_ptr, topk_weights_ptr, act_scale_ptr, a2_static_ptr,
        w2_scale_ptr, num_pairs, BLOCK_M, ALIGN_M, PER_CHANNEL, STATIC)
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    a = tl.load(actq_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :],
                mask=valid[:, None] & mask_n[None, :], other=0.0)
    if EXACT_CAST:
        a = _fp8_operand(a, FP8_MAX, EXACT_CAST)
    kt0, kt1 = _k_tiles(pid_k, K, BLOCK_K, K_SPLIT)
    offs_r = tl.arange(0, BLOCK_K)
    w_base = w2_ptr + e * K * N + offs_n[:, None]
    for kt in tl.range(kt0, kt1, num_stages=NUM_STAGES):
        offs_k = kt * BLOCK_K + offs_r
        mask_k = offs_k < K
        w = tl.load(w_base + offs_k.to(tl.int64)[None, :] * N,
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        if EXACT_CAST:
            w = w.to(tl.float32)
        _store_partials(tl.dot(a, w), row_mult, w2_scale_ptr, e, offs_k, valid, safe,
                        partial_ptr, K, PER_CHANNEL)


@triton.jit
def moe_topk_reduce(
    partial_ptr, acc_ptr, out_ptr, K, topk,
    BLOCK_K: tl.constexpr, ATOMIC: tl.constexpr, USE_GDC: tl.constexpr,
):
    """out[tok] = bf16(sum of the token's top-k partials), or of its fp32 accumulator row."""
    _chain(USE_GDC)
    tok = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = offs < K
    if ATOMIC:
        acc = tl.load(acc_ptr + tok * K + offs, mask=mask, other=0.0)
    else:
        acc = tl.zeros([BLOCK_K], dtype=tl.float32)
        for j in range(0, topk):
            acc += tl.load(partial_ptr + (tok * topk + j) * K + offs, mask=mask, other=0.0)
    tl.store(out_ptr + tok * K + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------- tune space
# Scheme flags per scheme value (vllm_moe_aot.shapes.Scheme): (PER_CHANNEL, STATIC)
SCHEME_FLAGS = {
    "fp8_ptpc": (True, False),
    "fp8_per_tensor_static": (False, True),
    "fp8_per_tensor_dynamic": (False, False),
}
_SHORT = {"fp8_ptpc": "ptpc", "fp8_per_tensor_static": "pts", "fp8_per_tensor_dynamic": "ptd"}

_ALIGN16 = ("N", "K")
#: gemv reads every (token, slot) pair's expert weights separately: past a few hundred tokens
#: the grouped regime always wins
GEMV_MAX_TOKENS = 512


def _gemv_specs() -> tuple[list[KernelSpec], list[PipelineVariant]]:
    specs: list[KernelSpec] = []
    # stage 1: (BLOCK_N, BLOCK_K, warps); a [BLOCK_N, BLOCK_K] fp32 accumulator per
    # matrix. Tiles (1, 4096), (2, 2048), (4, 2048, w8), (8, 1024, w8) and a "wide" stage 1
    # (VEC=16 bytes summed in-thread: 48-80 registers, 2-4x the bytes in flight per SM) never
    # won a token count on the H100 (2026-11-25, docs/perf-notes.md) and are gone.
    s1_tiles = [(4, 1024, 4), (8, 512, 4)]
    # stage 2: (wide, BLOCK_K out cols, BLOCK_N reduction, TOPK_PAD, warps). TOPK_PAD 8 serves
    # topk <= 8 only (the pipeline skips it otherwise) with half the registers: it wins every
    # gemv token count of Hy3 (topk=8). One- and two-warp tiles reduce with warp shuffles and
    # almost no block barriers (the 4-warp k8_n64 tile has 35 BAR.SYNC per program).
    s2_tiles = [(False, 4, 128, 16, 4), (False, 8, 64, 16, 4), (True, 16, 128, 8, 8),
                (False, 2, 64, 16, 1), (False, 4, 64, 16, 2), (False, 2, 128, 8, 1)]

    def s1_name(tag: str, bn: int, bk: int, nw: int) -> str:
        return (f"gemv_s1_{tag}_n{bn}_k{bk}"
                + ("" if nw == 4 else f"_w{nw}"))

    def s2_name(tag: str, wide: bool, bk: int, bn: int, tp: int, nw: int) -> str:
        return (f"gemv_s2{'w' if wide else ''}_{tag}_k{bk}_n{bn}"
                + ("" if tp == 16 else f"_t{tp}") + ("" if nw == 4 else f"_w{nw}"))

    for pc in (False, True):
        tag = "pc" if pc else "pt"
        for bn, bk, nw in s1_tiles:
            specs.append(KernelSpec(
                name=s1_name(tag, bn, bk, nw),
                source=f"{_SRC}:moe_gemv_stage1",
                family="gemv_stage1",
                signature={"x_ptr": "*bf16", "w13_ptr": FP8_PTR, "w13_scale_ptr": "*fp32",
                           "topk_ids_ptr": "*i32", "act_ptr": "*fp32",
                           "N": "i32", "K": "i32", "topk": "i32"},
                constexprs={"BLOCK_N": bn, "BLOCK_K": bk, "PER_CHANNEL": pc,
                            "USE_GDC": ON_CUDA},
                divisible_by_16=("x_ptr", "w13_ptr", "act_ptr", *_ALIGN16),
                num_warps=nw, num_stages=2))
        for wide, bk, bn, tp, nw in s2_tiles:
            specs.append(KernelSpec(
                name=s2_name(tag, wide, bk, bn, tp, nw),
                source=f"{_SRC}:moe_gemv_stage2{'_wide' if wide else ''}",
                family="gemv_stage2",
                signature={"act_ptr": "*fp32", "w2_ptr": FP8_PTR, "w2_scale_ptr": "*fp32",
                           "topk_ids_ptr": "*i32", "topk_weights_ptr": "*fp32",
                           "out_ptr": "*bf16", "N": "i32", "K": "i32", "topk": "i32"},
                constexprs={"BLOCK_K": bk, "BLOCK_N": bn, "TOPK_PAD": tp,
                            **({"VEC": 16} if wide else {}), "PER_CHANNEL": pc,
                            "USE_GDC": ON_CUDA},
                divisible_by_16=("act_ptr", "w2_ptr", "out_ptr", *_ALIGN16),
                num_warps=nw, num_stages=2))
    variants = []
    for t1 in s1_tiles:
        for t2 in s2_tiles:
            kernels = {}
            for scheme, (pc, _static) in SCHEME_FLAGS.items():
                tag = "pc" if pc else "pt"
                kernels[scheme] = {"stage1": s1_name(tag, *t1), "stage2": s2_name(tag, *t2)}
            v1 = s1_name("x", *t1).replace("gemv_s1", "").replace("_x_", "")
            v2 = s2_name("x", *t2).replace("gemv_s2", "").replace("_x_", "")
            variants.append(PipelineVariant(
                name=f"gemv_{v1}.{v2}", regime="gemv", kernels=kernels,
                quantize_activations=False, max_tokens=GEMV_MAX_TOKENS))
    return specs, variants


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) for stage 1; stage 2 uses the same BLOCK_M
_S1_TILES = {
    "m16": (16, 128, 128, 4, 3),
    "m64": (64, 128, 128, 4, 3),
    "m64n64": (64, 64, 128, 4, 3),
    "m64n256": (64, 256, 128, 8, 3),
    "m128": (128, 128, 128, 8, 3),
}
class _S2(NamedTuple):
    """A stage-2 tile. ``k_split`` 0: one output tile per program (moe_grouped_stage2); else
    the looped kernel (moe_grouped_stage2_loop) with that many programs per row block.
    ``bm`` overrides the stage-2 BLOCK_M (default: stage 1's, which rows are aligned to)."""

    bk: int  # BLOCK_K: output columns per tile
    bn: int  # BLOCK_N: reduction chunk
    warps: int
    stages: int
    atomic: bool = False
    k_split: int = 0
    bm: int | None = None
    resident: bool = False  # moe_grouped_stage2_resident: needs N <= bn


# (stage-1 BLOCK_M, stage-2 kind) -> stage-2 tile
_S2_TILES = {
    (16, "std"): _S2(128, 128, 4, 3),
    (64, "std"): _S2(128, 128, 4, 3),
    (128, "std"): _S2(128, 128, 8, 3),
    (64, "atomic"): _S2(128, 128, 4, 3, atomic=True),
    (64, "k256"): _S2(256, 128, 8, 3),  # half the programs, twice the work each
    (128, "k256"): _S2(256, 128, 8, 3),
    (64, "n64"): _S2(128, 64, 4, 3),  # no masked half-chunk when N = 192
    # K_SPLIT=1 measured within 1-2% of 4 (H100, 2026-11-25): only 4 is kept
    (64, "loop4"): _S2(128, 64, 4, 3, k_split=4),
    # N = 128 in one MMA chunk (Qwen): no chunk loop, one epilogue per MMA
    (64, "loop4n128"): _S2(128, 128, 4, 3, k_split=4),
    # the faster BLOCK_M=128 stage 1 feeding the faster BLOCK_M=64 looped stage 2
    (128, "loop4m64"): _S2(128, 64, 4, 3, k_split=4, bm=64),
    # the intermediate tile loaded once per program (N <= 128: Qwen; N <= 256: Hy3)
    (64, "res4n128"): _S2(128, 128, 4, 3, k_split=4, resident=True),
    (64, "res4n256"): _S2(128, 256, 4, 2, k_split=4, resident=True),  # 2 stages: 2 CTAs/SM
    (128, "res4m64n128"): _S2(128, 128, 4, 3, k_split=4, bm=64, resident=True),
}
# variant suffix -> (stage-2 kind, promote fp8 MMA partials per K chunk in stage 1)
_MODES = {
    "": ("std", True),
    "_atomic": ("atomic", True),
    "_fastacc": ("std", False),
    "_fastacc_k256": ("k256", False),
    "_fastacc_n64": ("n64", False),
    "_fastacc_loop4": ("loop4", False),
    "_loop4": ("loop4", True),
    "_fastacc_loop4n128": ("loop4n128", False),
    "_fastacc_loop4m64": ("loop4m64", False),
    "_fastacc_res4n128": ("res4n128", False),
    "_fastacc_res4n256": ("res4n256", False),
    "_fastacc_res4m64n128": ("res4m64n128", False),
}
#: the product gate (vllm_moe_aot.reference.GATE_REL_FRO): what unpromoted fp8 MMA
#: accumulation over K=4096 is held to, as vLLM's stock kernel is (measured 1.1e-2 to 1.6e-2)
GATE_TOLERANCE = 3e-2
#: stage-1 tiles also built without per-chunk promotion (the "_fastacc" modes)
#: -> the "_fastacc" modes built for the tile (None: all). m64n256 covers Hy3's N=192 with one
#: gate/up tile (A read once per row block instead of 3x with m64n64)
_FASTACC_TILES: dict[str, set[str] | None] = {
    "m64": None, "m64n64": None, "m128": None,
    "m64n256": {"_fastacc_loop4", "_fastacc_res4n256"}}


def _grouped_specs() -> tuple[list[KernelSpec], list[PipelineVariant]]:
    specs: list[KernelSpec] = []
    e_pad = 1024  # MAX_E in vllm_moe_aot.shapes
    for static in (False, True):
        for zero in (False, True):
            specs.append(KernelSpec(
                name=f"prep_{'static' if static else 'dyn'}{'_zacc' if zero else ''}",
                source=f"{_SRC}:moe_prep", family="prep",
                signature={"x_ptr": "*bf16", "xq_ptr": FP8_PTR, "a_scale_ptr": "*fp32",
                           "static_scale_ptr": "*fp32", "topk_ids_ptr": "*i32",
                           "counts_ptr": "*i32", "acc_ptr": "*fp32", "K": "i32", "topk": "i32"},
                constexprs={"BLOCK_K": 1024, "TOPK_PAD": 16, "STATIC": static,
                            "ZERO_ACC": zero, "FP8_MAX": FP8_MAX, "EXACT_CAST": False,
                            "USE_GDC": ON_CUDA},
                divisible_by_16=("x_ptr", "xq_ptr", "acc_ptr", "K"), num_warps=4,
                num_stages=1))
    for bm in sorted({bm for bm, _ in _S2_TILES}):
        specs.append(KernelSpec(
            name=f"align_m{bm}", source=f"{_SRC}:moe_align", family="align",
            signature={"counts_ptr": "*i32", "cursor_ptr": "*i32", "block_expert_ptr": "*i32",
                       "sorted_ids_ptr": "*i32", "total_ptr": "*i32", "E": "i32",
                       "num_pairs": "i32"},
            constexprs={"BLOCK_M": bm, "E_PAD": e_pad, "FILL": 256, "USE_GDC": ON_CUDA},
            num_warps=4, num_stages=1))
    specs.append(KernelSpec(
        name="scatter", source=f"{_SRC}:moe_scatter", family="scatter",
        signature={"topk_ids_ptr": "*i32", "cursor_ptr": "*i32", "sorted_ids_ptr": "*i32",
                   "counts_ptr": "*i32", "num_pairs": "i32", "E": "i32"},
        constexprs={"BLOCK": 1024, "E_PAD": e_pad, "USE_GDC": ON_CUDA}, num_warps=4,
        num_stages=1))
    for atomic in (False, True):
        specs.append(KernelSpec(
            name="acc_to_out" if atomic else "topk_reduce", source=f"{_SRC}:moe_topk_reduce",
            family="reduce",
            signature={"partial_ptr": "*bf16", "acc_ptr": "*fp32", "out_ptr": "*bf16",
                       "K": "i32", "topk": "i32"},
            constexprs={"BLOCK_K": 1024, "ATOMIC": atomic, "USE_GDC": ON_CUDA},
            divisible_by_16=("partial_ptr", "acc_ptr", "out_ptr", "K"),
            num_warps=4, num_stages=1))

    s2_names: dict[tuple[int, str, str], str] = {}
    for (bm1, kind), (bk, bn, w, s, atomic, k_split, bm2, resident) in _S2_TILES.items():
        bm = bm2 or bm1
        for scheme, (pc, static) in SCHEME_FLAGS.items():
            name = f"grp_s2_{_SHORT[scheme]}_m{bm}_k{bk}_n{bn}{'_atomic' if atomic else ''}"
            consts = {"BLOCK_M": bm, "BLOCK_K": bk, "BLOCK_N": bn, "PER_CHANNEL": pc,
                      "STATIC": static, "ATOMIC": atomic, "FP8_MAX": FP8_MAX,
                      "EXACT_CAST": False, "USE_GDC": ON_CUDA}
            source = f"{_SRC}:moe_grouped_stage2"
            if k_split:
                kernel = "res" if resident else "loop"
                name = f"grp_s2{kernel}_{_SHORT[scheme]}_m{bm}_k{bk}_n{bn}_split{k_split}" + \
                    (f"_align{bm1}" if bm1 != bm else "")
                source = f"{_SRC}:moe_grouped_stage2_{'resident' if resident else 'loop'}"
                del consts["ATOMIC"]
                consts.update(K_SPLIT=k_split, ALIGN_M=bm1, NUM_STAGES=s)
            s2_names[(bm1, scheme, kind)] = name
            specs.append(KernelSpec(
                name=name, source=source, family="grouped_stage2",
                signature={"actq_ptr": FP8_PTR, "act_scale_ptr": "*fp32",
                           "a2_static_ptr": "*fp32", "w2_ptr": FP8_PTR,
                           "w2_scale_ptr": "*fp32", "topk_weights_ptr": "*fp32",
                           "sorted_ids_ptr": "*i32", "block_expert_ptr": "*i32",
                           "total_ptr": "*i32", "partial_ptr": "*bf16", "acc_ptr": "*fp32",
                           "N": "i32", "K": "i32", "topk": "i32", "num_pairs": "i32"},
                constexprs=consts,
                divisible_by_16=("actq_ptr", "w2_ptr", "partial_ptr", "acc_ptr", *_ALIGN16),
                num_warps=w, num_stages=s))

    variants = []
    s1_specs: dict[str, KernelSpec] = {}
    for (tag, (bm, bn, bk, w, s)), (suffix, (kind, promote)) in itertools.product(
            _S1_TILES.items(), _MODES.items()):
        if (bm, kind) not in _S2_TILES or (not promote and (
                tag not in _FASTACC_TILES or suffix not in (_FASTACC_TILES[tag] or {suffix}))):
            continue
        atomic = _S2_TILES[(bm, kind)][4]
        kernels: dict[str, dict[str, str]] = {}
        max_n: dict[str, int] = {}
        for scheme, (pc, static) in SCHEME_FLAGS.items():
            if not static and bn < 128:
                continue  # dynamic re-quantisation wants whole rows: narrow tiles are pointless
            name = f"grp_s1_{_SHORT[scheme]}_m{bm}_n{bn}_k{bk}{'' if promote else '_fa'}"
            s1_specs.setdefault(name, KernelSpec(
                name=name, source=f"{_SRC}:moe_grouped_stage1", family="grouped_stage1",
                signature={"xq_ptr": FP8_PTR, "a_scale_ptr": "*fp32",
                           "a13_static_ptr": "*fp32", "w13_ptr": FP8_PTR,
                           "w13_scale_ptr": "*fp32", "a2_static_ptr": "*fp32",
                           "sorted_ids_ptr": "*i32", "block_expert_ptr": "*i32",
                           "total_ptr": "*i32", "actq_ptr": FP8_PTR, "act_scale_ptr": "*fp32",
                           "N": "i32", "K": "i32", "topk": "i32", "num_pairs": "i32"},
                constexprs={"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "PER_CHANNEL": pc,
                            "STATIC": static, "PROMOTE": promote, "FP8_MAX": FP8_MAX,
                            "EXACT_CAST": False, "USE_GDC": ON_CUDA},
                divisible_by_16=("xq_ptr", "w13_ptr", "actq_ptr", *_ALIGN16),
                num_warps=w, num_stages=s))
            kernels[scheme] = _grouped_roles(static, bm, name, s2_names[(bm, scheme, kind)],
                                             atomic)
            if not static:
                max_n[scheme] = bn
            if _S2_TILES[(bm, kind)].resident:
                max_n[scheme] = min(max_n.get(scheme, 1 << 30), _S2_TILES[(bm, kind)].bn)
        variants.append(PipelineVariant(
            name=f"grouped_{tag}{suffix}", regime="grouped", kernels=kernels,
            quantize_activations=True, max_n=max_n,
            tolerance=1e-2 if promote else GATE_TOLERANCE))
    specs.extend(s1_specs.values())
    return specs, variants


def _grouped_roles(static: bool, bm: int, stage1: str, stage2: str, atomic: bool) -> dict:
    prep = "prep_static" if static else "prep_dyn"
    return {"prep": prep + ("_zacc" if atomic else ""), "align": f"align_m{bm}",
            "scatter": "scatter", "stage1": stage1, "stage2": stage2,
            "reduce": "acc_to_out" if atomic else "topk_reduce"}


def _tune_space() -> tuple[list[KernelSpec], list[PipelineVariant]]:
    g_specs, g_vars = _gemv_specs()
    p_specs, p_vars = _grouped_specs()
    return g_specs + p_specs, g_vars + p_vars


SPECS, VARIANTS = _tune_space()
