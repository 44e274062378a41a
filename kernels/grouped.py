"""GEMM stages of the ``grouped`` (prefill) regime.

stage 1: FP8 x FP8 tensor-core GEMM over gate/up tile pairs with scales + SiLU-and-mul +
re-quantisation in the epilogue; stage 2: FP8 x FP8 GEMM with the routing weight, bf16 partials
per pair (or fp32 atomics), in three forms: one output tile per program, looped over K tiles,
and with the intermediate tile resident.

All element offsets that can pass 2**31 are computed in int64.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.common import _chain, _fp8_operand, _group_scale, _row_scale, _silu_mul, _to_fp8

#: rows x columns of one block-FP8 weight scale, and the activation group (shapes.WEIGHT_BLOCK)
QBLOCK: tl.constexpr = tl.constexpr(128)


@triton.jit
def _mma(a, b, SWAP_AB: tl.constexpr):
    """a @ b ([M, K] x [K, N]), or with SWAP_AB its transpose b^T @ a^T ([N, M]). Hopper's
    warpgroup MMA needs 64 rows of A: a 16-row block of sorted rows would fall back to fp16
    mma.sync with every fp8 operand converted in registers, while with the weight tile as the
    64-row operand it stays an fp8 MMA fed from shared memory. The accumulator stays in the
    swapped orientation until the epilogue (:func:`_unswap`)."""
    if SWAP_AB:
        r = tl.dot(tl.trans(b), tl.trans(a))
    else:
        r = tl.dot(a, b)
    return r


@triton.jit
def _mma_acc(a, b, acc, SWAP_AB: tl.constexpr):
    """:func:`_mma` added into ``acc`` by the MMA itself (its accumulator: no promotion)."""
    if SWAP_AB:
        r = tl.dot(tl.trans(b), tl.trans(a), acc)
    else:
        r = tl.dot(a, b, acc)
    return r


@triton.jit
def _outer(rows, cols, SWAP_AB: tl.constexpr):
    """rows[:, None] * cols[None, :] in the orientation of a :func:`_mma` result."""
    if SWAP_AB:
        r = cols[:, None] * rows[None, :]
    else:
        r = rows[:, None] * cols[None, :]
    return r


@triton.jit
def _row_factor(rows, SWAP_AB: tl.constexpr):
    """A per-row factor broadcast over a :func:`_mma` result."""
    if SWAP_AB:
        r = rows[None, :]
    else:
        r = rows[:, None]
    return r


@triton.jit
def _unswap(acc, SWAP_AB: tl.constexpr):
    """The accumulator as [BLOCK_M, BLOCK_N] for the epilogue."""
    if SWAP_AB:
        r = tl.trans(acc)
    else:
        r = acc
    return r


@triton.jit
def moe_grouped_stage1(
    xq_ptr, a_scale_ptr, a13_static_ptr, w13_ptr, w13_scale_ptr, a2_static_ptr,
    sorted_ids_ptr, block_expert_ptr, total_ptr, actq_ptr, act_scale_ptr,
    N, K, topk, num_pairs,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PER_CHANNEL: tl.constexpr, STATIC: tl.constexpr, PROMOTE: tl.constexpr,
    FP8_MAX: tl.constexpr, EXACT_CAST: tl.constexpr, USE_GDC: tl.constexpr,
    BLOCK_SCALES: tl.constexpr = False, SWAP_AB: tl.constexpr = False,
):
    """act_q[row] = q2(silu(x W_gate^T) * (x W_up^T)) for one BLOCK_M block of sorted rows and
    one BLOCK_N tile of N.

    Dynamic schemes re-quantise per (row, N tile): the scale of row r's tile t is stored at
    ``act_scale[r * cdiv(N, BLOCK_N) + t]``. With N <= BLOCK_N that is one scale per row (what
    every stage 2 reads); wider layers need a stage 2 that applies the scale per tile
    (TILE_SCALES in :func:`moe_grouped_stage2_loop`). Finer scales lose nothing against the
    per-row scale of the reference: each tile's values use the full fp8 range.
    PROMOTE adds each BLOCK_K chunk's MMA result into an fp32 accumulator: Hopper's fp8 MMA
    accumulates in reduced precision, and chaining it over K=4096 costs ~4x the error (still
    inside the gate, like vLLM's stock kernel) for ~15% more speed at large M.

    BLOCK_SCALES (block FP8; BLOCK_K = 128, BLOCK_N a divisor or multiple of 128): every K
    chunk's MMA result is scaled by its rows' activation-group scales (``a_scale[tok *
    K/128 + kb]``) and its columns' weight-block scales (``w13_scale[e, n/128, kb]``) before it
    is added, i.e. always promoted; the intermediate is re-quantised per (row, N tile) with
    vLLM's group scale.

    SWAP_AB (BLOCK_M < 64, BLOCK_N >= 64): the MMAs run as W x^T (:func:`_mma`).
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
    # the accumulators in the orientation of the MMA (_mma)
    acc_g = tl.zeros([BLOCK_N, BLOCK_M] if SWAP_AB else [BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros_like(acc_g)
    if BLOCK_SCALES:
        kblocks = K // QBLOCK
        a_srow = a_scale_ptr + tok * kblocks
        w_srow_g = w13_scale_ptr + (e * (2 * N // QBLOCK) + offs_n // QBLOCK) * kblocks
        w_srow_u = w_srow_g + (N // QBLOCK) * kblocks
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs + k0, mask=valid[:, None], other=0.0)
        bg = tl.load(g_ptrs + k0, mask=mask_n[None, :], other=0.0)
        bu = tl.load(u_ptrs + k0, mask=mask_n[None, :], other=0.0)
        if EXACT_CAST:
            a = _fp8_operand(a, FP8_MAX, EXACT_CAST)
            bg = bg.to(tl.float32)
            bu = bu.to(tl.float32)
        if BLOCK_SCALES:
            kb = k0 // QBLOCK
            a_s = tl.load(a_srow + kb, mask=valid, other=0.0)
            acc_g += _mma(a, bg, SWAP_AB) * _outer(
                a_s, tl.load(w_srow_g + kb, mask=mask_n, other=0.0), SWAP_AB)
            acc_u += _mma(a, bu, SWAP_AB) * _outer(
                a_s, tl.load(w_srow_u + kb, mask=mask_n, other=0.0), SWAP_AB)
        elif PROMOTE:
            acc_g += _mma(a, bg, SWAP_AB)
            acc_u += _mma(a, bu, SWAP_AB)
        else:
            acc_g = _mma_acc(a, bg, acc_g, SWAP_AB)
            acc_u = _mma_acc(a, bu, acc_u, SWAP_AB)
    acc_g = _unswap(acc_g, SWAP_AB)
    acc_u = _unswap(acc_u, SWAP_AB)
    if BLOCK_SCALES:
        pass  # scaled per K chunk
    elif STATIC:
        a_s = tl.load(a13_static_ptr)
        acc_g = acc_g * a_s
        acc_u = acc_u * a_s
    else:
        a_s = tl.load(a_scale_ptr + tok, mask=valid, other=0.0)
        acc_g = acc_g * a_s[:, None]
        acc_u = acc_u * a_s[:, None]
    if BLOCK_SCALES:
        pass
    elif PER_CHANNEL:
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
        if BLOCK_SCALES:
            s2 = _group_scale(amax, nan, FP8_MAX)
        else:
            s2 = _row_scale(amax, nan, FP8_MAX)
        tl.store(act_scale_ptr + offs_m.to(tl.int64) * tl.cdiv(N, BLOCK_N) + pid_n, s2,
                 mask=valid)
        q = _to_fp8(act / s2[:, None], actq_ptr.dtype.element_ty, FP8_MAX, EXACT_CAST)
    dst = actq_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(dst, q, mask=valid[:, None] & mask_n[None, :])


@triton.jit
def _stage2_halves(acc, actq_ptr, w2_ptr, scale_rows, e, offs_m, valid, offs_k, mask_k, N, K,
                   BLOCK_N: tl.constexpr, SCALE_N: tl.constexpr, FP8_MAX: tl.constexpr,
                   EXACT_CAST: tl.constexpr, SWAP_AB: tl.constexpr):
    """The chunk loop of :func:`moe_grouped_stage2` under HALVES: each BLOCK_N chunk loaded as
    its two SCALE_N-wide scale tiles side by side, one MMA and scale each."""
    offs_h = tl.arange(0, BLOCK_N // 2)
    h_a = actq_ptr + offs_m.to(tl.int64)[:, None] * N + offs_h[None, :]
    h_w = w2_ptr + e * K * N + offs_k.to(tl.int64)[None, :] * N + offs_h[:, None]
    for n0 in range(0, N, BLOCK_N):
        n1 = n0 + BLOCK_N // 2
        m0 = (n0 + offs_h) < N
        m1 = (n1 + offs_h) < N
        a0 = tl.load(h_a + n0, mask=valid[:, None] & m0[None, :], other=0.0)
        a1 = tl.load(h_a + n1, mask=valid[:, None] & m1[None, :], other=0.0)
        w0 = tl.load(h_w + n0, mask=m0[:, None] & mask_k[None, :], other=0.0)
        w1 = tl.load(h_w + n1, mask=m1[:, None] & mask_k[None, :], other=0.0)
        if EXACT_CAST:
            a0 = _fp8_operand(a0, FP8_MAX, EXACT_CAST)
            a1 = _fp8_operand(a1, FP8_MAX, EXACT_CAST)
            w0 = w0.to(tl.float32)
            w1 = w1.to(tl.float32)
        s0 = tl.load(scale_rows + n0 // SCALE_N, mask=valid, other=0.0)
        s1 = tl.load(scale_rows + n1 // SCALE_N, mask=valid & (n1 < N), other=0.0)
        acc += (_mma(a0, w0, SWAP_AB) * _row_factor(s0, SWAP_AB)
                + _mma(a1, w1, SWAP_AB) * _row_factor(s1, SWAP_AB))
    return acc


@triton.jit
def moe_grouped_stage2(
    actq_ptr, act_scale_ptr, a2_static_ptr, w2_ptr, w2_scale_ptr, topk_weights_ptr,
    sorted_ids_ptr, block_expert_ptr, total_ptr, partial_ptr, acc_ptr,
    N, K, topk, num_pairs,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    PER_CHANNEL: tl.constexpr, STATIC: tl.constexpr, ATOMIC: tl.constexpr,
    FP8_MAX: tl.constexpr, EXACT_CAST: tl.constexpr, USE_GDC: tl.constexpr,
    TILE_SCALES: tl.constexpr = False, SCALE_N: tl.constexpr = 128,
    BLOCK_SCALES: tl.constexpr = False, SWAP_AB: tl.constexpr = False,
    HALVES: tl.constexpr = False,
):
    """y = w_pair * (act_q[row] W2_e^T)[cols] for one block of sorted rows, written as bf16
    partials per pair, or (ATOMIC) added into the token's fp32 accumulator row: no
    [pairs, K] round trip through memory, at the price of a non-deterministic sum order.
    TILE_SCALES: the intermediate's scales per (row, SCALE_N columns), as in
    :func:`moe_grouped_stage2_loop`; one program per output tile gives small batches of wide
    layers many programs (the looped kernel has K_SPLIT per row block). BLOCK_SCALES (block
    FP8, with TILE_SCALES; BLOCK_N divides 128): each chunk is also scaled by its output
    columns' w2 block scales ``w2_scale[e, k/128, n0/128]``. SWAP_AB (BLOCK_M < 64): the
    MMAs run as W2 act^T (:func:`_mma`). HALVES (with TILE_SCALES, SCALE_N = BLOCK_N / 2):
    each chunk is loaded as its two scale tiles side by side, one MMA and scale each, so a
    64-wide stage 1 still gets BLOCK_N contiguous bytes of every w2 row per step."""
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
    acc = tl.zeros([BLOCK_K, BLOCK_M] if SWAP_AB else [BLOCK_M, BLOCK_K], dtype=tl.float32)
    if TILE_SCALES:
        scale_rows = act_scale_ptr + offs_m.to(tl.int64) * tl.cdiv(N, SCALE_N)
    if BLOCK_SCALES:
        w_scale_cols = w2_scale_ptr + (e * (K // QBLOCK) + offs_k // QBLOCK) * (N // QBLOCK)
    if HALVES:
        acc = _stage2_halves(acc, actq_ptr, w2_ptr, scale_rows, e, offs_m, valid, offs_k, mask_k,
                             N, K, BLOCK_N, SCALE_N, FP8_MAX, EXACT_CAST, SWAP_AB)
    else:
        for n0 in range(0, N, BLOCK_N):
            mask_n = (n0 + offs_n) < N
            a = tl.load(a_ptrs + n0, mask=valid[:, None] & mask_n[None, :], other=0.0)
            w = tl.load(b_ptrs + n0, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            if EXACT_CAST:
                a = _fp8_operand(a, FP8_MAX, EXACT_CAST)
                w = w.to(tl.float32)
            if BLOCK_SCALES:
                s = tl.load(scale_rows + n0 // SCALE_N, mask=valid, other=0.0)
                ws = tl.load(w_scale_cols + n0 // QBLOCK, mask=mask_k, other=0.0)
                acc += _mma(a, w, SWAP_AB) * _outer(s, ws, SWAP_AB)
            elif TILE_SCALES:
                s = tl.load(scale_rows + n0 // SCALE_N, mask=valid, other=0.0)
                acc += _mma(a, w, SWAP_AB) * _row_factor(s, SWAP_AB)
            else:
                acc += _mma(a, w, SWAP_AB)
    acc = _unswap(acc, SWAP_AB)
    if STATIC:
        acc = acc * tl.load(a2_static_ptr)
    elif TILE_SCALES:
        pass  # applied per chunk
    else:
        acc = acc * tl.load(act_scale_ptr + offs_m, mask=valid, other=0.0)[:, None]
    if BLOCK_SCALES:
        pass  # applied per chunk
    elif PER_CHANNEL:
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
                 ALIGN_M: tl.constexpr, PER_CHANNEL: tl.constexpr, STATIC: tl.constexpr,
                 TILE_SCALES: tl.constexpr = False, BLOCK_SCALES: tl.constexpr = False):
    """Row block ``b`` of the looped stage-2 kernels: its expert, rows, which rows hold a
    pair, the per-row factor (routing weight x activation scale, x the weight scale when it
    is per tensor; without the activation scale under TILE_SCALES, where it is per N tile)
    and the pair index to write each row's partial to."""
    e = tl.load(block_expert_ptr + (b * BLOCK_M) // ALIGN_M).to(tl.int64)
    offs_m = b * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + offs_m)
    valid = pair < num_pairs
    if STATIC:
        row_mult = tl.load(topk_weights_ptr + pair, mask=valid, other=0.0) * \
            tl.load(a2_static_ptr)
    elif TILE_SCALES:
        row_mult = tl.load(topk_weights_ptr + pair, mask=valid, other=0.0)
    else:
        row_mult = tl.load(topk_weights_ptr + pair, mask=valid, other=0.0) * \
            tl.load(act_scale_ptr + offs_m, mask=valid, other=0.0)
    if not PER_CHANNEL and not BLOCK_SCALES:
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
    TILE_SCALES: tl.constexpr = False, SCALE_N: tl.constexpr = 128,
    BLOCK_SCALES: tl.constexpr = False, K_FIRST: tl.constexpr = False,
):
    """Stage 2 as a loop: one program per (block of sorted rows, 1/K_SPLIT of the K output
    columns) walks all its K tiles, so the row block's bookkeeping (pairs, scales, routing
    weights) is read once and the weight-tile loads of the next tiles are pipelined under the
    current MMA and store; the one-tile-per-program kernel pays a full load latency per
    64x128x128 MMA. Same partials and arguments as :func:`moe_grouped_stage2` (acc_ptr unused).

    ALIGN_M is the block size rows were sorted and padded to (stage 1's BLOCK_M, a multiple of
    BLOCK_M): a stage 1 with tall tiles can feed a stage 2 with short ones.

    TILE_SCALES (dynamic schemes, any N): the intermediate carries one scale per (row, SCALE_N
    columns), stage 1's BLOCK_N tiles; each chunk's MMA result is scaled by its rows' scales
    before it is added (BLOCK_N divides SCALE_N, so a chunk never straddles two tiles).
    BLOCK_SCALES (block FP8, with TILE_SCALES): and by its output columns' w2 block scales.
    K_FIRST: programs run in (row block, K part) order instead of (K part, row block), so the
    K_SPLIT programs of a row block run side by side and its intermediate comes from DRAM once
    (at N = 2048 the row-block-first order read it K_SPLIT times).
    """
    _chain(USE_GDC)
    if K_FIRST:
        launched = tl.program_id(0) + tl.program_id(1) * tl.num_programs(0)
        b = launched // K_SPLIT
        pid_k = launched % K_SPLIT
    else:
        b = tl.program_id(0)
        pid_k = tl.program_id(1)
    if b * BLOCK_M >= tl.load(total_ptr):
        return
    e, offs_m, valid, row_mult, safe = _stage2_rows(
        b, sorted_ids_ptr, block_expert_ptr, topk_weights_ptr, act_scale_ptr, a2_static_ptr,
        w2_scale_ptr, num_pairs, BLOCK_M, ALIGN_M, PER_CHANNEL, STATIC, TILE_SCALES,
        BLOCK_SCALES)
    n_chunks = tl.cdiv(N, BLOCK_N)
    if TILE_SCALES:
        scale_rows = act_scale_ptr + offs_m.to(tl.int64) * tl.cdiv(N, SCALE_N)
    kt0, kt1 = _k_tiles(pid_k, K, BLOCK_K, K_SPLIT)
    steps = (kt1 - kt0) * n_chunks
    offs_r = tl.arange(0, BLOCK_K)
    offs_c = tl.arange(0, BLOCK_N)
    a_rows = actq_ptr + offs_m.to(tl.int64)[:, None] * N
    w_base = w2_ptr + e * K * N
    if BLOCK_SCALES:
        w_base_s = w2_scale_ptr + e * (K // QBLOCK) * (N // QBLOCK)
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
        if BLOCK_SCALES:
            s = tl.load(scale_rows + (nc * BLOCK_N) // SCALE_N, mask=valid, other=0.0)
            ws = tl.load(w_base_s + (offs_k // QBLOCK) * (N // QBLOCK) + (nc * BLOCK_N) // QBLOCK,
                         mask=offs_k < K, other=0.0)
            acc += tl.dot(a, w) * (s[:, None] * ws[None, :])
        elif TILE_SCALES:
            s = tl.load(scale_rows + (nc * BLOCK_N) // SCALE_N, mask=valid, other=0.0)
            acc += tl.dot(a, w) * s[:, None]
        else:
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
