"""What vLLM 0.33's FP8 MoE oracle picks on an H100 without the plugin, and what the hook
answers there: the table in docs/vllm-integration.md, checked against the installed vLLM.

The machine has no GPU, so the oracle is asked under a stand-in platform: vLLM's one
``current_platform`` object (every module bound the same one) is given a class that reports
CUDA capability 9.0, after every backend module is imported. Two things are not decided by
the platform and are set explicitly: ``cutlass_group_gemm_supported`` (a compiled op this
wheel lacks here; vLLM's CUDA wheel answers True on sm_90) and whether FlashInfer's CUTLASS MoE
is usable (``flashinfer-cubin`` installed, or nvcc and ninja on the machine), tried both ways.
"""

from __future__ import annotations

import pytest
import torch

from tests import integration_support as support

pytestmark = [pytest.mark.vllm, support.requires_vllm()]
plugin_on = support.plugin_on  # fixture

#: (label, weight key, activation key, allow_vllm_cutlass as the quant method passes it)
CASES = [
    ("fp8 static", "kFp8StaticTensorSym", "kFp8StaticTensorSym", False),
    ("fp8 dynamic", "kFp8StaticTensorSym", "kFp8DynamicTensorSym", False),
    ("ct channel x token", "kFp8StaticChannelSym", "kFp8DynamicTokenSym", True),
    ("ct tensor static", "kFp8StaticTensorSym", "kFp8StaticTensorSym", True),
    ("ct tensor dynamic", "kFp8StaticTensorSym", "kFp8Dynamic128Sym", True),
    ("online ptpc", "kFp8StaticChannelSym", "kFp8DynamicTokenSym", True),
    ("online per-tensor", "kFp8StaticTensorSym", "kFp8DynamicTensorSym", False),
    ("block fp8", "kFp8Static128BlockSym", "kFp8Dynamic128Sym", False),
    ("ct block", "kFp8Static128BlockSym", "kFp8Dynamic128Sym", True),
]

#: label -> (backend, experts class) with FlashInfer CUTLASS MoE usable / not usable
H100_WITHOUT_PLUGIN = {
    "fp8 static": (("FLASHINFER_CUTLASS", "FlashInferExperts"), ("TRITON", "TritonExperts")),
    "fp8 dynamic": (("TRITON", "TritonExperts"),) * 2,
    "ct channel x token": (("VLLM_CUTLASS", "TritonOrCutlassExperts"),) * 2,
    "ct tensor static": (("FLASHINFER_CUTLASS", "FlashInferExperts"),
                         ("VLLM_CUTLASS", "TritonOrCutlassExperts")),
    "ct tensor dynamic": (("HUMMING", "HummingIndexedExperts"),) * 2,
    "online ptpc": (("VLLM_CUTLASS", "TritonOrCutlassExperts"),) * 2,
    "online per-tensor": (("TRITON", "TritonExperts"),) * 2,
    "block fp8": (("TRITON", "TritonExperts"),) * 2,  # Triton first for block FP8 under TP
    "ct block": (("TRITON", "TritonExperts"),) * 2,
}

#: the binding each case's quant method calls through
MODULE = {
    "fp8 static": "vllm.model_executor.layers.quantization.fp8",
    "fp8 dynamic": "vllm.model_executor.layers.quantization.fp8",
    "block fp8": "vllm.model_executor.layers.quantization.fp8",
    "online ptpc": "vllm.model_executor.layers.quantization.online.fp8",
    "online per-tensor": "vllm.model_executor.layers.quantization.online.fp8",
}


@pytest.fixture
def h100(monkeypatch):
    import vllm._custom_ops as ops
    import vllm.platforms
    from vllm.model_executor.layers.fused_moe.experts import flashinfer_cutlass_moe

    support.load_oracle_backends()
    H100 = support.h100_platform()

    monkeypatch.setattr(ops, "cutlass_group_gemm_supported", lambda cap: 90 <= cap < 110)
    state = {"flashinfer": True}
    monkeypatch.setattr(flashinfer_cutlass_moe, "has_flashinfer_cutlass_fused_moe",
                        lambda: state["flashinfer"])
    platform = vllm.platforms.current_platform
    original = platform.__class__
    platform.__class__ = H100
    try:
        yield state
    finally:
        platform.__class__ = original


def _moe_config():
    from vllm.config import ParallelConfig
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.config import (
        FusedMoEConfig,
        FusedMoEParallelConfig,
        RoutingMethodType,
    )

    parallel = FusedMoEParallelConfig.make(tp_size_=1, pcp_size_=1, dp_size_=1, sp_size_=1,
                                           vllm_parallel_config=ParallelConfig())
    E, K, N, topk = 512, 4096, 128, 10  # Qwen3.5-397B-A17B per rank at TP8
    return FusedMoEConfig(num_experts=E, experts_per_token=topk, hidden_dim=K,
                          intermediate_size=N, num_local_experts=E, num_logical_experts=E,
                          activation=MoEActivation.SILU, device="cuda",
                          routing_method=RoutingMethodType.Renormalize,
                          moe_parallel_config=parallel, in_dtype=torch.bfloat16)


def _keys(case):
    from vllm.model_executor.layers.quantization.utils import quant_utils

    _label, wk, ak, cutlass = case
    return getattr(quant_utils, wk), getattr(quant_utils, ak), cutlass


@pytest.mark.parametrize("flashinfer", [True, False], ids=["flashinfer", "no-flashinfer"])
def test_vllm_choice_on_h100_without_the_plugin(h100, flashinfer):
    from vllm.model_executor.layers.fused_moe.oracle import fp8 as oracle

    h100["flashinfer"] = flashinfer
    with support.cpu_vllm():
        config = _moe_config()
        got = {}
        for case in CASES:
            wk, ak, cutlass = _keys(case)
            backend, cls = oracle.select_fp8_moe_backend(config, wk, ak,
                                                         allow_vllm_cutlass=cutlass)
            got[case[0]] = (backend.value, cls.__name__)
    want = {label: pair[0 if flashinfer else 1] for label, pair in H100_WITHOUT_PLUGIN.items()}
    assert got == want


def test_hook_on_h100_takes_the_supported_schemes(h100, plugin_on):
    """With the plugin on an H100 that has sm_90a code objects: AotExperts delegating to
    vLLM's own choice for every scheme we serve where that choice shares the pipeline's weights
    (block FP8 included: Triton under TP), vLLM's own choice otherwise."""
    import sys

    from vllm_moe_aot.info import code_objects_per_target

    if not code_objects_per_target().get("sm_90a"):
        pytest.skip("no sm_90a code objects in the manifest: the hook rightly defers")
    from vllm_moe_aot.integration.experts import AotExperts

    with support.cpu_vllm():
        config = _moe_config()
        for case in CASES:
            wk, ak, cutlass = _keys(case)
            name = MODULE.get(case[0], "vllm.model_executor.layers.quantization."
                                       "compressed_tensors.compressed_tensors_moe."
                                       "compressed_tensors_moe_w8a8_fp8")
            select = sys.modules[name].select_fp8_moe_backend
            backend, cls = select(config=config, weight_key=wk, activation_key=ak,
                                  allow_vllm_cutlass=cutlass)
            # vLLM's own answer, unhooked: AotExperts delegates to it where it shares the
            # pipeline's weights, else the layer stays with it (test_integration_delegate.py
            # covers every platform variant)
            from vllm_moe_aot.integration.hook import _ORIGINAL
            from vllm_moe_aot.integration.providers import SHAREABLE_BACKENDS

            vllm_backend, vllm_cls = getattr(select, _ORIGINAL)(
                config=config, weight_key=wk, activation_key=ak, allow_vllm_cutlass=cutlass)
            if vllm_backend.value in SHAREABLE_BACKENDS:
                assert backend.value == "TRITON" and issubclass(cls, AotExperts), case[0]
                assert cls.delegate_cls is vllm_cls, case[0]
            else:
                assert (backend, cls) == (vllm_backend, vllm_cls), case[0]
