"""Device helpers every fused-MoE kernel family shares: SiLU-and-mul, the fp32 -> fp8 cast (and
its exact interpreter form), the fp8 MMA operand, the dynamic row scale and the PDL chain step.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


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
def _group_scale(amax, has_nan, FP8_MAX: tl.constexpr):
    """Dynamic scale of a 128-column group (block FP8), as vLLM's per_token_group_quant_fp8
    computes it: ``max(amax, 1e-10) / FP8_MAX``; NaN groups get a NaN scale."""
    s = tl.maximum(amax, 1e-10) / FP8_MAX
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
