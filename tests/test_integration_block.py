"""Block FP8 in real vLLM 0.33 MoE layers built on the CPU (issue 14, item 3): ``Fp8MoEMethod``
with ``weight_block_size: [128, 128]`` (dynamic activations, one scale per token per 128
columns) and the compressed-tensors W8A8 FP8 method with ``strategy: block`` get
``AotExperts`` (vLLM's oracle keys ``kFp8Static128BlockSym`` x ``kFp8Dynamic128Sym``, scheme
``fp8_block``). The pipeline reads vLLM's ``weight_scale_inv`` tensors as they are
(``[E, 2N/128, K/128]`` / ``[E, K/128, N/128]``) and quantises the bf16 input itself; batches
the tuned configs give to stock run vLLM's ``TritonExperts`` with the input quantised as vLLM's
prepare step quantises it (``per_token_group_quant_fp8``, a torch stand-in here:
``integration_support.fake_ops``). Layers of other block sizes (64x64) and E8M0 block scales
are not taken, with one log line naming why.

The pipeline runs through the Triton interpreter (the real ``FusedMoE``; the float64 stand-in
when no code-object manifest is there, as in the other integration tests); its output is
compared with the float64 ``reference_moe(..., Scheme.FP8_BLOCK)`` through the gate. Under
vLLM's sm_90 oracle (``tests/test_integration_delegate.py``, ``tests/test_integration_ep.py``)
block layers are taken where vLLM picks Triton (TP) and stay with vLLM where it picks
FlashInfer CUTLASS or DeepGEMM (EP).
"""

from __future__ import annotations

import logging

import pytest
import torch

from tests import integration_support as support
from vllm_moe_aot.integration import CONFIG_DIR_ENV
from vllm_moe_aot.shapes import MoEShape, Scheme

pytestmark = [pytest.mark.vllm, support.requires_vllm()]
moe_logs, plugin_on, fake_ops = support.moe_logs, support.plugin_on, support.fake_ops  # fixtures
pipeline_kind = support.pipeline_kind  # fixture

#: N and K whole 128x128 blocks: w13 scales [4, 2, 2], w2 scales [4, 2, 1]
SHAPE = MoEShape(E=4, K=256, N=128, topk=2)
TAKEN = "use AotExperts"
LEFT = "left to vLLM's backend choice"
NOT_BUILT = "block sizes other than 128x128 are not built"


@pytest.fixture
def tuned_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(CONFIG_DIR_ENV, str(tmp_path))
    return tmp_path


def build(kind: str, load: bool = True, seed: int = 0):
    with support.cpu_vllm():
        return support.make_layer(kind, SHAPE.E, SHAPE.K, SHAPE.N, SHAPE.topk, seed=seed,
                                  load=load)


def weight_scales(layer):
    """The layer's block scales: ``w13_weight_scale_inv`` (Fp8MoEMethod) or
    ``w13_weight_scale`` (compressed-tensors), and w2's."""
    ex = layer.experts
    suffix = "weight_scale_inv" if hasattr(ex, "w13_weight_scale_inv") else "weight_scale"
    return getattr(ex, f"w13_{suffix}"), getattr(ex, f"w2_{suffix}")


def tune(tuned_dir, kind: str):
    """Tuned rows for SHAPE: M=1 a gemv variant, M=2 a grouped one, M=4 stock."""
    v1, v2 = support.pick_variants(SHAPE, Scheme.FP8_BLOCK, kind)
    support.write_tuned(tuned_dir, SHAPE, Scheme.FP8_BLOCK, {1: v1, 2: v2, 4: "stock"})
    return v1, v2


def reference(layer, x, tw, ids, pipeline, variant):
    from vllm_moe_aot.measure.reference import reference_moe

    qc = layer.fused_experts.quant_config
    ex = layer.experts
    act_group = pipeline.act_group(variant) if hasattr(pipeline, "act_group") else 0
    return reference_moe(x, ex.w13_weight, ex.w2_weight, qc.w1_scale, qc.w2_scale, tw, ids,
                         Scheme.FP8_BLOCK, quantize_activations=(
                             pipeline.quantize_activations(variant)), act_group=act_group)


# --- the layers taken ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", support.BLOCK_KINDS)
def test_block_layers_get_aot_experts_on_vllms_weight_scale_inv(kind, plugin_on, fake_ops,
                                                                tuned_dir, pipeline_kind,
                                                                moe_logs):
    from vllm_moe_aot.integration.experts import AotExperts

    v1, v2 = tune(tuned_dir, pipeline_kind)
    layers = [build(kind, seed=s) for s in range(2)]
    for layer in layers:
        assert issubclass(layer.method.experts_cls, AotExperts)
        assert layer.method.fp8_backend.value == "TRITON"
        experts = layer.fused_experts
        qc = experts.quant_config
        assert qc.block_shape == [128, 128] and not qc.per_act_token_quant
        assert experts.fallback_reason is None, experts.fallback_reason
        md = experts.metadata
        assert (md.shape, md.scheme) == (SHAPE, Scheme.FP8_BLOCK)
        E, N, K = SHAPE.E, SHAPE.N, SHAPE.K
        for got, param, shape in zip((md.w13_scale, md.w2_scale), weight_scales(layer),
                                     ((E, 2 * N // 128, K // 128), (E, K // 128, N // 128)),
                                     strict=True):
            assert tuple(got.shape) == shape and got.dtype == torch.float32
            assert got.is_contiguous() and torch.equal(got, param)
            assert got.data_ptr() == param.data_ptr()  # the parameter itself: reloads show
        assert md.a13_scale is None and md.a2_scale is None
        assert md.table.describe() == [(1, v1), (2, v2), (4, "stock")]
        assert md.uses_pipeline and experts.expects_unquantized_inputs
        assert type(experts.stock).__name__ == "TritonExperts"
    taken = moe_logs.matching(TAKEN)
    assert len(taken) == 1 and "(fp8_block)" in taken[0], moe_logs.messages
    assert not moe_logs.matching(LEFT)


@pytest.mark.parametrize("kind", support.BLOCK_KINDS)
def test_apply_runs_the_pipeline_for_tuned_batches(kind, plugin_on, fake_ops, tuned_dir,
                                                   pipeline_kind, monkeypatch):
    """vLLM's modular kernel (its prepare, AotExperts, its finalize) on bf16 input: the tuned
    batch sizes run the pipeline on the weight_scale_inv tensors, matching the float64 block
    reference through the gate."""
    from vllm_moe_aot.measure.reference import gate

    v1, v2 = tune(tuned_dir, pipeline_kind)
    layer = build(kind)
    experts = layer.fused_experts
    stock = support.spy_on_stock(experts, monkeypatch)
    pipeline = experts.metadata.pipeline
    runs = []
    real_run = pipeline.run
    monkeypatch.setattr(pipeline, "run", lambda variant, x, w13, w2, s13, s2, *a, **k: (
        runs.append((variant, x.shape[0], x.dtype, s13, s2, a[3:], k))
        or real_run(variant, x, w13, w2, s13, s2, *a, **k)))
    s13, s2 = weight_scales(layer)
    for M, variant in ((1, v1), (2, v2)):
        x = torch.randn(M, SHAPE.K, generator=torch.Generator().manual_seed(M)).bfloat16()
        tw, ids = support.routing(M, SHAPE.E, SHAPE.topk, seed=M)
        out = support.forward(layer, x, tw, ids)
        got_variant, got_m, dtype, got13, got2, act_scales, kwargs = runs[-1]
        assert (got_variant, got_m, dtype) == (variant, M, torch.bfloat16)  # not quantised
        assert got13.data_ptr() == s13.data_ptr() and got2.data_ptr() == s2.data_ptr()
        assert act_scales == (None, None) and kwargs == {"expert_map": None}
        result = gate(out, reference(layer, x, tw, ids, pipeline, variant))
        assert result.passed, f"{pipeline_kind} pipeline, {kind}, M={M}: {result}"
    assert stock.calls == []


@pytest.mark.parametrize("kind", support.BLOCK_KINDS)
def test_untuned_batches_go_to_triton_quantised_like_vllm(kind, plugin_on, fake_ops, tuned_dir,
                                                          pipeline_kind, monkeypatch):
    """M=3, 4: the delegate gets fp8 input with one scale per token per 128 columns, exactly
    what vLLM's prepare step makes for its block path."""
    from vllm.model_executor.layers.fused_moe.prepare_finalize.no_dp_ep import _quantize_input

    tune(tuned_dir, pipeline_kind)
    layer = build(kind)
    experts = layer.fused_experts
    stock = support.spy_on_stock(experts, monkeypatch)
    support.forbid_pipeline(experts, monkeypatch)
    for M in (3, 4):
        x = torch.randn(M, SHAPE.K, generator=torch.Generator().manual_seed(M)).bfloat16()
        tw, ids = support.routing(M, SHAPE.E, SHAPE.topk, seed=M)
        out = support.forward(layer, x, tw, ids)
        assert torch.all(out == 7.0)
        call = stock.calls[-1]
        want_q, want_scale = _quantize_input(x, experts.quant_config, defer_input_quant=False)
        assert tuple(want_scale.shape) == (M, SHAPE.K // 128)
        assert call["hidden_states"].dtype == support.FP8
        assert torch.equal(call["hidden_states"].view(torch.uint8), want_q.view(torch.uint8))
        assert torch.equal(call["a1q_scale"], want_scale)
        assert call["a2_scale"] is None and call["expert_map"] is None
    assert len(stock.calls) == 2
    assert fake_ops["per_token_group_quant_fp8"] == 4  # ours and the reference's, per M


def test_untuned_block_layers_run_stock_with_one_tuning_hint(plugin_on, fake_ops, tuned_dir,
                                                             moe_logs):
    layers = [build("fp8_block", seed=s) for s in range(2)]
    for layer in layers:
        experts = layer.fused_experts
        assert experts.fallback_reason is None and not experts.metadata.uses_pipeline
        assert not experts.expects_unquantized_inputs  # vLLM's prepare quantises, as usual
    hints = moe_logs.matching("no tuned configs for E=4,K=256,N=128,topk=2 fp8_block")
    assert len(hints) == 1, moe_logs.messages
    assert "--scheme fp8_block" in hints[0]


def test_block_scales_of_another_shape_fall_back(plugin_on, fake_ops, tuned_dir, moe_logs):
    """AotExperts built on a block quant config whose scales are not the 128x128 grid of the
    layer (a caller of its own): stock at every M, one warning naming the shapes."""
    from vllm.model_executor.layers.fused_moe.config import fp8_w8a8_moe_quant_config

    from vllm_moe_aot.integration.experts import AotExperts

    layer = build("fp8_block", load=False)
    qc = fp8_w8a8_moe_quant_config(w1_scale=torch.ones(SHAPE.E, 4, 2),
                                   w2_scale=torch.ones(SHAPE.E, 2, 1), block_shape=[128, 128])
    with support.cpu_vllm():
        experts = AotExperts(layer.experts.moe_config, qc)
    assert experts.metadata is None
    assert "w13_scale (w13_weight_scale_inv) has shape (4, 4, 2), expected (4, 2, 2)" in (
        experts.fallback_reason)
    lines = [r for r in moe_logs.records if r.levelno == logging.WARNING]
    assert len(lines) == 1 and "runs vLLM's TritonExperts at every batch size" in (
        lines[0].getMessage())


# --- the layers left to vLLM -----------------------------------------------------------------

def test_64x64_blocks_stay_with_vllm_with_one_line(plugin_on, fake_ops, moe_logs):
    """Fp8MoEMethod hands vLLM's oracle the block size in the weight key (GroupShape(64, 64)):
    the hook leaves the layer to vLLM before anything is built."""
    from vllm_moe_aot.integration.experts import AotExperts

    layers = [build("fp8_block64", load=False, seed=s) for s in range(2)]
    for layer in layers:
        cls = layer.method.experts_cls
        assert cls is None or not issubclass(cls, AotExperts)
    left = moe_logs.matching(LEFT)
    assert len(left) == 1, moe_logs.messages
    assert "Fp8MoEMethod layer" in left[0] and "64x64 weight blocks" in left[0]
    assert NOT_BUILT in left[0]
    assert not moe_logs.matching(TAKEN)


def test_compressed_tensors_64x64_blocks_run_stock_with_one_warning(plugin_on, fake_ops,
                                                                    tuned_dir, pipeline_kind,
                                                                    moe_logs):
    """compressed-tensors hands the oracle the 128x128 key whatever its block_structure, so
    the hook cannot see the block size; the experts' quant config (block_shape [64, 64]) can:
    AotExperts runs vLLM's TritonExperts (vLLM's own pick for it) at every batch size, one
    warning naming the block size."""
    tune(tuned_dir, pipeline_kind)  # rows for the 128x128 layer of this shape do not apply
    layers = [build("ct_block64", seed=s) for s in range(2)]
    for layer in layers:
        experts = layer.fused_experts
        assert experts.quant_config.block_shape == [64, 64]
        assert experts.metadata is None and "64x64 weight blocks" in experts.fallback_reason
        assert not experts.expects_unquantized_inputs
        assert type(experts.stock).__name__ == "TritonExperts"
    warnings = [r.getMessage() for r in moe_logs.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and NOT_BUILT in warnings[0], moe_logs.messages
    assert "runs vLLM's TritonExperts at every batch size" in warnings[0]


def test_e8m0_block_scales_stay_with_vllm_with_one_line(plugin_on, fake_ops, moe_logs,
                                                        monkeypatch):
    """E8M0 (power-of-two) block scales: kFp8Static128BlockE8M0Sym, which no vLLM 0.33 MoE
    method hands the FP8 oracle yet (Quark's linear layers use it): asked through
    Fp8MoEMethod's binding, the hook answers vLLM's choice with one line."""
    import sys

    from vllm.model_executor.layers.quantization.utils.quant_utils import (
        kFp8Dynamic128Sym,
        kFp8Static128BlockE8M0Sym,
    )

    from tests.delegate_support import FP8_MODULE, Selection

    with monkeypatch.context() as m:
        selection = Selection(m, FP8_MODULE)
        build("fp8_block", load=False)
    args = dict(selection.arguments, weight_key=kFp8Static128BlockE8M0Sym,
                activation_key=kFp8Dynamic128Sym)
    moe_logs.records.clear()
    hooked = sys.modules[FP8_MODULE].select_fp8_moe_backend
    with support.cpu_vllm():
        answers = [hooked(**args) for _ in range(2)]
    assert all(a[0].value == "NONE" for a in answers)  # vLLM's own answer on the CPU
    left = moe_logs.matching(LEFT)
    assert len(left) == 1 and "E8M0" in left[0] and "float8_e8m0fnu" in left[0], left
    assert not moe_logs.matching(TAKEN)


def test_quant_configs_the_pipeline_does_not_take():
    """scheme_for_quant_config, the experts' own check (AotExperts built without the oracle):
    128x128 block FP8 is fp8_block; other block sizes and E8M0 scales say why not."""
    from vllm.model_executor.layers.fused_moe.config import fp8_w8a8_moe_quant_config

    from vllm_moe_aot.integration.experts import scheme_for_quant_config

    s13, s2 = torch.ones(4, 2, 2), torch.ones(4, 2, 1)
    assert scheme_for_quant_config(fp8_w8a8_moe_quant_config(
        w1_scale=s13, w2_scale=s2, block_shape=[128, 128])) is Scheme.FP8_BLOCK
    with pytest.raises(ValueError, match=f"64x64 weight blocks: {NOT_BUILT}"):
        scheme_for_quant_config(fp8_w8a8_moe_quant_config(
            w1_scale=s13, w2_scale=s2, block_shape=[64, 64]))
    with pytest.raises(ValueError, match=f"128x64 weight blocks: {NOT_BUILT}"):
        scheme_for_quant_config(fp8_w8a8_moe_quant_config(
            w1_scale=s13, w2_scale=s2, block_shape=[128, 64]))
    e8m0 = s13.to(torch.float8_e8m0fnu)
    with pytest.raises(ValueError, match="float8_e8m0fnu w1_scale: E8M0"):
        scheme_for_quant_config(fp8_w8a8_moe_quant_config(
            w1_scale=e8m0, w2_scale=s2, block_shape=[128, 128]))


def test_scheme_reasons_name_the_block():
    from vllm.model_executor.layers.quantization.utils.quant_utils import (
        GroupShape,
        create_fp8_quant_key,
        kFp8Dynamic128Sym,
        kFp8DynamicTokenSym,
        kFp8Static128BlockE8M0Sym,
        kFp8Static128BlockSym,
    )

    from vllm_moe_aot.integration.experts import SCHEME_BY_KEYS, scheme_unsupported_reason

    assert SCHEME_BY_KEYS[(kFp8Static128BlockSym, kFp8Dynamic128Sym)] is Scheme.FP8_BLOCK
    assert create_fp8_quant_key(static=True, group_shape=GroupShape(128, 128)) == (
        kFp8Static128BlockSym)  # the key Fp8MoEMethod builds for 128x128
    assert scheme_unsupported_reason(kFp8Static128BlockSym, kFp8Dynamic128Sym) is None
    refined = create_fp8_quant_key(static=True, group_shape=GroupShape(64, 64))
    assert scheme_unsupported_reason(refined, kFp8Dynamic128Sym) == (
        f"block-quantised FP8 with 64x64 weight blocks: {NOT_BUILT}")
    assert "E8M0" in scheme_unsupported_reason(kFp8Static128BlockE8M0Sym, kFp8Dynamic128Sym)
    assert "activations" in scheme_unsupported_reason(kFp8Static128BlockSym,
                                                      kFp8DynamicTokenSym)
