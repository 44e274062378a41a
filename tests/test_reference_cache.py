"""DequantizedExperts: the float64 reference with its experts dequantised once gives the same
result as without, and is refused for any other (or since changed) weights."""

from __future__ import annotations

import pytest
import torch

from tests._problems import make
from vllm_moe_aot.measure.reference import DequantizedExperts, reference_moe
from vllm_moe_aot.shapes import MoEShape, Scheme

ARGS = ("x", "w13", "w2", "w13_scale", "w2_scale", "topk_weights", "topk_ids")


@pytest.mark.parametrize("scheme", [Scheme.FP8_PTPC, Scheme.FP8_BLOCK,
                                    Scheme.FP8_PER_TENSOR_STATIC], ids=lambda s: s.value)
def test_cached_experts_give_the_same_reference(scheme):
    p = make(MoEShape(E=4, K=256, N=128, topk=2), scheme, 6, seed=2)
    args = [p[k] for k in ARGS]
    kw = dict(a13_scale=p["a13_scale"], a2_scale=p["a2_scale"])
    d = DequantizedExperts(p["w13"], p["w2"], p["w13_scale"], p["w2_scale"], scheme)
    plain = reference_moe(*args, scheme, **kw)
    assert torch.equal(reference_moe(*args, scheme, **kw, experts=d), plain)
    assert torch.equal(reference_moe(*args, scheme, **kw, experts=d), plain)  # reused


def test_other_or_changed_weights_are_refused():
    scheme = Scheme.FP8_PTPC
    p = make(MoEShape(E=4, K=256, N=128, topk=2), scheme, 3, seed=5)
    d = DequantizedExperts(p["w13"], p["w2"], p["w13_scale"], p["w2_scale"], scheme)
    q = make(MoEShape(E=4, K=256, N=128, topk=2), scheme, 3, seed=6)
    with pytest.raises(ValueError, match="other weights"):
        reference_moe(*[q[k] for k in ARGS], scheme, experts=d)
    p["w13_scale"][0] *= 2  # an in-place change after the experts were made
    with pytest.raises(ValueError, match="in-place change"):
        reference_moe(*[p[k] for k in ARGS], scheme, experts=d)


def test_holding_the_experts_keeps_no_weights_alive():
    import gc
    import weakref

    p = make(MoEShape(E=2, K=128, N=128, topk=1), Scheme.FP8_PTPC, 2, seed=1)
    d = DequantizedExperts(p["w13"], p["w2"], p["w13_scale"], p["w2_scale"], Scheme.FP8_PTPC)
    alive = weakref.ref(p["w13"])
    del p
    gc.collect()
    assert alive() is None
    with pytest.raises(ValueError, match="gone"):
        d.expert(0)
