"""Every kernel family of the pipeline against the float64 reference, through the committed
code objects' manifest and Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET).

Shapes are tiny so the interpreter stays fast; the GPU tests (tests/gpu/) run the presets.
The interpreter's fp32 -> fp8 conversion is wrong when rounding carries into the exponent, so
the kernels route it through an exact rounding under the interpreter (EXACT_CAST, tested
directly below); its bf16 stores truncate instead of rounding, which costs at most one bf16
ulp and is far inside the tolerances.
"""

from __future__ import annotations

import pytest
import torch

from vllm_moe_aot.pipeline import FusedMoE
from vllm_moe_aot.reference import gate, reference_moe
from vllm_moe_aot.shapes import MoEShape, Scheme

# Unit tests of single variants are held to 1e-2 (the product gate is looser, see reference).
TIGHT = dict(rel_fro_max=1e-2, mean_rel_abs_max=1e-2)
SMALL = MoEShape(E=8, K=256, N=64, topk=3)
FP8 = torch.float8_e4m3fn


def make(shape: MoEShape, scheme: Scheme, M: int, seed: int = 0, x_scale: float = 1.0,
         ids: torch.Tensor | None = None):
    g = torch.Generator().manual_seed(seed)
    E, K, N, topk = shape.E, shape.K, shape.N, shape.topk
    x = (torch.randn(M, K, generator=g) * x_scale).bfloat16()
    w13 = (torch.randn(E, 2 * N, K, generator=g) * 64).clamp(-448, 448).to(FP8)
    w2 = (torch.randn(E, K, N, generator=g) * 64).clamp(-448, 448).to(FP8)
    if scheme.per_channel_weights:
        s13 = torch.rand(E, 2 * N, generator=g) * 2e-3 + 5e-4
        s2 = torch.rand(E, K, generator=g) * 2e-3 + 5e-4
    else:
        s13 = torch.rand(E, generator=g) * 2e-3 + 5e-4
        s2 = torch.rand(E, generator=g) * 2e-3 + 5e-4
    if ids is None:
        ids = torch.rand(M, E, generator=g).argsort(dim=1)[:, :topk]
    ids = ids.int().contiguous()
    tw = torch.rand(M, topk, generator=g)
    tw = (tw / tw.sum(1, keepdim=True)).float().contiguous()
    a13 = a2 = None
    if scheme.static_activations:
        a13 = torch.tensor([float(x.float().abs().amax()) / 448 * 0.9 + 1e-6])
        a2 = torch.tensor([0.02])
    return dict(x=x, w13=w13, w2=w2, w13_scale=s13, w2_scale=s2, topk_weights=tw,
                topk_ids=ids, a13_scale=a13, a2_scale=a2)


def run_and_check(moe: FusedMoE, variant: str, p: dict, **tol):
    M, K = p["x"].shape
    out = torch.full((M, K), float("nan"), dtype=torch.bfloat16)  # poison: catch unwritten
    moe.run(variant, p["x"], p["w13"], p["w2"], p["w13_scale"], p["w2_scale"],
            p["topk_weights"], p["topk_ids"], out, p["a13_scale"], p["a2_scale"])
    ref = reference_moe(p["x"], p["w13"], p["w2"], p["w13_scale"], p["w2_scale"],
                        p["topk_weights"], p["topk_ids"], moe.scheme, p["a13_scale"],
                        p["a2_scale"], quantize_activations=moe.quantize_activations(variant))
    result = gate(out, ref, **(tol or TIGHT))
    assert result.passed, f"{variant} {moe.scheme.value} M={M}: {result}"
    return out, ref


@pytest.fixture(scope="module", params=list(Scheme), ids=lambda s: s.value)
def small_moe(request):
    return FusedMoE(SMALL, request.param, "cpu", max_tokens=64)


def _first(moe: FusedMoE, regime: str) -> str:
    return next(v for v in moe.variants if moe.regime(v) == regime)


def test_every_variant_single_token(small_moe):
    p = make(SMALL, small_moe.scheme, 1, seed=1)
    for v in small_moe.variants:
        run_and_check(small_moe, v, p)


@pytest.mark.parametrize("M", [2, 37])
def test_regimes_odd_batch(small_moe, M):
    """M not a multiple of any block size; most experts get some tokens, some none."""
    p = make(SMALL, small_moe.scheme, M, seed=M)
    for v in (_first(small_moe, "gemv"), "grouped_m16", "grouped_m64"):
        if v in small_moe.variants:
            run_and_check(small_moe, v, p)


def test_all_tokens_on_one_expert_and_empty_experts():
    shape = MoEShape(E=8, K=128, N=32, topk=2)
    for scheme in Scheme:
        moe = FusedMoE(shape, scheme, "cpu", max_tokens=32)
        ids = torch.tensor([[5, 2]] * 19)  # experts 0,1,3,4,6,7 get nothing
        p = make(shape, scheme, 19, seed=3, ids=ids)
        for v in (_first(moe, "gemv"), "grouped_m16", "grouped_m128"):
            run_and_check(moe, v, p)


def test_topk_one_and_non_power_of_two_n():
    shape = MoEShape(E=4, K=384, N=96, topk=1)  # K not a multiple of 256/512/1024 tiles
    for scheme in Scheme:
        moe = FusedMoE(shape, scheme, "cpu", max_tokens=16)
        p = make(shape, scheme, 7, seed=4)
        for v in moe.variants:
            if moe.regime(v) == "grouped" or v == _first(moe, "gemv"):
                run_and_check(moe, v, p)


def test_chunking_over_max_tokens():
    moe = FusedMoE(SMALL, Scheme.FP8_PTPC, "cpu", max_tokens=4)
    p = make(SMALL, Scheme.FP8_PTPC, 11, seed=5)
    for v in (_first(moe, "gemv"), "grouped_m16"):
        run_and_check(moe, v, p)


@pytest.mark.parametrize("scheme", [Scheme.FP8_PTPC, Scheme.FP8_PER_TENSOR_STATIC],
                         ids=lambda s: s.value)
def test_large_magnitude_inputs(scheme):
    """Inputs far beyond the fp8 range: dynamic scales absorb them; a static scale saturates
    (clamps to +-448) exactly like the reference."""
    moe = FusedMoE(SMALL, scheme, "cpu", max_tokens=8)
    p = make(SMALL, scheme, 5, seed=6, x_scale=3e4)
    if scheme.static_activations:
        p["a13_scale"] = torch.tensor([float(p["x"].float().abs().amax()) / 448 / 4])
    for v in (_first(moe, "gemv"), "grouped_m16"):
        run_and_check(moe, v, p)


@pytest.mark.parametrize("scheme", list(Scheme), ids=lambda s: s.value)
def test_nan_and_inf_inputs_follow_reference(scheme):
    moe = FusedMoE(SMALL, scheme, "cpu", max_tokens=8)
    p = make(SMALL, scheme, 6, seed=7)
    x = p["x"].clone()
    x[1, 7] = float("nan")
    x[3, 100] = float("inf")
    p["x"] = x
    for v in (_first(moe, "gemv"), "grouped_m16", "grouped_m64"):
        if v not in moe.variants:
            continue
        out, ref = run_and_check(moe, v, p)
        assert torch.isfinite(out[[0, 2, 4, 5]].float()).all(), "clean rows must stay finite"
        assert not torch.isfinite(out[1].float()).all(), "a NaN row must propagate"


def test_grouped_state_is_clean_between_calls():
    """The routing histogram is re-zeroed by the scatter kernel; a second call with different
    routing must not see the first call's counts."""
    moe = FusedMoE(SMALL, Scheme.FP8_PTPC, "cpu", max_tokens=16)
    for seed in (8, 9, 10):
        run_and_check(moe, "grouped_m16", make(SMALL, Scheme.FP8_PTPC, 9, seed=seed))
    assert int(moe.ws.counts.abs().sum()) == 0


def test_rejects_bad_calls():
    moe = FusedMoE(SMALL, Scheme.FP8_PTPC, "cpu", max_tokens=8)
    p = make(SMALL, Scheme.FP8_PTPC, 2)
    out = torch.empty(2, SMALL.K, dtype=torch.bfloat16)
    args = [p[k] for k in ("x", "w13", "w2", "w13_scale", "w2_scale", "topk_weights",
                           "topk_ids")]
    with pytest.raises(ValueError, match="unknown variant"):
        moe.run("no_such_variant", *args, out)
    bad = list(args)
    bad[6] = p["topk_ids"].long()
    with pytest.raises(ValueError, match="topk_ids must be contiguous int32"):
        moe.run("grouped_m16", *bad, out)
    bad = list(args)
    bad[3] = torch.ones(SMALL.E)  # per-tensor scale given to a ptpc layer
    with pytest.raises(ValueError, match="w13_scale"):
        moe.run("grouped_m16", *bad, out)
    with pytest.raises(ValueError, match="out must be"):
        moe.run("grouped_m16", *args, out.float())
    static = FusedMoE(SMALL, Scheme.FP8_PER_TENSOR_STATIC, "cpu", max_tokens=8)
    q = make(SMALL, Scheme.FP8_PER_TENSOR_STATIC, 2)
    with pytest.raises(ValueError, match="a13_scale"):
        static.run("grouped_m16", *[q[k] for k in ("x", "w13", "w2", "w13_scale", "w2_scale",
                                                   "topk_weights", "topk_ids")], out)


@pytest.mark.parametrize("shape,match", [
    (MoEShape(E=8, K=200, N=64, topk=2), "hidden size K=200"),
    (MoEShape(E=8, K=256, N=48, topk=2), "intermediate size N=48"),
    (MoEShape(E=2048, K=256, N=64, topk=2), "expert count"),
    (MoEShape(E=8, K=256, N=64, topk=9), "topk=9"),
])
def test_unsupported_shapes_rejected(shape, match):
    with pytest.raises(ValueError, match=match):
        FusedMoE(shape, Scheme.FP8_PTPC, "cpu")


def test_dynamic_wide_n_has_no_grouped_variant_but_gemv():
    """Dynamic re-quantisation needs the whole row of N in one stage-1 tile: N=512 leaves
    only the gemv regime for ptpc, while the static scheme keeps the grouped variants."""
    shape = MoEShape(E=4, K=128, N=512, topk=2)
    ptpc = FusedMoE(shape, Scheme.FP8_PTPC, "cpu", max_tokens=4)
    assert {ptpc.regime(v) for v in ptpc.variants} == {"gemv"}
    static = FusedMoE(shape, Scheme.FP8_PER_TENSOR_STATIC, "cpu", max_tokens=4)
    assert "grouped_m64" in static.variants
    run_and_check(ptpc, ptpc.variants[0], make(shape, Scheme.FP8_PTPC, 3, seed=11))
