"""The float64 reference under expert parallelism (vLLM's ``expert_map``: global id -> local
slot, -1 on another rank): with half, none and all of the experts local. Summed over ranks
that each hold a part, the layers must give the whole layer."""

from __future__ import annotations

import pytest
import torch

from tests._problems import ROW_SCHEMES
from vllm_moe_aot.measure.reference import reference_moe
from vllm_moe_aot.measure.workload import make_problem
from vllm_moe_aot.shapes import MoEShape, Scheme

SHAPE = MoEShape(E=8, K=256, N=64, topk=4)


def _rank(p, local: list[int]):
    """This rank's weights, scales and expert_map for the global experts ``local``."""
    emap = torch.full((SHAPE.E,), -1, dtype=torch.int32)
    emap[local] = torch.arange(len(local), dtype=torch.int32)
    idx = torch.tensor(local, dtype=torch.long)
    return p.w13[idx], p.w2[idx], p.w13_scale[idx], p.w2_scale[idx], emap


def _ref(p, w13, w2, s13, s2, emap=None):
    cpu = lambda t: None if t is None else t.detach().cpu()  # noqa: E731
    return reference_moe(p.x, w13, w2, s13, s2, p.topk_weights, p.topk_ids, p.scheme,
                         a13_scale=cpu(p.a13_scale), a2_scale=cpu(p.a2_scale),
                         expert_map=emap)


@pytest.mark.parametrize("scheme", ROW_SCHEMES)
def test_ranks_holding_halves_add_up_to_the_whole_layer(scheme):
    p = make_problem(SHAPE, scheme, 24, "cpu", seed=5)
    whole = p.reference(True)
    halves = [[0, 2, 5, 7], [1, 3, 4, 6]]
    parts = [_ref(p, *_rank(p, h)) for h in halves]
    assert all(part.abs().sum() > 0 for part in parts)  # each rank did some of the work
    torch.testing.assert_close(parts[0] + parts[1], whole, rtol=1e-12, atol=1e-12)


def test_a_rank_with_half_the_experts_adds_only_their_pairs():
    p = make_problem(SHAPE, Scheme.FP8_PTPC, 16, "cpu", seed=6)
    local = [1, 3, 4, 6]
    part = _ref(p, *_rank(p, local))
    # the same as the whole layer with every other expert's routing weight set to 0
    others = ~torch.isin(p.topk_ids.long(), torch.tensor(local))
    tw = p.topk_weights.clone()
    tw[others] = 0
    want = reference_moe(p.x, p.w13, p.w2, p.w13_scale, p.w2_scale, tw, p.topk_ids, p.scheme)
    torch.testing.assert_close(part, want, rtol=1e-12, atol=1e-12)


def test_no_local_expert_gives_zeros_and_all_local_gives_the_layer():
    p = make_problem(SHAPE, Scheme.FP8_PER_TENSOR_STATIC, 8, "cpu", seed=7)
    none = torch.full((SHAPE.E,), -1, dtype=torch.int32)
    assert torch.count_nonzero(_ref(p, p.w13, p.w2, p.w13_scale, p.w2_scale, none)) == 0
    identity = torch.arange(SHAPE.E, dtype=torch.int32)
    torch.testing.assert_close(_ref(p, p.w13, p.w2, p.w13_scale, p.w2_scale, identity),
                               p.reference(True), rtol=0, atol=0)


def test_bad_expert_maps_are_refused():
    p = make_problem(SHAPE, Scheme.FP8_PTPC, 4, "cpu", seed=8)
    w13, w2, s13, s2, _ = _rank(p, [0, 1])
    with pytest.raises(ValueError, match="slots < 2 local experts"):
        _ref(p, w13, w2, s13, s2, torch.arange(SHAPE.E, dtype=torch.int32))
    with pytest.raises(ValueError, match="expert_map covers 4"):
        _ref(p, w13, w2, s13, s2, torch.tensor([0, 1, -1, -1], dtype=torch.int32))
