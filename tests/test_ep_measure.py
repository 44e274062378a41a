"""Expert parallelism on the measuring side (issue 13): EP problems, the torch peer with an
expert map, the configs' ``ep`` key column and the shipped EP8 layouts."""

from __future__ import annotations

import pytest
import torch

from tests._problems import ROW_SCHEMES
from vllm_moe_aot.dispatch.configs import (
    RowKey,
    generate_untuned,
    preset_shape,
    read_tuned,
    read_untuned,
    untuned_name,
)
from vllm_moe_aot.measure.peers.torch_grouped import TorchGroupedMoE
from vllm_moe_aot.measure.reference import gate
from vllm_moe_aot.measure.workload import (
    MIN_EP_SETS,
    expected_experts_touched,
    make_problem,
    rotation_count,
)
from vllm_moe_aot.shapes import PRESETS, MoEShape, Scheme, unsupported_reason


def test_ep_problem_routes_over_every_rank_and_maps_rank_zero():
    shape = MoEShape(E=4, K=128, N=64, topk=3, ep=4)
    p = make_problem(shape, Scheme.FP8_PTPC, 50, "cpu", seed=2)
    assert tuple(p.w13.shape) == (4, 128, 128)
    assert int(p.topk_ids.max()) >= 4  # routed past the local experts
    assert p.expert_map.tolist() == [0, 1, 2, 3] + [-1] * 12
    local = p.local_ids()
    assert ((local >= 0) == (p.topk_ids < 4)).all()
    assert 0 < p.experts_touched() <= 4
    assert expected_experts_touched(shape, 10**6) == pytest.approx(4.0)
    assert shape.flops(8) == pytest.approx(2 * 8 * 3 / 4 * 3 * 64 * 128)


@pytest.mark.parametrize("scheme", ROW_SCHEMES, ids=lambda s: s.value)
def test_torch_peer_with_an_expert_map(scheme):
    p = make_problem(MoEShape(E=4, K=256, N=64, topk=3, ep=2), scheme, 13, "cpu", seed=5)
    p.topk_ids[0] = torch.tensor([4, 5, 6], dtype=torch.int32)  # nothing local
    out = torch.full((13, 256), float("nan"), dtype=torch.bfloat16)
    TorchGroupedMoE(scheme)(p, out=out)
    ref = p.reference(True)
    assert torch.count_nonzero(ref[0]) == 0 and torch.count_nonzero(out[0]) == 0
    res = gate(out, ref)
    assert res.passed, res
    # ignoring the map (every pair local) would be far off
    emap = p.expert_map
    p.expert_map = None
    p.topk_ids.remainder_(4)
    assert not gate(out, p.reference(True)).passed
    p.expert_map = emap


def test_configs_key_on_ep_and_read_files_without_the_column(tmp_path):
    shape = MoEShape(E=64, K=4096, N=1024, topk=10, ep=8)
    key = RowKey.of(shape, Scheme.FP8_PTPC, 32)
    assert key.ep == 8 and key.shape == shape
    assert key.layer() != RowKey.of(MoEShape(64, 4096, 1024, 10), Scheme.FP8_PTPC, 32).layer()
    old = tmp_path / "old.untuned.csv"
    old.write_text("tokens,model_dim,inter_dim,experts,topk,activation,scheme\n"
                   "4,4096,128,512,10,silu,fp8_ptpc\n")
    keys, issues = read_untuned(old)
    assert not issues and keys[0].ep == 1
    tuned = tmp_path / "t.tuned.csv"
    tuned.write_text(
        "tokens,model_dim,inter_dim,experts,topk,activation,scheme,gpu,arch,cu_num,backend,"
        "variant,us,stock_us,stock_provider,speedup,tflops,gbps,err,version,tuned_at\n"
        "4,4096,128,512,10,silu,fp8_ptpc,NVIDIA H200,sm_90a,132,stock,,10,10,vllm_cutlass,"
        "1.0,,,,0.1,2026-12-03\n")
    rows, issues = read_tuned(tuned)
    assert not issues and rows[0].key.ep == 1


def test_shipped_ep8_layouts():
    qwen, hy3 = PRESETS["qwen3.5-397b-a17b"], PRESETS["hy3"]
    assert preset_shape(qwen, tp=1, ep=8) == MoEShape(64, 4096, 1024, 10, ep=8)
    assert preset_shape(hy3, tp=1, ep=8) == MoEShape(24, 4096, 1536, 8, ep=8)
    assert untuned_name(qwen, 1, 8) == "qwen3.5-397b-a17b_fp8_ptpc_tp1_ep8.untuned.csv"
    for p in (qwen, hy3):
        assert unsupported_reason(preset_shape(p, tp=1, ep=8), p.scheme) is None
    with pytest.raises(ValueError, match="ep=3"):
        preset_shape(qwen, tp=1, ep=3)


def test_generate_writes_tp8_and_ep8_files(tmp_path):
    names = sorted(p.name for p in generate_untuned(tmp_path))
    assert names == sorted([
        "hy3_fp8_per_tensor_tp1_ep8.untuned.csv", "hy3_fp8_per_tensor_tp8.untuned.csv",
        "qwen3.5-397b-a17b-fp8_fp8_block_tp1_ep8.untuned.csv",
        "qwen3.5-397b-a17b-fp8_fp8_block_tp8.untuned.csv",
        "qwen3.5-397b-a17b_fp8_ptpc_tp1_ep8.untuned.csv",
        "qwen3.5-397b-a17b_fp8_ptpc_tp8.untuned.csv"])
    keys, issues = read_untuned(tmp_path / "hy3_fp8_per_tensor_tp1_ep8.untuned.csv")
    assert not issues and len(keys) == 18 and {k.ep for k in keys} == {8}


def test_shape_parse_and_str_with_ep():
    s = MoEShape.parse("64,4096,1024,10,8")
    assert s.ep == 8 and str(s) == "E=64,K=4096,N=1024,topk=10,ep=8"
    assert str(MoEShape.parse("8,256,64,2")) == "E=8,K=256,N=64,topk=2"
    with pytest.raises(ValueError, match="E,K,N,topk"):
        MoEShape.parse("1,2,3")
    assert "ep=0" in unsupported_reason(MoEShape(4, 128, 64, 2, ep=0))
    # topk is bounded by the experts routed over, not the local ones
    assert unsupported_reason(MoEShape(2, 128, 64, 4, ep=4)) is None


def test_ep_layers_are_timed_over_several_routing_draws():
    """A rank's share of a batch varies with the routing: EP layers rotate through at least
    MIN_EP_SETS problems even when one set's weights already exceed the L2 several times."""
    tp = MoEShape(E=512, K=4096, N=128, topk=10)
    ep = MoEShape(E=64, K=4096, N=1024, topk=10, ep=8)
    l2 = 50 << 20
    assert rotation_count(tp, 4096, l2) == 1
    assert rotation_count(ep, 32, l2) == MIN_EP_SETS
    assert rotation_count(ep, 32, l2, free_bytes=2 * 805 << 20) == 1  # memory still bounds it
