"""Float64 reference for the fused FP8 MoE layer and the one correctness gate.

Semantics (what every pipeline variant must compute, up to rounding):

    out[m] = sum_j  w[m, j] * down_e( q2( silu(gate_e(q1(x[m]))) * up_e(q1(x[m])) ) )

with ``e = topk_ids[m, j]``, weights dequantised by their scales (per expert, or per output
channel for ptpc) and ``q1``/``q2`` the activation quantisation of the scheme:

- ``fp8_ptpc`` and ``fp8_per_tensor_dynamic``: dynamic per token, scale
  ``max(amax(row) / FP8_MAX, 1 / (FP8_MAX * 512))`` (vLLM's floor). For the per-tensor dynamic
  scheme we deliberately quantise per token: a finer scale than vLLM's single tensor-wide one,
  so its error is never larger and no grid-wide reduction is needed.
- ``fp8_per_tensor_static``: the checkpoint's scalar scales ``a13_scale`` / ``a2_scale``.
- ``quantize_activations=False``: W8A16, activations are not quantised at all (the decode
  kernels dequantise weights in registers and keep activations in fp32).
- block FP8 (``weight_block=(bn, bk)``, the official FP8 checkpoints' 128 x 128): one weight
  scale per ``bn x bk`` block (vLLM's ``weight_scale_inv``: ``[E, ceil(2N/bn), ceil(K/bk)]`` and
  ``[E, ceil(K/bn), ceil(N/bk)]``), and both activations quantised dynamically per token in
  groups of ``bk`` columns with vLLM's ``per_token_group_quant_fp8`` scale
  ``max(amax(group), 1e-10) / FP8_MAX``.

Quantisation clamps to +-FP8_MAX (NaN stays NaN) and rounds to nearest even.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from vllm_moe_aot.shapes import WEIGHT_BLOCK, Scheme

#: Thresholds of :func:`gate`, against the float64 reference of the same semantics. Stricter
#: than vLLM's own FP8 MoE tests (mean relative error < 0.05); vLLM's stock Triton path
#: measures 1.2e-2 to 2.0e-2 against the same reference on our H100, so it passes too.
GATE_REL_FRO = 3e-2
GATE_MEAN_REL_ABS = 3e-2


def fp8_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def min_scale(dtype: torch.dtype) -> float:
    """Smallest dynamic scale, as vLLM floors it (keeps all-zero rows finite)."""
    return 1.0 / (fp8_max(dtype) * 512.0)


def quantize(t: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:
    """Round ``t / scale`` to ``fp8_dtype`` (clamped, RNE) and return it dequantised, float64."""
    m = fp8_max(fp8_dtype)
    q = (t.double() / scale).clamp(-m, m)  # clamp keeps NaN
    return q.float().to(fp8_dtype).double() * scale


def _act_quant(t: torch.Tensor, scheme: Scheme, static_scale, fp8_dtype,
               group: int = 0) -> torch.Tensor:
    """Quantise ``t`` [rows, cols] as the scheme does: one static scale, or one dynamic scale
    per row, or (``group`` > 0) per ``group`` consecutive columns of a row."""
    if scheme.static_activations:
        if static_scale is None:
            raise ValueError(f"{scheme.value} needs static activation scales")
        scale = torch.as_tensor(static_scale).detach().cpu().double().reshape(())
        return quantize(t, scale, fp8_dtype)
    return _dynamic_quant(t, group, fp8_dtype, block=False)


#: vLLM's per_token_group_quant_fp8 floor on a group's amax
GROUP_EPS = 1e-10


def _dynamic_quant(t: torch.Tensor, group: int, fp8_dtype: torch.dtype, block: bool
                   ) -> torch.Tensor:
    """``t`` [rows, cols] quantised with one dynamic scale per row, or per ``group`` columns
    of a row (the last group may be narrower), dequantised (float64). The scale's floor is
    vLLM's per-token one, ``1 / (FP8_MAX * 512)``, or (``block``) its per-token-group one,
    ``max(amax, GROUP_EPS) / FP8_MAX``. A NaN group's scale is NaN (clamp keeps NaN), so the
    group stays NaN like the kernels."""
    m = fp8_max(fp8_dtype)
    out = []
    for c in t.double().split(group, dim=-1) if group else (t.double(),):
        amax = c.abs().amax(dim=-1, keepdim=True)
        scale = (torch.clamp(amax, min=GROUP_EPS) / m if block
                 else torch.clamp(amax / m, min=min_scale(fp8_dtype)))
        out.append(quantize(c, scale, fp8_dtype))
    return torch.cat(out, dim=-1)


def group_quant(t: torch.Tensor, group: int, fp8_dtype: torch.dtype) -> torch.Tensor:
    """``t`` [rows, cols] quantised per row in groups of ``group`` columns with vLLM's
    per-token-group scale (block FP8), dequantised (float64)."""
    return _dynamic_quant(t, group, fp8_dtype, block=True)


def block_dequant(w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """fp8 ``w`` [rows, cols] times its block scales ``scale`` [ceil(rows/bn), ceil(cols/bk)]
    (float64)."""
    bn, bk = block
    rows, cols = w.shape
    want = (-(-rows // bn), -(-cols // bk))
    if tuple(scale.shape) != want:
        raise ValueError(f"block scales for a {rows}x{cols} weight with {bn}x{bk} blocks are "
                         f"{want[0]}x{want[1]}, got {tuple(scale.shape)}")
    s = scale.double().repeat_interleave(bn, 0)[:rows].repeat_interleave(bk, 1)[:, :cols]
    return w.double() * s


def _weight_block(scheme: Scheme, weight_block: tuple[int, int] | None
                  ) -> tuple[int, int] | None:
    """The weight block in force: the one given, or block FP8's own."""
    return WEIGHT_BLOCK if scheme.block_weights and weight_block is None else weight_block


def _weight_scales(E: int, w13_scale: torch.Tensor, w2_scale: torch.Tensor,
                   weight_block: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight scales as the dequantisation takes them (CPU float64): block scales as they
    are, per-tensor and per-channel ones as [E, 1] / [E, rows]."""
    s13, s2 = w13_scale.detach().cpu().double(), w2_scale.detach().cpu().double()
    return (s13, s2) if weight_block is not None else (s13.reshape(E, -1), s2.reshape(E, -1))


def _dequantize_expert(w13: torch.Tensor, w2: torch.Tensor, s13: torch.Tensor,
                       s2: torch.Tensor, e: int, weight_block: tuple[int, int] | None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert ``e``'s float64 weights, w13 [2N, K] and w2 [K, N]; ``s13``/``s2`` as
    :func:`reference_moe` reshapes them (CPU, float64)."""
    if weight_block is not None:
        return (block_dequant(w13[e].detach().cpu(), s13[e], weight_block),
                block_dequant(w2[e].detach().cpu(), s2[e], weight_block))
    return (w13[e].detach().cpu().double() * s13[e].reshape(-1, 1),
            w2[e].detach().cpu().double() * s2[e].reshape(-1, 1))


class DequantizedExperts:
    """The float64 expert weights of one layer, each expert dequantised on first use and kept:
    a test that checks many batches against the same weights pays the dequantisation (most of
    the reference's time at EP8 sizes: ~0.2 s per expert on two cores) once per expert instead
    of once per batch. It remembers the tensors it was made from (weakly: holding it keeps no
    weights alive) and their in-place versions; :func:`reference_moe` refuses it for any other
    weights."""

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor, w13_scale: torch.Tensor,
                 w2_scale: torch.Tensor, scheme: Scheme | str,
                 weight_block: tuple[int, int] | None = None) -> None:
        scheme = Scheme.parse(scheme) if isinstance(scheme, str) else scheme
        weight_block = _weight_block(scheme, weight_block)
        self._sources = tuple(weakref.ref(t) for t in (w13, w2, w13_scale, w2_scale))
        self.versions = tuple(t._version for t in (w13, w2, w13_scale, w2_scale))
        self.weight_block = weight_block
        self._s13, self._s2 = _weight_scales(w13.shape[0], w13_scale, w2_scale, weight_block)
        self._experts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def matches(self, w13: torch.Tensor, w2: torch.Tensor, w13_scale: torch.Tensor,
                w2_scale: torch.Tensor, weight_block: tuple[int, int] | None) -> bool:
        """Whether these are the tensors (unchanged since) and the block this was made for."""
        now = (w13, w2, w13_scale, w2_scale)
        return (all(t is ref() for t, ref in zip(now, self._sources, strict=True))
                and tuple(t._version for t in now) == self.versions
                and weight_block == self.weight_block)

    def expert(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ``e``'s float64 w13 [2N, K] and w2 [K, N]."""
        if e not in self._experts:
            w13, w2 = (ref() for ref in self._sources[:2])
            if w13 is None or w2 is None:
                raise ValueError("the weights these experts were made from are gone")
            self._experts[e] = _dequantize_expert(w13, w2, self._s13, self._s2, e,
                                                  self.weight_block)
        return self._experts[e]


def reference_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    w13_scale: torch.Tensor,
    w2_scale: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    scheme: Scheme | str,
    a13_scale: torch.Tensor | None = None,
    a2_scale: torch.Tensor | None = None,
    quantize_activations: bool = True,
    expert_map: torch.Tensor | None = None,
    act_group: int = 0,
    weight_block: tuple[int, int] | None = None,
    experts: DequantizedExperts | None = None,
) -> torch.Tensor:
    """The layer in float64 on the CPU: ``[M, K]`` float64.

    ``w13_scale``/``w2_scale`` are ``[E]`` (per tensor) or ``[E, 2N]``/``[E, K]`` (ptpc; a
    trailing singleton dimension is accepted).

    ``expert_map`` (expert parallelism, vLLM's convention): int ``[global experts]``, each
    global expert id -> its slot in this rank's weights, or -1 when another rank holds it.
    ``topk_ids`` are then global ids, the weights and scales hold the local experts only, and a
    pair routed to another rank contributes nothing here (that rank adds it).

    ``act_group``: dynamic schemes re-quantise the intermediate with one scale per that many
    columns of a row (a variant's ``act_group``; 0: one scale per row).

    ``weight_block`` (block FP8): scales are ``[E, ceil(2N/bn), ceil(K/bk)]`` /
    ``[E, ceil(K/bn), ceil(N/bk)]`` and activations are quantised per token per ``bk`` columns
    (see the module docstring); ``scheme`` must then be a dynamic one. ``Scheme.FP8_BLOCK``
    implies ``weight_block=WEIGHT_BLOCK``; its intermediate follows ``act_group`` where a
    variant re-quantises per wider N tile.

    ``experts``: the same weights already dequantised (:class:`DequantizedExperts`, made from
    exactly these tensors); the result is the same, only faster when it is reused.
    """
    scheme = Scheme.parse(scheme) if isinstance(scheme, str) else scheme
    fp8 = w13.dtype
    E, N2, K = w13.shape
    N = N2 // 2
    M, topk = topk_ids.shape
    xd = x.detach().cpu().double()
    weight_block = _weight_block(scheme, weight_block)
    if weight_block is not None and scheme.static_activations:
        raise ValueError("block FP8 quantises activations dynamically, not with "
                         f"{scheme.value}'s static scales")
    s13, s2 = _weight_scales(E, w13_scale, w2_scale, weight_block)
    ids = topk_ids.detach().cpu().long()
    tw = topk_weights.detach().cpu().double()
    local = None
    if expert_map is not None:
        local = expert_map.detach().cpu().long()
        if local.dim() != 1 or (local.numel() and int(local.max()) >= E):
            raise ValueError(f"expert_map must be 1-D with slots < {E} local experts")
        if ids.numel() and int(ids.max()) >= local.numel():
            raise ValueError(f"topk_ids reach expert {int(ids.max())}; expert_map covers "
                             f"{local.numel()}")
    if experts is not None and not experts.matches(w13, w2, w13_scale, w2_scale, weight_block):
        raise ValueError("experts were dequantised from other weights (or from these before an "
                         "in-place change, or with another weight block)")
    out = torch.zeros(M, K, dtype=torch.float64)
    def q(t: torch.Tensor, static_scale, group: int) -> torch.Tensor:
        if weight_block is not None:  # per 128 columns, or per the variant's wider N tile
            return group_quant(t, group or weight_block[1], fp8)
        return _act_quant(t, scheme, static_scale, fp8, group)

    a1 = q(xd, a13_scale, 0) if quantize_activations else xd
    for g in ids.unique().tolist():
        e = g if local is None else int(local[g])
        if e < 0:
            continue  # another rank's expert
        rows, slots = (ids == g).nonzero(as_tuple=True)
        w13e, w2e = (experts.expert(e) if experts is not None else
                     _dequantize_expert(w13, w2, s13, s2, e, weight_block))  # [2N, K], [K, N]
        h = a1[rows] @ w13e.T  # [r, 2N]
        act = torch.nn.functional.silu(h[:, :N]) * h[:, N:]
        if quantize_activations:
            act = q(act, a2_scale, act_group)
        y = act @ w2e.T  # [r, K]
        out.index_add_(0, rows, y * tw[rows, slots].unsqueeze(1))
    return out


@dataclass(frozen=True)
class GateResult:
    passed: bool
    rel_fro: float
    mean_rel_abs: float
    reason: str = ""

    def __str__(self) -> str:
        verdict = "pass" if self.passed else f"FAIL ({self.reason})"
        return f"{verdict}: rel_fro={self.rel_fro:.3e} mean_rel_abs={self.mean_rel_abs:.3e}"


def gate(out: torch.Tensor, ref: torch.Tensor, rel_fro_max: float = GATE_REL_FRO,
         mean_rel_abs_max: float = GATE_MEAN_REL_ABS) -> GateResult:
    """The correctness gate used by tests and the tuner.

    Passes when the relative Frobenius error ``||out - ref|| / ||ref||`` and the mean relative
    absolute error ``mean|out - ref| / mean|ref|`` are both under their thresholds and ``out``
    is NaN/Inf exactly where ``ref`` is (non-finite values are compared by position, the
    finite ones numerically).
    """
    o = out.detach().cpu().double()
    r = ref.detach().cpu().double()
    if o.shape != r.shape:
        return GateResult(False, float("inf"), float("inf"), f"shape {tuple(o.shape)} != "
                          f"{tuple(r.shape)}")
    fin_o, fin_r = torch.isfinite(o), torch.isfinite(r)
    if not torch.equal(fin_o, fin_r):
        bad = int((fin_o != fin_r).sum())
        return GateResult(False, float("inf"), float("inf"),
                          f"{bad} elements finite in one and not the other")
    o, r = o[fin_r], r[fin_r]
    denom = r.norm().item()
    rel_fro = (o - r).norm().item() / denom if denom > 0 else (o - r).norm().item()
    mabs = r.abs().mean().item() if r.numel() else 0.0
    mra = (o - r).abs().mean().item() / mabs if mabs > 0 else (o - r).abs().mean().item()
    reasons = []
    if not rel_fro <= rel_fro_max:
        reasons.append(f"rel_fro {rel_fro:.3e} > {rel_fro_max:.1e}")
    if not mra <= mean_rel_abs_max:
        reasons.append(f"mean_rel_abs {mra:.3e} > {mean_rel_abs_max:.1e}")
    return GateResult(not reasons, rel_fro, mra, "; ".join(reasons))
