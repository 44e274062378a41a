"""The last kernel of the ``grouped`` regime: the top-k sum of the bf16 partials (or the copy
of the atomic stage 2's fp32 accumulator) into the bf16 output.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.common import _chain


@triton.jit
def moe_topk_reduce(
    partial_ptr, acc_ptr, topk_ids_ptr, out_ptr, K, topk,
    BLOCK_K: tl.constexpr, ATOMIC: tl.constexpr, USE_GDC: tl.constexpr,
):
    """out[tok] = bf16(sum of the token's top-k partials), or of its fp32 accumulator row.
    Slots whose expert id is below zero (another rank's) have no partial and are skipped."""
    _chain(USE_GDC)
    tok = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = offs < K
    if ATOMIC:
        acc = tl.load(acc_ptr + tok * K + offs, mask=mask, other=0.0)
    else:
        acc = tl.zeros([BLOCK_K], dtype=tl.float32)
        for j in range(0, topk):
            local = tl.load(topk_ids_ptr + tok * topk + j) >= 0
            acc += tl.load(partial_ptr + (tok * topk + j) * K + offs, mask=mask & local,
                           other=0.0)
    tl.store(out_ptr + tok * K + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
