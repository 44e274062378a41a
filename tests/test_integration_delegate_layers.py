"""(c) of tests/test_integration_delegate.py: a layer built through the hook owns vLLM's
choice as its delegate and runs its untuned batches there; delegates that cannot be built or
cannot share the modular kernel fall back to ``TritonExperts`` with one warning."""

from __future__ import annotations

import logging
import pickle

import pytest
import torch

from tests import delegate_support
from tests import integration_support as support
from tests.delegate_support import (  # the shared kinds, machines and helpers
    H100_NO_FI,
    KINDS,
    MACHINES,
    SHAPE,
    SHAREABLE,
    Selection,
    _build,
    _choice,
)
from vllm_moe_aot.integration import CONFIG_DIR_ENV
from vllm_moe_aot.integration import providers as P

pytestmark = [pytest.mark.vllm, support.requires_vllm()]
moe_logs, plugin_on, fake_ops = support.moe_logs, support.plugin_on, support.fake_ops  # fixtures
pipeline_kind = support.pipeline_kind  # fixture
sm90 = delegate_support.sm90  # fixture


# --- (c) layers built through the hook ------------------------------------------------------------

@pytest.fixture
def tuned_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(CONFIG_DIR_ENV, str(tmp_path))
    return tmp_path


def _build_through_hook(monkeypatch, sm90, kind: str, flags: P.PlatformFlags, load: bool):
    """The layer, its selection (the hook, asked under the stand-in) and vLLM's own answer."""
    module = KINDS[kind][0]
    sm90.set(flags)
    with monkeypatch.context() as m:
        selection = Selection(m, module, standin=sm90)
        layer = _build(kind, load=load)
    args = selection.arguments
    with support.cpu_vllm(), sm90:
        want = selection.original(**args)
    return layer, selection.answers[0], want


@pytest.mark.parametrize("machine", ["flashinfer", "no-flashinfer"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_layer_built_through_the_hook_owns_vllms_choice(kind, machine, sm90, plugin_on,
                                                        fake_ops, tuned_dir, monkeypatch,
                                                        moe_logs):
    from vllm.model_executor.layers.fused_moe.experts.cutlass_moe import CutlassExpertsFp8
    from vllm.model_executor.layers.fused_moe.experts.triton_cutlass_moe import (
        TritonOrCutlassExperts,
    )
    from vllm.model_executor.layers.fused_moe.experts.triton_moe import TritonExperts

    from vllm_moe_aot.integration.experts import AotExperts

    flags = MACHINES[machine]
    backend, vllm_cls = _choice(_build_through_hook(monkeypatch, sm90, kind, flags,
                                                    load=False)[2])
    layer, answer, _ = _build_through_hook(monkeypatch, sm90, kind, flags,
                                           load=backend in SHAREABLE)
    if backend not in SHAREABLE:
        # the layer is vLLM's: its method holds vLLM's own choice
        assert (layer.method.fp8_backend.value, layer.method.experts_cls) == (backend, vllm_cls)
        return
    assert layer.method.fp8_backend.value == "TRITON"
    assert layer.method.experts_cls is answer[1]
    experts = layer.fused_experts
    assert isinstance(experts, AotExperts) and type(experts) is answer[1]
    assert type(experts.stock) is vllm_cls
    assert experts.stock_backend == backend
    assert experts.stock_provider == P.provider_name(backend)
    assert experts.stock.quant_config is experts.quant_config
    assert experts.stock.moe_config is experts.moe_config
    assert moe_logs.matching("cannot use vLLM's") == []
    if vllm_cls is TritonOrCutlassExperts:
        assert isinstance(experts.stock.experts, CutlassExpertsFp8)
        assert isinstance(experts.stock.fallback_experts, TritonExperts)
    # the modular kernel sees the delegate's workspace and no top-k reduction left to finalize
    shape = delegate_support.shape_of(kind)
    ws = experts.workspace_shapes(5, 2 * shape.N, shape.K, shape.topk, shape.E, shape.E, None,
                                  layer.experts.moe_config.activation)
    assert ws == experts.stock.workspace_shapes(5, 2 * shape.N, shape.K, shape.topk, shape.E,
                                                shape.E, None,
                                                layer.experts.moe_config.activation)
    assert ws[2] == (5, shape.K)


class ApplySpy:
    """Stands in for a kernel's ``apply`` (vLLM's CUTLASS and Triton kernels cannot run on
    this machine): records the call and writes a marker into the output."""

    def __init__(self, marker: float = 7.0):
        self.calls = []
        self.marker = marker

    def __call__(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation,
                 global_num_experts, expert_map, a1q_scale, a2_scale, *rest):
        self.calls.append(dict(hidden_states=hidden_states, a1q_scale=a1q_scale))
        output.fill_(self.marker)


@pytest.mark.parametrize("tuned", [False, True], ids=["untuned", "tuned"])
@pytest.mark.parametrize("kind", ["ct_channel_token", "ct_tensor_static", "online_ptpc"])
def test_untaken_batches_run_on_vllms_cutlass(kind, tuned, sm90, plugin_on, fake_ops, tuned_dir,
                                              pipeline_kind, monkeypatch):
    """Batches the table gives to stock reach vLLM's CUTLASS kernel (not Triton) with the input
    quantised as vLLM's prepare step quantises it: by prepare when no batch size goes to the
    pipeline, by ``AotExperts.apply`` with the same helper when some do."""
    from vllm.model_executor.layers.fused_moe.prepare_finalize.no_dp_ep import _quantize_input

    scheme = support.scheme_of(kind)
    if tuned:
        v1, v2 = support.pick_variants(SHAPE, scheme, pipeline_kind)
        support.write_tuned(tuned_dir, SHAPE, scheme, {1: v1, 2: v2, 4: "stock"})
    layer, _, want = _build_through_hook(monkeypatch, sm90, kind, H100_NO_FI, load=True)
    assert want[0].value == "VLLM_CUTLASS"
    experts = layer.fused_experts
    assert experts.expects_unquantized_inputs is tuned
    cutlass, triton = ApplySpy(7.0), ApplySpy(-1.0)
    monkeypatch.setattr(experts.stock.experts, "apply", cutlass)
    monkeypatch.setattr(experts.stock.fallback_experts, "apply", triton)
    if tuned:
        monkeypatch.setattr(experts.metadata.pipeline, "run",
                            lambda *a, **k: pytest.fail("the pipeline must not run"))
    M = 3
    x = torch.randn(M, SHAPE.K, generator=torch.Generator().manual_seed(M)).bfloat16()
    tw, ids = support.routing(M, SHAPE.E, SHAPE.topk, seed=M)
    out = support.forward(layer, x, tw, ids)
    assert torch.all(out == 7.0)
    assert len(cutlass.calls) == 1 and triton.calls == []
    call = cutlass.calls[0]
    want_q, want_scale = _quantize_input(x, experts.quant_config, defer_input_quant=False)
    assert call["hidden_states"].dtype == support.FP8
    assert torch.equal(call["hidden_states"].view(torch.uint8), want_q.view(torch.uint8))
    assert torch.equal(call["a1q_scale"], want_scale)


def test_delegate_that_cannot_be_built_falls_back_to_triton(sm90, plugin_on, fake_ops,
                                                            tuned_dir, monkeypatch, moe_logs):
    """E.g. a vLLM build whose CUTLASS MoE cannot be constructed here: TritonExperts, and one
    warning naming the class, the backend and the cause."""
    from vllm.model_executor.layers.fused_moe.experts import triton_cutlass_moe
    from vllm.model_executor.layers.fused_moe.experts.triton_moe import TritonExperts

    class Missing(triton_cutlass_moe.CutlassExpertsFp8):
        def __init__(self, *args, **kwargs):
            raise RuntimeError("cutlass_moe_mm is not compiled into this build")

    monkeypatch.setattr(triton_cutlass_moe, "CutlassExpertsFp8", Missing)
    layer, answer, want = _build_through_hook(monkeypatch, sm90, "ct_channel_token", H100_NO_FI,
                                              load=True)
    assert answer[1].delegate_cls is want[1] is triton_cutlass_moe.TritonOrCutlassExperts
    experts = layer.fused_experts
    assert type(experts.stock) is TritonExperts
    assert (experts.stock_backend, experts.stock_provider) == ("TRITON", "vllm_triton")
    lines = [r for r in moe_logs.records if "cannot use vLLM's" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    message = lines[0].getMessage()
    assert "TritonOrCutlassExperts (VLLM_CUTLASS)" in message
    assert "RuntimeError: cutlass_moe_mm is not compiled into this build" in message
    assert "TritonExperts" in message


def test_delegate_that_cannot_share_the_kernel_falls_back_to_triton(plugin_on, fake_ops,
                                                                     tuned_dir, moe_logs):
    """A delegate that leaves the top-k reduction to finalize cannot run inside AotExperts'
    modular kernel (whose finalize does no reduction): TritonExperts, one warning."""
    from vllm.model_executor.layers.fused_moe.experts.triton_cutlass_moe import (
        TritonOrCutlassExperts,
    )
    from vllm.model_executor.layers.fused_moe.experts.triton_moe import TritonExperts
    from vllm.model_executor.layers.fused_moe.topk_weight_and_reduce import (
        TopKWeightAndReduceDelegate,
    )

    from vllm_moe_aot.integration.experts import AotExperts, delegate_problem

    class ReducesInFinalize(TritonOrCutlassExperts):
        def finalize_weight_and_reduce_impl(self):
            return TopKWeightAndReduceDelegate()

    layer = _build("ct_channel_token", load=True)
    moe_config, quant_config = layer.fused_experts.moe_config, layer.fused_experts.quant_config
    assert delegate_problem(TritonOrCutlassExperts(moe_config, quant_config), moe_config) is None
    cls = AotExperts.delegating_to("VLLM_CUTLASS", ReducesInFinalize)
    with support.cpu_vllm():
        experts = cls(moe_config=moe_config, quant_config=quant_config)
    assert type(experts.stock) is TritonExperts and experts.stock_backend == "TRITON"
    lines = moe_logs.matching("cannot use vLLM's ReducesInFinalize (VLLM_CUTLASS)")
    assert len(lines) == 1 and "leaves the top-k reduction to finalize" in lines[0]


def test_delegating_classes_are_one_per_choice_and_pickle():
    from vllm.model_executor.layers.fused_moe.experts.triton_cutlass_moe import (
        TritonOrCutlassExperts,
    )
    from vllm.model_executor.layers.fused_moe.experts.triton_moe import TritonExperts
    from vllm.model_executor.layers.fused_moe.oracle.fp8 import Fp8MoeBackend

    from vllm_moe_aot.integration import experts as experts_module
    from vllm_moe_aot.integration.experts import AotExperts

    cutlass = AotExperts.delegating_to(Fp8MoeBackend.VLLM_CUTLASS, TritonOrCutlassExperts)
    assert cutlass is AotExperts.delegating_to("VLLM_CUTLASS", TritonOrCutlassExperts)
    assert cutlass is not AotExperts and issubclass(cutlass, AotExperts)
    assert (cutlass.delegate_backend, cutlass.delegate_cls) == ("VLLM_CUTLASS",
                                                                TritonOrCutlassExperts)
    assert getattr(experts_module, cutlass.__name__) is cutlass
    assert pickle.loads(pickle.dumps(cutlass)) is cutlass
    assert AotExperts.delegating_to(Fp8MoeBackend.TRITON, TritonExperts) is AotExperts
    assert AotExperts.delegating_to(Fp8MoeBackend.NONE, None) is AotExperts
    assert (AotExperts.delegate_backend, AotExperts.delegate_cls) == ("TRITON", TritonExperts)
