"""Random layer problems (workload.py) and the GPU-only guards of timing.py."""

from __future__ import annotations

import pytest
import torch

from tests._problems import ROW_SCHEMES
from vllm_moe_aot.measure import timing, workload
from vllm_moe_aot.measure.reference import fp8_max, gate
from vllm_moe_aot.measure.workload import make_problem, make_problems, rotation_count
from vllm_moe_aot.shapes import MoEShape, Scheme

SHAPE = MoEShape(E=8, K=256, N=64, topk=4)


@pytest.mark.parametrize("scheme", ROW_SCHEMES)
def test_problem_layout_and_dtypes(scheme):
    M = 33
    p = make_problem(SHAPE, scheme, M, "cpu", seed=3)
    E, K, N, topk = SHAPE.E, SHAPE.K, SHAPE.N, SHAPE.topk
    assert p.x.shape == (M, K) and p.x.dtype == torch.bfloat16
    assert p.w13.shape == (E, 2 * N, K) and p.w13.dtype == torch.float8_e4m3fn
    assert p.w2.shape == (E, K, N) and p.w2.dtype == torch.float8_e4m3fn
    assert p.topk_ids.shape == (M, topk) and p.topk_ids.dtype == torch.int32
    assert p.topk_weights.shape == (M, topk) and p.topk_weights.dtype == torch.float32
    for t in (*p.tensors(), p.a13_scale, p.a2_scale):
        assert t is None or t.is_contiguous()
    if scheme is Scheme.FP8_PTPC:
        assert p.w13_scale.shape == (E, 2 * N) and p.w2_scale.shape == (E, K)
    else:
        assert p.w13_scale.shape == (E,) and p.w2_scale.shape == (E,)
    for s in (p.w13_scale, p.w2_scale):
        assert s.dtype == torch.float32 and bool((s > 0).all()) and bool(torch.isfinite(s).all())
    if scheme.static_activations:
        for s in (p.a13_scale, p.a2_scale):
            assert s.shape == (1,) and s.dtype == torch.float32 and float(s) > 0
        # calibrated from the data: x / a13 just reaches FP8_MAX
        assert float(p.x.float().abs().amax() / p.a13_scale) == pytest.approx(448.0, rel=1e-3)
    else:
        assert p.a13_scale is None and p.a2_scale is None


@pytest.mark.parametrize("scheme", [Scheme.FP8_PTPC, Scheme.FP8_PER_TENSOR_STATIC])
def test_weights_use_the_fp8_range(scheme):
    p = make_problem(SHAPE, scheme, 4, "cpu", seed=5)
    fmax = fp8_max(p.w13.dtype)
    for w in (p.w13, p.w2):
        a = w.float().abs()
        if scheme.per_channel_weights:  # every output channel reaches the top of the range
            assert torch.allclose(a.amax(dim=2), torch.full_like(a.amax(dim=2), fmax))
        else:  # every expert does
            assert torch.allclose(a.flatten(1).amax(dim=1), torch.full((SHAPE.E,), fmax))
        assert a.mean() > fmax / 40  # not just a few large values
    # dequantised rows have the intended N(0, 1/K) magnitude (log-normal spread around it)
    deq = p.w13.float() * (p.w13_scale.unsqueeze(-1) if scheme.per_channel_weights
                           else p.w13_scale.view(-1, 1, 1))
    assert 0.5 < float(deq.std() * SHAPE.K ** 0.5) < 2.0


def test_routing_distinct_experts_normalised():
    shape = MoEShape(E=16, K=128, N=32, topk=6)
    p = make_problem(shape, Scheme.FP8_PTPC, 500, "cpu", seed=1)
    ids = p.topk_ids.long()
    assert int(ids.min()) >= 0 and int(ids.max()) < shape.E
    assert all(len(set(r)) == shape.topk for r in ids.tolist())
    assert torch.allclose(p.topk_weights.sum(-1), torch.ones(500))
    assert bool((p.topk_weights > 0).all())
    assert p.experts_touched() == 16
    # topk == E still gives a permutation per token
    q = make_problem(MoEShape(E=4, K=128, N=32, topk=4), Scheme.FP8_PTPC, 3, "cpu")
    assert all(sorted(r) == [0, 1, 2, 3] for r in q.topk_ids.tolist())


def test_seeds_are_deterministic_and_sets_differ():
    a = make_problem(SHAPE, Scheme.FP8_PTPC, 5, "cpu", seed=11)
    b = make_problem(SHAPE, Scheme.FP8_PTPC, 5, "cpu", seed=11)
    for ta, tb in zip(a.tensors(), b.tensors(), strict=True):
        assert torch.equal(ta.view(torch.uint8) if ta.dtype.itemsize == 1 else ta,
                           tb.view(torch.uint8) if tb.dtype.itemsize == 1 else tb)
    sets = make_problems(SHAPE, Scheme.FP8_PTPC, 5, 3, "cpu", seed=11)
    assert len(sets) == 3
    assert torch.equal(sets[0].x, a.x)
    assert not torch.equal(sets[0].x, sets[1].x)
    assert not torch.equal(sets[1].w13.view(torch.uint8), sets[2].w13.view(torch.uint8))


@pytest.mark.parametrize("scheme", ROW_SCHEMES)
def test_reference_rows_subset_and_bf16_passes_gate(scheme):
    p = make_problem(SHAPE, scheme, 40, "cpu", seed=2)
    full = p.reference(True)
    rows = [0, 7, 39]
    assert torch.allclose(p.reference(True, rows=rows), full[rows], rtol=1e-12, atol=1e-12)
    assert full.abs().mean() > 0.05  # a layer output of sensible magnitude
    # the bf16-rounded reference is well inside the gate
    g = gate(full.to(torch.bfloat16), full)
    assert g.passed and g.rel_fro < 5e-3
    # W8A16 is different semantics: a few % away from W8A8 (why variants declare theirs)
    rel = float((p.reference(False) - full).norm() / full.norm())
    assert 5e-3 < rel < 0.1


def test_rotation_count():
    qwen = MoEShape(E=512, K=4096, N=128, topk=10)
    l2 = 50 << 20
    small = rotation_count(qwen, 1, l2)
    assert 8 <= small <= 16  # 10 experts = 15.7 MB per call: many sets to flush 50 MB of L2
    assert rotation_count(qwen, 4096, l2) == 1
    assert rotation_count(qwen, 1, l2, max_sets=4) == 4
    # each set holds a weight copy (805 MB): 2 GB free allows one set
    assert rotation_count(qwen, 1, l2, free_bytes=2 << 30) == 1
    assert workload.expected_experts_touched(qwen, 1) == pytest.approx(10.0)
    assert workload.expected_experts_touched(qwen, 100000) == pytest.approx(512.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_timing_needs_a_gpu():
    for fn in (lambda: timing.time_graph([lambda: None]), timing.measure_hbm_bandwidth,
               timing.measure_fp8_flops, timing.device_info, timing.require_gpu):
        with pytest.raises(timing.NoGPUError, match="needs a CUDA or ROCm GPU"):
            fn()
    from vllm_moe_aot.measure.peers.vllm_triton import LAST_PROBE, get_stock_provider

    assert get_stock_provider() is None and "no GPU" in LAST_PROBE["all"]
    assert get_stock_provider("cpu") is None
