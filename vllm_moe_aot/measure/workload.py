"""Random MoE layer problems for the tuner, the benchmark and the tests.

:func:`make_problem` builds one layer's inputs the way a real FP8 checkpoint looks:

- ``x`` bf16 ``[M, K]`` ~ N(0, 1);
- weights drawn in float (``w13`` rows ~ N(0, 1/K), ``w2`` rows ~ N(0, 1/N), with a log-normal
  spread between output channels and between experts), then quantised the way checkpoints are:
  scale = amax / FP8_MAX per output channel (ptpc: ``w13_scale [E, 2N]``, ``w2_scale [E, K]``)
  or per 128 x 128 block (block FP8: ``[E, 2N/128, K/128]``, ``[E, K/128, N/128]``) or per
  expert (per tensor: ``[E]``), so the fp8 values span the format's range and the scales are
  small positive numbers;
- static activation scales (``fp8_per_tensor_static`` only) calibrated from the data:
  ``a13 = amax(x) / FP8_MAX``, ``a2 = amax(intermediate) / FP8_MAX`` over a sample of tokens;
- routing: ``softmax(randn(M, E))``'s top-k (distinct experts per token), renormalised to sum
  to one; ``topk_ids`` int32, ``topk_weights`` fp32;
- expert parallelism (``shape.ep`` > 1): tokens are routed over all ``E * ep`` experts and the
  problem is rank 0's: it holds global experts ``[0, E)`` (vLLM's linear placement), and
  ``expert_map`` (int32 ``[E * ep]``) maps them to slots ``0..E-1`` and every other to -1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vllm_moe_aot.measure.reference import fp8_max, reference_moe
from vllm_moe_aot.shapes import WEIGHT_BLOCK, MoEShape, Scheme

#: Elements generated per chunk when drawing weights (bounds temporary float32 memory).
_CHUNK_ELEMS = 1 << 26
#: Tokens used to calibrate the static intermediate scale.
_CALIBRATION_TOKENS = 256


@dataclass
class MoEProblem:
    """One layer's inputs on one device (shapes and dtypes in the module docstring)."""

    shape: MoEShape
    scheme: Scheme
    x: torch.Tensor
    w13: torch.Tensor
    w2: torch.Tensor
    w13_scale: torch.Tensor
    w2_scale: torch.Tensor
    topk_weights: torch.Tensor
    topk_ids: torch.Tensor
    a13_scale: torch.Tensor | None = None
    a2_scale: torch.Tensor | None = None
    expert_map: torch.Tensor | None = None

    @property
    def M(self) -> int:
        return self.x.shape[0]

    @property
    def device(self) -> torch.device:
        return self.x.device

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """``(x, w13, w2, w13_scale, w2_scale, topk_weights, topk_ids)``: the positional
        arguments of ``FusedMoE.run`` before ``out``."""
        return (self.x, self.w13, self.w2, self.w13_scale, self.w2_scale, self.topk_weights,
                self.topk_ids)

    def run_kwargs(self) -> dict[str, torch.Tensor | None]:
        """The keyword arguments of ``FusedMoE.run`` after ``out``."""
        return {"a13_scale": self.a13_scale, "a2_scale": self.a2_scale,
                "expert_map": self.expert_map}

    def local_ids(self) -> torch.Tensor:
        """``topk_ids`` as local slots (-1: another rank's expert)."""
        if self.expert_map is None:
            return self.topk_ids
        return self.expert_map[self.topk_ids.long()]

    def experts_touched(self) -> int:
        """Distinct local experts the routing selects (what the weight-bytes floor counts)."""
        ids = torch.unique(self.local_ids())
        return int((ids >= 0).sum())

    def new_out(self) -> torch.Tensor:
        return torch.empty(self.M, self.shape.K, dtype=torch.bfloat16, device=self.device)

    def nbytes(self) -> int:
        ts = [*self.tensors(), self.a13_scale, self.a2_scale]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def reference(self, quantize_activations: bool = True,
                  rows: torch.Tensor | Sequence[int] | None = None,
                  act_group: int = 0) -> torch.Tensor:
        """Float64 CPU reference of the layer, for all tokens or only ``rows`` (tokens are
        independent in every scheme, so a subset is exact and much cheaper at large M);
        ``act_group``: the variant's intermediate scale width (reference_moe)."""
        x, tw, ids = self.x, self.topk_weights, self.topk_ids
        if rows is not None:
            idx = torch.as_tensor(rows, dtype=torch.long, device=self.device)
            x, tw, ids = x[idx], tw[idx], ids[idx]
        cpu = lambda t: None if t is None else t.detach().cpu()
        return reference_moe(x, self.w13, self.w2, self.w13_scale, self.w2_scale, tw, ids,
                             self.scheme, a13_scale=cpu(self.a13_scale),
                             a2_scale=cpu(self.a2_scale),
                             quantize_activations=quantize_activations,
                             expert_map=self.expert_map, act_group=act_group)


def default_fp8_dtype(device: torch.device | str) -> torch.dtype:
    """e4m3fnuz on gfx942 (MI300), e4m3fn everywhere else (:func:`vllm_moe_aot.device.identify`)."""
    from vllm_moe_aot.device import identify

    return identify(device).fp8_dtype


def _generator(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _quantized_weights(E: int, rows: int, cols: int, per_channel: bool, fp8: torch.dtype,
                       device: torch.device, gen: torch.Generator, block: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8 ``[E, rows, cols]`` with scales ``[E, rows]`` (per channel), ``[E, rows/128,
    cols/128]`` (block) or ``[E]``: rows of N(0, 1/cols) with a log-normal channel and expert
    spread, quantised at amax / FP8_MAX of the channel, block or expert."""
    fmax = fp8_max(fp8)
    q = torch.empty(E, rows, cols, dtype=fp8, device=device)
    bn, bk = WEIGHT_BLOCK
    shape = (E, rows // bn, cols // bk) if block else (E, rows) if per_channel else (E,)
    scale = torch.empty(shape, dtype=torch.float32, device=device)
    per_chunk = max(1, _CHUNK_ELEMS // (rows * cols))
    for e0 in range(0, E, per_chunk):
        e1 = min(E, e0 + per_chunk)
        w = torch.randn(e1 - e0, rows, cols, generator=gen, device=device)
        spread = torch.exp(0.25 * torch.randn(e1 - e0, rows, 1, generator=gen, device=device))
        w *= spread / math.sqrt(cols)
        if block:
            blocks = w.reshape(e1 - e0, rows // bn, bn, cols // bk, bk)
            s = blocks.abs().amax(dim=(2, 4)) / fmax  # [e, rows/bn, cols/bk]
            s.clamp_(min=1e-12)
            full = s.repeat_interleave(bn, 1).repeat_interleave(bk, 2)
            q[e0:e1] = (w / full).clamp_(-fmax, fmax).to(fp8)
            del blocks, full
        elif per_channel:
            s = w.abs().amax(dim=2) / fmax  # [e, rows]
            s.clamp_(min=1e-12)
            q[e0:e1] = (w / s.unsqueeze(2)).clamp_(-fmax, fmax).to(fp8)
        else:
            s = w.abs().flatten(1).amax(dim=1) / fmax  # [e]
            s.clamp_(min=1e-12)
            q[e0:e1] = (w / s.view(-1, 1, 1)).clamp_(-fmax, fmax).to(fp8)
        scale[e0:e1] = s
        del w, spread
    return q, scale


def _routing(M: int, E: int, topk: int, device: torch.device, gen: torch.Generator
             ) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.empty(M, topk, dtype=torch.int32, device=device)
    weights = torch.empty(M, topk, dtype=torch.float32, device=device)
    per_chunk = max(1, _CHUNK_ELEMS // E)
    for m0 in range(0, M, per_chunk):
        m1 = min(M, m0 + per_chunk)
        probs = torch.randn(m1 - m0, E, generator=gen, device=device).softmax(dim=-1)
        w, i = probs.topk(topk, dim=-1)  # distinct experts per token
        weights[m0:m1] = w / w.sum(dim=-1, keepdim=True)
        ids[m0:m1] = i.to(torch.int32)
    return weights, ids


def _calibrate_a2(x: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor,
                  ids: torch.Tensor, a13: torch.Tensor, N: int) -> torch.Tensor:
    """amax of the SiLU-and-mul intermediate over a token sample, / FP8_MAX."""
    fp8 = w13.dtype
    fmax = fp8_max(fp8)
    n = min(x.shape[0], _CALIBRATION_TOKENS)
    xs = x[:n].float()
    xs = (xs / a13).clamp(-fmax, fmax).to(fp8).float() * a13  # as the kernels see it
    amax = torch.zeros((), dtype=torch.float32, device=x.device)
    for e in torch.unique(ids[:n]).tolist():
        if e < 0:
            continue  # another rank's expert
        rows = (ids[:n] == e).any(dim=1).nonzero().squeeze(1)
        w = w13[e].float() * w13_scale[e].reshape(-1, 1)
        h = xs[rows] @ w.T
        act = torch.nn.functional.silu(h[:, :N]) * h[:, N:]
        amax = torch.maximum(amax, act.abs().amax())
    return (amax / fmax).clamp(min=1e-12).reshape(1)


def make_problem(shape: MoEShape, scheme: Scheme | str, M: int,
                 device: torch.device | str = "cpu", seed: int = 0,
                 fp8_dtype: torch.dtype | None = None) -> MoEProblem:
    """A random layer problem with ``M`` tokens (see the module docstring)."""
    scheme = Scheme.parse(scheme) if isinstance(scheme, str) else scheme
    if M < 1:
        raise ValueError(f"M must be >= 1, got {M}")
    if not 1 <= shape.topk <= shape.global_experts:
        raise ValueError(f"topk={shape.topk} must be between 1 and {shape.global_experts} "
                         "experts")
    device = torch.device(device)
    fp8 = fp8_dtype or default_fp8_dtype(device)
    gen = _generator(device, seed)
    E, K, N, topk = shape.E, shape.K, shape.N, shape.topk
    pc, blk = scheme.per_channel_weights, scheme.block_weights
    w13, s13 = _quantized_weights(E, 2 * N, K, pc, fp8, device, gen, blk)
    w2, s2 = _quantized_weights(E, K, N, pc, fp8, device, gen, blk)
    x = torch.randn(M, K, generator=gen, device=device).to(torch.bfloat16)
    tw, ids = _routing(M, shape.global_experts, topk, device, gen)
    expert_map = None
    if shape.ep > 1:
        expert_map = torch.full((shape.global_experts,), -1, dtype=torch.int32, device=device)
        expert_map[:E] = torch.arange(E, dtype=torch.int32, device=device)
    a13 = a2 = None
    if scheme.static_activations:
        a13 = (x.float().abs().amax() / fp8_max(fp8)).clamp(min=1e-12).reshape(1)
        local = ids if expert_map is None else expert_map[ids.long()]
        a2 = _calibrate_a2(x, w13, s13, local, a13, N)
    return MoEProblem(shape, scheme, x, w13, w2, s13, s2, tw, ids, a13, a2, expert_map)


def make_problems(shape: MoEShape, scheme: Scheme | str, M: int, count: int,
                  device: torch.device | str = "cpu", seed: int = 0,
                  fp8_dtype: torch.dtype | None = None) -> list[MoEProblem]:
    """``count`` independent problems (own weights, activations and routing) for rotation:
    replaying them in turn keeps one set's weights from being L2-resident for the next."""
    return [make_problem(shape, scheme, M, device, seed + 7919 * i, fp8_dtype)
            for i in range(count)]


def expected_experts_touched(shape: MoEShape, M: int) -> float:
    """Expected distinct local experts hit by M tokens routed uniformly at random."""
    return shape.E * (1.0 - (1.0 - shape.topk / shape.global_experts) ** M)


def set_bytes(shape: MoEShape, M: int, experts: float | None = None) -> float:
    """Bytes one call of the layer must move at least: touched experts' fp8 weights plus
    bf16 x read and bf16 out written."""
    if experts is None:
        experts = expected_experts_touched(shape, M)
    return experts * shape.weight_bytes_per_expert() + 4.0 * M * shape.K


#: input sets an expert-parallel layer is timed over at least: a rank's share of a batch is
#: binomial (Qwen3.5 EP8 at M = 32: 40 +- 6 local pairs), so one routing draw can be 30% off
#: the mean; the time of a rotation averages the draws
MIN_EP_SETS = 4


def rotation_count(shape: MoEShape, M: int, l2_bytes: int, free_bytes: int | None = None,
                   max_sets: int = 16, l2_factor: float = 4.0) -> int:
    """How many independent input sets to rotate through so the bytes touched between two
    uses of one set exceed ``l2_factor`` x the L2 size (and at least MIN_EP_SETS under expert
    parallelism); bounded by ``max_sets`` and by half of ``free_bytes`` (each set holds a full
    copy of the weights)."""
    per_call = set_bytes(shape, M)
    want = max(1, math.ceil(l2_factor * l2_bytes / max(per_call, 1.0)))
    if shape.ep > 1:
        want = max(want, MIN_EP_SETS)
    sets = min(max_sets, want)
    if free_bytes is not None:
        E, K, N = shape.E, shape.K, shape.N
        per_set = 3 * E * N * K + 4 * M * K + 8 * M * shape.topk + 4 * E * (2 * N + K)
        sets = min(sets, max(1, int(0.5 * free_bytes // max(per_set, 1))))
    return max(1, sets)
