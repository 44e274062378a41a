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

from tests._problems import ARGS, ROW_SCHEMES, check, make, run
from vllm_moe_aot.pipeline import FusedMoE
from vllm_moe_aot.shapes import MoEShape, Scheme

SMALL = MoEShape(E=8, K=256, N=64, topk=3)


def run_and_check(moe: FusedMoE, variant: str, p: dict, **tol):
    out = run(moe, variant, p)
    _, ref = check(moe, variant, p, out, **tol)
    return out, ref


@pytest.fixture(params=ROW_SCHEMES, ids=lambda s: s.value)
def scheme(request):
    return request.param


@pytest.fixture
def small_moe(scheme):
    return FusedMoE(SMALL, scheme, "cpu", max_tokens=64)


def _first(moe: FusedMoE, regime: str) -> str:
    """The variant of ``regime`` with the fewest programs: the interpreter's cost is per
    program, and every gemv variant computes the same function."""
    if regime == "gemv" and "gemv_n8_k512.k8_n64" in moe.variants:
        return "gemv_n8_k512.k8_n64"
    return next(v for v in moe.variants if moe.regime(v) == regime)


def test_every_variant_single_token(scheme):
    shape = MoEShape(E=4, K=128, N=32, topk=2)  # tiny: some gemv variants run 1 row/program
    moe = FusedMoE(shape, scheme, "cpu", max_tokens=4)
    p = make(shape, scheme, 1, seed=1)
    for v in moe.variants:
        run_and_check(moe, v, p)


@pytest.mark.parametrize("M", [2, 37])
def test_regimes_odd_batch(small_moe, M):
    """M not a multiple of any block size; most experts get some tokens, some none."""
    p = make(SMALL, small_moe.scheme, M, seed=M)
    for v in (_first(small_moe, "gemv"), "grouped_m16", "grouped_m64"):
        if v in small_moe.variants:
            run_and_check(small_moe, v, p)


def test_all_tokens_on_one_expert_and_empty_experts():
    shape = MoEShape(E=8, K=128, N=32, topk=2)
    for scheme in ROW_SCHEMES:
        moe = FusedMoE(shape, scheme, "cpu", max_tokens=32)
        ids = torch.tensor([[5, 2]] * 19)  # experts 0,1,3,4,6,7 get nothing
        p = make(shape, scheme, 19, seed=3, ids=ids)
        for v in (_first(moe, "gemv"), "grouped_m16", "grouped_m128"):
            run_and_check(moe, v, p)


def test_topk_one_and_non_power_of_two_n():
    shape = MoEShape(E=4, K=384, N=96, topk=1)  # K not a multiple of 256/512/1024 tiles
    for scheme in ROW_SCHEMES:
        moe = FusedMoE(shape, scheme, "cpu", max_tokens=16)
        p = make(shape, scheme, 7, seed=4)
        for v in moe.variants:
            wide = ("gemv_n4_k1024.k4_n128",)  # stage-1 BLOCK_K and stage-2 BLOCK_N > K, N
            if moe.regime(v) == "grouped" or v in (_first(moe, "gemv"), *wide):
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
    if scheme.static_activations:  # a quarter of the needed scale: many inputs saturate
        p["a13_scale"] = torch.tensor([float(p["x"].float().abs().amax()) / 448 / 4])
    for v in (_first(moe, "gemv"), "grouped_m16"):
        run_and_check(moe, v, p)


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
    args = [p[k] for k in ARGS]
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
        static.run("grouped_m16", *[q[k] for k in ARGS], out)


@pytest.mark.parametrize("shape,match", [
    (MoEShape(E=8, K=200, N=64, topk=2), "hidden size K=200"),
    (MoEShape(E=8, K=256, N=48, topk=2), "intermediate size N=48"),
    (MoEShape(E=2048, K=256, N=64, topk=2), "expert count"),
    (MoEShape(E=8, K=256, N=64, topk=9), "topk=9"),
])
def test_unsupported_shapes_rejected(shape, match):
    with pytest.raises(ValueError, match=match):
        FusedMoE(shape, Scheme.FP8_PTPC, "cpu")


def test_dynamic_wide_n_is_served_by_per_tile_scale_variants():
    """N=512 is wider than every stage-1 tile: for ptpc only the variants that re-quantise
    the intermediate per N tile (and gemv) serve it, while the static scheme keeps the
    per-row grouped variants (its scale is per tensor)."""
    shape = MoEShape(E=4, K=128, N=512, topk=2)
    ptpc = FusedMoE(shape, Scheme.FP8_PTPC, "cpu", max_tokens=4)
    grouped = [v for v in ptpc.variants if ptpc.regime(v) == "grouped"]
    assert grouped and all(ptpc.act_group(v) in (64, 128, 256) for v in grouped)
    static = FusedMoE(shape, Scheme.FP8_PER_TENSOR_STATIC, "cpu", max_tokens=4)
    assert "grouped_m64" in static.variants
    run_and_check(ptpc, grouped[0], make(shape, Scheme.FP8_PTPC, 3, seed=11))


def test_failed_launch_leaves_the_histogram_clean(monkeypatch):
    """A launch that fails after prep counted the experts must not poison the next call."""
    moe = FusedMoE(SMALL, Scheme.FP8_PTPC, "cpu", max_tokens=16)
    p = make(SMALL, Scheme.FP8_PTPC, 9, seed=12)
    scatter = moe._stages["grouped_m16"]["scatter"].kernel

    def broken(*args, **kwargs):
        raise RuntimeError("simulated driver failure")

    monkeypatch.setattr(scatter, "launch", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        run(moe, "grouped_m16", p)
    assert int(moe.ws.counts.abs().sum()) == 0
    monkeypatch.undo()
    run_and_check(moe, "grouped_m16", make(SMALL, Scheme.FP8_PTPC, 9, seed=13))


@pytest.mark.parametrize("pdl", [True, False])
@pytest.mark.parametrize("variant", ["grouped_m16", "gemv_n8_k512.k8_n64"])
def test_pdl_only_after_the_first_kernel_of_a_chain(monkeypatch, variant, pdl):
    """Programmatic dependent launch is safe only for a kernel that waits in-kernel for its
    predecessor (USE_GDC) and never for the first kernel of a call; pdl=False turns it off."""
    moe = FusedMoE(SMALL, Scheme.FP8_PTPC, "cpu", max_tokens=16, pdl=pdl)
    seen: list[tuple[str, bool]] = []
    for role, stage in moe._stages[variant].items():
        real = stage.kernel.launch

        def spy(grid, *args, _role=role, _real=real, pdl=False, **named):
            seen.append((_role, pdl))
            return _real(grid, *args, pdl=pdl, **named)

        monkeypatch.setattr(stage.kernel, "launch", spy)
    run_and_check(moe, variant, make(SMALL, Scheme.FP8_PTPC, 5, seed=14))
    order = [r for r, _ in seen]
    first = "prep" if "prep" in order else "stage1"
    assert order[0] == first and len(seen) == len(moe._stages[variant])
    for role, flag in seen:
        gdc = bool(moe._stages[variant][role].consts.get("USE_GDC"))
        assert flag == (pdl and gdc and role != first), (role, flag)
    assert any(flag for _, flag in seen) == pdl  # the manifest's sm_90a entries use GDC


def test_topk_pad_bounds_the_variants():
    """A gemv stage 2 that holds TOPK_PAD slots per token must not serve a larger topk (it
    would drop experts silently); it does serve smaller ones."""
    small = FusedMoE(MoEShape(E=16, K=128, N=32, topk=8), Scheme.FP8_PTPC, "cpu", max_tokens=4)
    large = FusedMoE(MoEShape(E=16, K=128, N=32, topk=10), Scheme.FP8_PTPC, "cpu", max_tokens=4)
    t8 = [v for v in small.variants if v.endswith("_t8_w8")]
    assert t8 and not set(t8) & set(large.variants)
    p = make(MoEShape(E=16, K=128, N=32, topk=8), Scheme.FP8_PTPC, 3, seed=15)
    run_and_check(small, t8[0], p)


def test_variant_without_code_objects_for_the_target_is_skipped():
    """A variant whose kernels were not built for the runtime's target (the 4-stage stage-1
    tiles on gfx950) is skipped with a reason naming the missing kernels, not loaded."""
    import dataclasses

    from vllm_moe_aot.runtime import Runtime

    rt = Runtime.get(torch.device("cpu"))
    victim = "grouped_m16n64s4_wstd"
    s1 = rt.manifest.variant(victim).chain(Scheme.FP8_PTPC)["stage1"]
    view = dataclasses.replace(rt.manifest, objects=tuple(
        o for o in rt.manifest.objects if o.name != s1))
    stub = type("View", (), {"manifest": view, "target": rt.target, "kernel": rt.kernel})()
    moe = FusedMoE(MoEShape(E=4, K=128, N=160, topk=2), Scheme.FP8_PTPC, "cpu", max_tokens=4,
                   runtime=stub)
    assert victim not in moe.variants
    assert moe.skipped[victim] == f"not built for {rt.target}: {s1}"
    assert "grouped_m16n64_wstd" in moe.variants
