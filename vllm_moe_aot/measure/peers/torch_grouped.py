"""The torch grouped-GEMM peer: the same layer built from stock PyTorch ops only.

What a team without custom kernels would write, and the second baseline the bench times beside
ours (issue 6's "torch grouped-GEMM pipeline"):

    quantise x (the scheme's q1) -> sort (token, slot) pairs by expert (argsort) -> gather rows
    -> ``torch._scaled_grouped_mm`` (fp8 x fp8, row-wise scales) for gate/up -> SiLU-and-mul
    -> q2 -> ``torch._scaled_grouped_mm`` for down -> routing weight -> ``index_add_`` reduce.

It has the reference's quantisation semantics (``reference.reference_moe`` with
``quantize_activations=True``), allocates per call like ordinary torch code, never synchronises
on CUDA and is CUDA-graph capturable. Under expert parallelism (the problem's ``expert_map``)
pairs of other ranks sort after the local experts' groups, past the last group end, so the
grouped GEMMs never compute them, and their rows are zeroed before the top-k sum.
``torch._scaled_grouped_mm`` exists for CUDA sm90 only; elsewhere (CPU tests) the two grouped
GEMMs run as a per-expert loop of dequantised float32 matmuls, which checks everything around
them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vllm_moe_aot.library_gemm import grouped_mm as _grouped_mm
from vllm_moe_aot.measure.workload import MoEProblem
from vllm_moe_aot.shapes import Scheme


def _fp8_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def _quant_rows(t: torch.Tensor, static_scale: torch.Tensor | None, fp8: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` [R, C] -> (fp8 [R, C], fp32 scale [R]): dynamic per row, or the static scalar."""
    m = _fp8_max(fp8)
    if static_scale is not None:
        scale = static_scale.float().reshape(1).expand(t.shape[0])
    else:
        amax = t.abs().amax(dim=-1).float()
        scale = torch.clamp(amax / m, min=1.0 / (m * 512.0))
    q = (t.float() / scale[:, None]).clamp(-m, m).to(fp8)
    return q, scale.contiguous()


def _row_scales(scheme: Scheme, w13: torch.Tensor, s13: torch.Tensor, s2: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight scales in the row-wise form the grouped GEMM takes: fp32 [E, 2N], [E, K]."""
    E, N2, K = w13.shape
    if scheme.per_channel_weights:
        s13, s2 = s13.reshape(E, N2), s2.reshape(E, K)
    else:
        s13, s2 = s13.reshape(E, 1).expand(E, N2), s2.reshape(E, 1).expand(E, K)
    return s13.float().contiguous(), s2.float().contiguous()


def _local_ids(topk_ids: torch.Tensor, expert_map: torch.Tensor | None, E: int
               ) -> torch.Tensor:
    """Local expert slots, with pairs of other ranks (map -1) as ``E``: they sort last."""
    if expert_map is None:
        return topk_ids
    local = expert_map[topk_ids.long()]
    return torch.where(local < 0, E, local).to(topk_ids.dtype)


def _sort_pairs(topk_ids: torch.Tensor, E: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token, slot) pairs sorted by expert: the order, each sorted pair's token, and the
    int32 group ends per expert (ids equal to ``E`` sort past the last end)."""
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    tok = torch.div(order, topk_ids.shape[1], rounding_mode="floor")
    ends = torch.arange(1, E + 1, device=topk_ids.device, dtype=flat.dtype)
    offs = torch.searchsorted(flat[order].contiguous(), ends, out_int32=True)
    return order, tok, offs


class TorchGroupedMoE:
    """The peer for one layer's weights; :meth:`bind` fixes a problem's weights and scales
    (expanded once to the row-wise form the grouped GEMM takes, as a load-time step would)."""

    name = "torch_grouped"

    def __init__(self, scheme: Scheme | str):
        self.scheme = Scheme.parse(scheme) if isinstance(scheme, str) else scheme

    def bind(self, problem: MoEProblem) -> Callable[[], torch.Tensor]:
        _x, w13, w2, s13, s2, _tw, _ids = problem.tensors()
        s13, s2 = _row_scales(self.scheme, w13, s13, s2)
        static = self.scheme.static_activations
        a13 = problem.a13_scale if static else None
        a2 = problem.a2_scale if static else None

        def call(p: MoEProblem = problem) -> torch.Tensor:
            xx, _w13, _w2, _s13, _s2, tw, ids = p.tensors()
            return self.forward(xx, w13, w2, s13, s2, tw, ids, a13, a2, p.expert_map)

        return call

    def __call__(self, problem: MoEProblem, out: torch.Tensor | None = None) -> torch.Tensor:
        from vllm_moe_aot.measure.peers.lineup import run_bound

        return run_bound(self.bind, problem, out)

    def forward(self, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                s13_rows: torch.Tensor, s2_rows: torch.Tensor, topk_weights: torch.Tensor,
                topk_ids: torch.Tensor, a13_scale: torch.Tensor | None = None,
                a2_scale: torch.Tensor | None = None,
                expert_map: torch.Tensor | None = None) -> torch.Tensor:
        """bf16 [M, K]; ``s13_rows`` fp32 [E, 2N], ``s2_rows`` fp32 [E, K]."""
        fp8 = w13.dtype
        E, N2, K = w13.shape
        N = N2 // 2
        M, topk = topk_ids.shape
        xq, xs = _quant_rows(x, a13_scale, fp8)
        local = _local_ids(topk_ids, expert_map, E)
        order, tok, offs = _sort_pairs(local, E)
        h = _grouped_mm(xq[tok], w13.transpose(-2, -1), xs[tok], s13_rows, offs)
        act = torch.nn.functional.silu(h[:, :N].float()) * h[:, N:].float()
        aq, as_ = _quant_rows(act, a2_scale, fp8)
        y = _grouped_mm(aq, w2.transpose(-2, -1), as_, s2_rows, offs)
        # routing weight in place and the top-k sum through the unsorted [M, topk, K] view:
        # an fp32 copy of y would be 21 GB at 131072 Qwen tokens
        y.mul_(topk_weights.reshape(-1)[order].to(y.dtype)[:, None])
        if expert_map is not None:  # rows past the last group end were never computed
            y = torch.where((local.reshape(-1)[order] < E)[:, None], y, 0)
        unsorted = torch.empty_like(y).index_copy_(0, order, y)
        return unsorted.view(M, topk, K).sum(dim=1, dtype=torch.float32).to(torch.bfloat16)


class GroupedGemmBound:
    """The CUTLASS-class bound: the layer's two grouped GEMMs alone (``torch._scaled_grouped_mm``,
    CUTLASS-based on sm90) on inputs prepared once at :meth:`bind`: no routing, quantisation,
    activation or reduce. What a pipeline of separate launches costs at least; its output is the
    down projection per sorted (token, slot) pair, so there is nothing to gate."""

    name = "gemm_bound"

    def __init__(self, scheme: Scheme | str):
        self.scheme = Scheme.parse(scheme) if isinstance(scheme, str) else scheme

    def bind(self, problem: MoEProblem) -> Callable[[], torch.Tensor]:
        x, w13, w2, s13, s2, _tw, ids = problem.tensors()
        s13, s2 = _row_scales(self.scheme, w13, s13, s2)
        static = self.scheme.static_activations
        fp8, N = w13.dtype, w13.shape[1] // 2
        xq, xs = _quant_rows(x, problem.a13_scale if static else None, fp8)
        _order, tok, offs = _sort_pairs(_local_ids(ids, problem.expert_map, w13.shape[0]),
                                        w13.shape[0])
        a1, s1 = xq[tok].contiguous(), xs[tok].contiguous()
        w13_t, w2_t = w13.transpose(-2, -1), w2.transpose(-2, -1)
        h = _grouped_mm(a1, w13_t, s1, s13, offs)
        act = torch.nn.functional.silu(h[:, :N].float()) * h[:, N:].float()
        a2, s2a = _quant_rows(act, problem.a2_scale if static else None, fp8)
        del h, act

        def call() -> torch.Tensor:
            _grouped_mm(a1, w13_t, s1, s13, offs)
            return _grouped_mm(a2, w2_t, s2a, s2, offs)

        return call
