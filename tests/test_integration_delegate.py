"""Who runs the batches ``AotExperts`` does not take: vLLM's own choice for the layer, checked
against the real vLLM 0.33 oracle on an sm_90 stand-in (issue 12, item 3).

For every layer kind of ``providers.LAYER_KINDS`` (built as a real vLLM layer on the CPU, so
the oracle's arguments are the ones the quant method really passes) and for several machines
(FlashInfer's CUTLASS MoE usable or not, vLLM's CUTLASS grouped GEMM compiled in or not,
Humming installed or not):

(a) the rule in :mod:`vllm_moe_aot.integration.providers` names the backend vLLM's unhooked
    ``select_fp8_moe_backend`` picks;
(b) with ``VLLM_MOE_BACKEND=asmjit_aot`` the hooked selection answers an ``AotExperts`` class
    whose ``delegate_cls`` is exactly the class vLLM picked when that choice can share the
    pipeline's weights (``TRITON``, ``VLLM_CUTLASS``), and vLLM's own answer, unchanged, with
    one log line saying why, when it cannot (FlashInfer CUTLASS, Humming, Marlin);
(c) a layer built through the hook owns an instance of that class as ``stock``, built on the
    layer's own quant config, and its untuned batches run there; if the class cannot be built
    (or cannot share the modular kernel) the delegate is ``TritonExperts`` and one warning names
    the cause.

The stand-in: vLLM's one ``current_platform`` object is given a class reporting CUDA capability
9.0 only around each backend selection (the layers themselves are built on the CPU, where vLLM
has no FP8 MoE backend and answers ``NONE``). The support functions the oracle consults are set
per machine: ``has_flashinfer_cutlass_fused_moe`` (``flashinfer_cutlass_moe``), the CUTLASS
grouped-GEMM capability op behind ``cutlass_group_gemm_supported`` and ``has_humming``
(``fused_humming_moe``). The manifest is taken to hold sm_90a code objects inside the stand-in,
so the hook's own support check says yes whatever this checkout's artifacts hold.
"""

from __future__ import annotations

import inspect
import logging
import sys

import pytest
import torch

from tests import delegate_support
from tests import integration_support as support
from tests.delegate_support import (  # the shared kinds, machines and helpers
    FP8_MODULE,
    H100,
    H100_NO_FI,
    KINDS,
    MACHINES,
    SHAREABLE,
    TABLE,
    _build,
    _choice,
    _selection_arguments,
    _vllm_original,
)
from vllm_moe_aot.integration import providers as P
from vllm_moe_aot.shapes import Scheme

pytestmark = [pytest.mark.vllm, support.requires_vllm()]
moe_logs, plugin_on, fake_ops = support.moe_logs, support.plugin_on, support.fake_ops  # fixtures
pipeline_kind = support.pipeline_kind  # fixture
sm90 = delegate_support.sm90  # fixture


# --- the layer kinds ------------------------------------------------------------------------------

def test_the_kinds_cover_the_integration_table():
    assert sorted(KINDS) == sorted(support.KINDS + support.BLOCK_KINDS)
    assert sorted(key for _, key in KINDS.values()) == sorted(P.LAYER_KINDS)
    assert {kind: support.scheme_of(kind) for kind in KINDS} == {
        kind: key[1] for kind, (_, key) in KINDS.items()}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_layer_kinds_are_what_the_quant_methods_pass(kind, monkeypatch):
    """providers.LAYER_KINDS holds the keys the real quant method hands the oracle."""
    args = _selection_arguments(monkeypatch, kind)
    from vllm.model_executor.layers.quantization.utils import quant_utils

    want = P.LAYER_KINDS[KINDS[kind][1]]
    assert args["weight_key"] == getattr(quant_utils, want.weight_key)
    assert args["activation_key"] == getattr(quant_utils, want.activation_key)
    assert args["allow_vllm_cutlass"] is want.allow_vllm_cutlass


# --- (a) the rule against vLLM's unhooked oracle --------------------------------------------------

@pytest.mark.parametrize("machine", sorted(MACHINES))
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_rule_matches_the_unhooked_oracle(kind, machine, sm90, monkeypatch):
    flags = MACHINES[machine]
    args = _selection_arguments(monkeypatch, kind)
    original = _vllm_original(sys.modules[KINDS[kind][0]].select_fp8_moe_backend)
    with support.cpu_vllm(), sm90.set(flags):
        backend, cls = _choice(original(**args))
        asked = P.PlatformFlags.from_vllm()
    method, scheme = KINDS[kind][1]
    assert asked == flags  # the flags are read through the functions the oracle calls
    assert P.vllm_backend(scheme, method, flags) == backend
    assert P.stock_provider(scheme, method, flags) == P.provider_name(backend)
    assert cls is not None and cls.__name__ in {c.__name__ for c in _kernel_classes(backend)}
    delegate = P.delegate_provider(scheme, method, flags)
    assert delegate == (P.provider_name(backend) if backend in SHAREABLE else None)


def _kernel_classes(value: str):
    from vllm.model_executor.layers.fused_moe.oracle import fp8 as oracle

    return oracle.backend_to_kernel_cls(oracle.Fp8MoeBackend(value))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_the_docs_table_is_vllms_choice(kind, sm90, monkeypatch):
    args = _selection_arguments(monkeypatch, kind)
    original = _vllm_original(sys.modules[KINDS[kind][0]].select_fp8_moe_backend)
    got = []
    for flags in (H100, H100_NO_FI):
        with support.cpu_vllm(), sm90.set(flags):
            got.append(original(**args)[0].value)
    assert tuple(got) == TABLE[kind]


def _quant_config_fields(qc) -> dict:
    """A quant config's fields, tensors by identity (the layer's parameters)."""
    import dataclasses

    def plain(value):
        if isinstance(value, torch.Tensor):
            return ("tensor", id(value))
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return value

    return plain(qc)


@pytest.mark.parametrize("kind", ["fp8_static", "ct_channel_token", "ct_tensor_static",
                                  "fp8_block", "ct_block"])
def test_shareable_backends_load_the_layer_as_triton(kind, plugin_on, fake_ops):
    """Why exactly TRITON and VLLM_CUTLASS can be delegates: vLLM's weight conversion and
    quant config for them are TRITON's (what the method gets from the hook), so the delegate
    reads the very tensors AotExperts was built on. FlashInfer CUTLASS's are not (for block
    FP8 it stores w13 and its block scales as [up; gate])."""
    from vllm.model_executor.layers.fused_moe.oracle import fp8 as oracle

    assert P.SHAREABLE_BACKENDS == SHAREABLE
    layer = _build(kind, load=True)
    ex = layer.experts
    suffix = "weight_scale_inv" if hasattr(ex, "w13_weight_scale_inv") else "weight_scale"
    tensors = (ex.w13_weight, ex.w2_weight, getattr(ex, f"w13_{suffix}"),
               getattr(ex, f"w2_{suffix}"))
    inputs = (getattr(ex, "w13_input_scale", None), getattr(ex, "w2_input_scale", None))
    per_token = kind == "ct_channel_token"
    block = [128, 128] if kind in support.BLOCK_KINDS else None

    def load_as(backend: str, module):
        converted = oracle.convert_to_fp8_moe_kernel_format(
            oracle.Fp8MoeBackend(backend), module, *tensors, *inputs)
        qc = oracle.make_fp8_moe_quant_config(
            oracle.Fp8MoeBackend(backend), converted[2], converted[3], inputs[0], inputs[1],
            per_act_token_quant=per_token, per_out_ch_quant=per_token, block_shape=block)
        return converted, qc

    triton_weights, triton_qc = load_as("TRITON", ex)
    assert all(a is b for a, b in zip(triton_weights, tensors, strict=True))  # checkpoint layout
    for backend in sorted(SHAREABLE):
        weights, qc = load_as(backend, ex)
        assert all(a is b for a, b in zip(weights, tensors, strict=True)), backend
        assert _quant_config_fields(qc) == _quant_config_fields(triton_qc), backend
    if block is not None:  # FlashInfer CUTLASS (vLLM's pick under EP) converts the weights
        fi_weights, _ = load_as("FLASHINFER_CUTLASS", ex)
        assert fi_weights[0] is not tensors[0] and fi_weights[2] is not tensors[2]
        N = ex.intermediate_size_per_partition
        assert torch.equal(fi_weights[0][:, :N].view(torch.uint8),
                           tensors[0][:, N:].view(torch.uint8))  # [up; gate]
    elif kind != "ct_channel_token":  # FlashInfer CUTLASS takes the per-tensor static layers
        fi_qc = oracle.make_fp8_moe_quant_config(
            oracle.Fp8MoeBackend.FLASHINFER_CUTLASS, ex.w13_weight_scale, ex.w2_weight_scale,
            inputs[0], inputs[1])
        assert fi_qc.g1_alphas is not None and triton_qc.g1_alphas is None
        assert _quant_config_fields(fi_qc) != _quant_config_fields(triton_qc)


def test_the_rule_without_a_gpu():
    for method, scheme in P.LAYER_KINDS:
        assert P.vllm_backend(scheme, method, P.PlatformFlags(arch="cpu")) == "NONE"
        assert P.delegate_provider(scheme, method, P.PlatformFlags(arch="cpu")) == "vllm_triton"
    assert P.vllm_backend(Scheme.FP8_PTPC, None, P.PlatformFlags(arch="sm_80")) is None
    with pytest.raises(ValueError, match="no fp8_ptpc layers"):
        P.vllm_backend(Scheme.FP8_PTPC, P.QuantMethod.FP8, H100)


# --- (b) the hooked selection ---------------------------------------------------------------------

@pytest.mark.parametrize("machine", sorted(MACHINES))
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_hook_delegates_to_vllms_choice_or_leaves_the_layer(kind, machine, sm90, plugin_on,
                                                            monkeypatch, moe_logs):
    from vllm_moe_aot import caches
    from vllm_moe_aot.integration.experts import AotExperts

    flags = MACHINES[machine]
    module, (method, scheme) = KINDS[kind]
    args = _selection_arguments(monkeypatch, kind)
    hooked = sys.modules[module].select_fp8_moe_backend
    original = _vllm_original(hooked)
    assert original is not hooked  # the hook is on
    caches.clear_all()  # log_once forgets
    moe_logs.records.clear()
    with support.cpu_vllm(), sm90.set(flags):
        want = original(**args)
        got = hooked(**args)
    backend, vllm_cls = _choice(want)
    taken = moe_logs.matching("use AotExperts")
    left = moe_logs.matching("left to vLLM's backend choice")
    if backend in SHAREABLE:
        assert got[0].value == "TRITON"
        assert issubclass(got[1], AotExperts)
        assert got[1].delegate_cls is vllm_cls
        assert got[1].delegate_backend == backend
        assert (got[1] is AotExperts) == (backend == "TRITON")
        assert len(taken) == 1 and left == [], moe_logs.messages
        assert vllm_cls.__name__ in taken[0] and scheme.value in taken[0]
        assert P.delegate_provider(scheme, method, flags) == P.provider_name(backend)
    else:
        assert got == want  # vLLM's own answer, unchanged
        assert not issubclass(got[1], AotExperts)
        assert len(left) == 1 and taken == [], moe_logs.messages
        assert vllm_cls.__name__ in left[0] and backend in left[0]
        assert "cannot share its weights" in left[0]
        assert P.NOT_SHAREABLE_WHY[backend] in left[0]
        assert P.delegate_provider(scheme, method, flags) is None


def test_hook_asks_vllm_once_and_returns_its_answer(sm90, plugin_on, monkeypatch, moe_logs):
    """The layer left to vLLM gets the very tuple vLLM's function returned (asked once)."""
    from vllm_moe_aot.integration import hook

    args = _selection_arguments(monkeypatch, "fp8_static")
    hooked = sys.modules[FP8_MODULE].select_fp8_moe_backend
    original = _vllm_original(hooked)
    answers = []

    def spy(*a, **k):
        answers.append(original(*a, **k))
        return answers[-1]

    spy.__signature__ = inspect.signature(original)  # the wrapper binds vLLM's arguments
    wrapper = hook._make_wrapper(spy, FP8_MODULE)
    with support.cpu_vllm(), sm90.set(H100):
        got = wrapper(**args)
    assert len(answers) == 1 and got is answers[0]
    assert got[0].value == "FLASHINFER_CUTLASS"


def test_hook_when_vllm_raises_takes_the_layer_with_triton(sm90, plugin_on, monkeypatch,
                                                           moe_logs):
    """No vLLM backend for a layer the pipeline supports (vLLM alone would fail to start):
    AotExperts with vLLM's TritonExperts, one WARNING naming what vLLM raised."""
    from vllm_moe_aot.integration import hook
    from vllm_moe_aot.integration.experts import AotExperts

    args = _selection_arguments(monkeypatch, "fp8_dynamic")
    moe_logs.records.clear()

    def raising(*a, **k):
        raise NotImplementedError("No FP8 MoE backend supports the deployment configuration.")

    raising.__signature__ = inspect.signature(
        _vllm_original(sys.modules[FP8_MODULE].select_fp8_moe_backend))
    wrapper = hook._make_wrapper(raising, FP8_MODULE)
    with support.cpu_vllm(), sm90.set(H100):
        backend, cls = wrapper(**args)
    assert (backend.value, cls) == ("TRITON", AotExperts)
    lines = [r for r in moe_logs.records if "use AotExperts" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert "NotImplementedError" in lines[0].getMessage()
