"""``AotExperts`` inside real vLLM 0.33 FP8 MoE layers built on the CPU: the metadata it builds
when the layer's weights are processed, the per-M routing between the AOT pipeline and vLLM's
``TritonExperts``, and every fallback (each logs one line).

The pipeline runs through the Triton interpreter when the code-object manifest is there
(``vllm_moe_aot/artifacts`` or ``$VLLM_MOE_AOT_ARTIFACTS``), else through the float64 stand-in
``tests/_moe_fakes.FakeFusedMoE`` (a warning in the summary says so, and why).

vLLM's stock Triton path cannot run on this machine at all: vLLM disables Triton when it finds
no GPU driver, so its fused-MoE kernel is a placeholder. The stock route is therefore checked
at the nearest real unit, the owned ``TritonExperts.apply``: it must be called, with the input
quantised exactly as vLLM's own prepare step quantises it.
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

SHAPE = MoEShape(E=16, K=128, N=32, topk=2)
#: kinds covering the three schemes and the three vLLM quant methods
ROUTED_KINDS = ("fp8_static", "fp8_dynamic", "ct_channel_token", "online_ptpc")


def build(kind: str, shape: MoEShape = SHAPE, load: bool = True, seed: int = 0):
    return support.make_layer(kind, shape.E, shape.K, shape.N, shape.topk, seed=seed, load=load)


@pytest.fixture
def tuned_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(CONFIG_DIR_ENV, str(tmp_path))
    return tmp_path


# --- metadata ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", support.KINDS)
def test_metadata_from_process_weights_after_loading(kind, plugin_on, fake_ops, tuned_dir,
                                                      pipeline_kind):
    scheme = support.scheme_of(kind)
    v1, v2 = support.pick_variants(SHAPE, scheme, pipeline_kind)
    support.write_tuned(tuned_dir, SHAPE, scheme, {1: v1, 2: v2, 4: "stock"})
    with support.cpu_vllm():
        layer = build(kind, load=False)
        assert getattr(layer.method, "moe_kernel", None) is None  # nothing before loading
        support.load_random_weights(layer)
    experts = layer.fused_experts
    md = experts.metadata
    assert experts.fallback_reason is None and md is not None
    assert (md.shape, md.scheme, md.device) == (SHAPE, scheme, torch.device("cpu"))
    assert (md.gpu_name, md.arch) == ("cpu", "interpreter")
    ex, E, N, K = layer.experts, SHAPE.E, SHAPE.N, SHAPE.K
    per_channel = scheme.per_channel_weights
    for got, param, shape in ((md.w13_scale, ex.w13_weight_scale, (E, 2 * N) if per_channel
                               else (E,)),
                              (md.w2_scale, ex.w2_weight_scale, (E, K) if per_channel
                               else (E,))):
        assert tuple(got.shape) == shape and got.dtype == torch.float32
        assert got.is_contiguous()
        assert torch.equal(got, param.detach().float().reshape(shape))
        assert got.data_ptr() == param.data_ptr()  # a view: in-place reloads stay visible
    if scheme.static_activations:
        for got, param in ((md.a13_scale, ex.w13_input_scale), (md.a2_scale, ex.w2_input_scale)):
            assert tuple(got.shape) == (1,) and got.dtype == torch.float32
            assert float(got) == float(param)
    else:
        assert md.a13_scale is None and md.a2_scale is None
    assert md.table.describe() == [(1, v1), (2, v2), (4, "stock")]
    assert md.uses_pipeline and set(md.pipeline.variants) >= {v1, v2}
    assert experts.expects_unquantized_inputs
    experts.process_weights_after_loading(ex)  # an explicit call later changes nothing
    assert experts.metadata is md


def test_no_tuned_rows_is_stock_everywhere_with_one_tuning_hint(plugin_on, fake_ops, tuned_dir,
                                                                moe_logs):
    with support.cpu_vllm():
        layers = [build("online_ptpc", seed=s) for s in range(2)]
    for layer in layers:
        experts = layer.fused_experts
        assert experts.fallback_reason is None
        assert not experts.metadata.uses_pipeline
        assert not experts.expects_unquantized_inputs  # vLLM quantises as usual
        x = torch.randn(1, SHAPE.K).bfloat16()
        tw, ids = support.routing(1, SHAPE.E, SHAPE.topk)
        assert experts.route(x, tw, ids, experts.moe_config.activation, None, False) == "stock"
    hints = moe_logs.matching("vllm-moe-aot tune --model")
    assert len(hints) == 1, moe_logs.messages
    assert "no tuned configs for E=16,K=128,N=32,topk=2 fp8_ptpc" in hints[0]


# --- apply --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ROUTED_KINDS)
def test_apply_routes_tuned_batches_to_the_pipeline(kind, plugin_on, fake_ops, tuned_dir,
                                                    pipeline_kind, monkeypatch):
    from vllm_moe_aot.measure.reference import gate

    scheme = support.scheme_of(kind)
    v1, v2 = support.pick_variants(SHAPE, scheme, pipeline_kind)
    support.write_tuned(tuned_dir, SHAPE, scheme, {1: v1, 2: v2, 4: "stock"})
    with support.cpu_vllm():
        layer = build(kind)
    experts = layer.fused_experts
    stock = support.spy_on_stock(experts, monkeypatch)
    runs = []
    real_run = experts.metadata.pipeline.run
    monkeypatch.setattr(experts.metadata.pipeline, "run",
                        lambda variant, x, *a, **k: runs.append((variant, x.shape[0]))
                        or real_run(variant, x, *a, **k))
    for M, variant in ((1, v1), (2, v2)):
        x = torch.randn(M, SHAPE.K, generator=torch.Generator().manual_seed(M)).bfloat16()
        tw, ids = support.routing(M, SHAPE.E, SHAPE.topk, seed=M)
        out = support.forward(layer, x, tw, ids)  # vLLM's prepare -> AotExperts -> finalize
        assert runs[-1] == (variant, M)
        ref = support.reference(layer, x, tw, ids, quantize_activations=(
            experts.metadata.pipeline.quantize_activations(variant)))
        result = gate(out, ref)
        assert result.passed, f"{pipeline_kind} pipeline, {kind}, M={M}: {result}"
    assert stock.calls == []


@pytest.mark.parametrize("kind", support.KINDS)
def test_apply_routes_untuned_batches_to_stock_quantised_like_vllm(kind, plugin_on, fake_ops,
                                                                    tuned_dir, pipeline_kind,
                                                                    monkeypatch):
    """M=3 and 4 fall in the "stock" bucket: the owned TritonExperts gets fp8 input and scales
    identical to what vLLM's prepare step makes when the experts do not defer quantisation."""
    from vllm.model_executor.layers.fused_moe.prepare_finalize.no_dp_ep import _quantize_input

    scheme = support.scheme_of(kind)
    v1, v2 = support.pick_variants(SHAPE, scheme, pipeline_kind)
    support.write_tuned(tuned_dir, SHAPE, scheme, {1: v1, 2: v2, 4: "stock"})
    with support.cpu_vllm():
        layer = build(kind)
    experts = layer.fused_experts
    assert experts.expects_unquantized_inputs
    stock = support.spy_on_stock(experts, monkeypatch)
    support.forbid_pipeline(experts, monkeypatch)
    for M in (3, 4):
        x = torch.randn(M, SHAPE.K, generator=torch.Generator().manual_seed(M)).bfloat16()
        tw, ids = support.routing(M, SHAPE.E, SHAPE.topk, seed=M)
        out = support.forward(layer, x, tw, ids)
        assert torch.all(out == 7.0)  # what the spy wrote came back through finalize
        call = stock.calls[-1]
        want_q, want_scale = _quantize_input(x, experts.quant_config, defer_input_quant=False)
        assert call["hidden_states"].dtype == support.FP8
        assert torch.equal(call["hidden_states"].view(torch.uint8), want_q.view(torch.uint8))
        assert torch.equal(call["a1q_scale"], want_scale)
        assert call["expert_map"] is None and call["apply_router_weight_on_input"] is False
        assert call["a2_scale"] is experts.quant_config.a2_scale
    assert len(stock.calls) == 2


def test_route_sends_unusual_calls_to_stock(plugin_on, fake_ops, tuned_dir, pipeline_kind):
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation

    v1, v2 = support.pick_variants(SHAPE, Scheme.FP8_PTPC, pipeline_kind)
    support.write_tuned(tuned_dir, SHAPE, Scheme.FP8_PTPC, {1: v1, 2: v2, 4: "stock"})
    with support.cpu_vllm():
        experts = build("ct_channel_token").fused_experts
    x = torch.randn(1, SHAPE.K).bfloat16()
    tw, ids = support.routing(1, SHAPE.E, SHAPE.topk)
    silu = MoEActivation.SILU
    assert experts.route(x, tw, ids, silu, None, False) == v1
    assert experts.route(x.repeat(9, 1), tw.repeat(9, 1), ids.repeat(9, 1), silu, None,
                         False) == "stock"  # beyond the largest tuned M: its choice
    # an expert_map over the layer's experts goes to the pipeline (expert parallelism:
    # tests/test_integration_ep.py); one it would not take is stock
    expert_map = torch.arange(SHAPE.E, dtype=torch.int32)
    assert experts.route(x, tw, ids, silu, expert_map, False) == v1
    assert experts.route(x, tw, ids, silu, expert_map.long(), False) == "stock"
    assert experts.route(x, tw, ids, silu, expert_map[:8], False) == "stock"
    assert experts.route(x, tw, ids, silu, None, True) == "stock"
    assert experts.route(x, tw, ids.long(), silu, None, False) == "stock"
    assert experts.route(x, tw.double(), ids, silu, None, False) == "stock"
    assert experts.route(x.half(), tw, ids, silu, None, False) == "stock"
    assert experts.route(x, tw, ids, MoEActivation.GELU, None, False) == "stock"
    experts.post_gemm2_hook = lambda unfinalized, output: None
    assert experts.route(x, tw, ids, silu, None, False) == "stock"


def test_workspace_covers_stock_at_every_m(plugin_on, fake_ops, tuned_dir, pipeline_kind):
    v1, v2 = support.pick_variants(SHAPE, Scheme.FP8_PER_TENSOR_STATIC, pipeline_kind)
    support.write_tuned(tuned_dir, SHAPE, Scheme.FP8_PER_TENSOR_STATIC, {1: v1, 2: "stock"})
    with support.cpu_vllm():
        experts = build("fp8_static").fused_experts
    act = experts.moe_config.activation
    for M in (1, 2, 3, 1024):
        args = (M, 2 * SHAPE.N, SHAPE.K, SHAPE.topk, SHAPE.E, SHAPE.E, None, act)
        assert experts.workspace_shapes(*args) == experts.stock.workspace_shapes(*args)
    assert type(experts.finalize_weight_and_reduce_impl()) is type(
        experts.stock.finalize_weight_and_reduce_impl())


def test_a_pipeline_failure_at_run_time_moves_the_layer_to_stock(plugin_on, fake_ops, tuned_dir,
                                                                 pipeline_kind, monkeypatch,
                                                                 moe_logs):
    from vllm.model_executor.layers.fused_moe.prepare_finalize.no_dp_ep import _quantize_input

    v1, v2 = support.pick_variants(SHAPE, Scheme.FP8_PTPC, pipeline_kind)
    support.write_tuned(tuned_dir, SHAPE, Scheme.FP8_PTPC, {1: v1, 2: v2})
    with support.cpu_vllm():
        layer = build("online_ptpc")
    experts = layer.fused_experts
    stock = support.spy_on_stock(experts, monkeypatch)

    def broken(*args, **kwargs):
        raise RuntimeError("launch failed")

    monkeypatch.setattr(experts.metadata.pipeline, "run", broken)
    x = torch.randn(1, SHAPE.K).bfloat16()
    tw, ids = support.routing(1, SHAPE.E, SHAPE.topk)
    out = support.forward(layer, x, tw, ids)
    assert torch.all(out == 7.0) and len(stock.calls) == 1  # this very call went to stock
    want_q, _ = _quantize_input(x, experts.quant_config, defer_input_quant=False)
    assert torch.equal(stock.calls[0]["hidden_states"].view(torch.uint8),
                       want_q.view(torch.uint8))
    assert "RuntimeError: launch failed" in experts.fallback_reason
    assert experts.metadata is None and not experts.expects_unquantized_inputs
    support.forward(layer, x, tw, ids)  # and so do later ones, quantised by vLLM's prepare
    assert len(stock.calls) == 2
    errors = [r for r in moe_logs.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "from now on" in errors[0].getMessage()


# --- fallbacks: the layer runs stock, one line says why -----------------------------------------

def _two_layers_fall_back(kind, moe_logs, text):
    with support.cpu_vllm():
        layers = [build(kind, seed=s) for s in range(2)]
    for layer in layers:
        experts = layer.fused_experts
        assert experts.metadata is None and text in experts.fallback_reason
        assert not experts.expects_unquantized_inputs
        x = torch.randn(1, SHAPE.K).bfloat16()
        tw, ids = support.routing(1, SHAPE.E, SHAPE.topk)
        assert experts.route(x, tw, ids, experts.moe_config.activation, None, False) == "stock"
    lines = [r for r in moe_logs.records if r.levelno == logging.WARNING
             and "runs vLLM's TritonExperts" in r.getMessage()]
    assert len(lines) == 1 and text in lines[0].getMessage(), moe_logs.messages
    return layers


def test_missing_code_objects_fall_back(plugin_on, fake_ops, tuned_dir, tmp_path_factory,
                                        monkeypatch, moe_logs):
    monkeypatch.setenv("VLLM_MOE_AOT_ARTIFACTS", str(tmp_path_factory.mktemp("no_artifacts")))
    support.write_tuned(tuned_dir, SHAPE, Scheme.FP8_PTPC, {1: "gemv_any", 4: "stock"})
    _two_layers_fall_back("online_ptpc", moe_logs, "ManifestError: no code-object manifest")


def test_corrupt_manifest_falls_back(plugin_on, fake_ops, tuned_dir, tmp_path_factory,
                                     monkeypatch, moe_logs):
    art = tmp_path_factory.mktemp("corrupt_artifacts")
    (art / "manifest.json").write_text("{not json")
    monkeypatch.setenv("VLLM_MOE_AOT_ARTIFACTS", str(art))
    support.write_tuned(tuned_dir, SHAPE, Scheme.FP8_PER_TENSOR_STATIC, {1: "gemv_any"})
    _two_layers_fall_back("fp8_static", moe_logs, "ManifestError: cannot read")


def test_config_naming_an_unknown_variant_falls_back(plugin_on, fake_ops, tuned_dir,
                                                     pipeline_kind, moe_logs):
    support.write_tuned(tuned_dir, SHAPE, Scheme.FP8_PER_TENSOR_DYNAMIC,
                        {1: "no_such_variant", 8: "stock"})
    _two_layers_fall_back("fp8_dynamic", moe_logs, "no_such_variant")


def test_malformed_config_rows_are_skipped(plugin_on, fake_ops, tuned_dir, pipeline_kind,
                                           moe_logs, caplog):
    """The dispatch table reports each bad row with file:line and skips it; with nothing
    left the layer is stock everywhere and the tuning hint is logged."""
    path = support.write_tuned(tuned_dir, SHAPE, Scheme.FP8_PTPC, {1: "gemv_any"})
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace(",10.000,", ",not-a-number,", 1)
    assert "not-a-number" in lines[1]
    path.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="vllm_moe_aot.dispatch.configs"):
        with support.cpu_vllm():
            experts = build("ct_channel_token").fused_experts
    assert experts.fallback_reason is None and not experts.metadata.uses_pipeline
    assert any(f"{path.name}:2:" in r.getMessage() for r in caplog.records), caplog.text
    assert len(moe_logs.matching("vllm-moe-aot tune --model")) == 1
