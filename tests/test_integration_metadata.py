"""``ExpertMetadata`` on its own: it is vLLM-free, so these run without vLLM."""

from __future__ import annotations

import pytest
import torch

from vllm_moe_aot.shapes import MoEShape, Scheme

SHAPE = MoEShape(E=16, K=128, N=32, topk=2)


def test_metadata_rejects_bad_shapes_and_scales():
    from vllm_moe_aot.integration.metadata import (
        ExpertMetadata,
        normalize_activation_scale,
        normalize_weight_scale,
    )

    E = SHAPE.E
    with pytest.raises(ValueError, match="unsupported shape"):
        ExpertMetadata.build(MoEShape(E=4, K=100, N=32, topk=2), Scheme.FP8_PTPC,
                             torch.ones(4, 64), torch.ones(4, 100))
    with pytest.raises(ValueError, match=r"w13_scale has shape \(16, 2\)"):
        ExpertMetadata.build(SHAPE, Scheme.FP8_PER_TENSOR_DYNAMIC, torch.ones(E, 2),
                             torch.ones(E))
    with pytest.raises(ValueError, match="no a13_scale"):
        ExpertMetadata.build(SHAPE, Scheme.FP8_PER_TENSOR_STATIC, torch.ones(E), torch.ones(E))
    with pytest.raises(ValueError, match="one static activation scale"):
        normalize_activation_scale(torch.ones(E), "a13_scale")
    s = torch.rand(E, 64, 1)
    assert normalize_weight_scale(s, E, 64, "w13_scale").data_ptr() == s.data_ptr()
    half = torch.rand(E).half()
    got = normalize_weight_scale(half, E, None, "w2_scale")
    assert got.dtype == torch.float32 and torch.equal(got, half.float())
    assert normalize_activation_scale(torch.tensor(0.5), "a2_scale").shape == (1,)


def test_tune_hint_names_the_untuned_file(tmp_path):
    from vllm_moe_aot.integration.metadata import tune_hint
    from vllm_moe_aot.shapes import PRESETS

    hy3 = PRESETS["hy3"]
    (tmp_path / "hy3_fp8_per_tensor_tp8.untuned.csv").write_text("")
    assert tune_hint(hy3.shape, hy3.scheme, 8, tmp_path) == (
        f"vllm-moe-aot tune -i {tmp_path}/hy3_fp8_per_tensor_tp8.untuned.csv "
        f"-o {tmp_path}/hy3_fp8_per_tensor_tp8.tuned.csv")
    hy3_tp4 = MoEShape(E=192, K=4096, N=384, topk=8)  # no untuned file yet: generate it first
    assert tune_hint(hy3_tp4, Scheme.FP8_PER_TENSOR_DYNAMIC, 4, tmp_path).startswith(
        f"python -m vllm_moe_aot.cli.configs --generate --tp 4 --config-dir {tmp_path}, then "
        f"vllm-moe-aot tune -i {tmp_path}/hy3_fp8_per_tensor_tp4.untuned.csv")
    assert "vllm-moe-aot tune --model <checkpoint or config.json> --tp 1 --scheme fp8_ptpc" \
        in tune_hint(SHAPE, Scheme.FP8_PTPC, 1, tmp_path)


def test_tune_hint_under_expert_parallelism(tmp_path):
    """An EP layer's rows come from a tune with --ep (its shape, keyed ep, is another layer)."""
    from vllm_moe_aot.integration.metadata import tune_hint
    from vllm_moe_aot.shapes import PRESETS

    hy3_ep8 = MoEShape(E=24, K=4096, N=1536, topk=8, ep=8)  # hy3 at -dp 8 (or -tp 2 -dp 4) EP
    assert tune_hint(hy3_ep8, Scheme.FP8_PER_TENSOR_STATIC, 2, tmp_path) == (
        f"python -m vllm_moe_aot.cli.configs --generate --tp 2 --ep 8 --config-dir {tmp_path}, "
        f"then vllm-moe-aot tune -i {tmp_path}/hy3_fp8_per_tensor_tp2_ep8.untuned.csv "
        f"-o {tmp_path}/hy3_fp8_per_tensor_tp2_ep8.tuned.csv")
    # an untuned file of this layer at another TP size holds the same rows: tune that one
    (tmp_path / "hy3_fp8_per_tensor_tp1_ep8.untuned.csv").write_text("")
    assert tune_hint(hy3_ep8, Scheme.FP8_PER_TENSOR_STATIC, 2, tmp_path) == (
        f"vllm-moe-aot tune -i {tmp_path}/hy3_fp8_per_tensor_tp1_ep8.untuned.csv "
        f"-o {tmp_path}/hy3_fp8_per_tensor_tp1_ep8.tuned.csv")
    # hy3's layer without EP is another layer: its own file
    (tmp_path / "hy3_fp8_per_tensor_tp8.untuned.csv").write_text("")
    assert "tp8.untuned.csv" in tune_hint(PRESETS["hy3"].shape, Scheme.FP8_PER_TENSOR_STATIC,
                                          8, tmp_path)
    other = MoEShape(E=4, K=128, N=64, topk=3, ep=2)
    assert tune_hint(other, Scheme.FP8_PTPC, None, tmp_path) == (
        "vllm-moe-aot tune --model <checkpoint or config.json> --tp <T> --ep 2 --scheme "
        "fp8_ptpc --config-dir <dir>, then serve with VLLM_MOE_AOT_CONFIG_DIR=<dir>")


def test_layers_of_one_shape_share_pipeline_and_table(tmp_path, monkeypatch):
    """Sixty layers of one model: one pipeline (one workspace) and one dispatch table."""
    import vllm_moe_aot.pipeline as pipeline
    from tests import _moe_fakes
    from tests.integration_support import write_tuned
    from vllm_moe_aot.integration import metadata

    monkeypatch.setattr(pipeline, "FusedMoE", _moe_fakes.FakeFusedMoE)
    metadata.clear_caches()
    write_tuned(tmp_path, SHAPE, Scheme.FP8_PTPC, {1: "fake_w8a8", 4: "stock"})
    before = len(_moe_fakes.FakeFusedMoE.instances)
    E, N, K = SHAPE.E, SHAPE.N, SHAPE.K
    built = [metadata.ExpertMetadata.build(SHAPE, Scheme.FP8_PTPC, torch.rand(E, 2 * N, 1),
                                           torch.rand(E, K, 1), config_directory=tmp_path)
             for _ in range(3)]
    try:
        assert len(_moe_fakes.FakeFusedMoE.instances) == before + 1
        assert all(md.pipeline is built[0].pipeline for md in built)
        assert all(md.table is built[0].table for md in built)
        choices = [built[0].choose(m) for m in (1, 2, 4, 64)]
        assert choices == ["fake_w8a8", "stock", "stock", "stock"]
        assert built[0].describe().endswith("M<=1:aot, M<=4:stock")
    finally:
        metadata.clear_caches()


def test_scales_must_live_on_the_layer_device():
    from vllm_moe_aot.integration.metadata import ExpertMetadata

    with pytest.raises(ValueError, match="w2_scale is on meta"):
        ExpertMetadata.build(SHAPE, Scheme.FP8_PER_TENSOR_DYNAMIC, torch.ones(SHAPE.E),
                             torch.ones(SHAPE.E, device="meta"))


def test_block_scales_pass_through_unchanged():
    """Block FP8: vLLM's weight_scale_inv [E, 2N/128, K/128] / [E, K/128, N/128], contiguous
    fp32, reach the pipeline as they are (the very tensors: in-place reloads stay visible);
    other grids, E8M0 and N that is not whole blocks are refused with the cause."""
    from vllm_moe_aot.integration.metadata import (
        ExpertMetadata,
        block_scale_shape,
        normalize_block_scale,
    )

    E, K, N = 4, 256, 128
    assert block_scale_shape(E, 2 * N, K) == (E, 2, 2)
    assert block_scale_shape(E, K, N) == (E, 2, 1)
    s13 = torch.rand(E, 2, 2)
    got = normalize_block_scale(s13, (E, 2, 2), "w13_scale")
    assert got.data_ptr() == s13.data_ptr() and got.dtype == torch.float32
    strided = torch.rand(E, 2, 2).transpose(1, 2)  # a copy, once, contiguous
    got = normalize_block_scale(strided, (E, 2, 2), "w13_scale")
    assert got.is_contiguous() and torch.equal(got, strided)
    assert normalize_block_scale(s13.bfloat16(), (E, 2, 2), "w13_scale").dtype == torch.float32
    with pytest.raises(ValueError, match=r"w13_scale has shape \(4, 4, 4\), expected "
                                         r"\(4, 2, 2\) \(one scale per 128x128 block\)"):
        normalize_block_scale(torch.rand(E, 4, 4), (E, 2, 2), "w13_scale")
    with pytest.raises(ValueError, match="float8_e8m0fnu: E8M0 or packed UE8M0"):
        normalize_block_scale(s13.to(torch.float8_e8m0fnu), (E, 2, 2), "w13_scale")
    with pytest.raises(ValueError, match="torch.int32: E8M0 or packed UE8M0"):
        normalize_block_scale(torch.ones(E, 2, 1, dtype=torch.int32), (E, 2, 2), "w13_scale")
    shape = MoEShape(E=E, K=K, N=N, topk=2)
    with pytest.raises(ValueError, match=r"w2_scale \(w2_weight_scale_inv\) has shape "
                                         r"\(4, 2\), expected \(4, 2, 1\)"):
        ExpertMetadata.build(shape, Scheme.FP8_BLOCK, s13, torch.rand(E, 2))
    with pytest.raises(ValueError, match="multiple of the 128-row weight block"):
        ExpertMetadata.build(MoEShape(E=E, K=K, N=64, topk=2), Scheme.FP8_BLOCK,
                             torch.rand(E, 1, 2), torch.rand(E, 2, 1))


def test_block_metadata_holds_the_scales(tmp_path, monkeypatch):
    import vllm_moe_aot.pipeline as pipeline
    from tests import _moe_fakes
    from tests.integration_support import write_tuned
    from vllm_moe_aot.integration import metadata

    monkeypatch.setattr(pipeline, "FusedMoE", _moe_fakes.FakeFusedMoE)
    metadata.clear_caches()
    shape = MoEShape(E=4, K=256, N=128, topk=2)
    write_tuned(tmp_path, shape, Scheme.FP8_BLOCK, {1: "fake_w8a8", 4: "stock"})
    s13, s2 = torch.rand(4, 2, 2), torch.rand(4, 2, 1)
    try:
        md = metadata.ExpertMetadata.build(shape, Scheme.FP8_BLOCK, s13, s2,
                                           config_directory=tmp_path)
        assert md.w13_scale.data_ptr() == s13.data_ptr()
        assert md.w2_scale.data_ptr() == s2.data_ptr()
        assert md.a13_scale is None and md.a2_scale is None
        assert md.uses_pipeline and md.choose(1) == "fake_w8a8" and md.choose(3) == "stock"
        assert md.describe().startswith("E=4,K=256,N=128,topk=2 fp8_block on ")
    finally:
        metadata.clear_caches()
