"""Random MoE problems for the pipeline tests (CPU and GPU): fp8 weights that use the fp8
range, positive scales, distinct experts per token, normalised routing weights."""

from __future__ import annotations

import weakref

import torch

from vllm_moe_aot.measure.reference import DequantizedExperts, gate, reference_moe
from vllm_moe_aot.pipeline import FusedMoE
from vllm_moe_aot.shapes import MoEShape, Scheme, weight_scale_shapes

FP8 = torch.float8_e4m3fn
#: single variants are held to 1e-2 (the product gate in reference.py is looser)
TIGHT = dict(rel_fro_max=1e-2, mean_rel_abs_max=1e-2)
ARGS = ("x", "w13", "w2", "w13_scale", "w2_scale", "topk_weights", "topk_ids")
#: the schemes with per-tensor or per-channel weight scales: the tests at N < 128 (block FP8
#: needs N in whole 128 blocks and has its own tests, tests/test_pipeline_block_cpu.py)
ROW_SCHEMES = [s for s in Scheme if not s.block_weights]


def make_weights(shape: MoEShape, scheme: Scheme, g: torch.Generator, device="cpu") -> dict:
    E, K, N = shape.E, shape.K, shape.N
    w13 = (torch.randn(E, 2 * N, K, generator=g, device=device) * 64).clamp(-448, 448).to(FP8)
    w2 = (torch.randn(E, K, N, generator=g, device=device) * 64).clamp(-448, 448).to(FP8)
    s13, s2 = (torch.rand(dims, generator=g, device=device) * 2e-3 + 5e-4
               for dims in weight_scale_shapes(shape, scheme))
    return dict(w13=w13, w2=w2, w13_scale=s13, w2_scale=s2)


def make_tokens(shape: MoEShape, scheme: Scheme, M: int, g: torch.Generator, device="cpu",
                x_scale: float = 1.0, ids: torch.Tensor | None = None) -> dict:
    E, K, topk = shape.E, shape.K, shape.topk
    x = (torch.randn(M, K, generator=g, device=device) * x_scale).bfloat16()
    if ids is None:
        ids = torch.rand(M, E, generator=g, device=device).argsort(dim=1)[:, :topk]
    ids = ids.to(device=device, dtype=torch.int32).contiguous()
    tw = torch.rand(M, topk, generator=g, device=device)
    tw = (tw / tw.sum(1, keepdim=True)).float().contiguous()
    a13 = a2 = None
    if scheme.static_activations:
        a13 = torch.tensor([4.5 * x_scale / 448 + 1e-6], device=device)
        a2 = torch.tensor([0.02], device=device)
    return dict(x=x, topk_weights=tw, topk_ids=ids, a13_scale=a13, a2_scale=a2)


def make(shape: MoEShape, scheme: Scheme, M: int, seed: int = 0, device="cpu", **kw) -> dict:
    g = torch.Generator(device=device).manual_seed(seed)
    return {**make_weights(shape, scheme, g, device), **make_tokens(shape, scheme, M, g, device,
                                                                      **kw)}


def run(moe: FusedMoE, variant: str, p: dict, out: torch.Tensor | None = None) -> torch.Tensor:
    M, K = p["x"].shape
    if out is None:
        out = torch.empty(M, K, dtype=torch.bfloat16, device=p["x"].device)
    out.fill_(float("nan"))  # poison: unwritten elements fail the gate
    return moe.run(variant, *[p[k] for k in ARGS], out, p["a13_scale"], p["a2_scale"],
                   expert_map=p.get("expert_map"))


#: id(w13) -> its layer's float64 experts: the GPU tests check every token count and variant
#: against the same module-scoped weights, and dequantising them was most of the reference's
#: time (~0.2 s per EP8 expert and reference on two cores); an entry goes with its weights
#: (tensors cannot key a WeakKeyDictionary: it compares keys with ==)
_DEQUANTIZED: dict[int, DequantizedExperts] = {}


def _experts(moe: FusedMoE, p: dict) -> DequantizedExperts:
    w = (p["w13"], p["w2"], p["w13_scale"], p["w2_scale"])
    d = _DEQUANTIZED.get(id(p["w13"]))
    if d is None or not d.matches(*w, d.weight_block):
        d = _DEQUANTIZED[id(p["w13"])] = DequantizedExperts(*w, moe.scheme)
        weakref.finalize(p["w13"], _DEQUANTIZED.pop, id(p["w13"]), None)
    return d


def reference_for(moe: FusedMoE, variant: str, p: dict, rows: torch.Tensor | None = None):
    """Float64 reference of the variant's semantics, for all rows or a sample of ``rows``.
    Tokens are independent (per-token or static activation scales), so a sample is exact."""
    sel = (lambda t: t) if rows is None else (lambda t: t[rows.to(t.device)])
    return reference_moe(sel(p["x"]), p["w13"], p["w2"], p["w13_scale"], p["w2_scale"],
                         sel(p["topk_weights"]), sel(p["topk_ids"]), moe.scheme,
                         p["a13_scale"], p["a2_scale"],
                         quantize_activations=moe.quantize_activations(variant),
                         expert_map=p.get("expert_map"), act_group=moe.act_group(variant),
                         experts=_experts(moe, p))


def check(moe: FusedMoE, variant: str, p: dict, out: torch.Tensor,
          rows: torch.Tensor | None = None, ref: torch.Tensor | None = None, **tol):
    """Gate ``out`` (all rows, or ``rows``) against the variant's float64 reference."""
    if ref is None:
        ref = reference_for(moe, variant, p, rows)
    got = out if rows is None else out[rows.to(out.device)]
    result = gate(got, ref, **(tol or TIGHT))
    assert result.passed, f"{variant} {moe.scheme.value} M={p['x'].shape[0]}: {result}"
    return result, ref


def check_every_variant(moe: FusedMoE, p: dict, M: int, label: str, sample: int = 32) -> int:
    """Run every variant meant for M (gemv only where it is meant to run: it is slow at large
    M) on ``p`` and gate each against the float64 reference of its own semantics
    (quantisation and intermediate scale width) on ``sample`` rows, at the variant's own
    tolerance; returns how many ran."""
    out = torch.empty(M, moe.shape.K, dtype=torch.bfloat16, device=p["x"].device)
    rows = torch.randperm(M, device="cpu")[:sample]
    refs: dict[tuple[bool, int], torch.Tensor] = {}
    ran = 0
    for v in moe.variants_for(M):
        run(moe, v, p, out)
        if out.is_cuda:
            torch.cuda.synchronize()
        assert not torch.isnan(out).any(), f"{v}: unwritten (poisoned) or NaN output at M={M}"
        sem = (moe.quantize_activations(v), moe.act_group(v))
        if sem not in refs:
            refs[sem] = reference_for(moe, v, p, rows)
        tol = moe.tolerance(v)
        result, _ = check(moe, v, p, out, rows=rows, ref=refs[sem], rel_fro_max=tol,
                          mean_rel_abs_max=tol)
        print(f"{label} M={M} {v}: {result}")
        ran += 1
    return ran
