"""The GPU library's fp8 grouped GEMM (``torch._scaled_grouped_mm``, CUTLASS on sm_90): where it
runs, and the one call the torch peers (``torch_grouped``, ``gemm_bound``) make.

On the CPU (the interpreter's tests) the GEMM runs as a per-expert loop of dequantised float32
matmuls with a bf16 result, which checks everything around it.
"""

from __future__ import annotations

import torch


def unavailable_reason(device: torch.device) -> str | None:
    """Why the library's fp8 grouped GEMM cannot run on ``device``; None when it can (the CPU
    counts: its loop stands in)."""
    if device.type == "cpu":
        return None
    if device.type != "cuda" or torch.version.hip is not None:
        return f"torch._scaled_grouped_mm's fp8 row-wise path serves CUDA sm_90, not {device}"
    if not hasattr(torch, "_scaled_grouped_mm"):
        return "this torch has no torch._scaled_grouped_mm"
    major, _minor = torch.cuda.get_device_capability(device)
    if major != 9:
        return f"torch._scaled_grouped_mm serves sm_90 only (this GPU: sm_{major}x)"
    return None


def grouped_mm(a: torch.Tensor, b_t: torch.Tensor, scale_a: torch.Tensor,
               scale_b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """bf16 ``[R, cols]`` = (a * scale_a) @ (b_t * scale_b) per expert group of rows.

    ``a`` fp8 [R, K] sorted by expert, ``b_t`` fp8 [E, K, cols] (a transposed view of the
    checkpoint's [E, cols, K]), ``scale_a`` fp32 [R], ``scale_b`` fp32 [E, cols], ``offs``
    int32 [E] group ends (rows past the last end are not computed)."""
    if a.is_cuda:
        return torch._scaled_grouped_mm(a, b_t, scale_a, scale_b, offs=offs,
                                        out_dtype=torch.bfloat16, use_fast_accum=True)
    out = torch.zeros(a.shape[0], b_t.shape[-1], dtype=torch.bfloat16, device=a.device)
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            lhs = a[start:end].float() * scale_a[start:end, None]
            out[start:end] = (lhs @ (b_t[e].float() * scale_b[e][None, :])).to(torch.bfloat16)
        start = end
    return out
