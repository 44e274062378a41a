"""The measured default dispatch policy and the tuned-row matching across GPU names."""

import pytest

from vllm_moe_aot.dispatch.configs import DispatchTable, gpu_family
from vllm_moe_aot.dispatch.policy import POLICY_MARGIN, default_dispatch, layer_class, load_policy
from vllm_moe_aot.shapes import PRESETS, MoEShape, Scheme

QWEN, HY3 = PRESETS["qwen3.5-397b-a17b"], PRESETS["hy3"]


@pytest.mark.parametrize("name,family", [
    ("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA H100 SXM5 80GB", "H100"),
    ("NVIDIA H100 PCIe", "H100"), ("NVIDIA H200", "H200"), ("NVIDIA H200 NVL", "H200 NVL"),
    ("NVIDIA H20", "H20"), ("NVIDIA H800", "H800"), ("AMD Instinct MI300X", "MI300X"),
])
def test_gpu_family(name, family):
    assert gpu_family(name) == family


def test_policy_rows_keep_the_margin():
    rows = load_policy()
    assert rows, "default_policy.csv is shipped"
    for r in rows:
        assert r.choice == "stock" or r.worst_speedup >= 1 + POLICY_MARGIN, r


# (layer, M) -> expected choice at bucket edges, from default_policy.csv (H200, 2026-12-02)
@pytest.mark.parametrize("shape,scheme,M,want", [
    (QWEN.shape, QWEN.scheme, 1, "gemv_n4_k1024.k8_n64"),
    (QWEN.shape, QWEN.scheme, 3, "gemv_n4_k1024.k4_n64_w2"),   # between 2 and 4: next larger
    (QWEN.shape, QWEN.scheme, 17, "grouped_m16"),
    (QWEN.shape, QWEN.scheme, 200000, "grouped_m64_fastacc_res4n128"),  # beyond: the largest
    (HY3.shape, HY3.scheme, 1, "gemv_n4_k1024.wk16_n128_t8_w8"),
    (HY3.shape, HY3.scheme, 64, "stock"),
    (HY3.shape, HY3.scheme, 65, "stock"),
    (HY3.shape, HY3.scheme, 129, "grouped_m64n64_fastacc_loop4n128"),
    (HY3.shape, HY3.scheme, 131072, "stock"),
    (MoEShape(128, 4096, 384, 8), Scheme.FP8_PTPC, 64, "stock"),
])
def test_policy_expectations(shape, scheme, M, want):
    d = default_dispatch(shape, scheme, "sm_90a", 132)
    assert DispatchTable(d.entries, d.reason, "default").choose(M) == want


@pytest.mark.parametrize("shape,scheme,arch,why", [
    (QWEN.shape, QWEN.scheme, "gfx942", "not measured on gfx942"),
    (MoEShape(64, 4096, 1024, 10), Scheme.FP8_PTPC, "sm_90a", "no surveyed layer"),
    (MoEShape(8, 4096, 192, 2), Scheme.FP8_PTPC, "sm_90a", "outside the surveyed range"),
])
def test_policy_says_stock_where_nothing_was_measured(shape, scheme, arch, why):
    d = default_dispatch(shape, scheme, arch, 132)
    assert not d.entries and why in d.reason


def test_policy_notes_another_sm_count():
    assert "this GPU has 78" in default_dispatch(QWEN.shape, QWEN.scheme, "sm_90a", 78).reason


def test_layer_class():
    assert layer_class(QWEN.shape, QWEN.scheme) == ("fp8_ptpc", 128, 16)
    assert layer_class(HY3.shape, "fp8_per_tensor") == ("fp8_per_tensor", 256, 8)


def test_for_layer_prefers_rows_then_policy(tmp_path):
    # shipped rows for the H100 model serve any H100 name; an H200 with no rows gets the policy
    h100 = DispatchTable.for_layer(QWEN.shape, QWEN.scheme, "NVIDIA H100 SXM5 80GB", "sm_90a")
    assert h100.origin == "tuned" and not h100.is_empty
    h20 = DispatchTable.for_layer(QWEN.shape, QWEN.scheme, "NVIDIA H20", "sm_90a", sm_count=78)
    assert h20.origin == "default"
    # no policy for this layer: rows of another GPU of the arch are the last resort
    assert DispatchTable.for_layer(QWEN.shape, QWEN.scheme, "NVIDIA H20", "sm_90a",
                                   default_policy=False).is_empty


def test_restricted_to_replaces_unserved_choices():
    t = DispatchTable([(1, "a"), (8, "b"), (64, "stock")], origin="default").restricted_to({"a"})
    assert t.describe() == [(1, "a"), (8, "stock"), (64, "stock")] and t.origin == "default"


@pytest.mark.parametrize("preset", [QWEN, HY3])
def test_untuned_ep_layers_get_no_default_entries(preset, tmp_path):
    """The survey ran every layer with all its experts local: an EP rank's layer (here the
    preset under -dp 8 --enable-expert-parallel) gets no policy entries, and its dispatch table
    is empty (stock everywhere) until it is tuned. (EP4: the shipped configs tune EP8.)"""
    s = preset.shape
    ep = MoEShape(E=s.E // 4, K=s.K, N=s.N * 8, topk=s.topk, ep=4)
    d = default_dispatch(ep, preset.scheme, "sm_90a", 132)
    assert d.entries == () and not d.uses_aot
    assert "measured without expert parallelism" in d.reason and "ep=4" in d.reason
    # the same layer without EP would have had entries
    assert default_dispatch(preset.shape, preset.scheme, "sm_90a", 132).entries
    table = DispatchTable.for_layer(ep, preset.scheme, "NVIDIA H200", "sm_90a", tmp_path,
                                    sm_count=132)
    assert table.is_empty and table.origin == "none" and table.choose(1) == "stock"
    assert "without expert parallelism" in table.source
