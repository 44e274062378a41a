"""The FP8 MoE backend-selection hook, on real vLLM 0.33 layers built on the CPU: which layers
get ``AotExperts`` and which keep vLLM's own choice (each deferral logs one line).

Without the hook, vLLM's oracle answers ``(Fp8MoeBackend.NONE, None)`` on this GPU-less
machine, so "vLLM's choice" is recognisable here as that answer.
"""

from __future__ import annotations

import dataclasses
import socket

import pytest

from tests import integration_support as support
from vllm_moe_aot import BACKEND_NAME
from vllm_moe_aot.integration import ENV_VAR
from vllm_moe_aot.shapes import MoEShape

pytestmark = [pytest.mark.vllm, support.requires_vllm()]
moe_logs, plugin_on, fake_ops = support.moe_logs, support.plugin_on, support.fake_ops  # fixtures

SHAPE = MoEShape(E=16, K=128, N=32, topk=2)


def build(kind: str, shape: MoEShape = SHAPE, load: bool = False):
    return support.make_layer(kind, shape.E, shape.K, shape.N, shape.topk, load=load)


@pytest.mark.parametrize("kind", support.KINDS)
def test_supported_schemes_get_aot_experts(kind, plugin_on, fake_ops, moe_logs):
    from vllm.model_executor.layers.fused_moe.oracle.fp8 import Fp8MoeBackend

    from vllm_moe_aot.integration.experts import AotExperts

    with support.cpu_vllm():
        layer = build(kind, load=True)
    assert layer.method.fp8_backend == Fp8MoeBackend.TRITON
    assert layer.method.experts_cls is AotExperts
    experts = layer.fused_experts
    assert isinstance(experts, AotExperts)
    assert experts.fallback_reason is None
    assert experts.metadata.scheme == support.scheme_of(kind)
    assert experts.metadata.shape == SHAPE
    assert any("use AotExperts" in m for m in moe_logs.messages)


def _assert_vllm_choice(layer):
    from vllm.model_executor.layers.fused_moe.oracle.fp8 import Fp8MoeBackend

    assert layer.method.fp8_backend == Fp8MoeBackend.NONE
    assert layer.method.experts_cls is None


@pytest.fixture
def model_parallel():
    """A one-rank gloo process group: block FP8 layers ask for the TP world size."""
    from vllm.distributed import parallel_state as ps

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with support.cpu_vllm():
        ps.init_distributed_environment(world_size=1, rank=0, local_rank=0,
                                        distributed_init_method=f"tcp://127.0.0.1:{port}",
                                        backend="gloo")
        ps.initialize_model_parallel(1, 1)
        try:
            yield
        finally:
            ps.destroy_model_parallel()
            ps.destroy_distributed_environment()


def test_block_fp8_128x128_is_taken_and_other_blocks_stay_with_vllm(plugin_on, model_parallel,
                                                                    moe_logs):
    """128x128 blocks (fp8_block, tests/test_integration_block.py): AotExperts; 64x64 blocks:
    vLLM's choice, one line naming the block size."""
    from vllm_moe_aot.integration.experts import AotExperts

    shape = MoEShape(E=16, K=128, N=128, topk=2)
    layer = build("fp8_block", shape)
    assert layer.method.experts_cls is AotExperts
    assert len(moe_logs.matching("(fp8_block) use AotExperts")) == 1, moe_logs.messages
    _assert_vllm_choice(build("fp8_block64", shape))
    lines = moe_logs.matching("left to vLLM's backend choice")
    assert len(lines) == 1 and "64x64 weight blocks: block sizes other than 128x128 are not " \
        "built" in lines[0], moe_logs.messages


def test_unsupported_shape_stays_with_vllm(plugin_on, moe_logs):
    with support.cpu_vllm():
        layer = build("fp8_static", MoEShape(E=16, K=128, N=48, topk=2))  # N % 32 != 0
    _assert_vllm_choice(layer)
    lines = moe_logs.matching("left to vLLM's backend choice")
    assert len(lines) == 1 and "N=48" in lines[0], moe_logs.messages


def test_unset_variable_leaves_vllm_alone(monkeypatch, plugin_on, moe_logs):
    """Hook installed, variable removed afterwards: the wrapper defers without a word."""
    monkeypatch.delenv(ENV_VAR)
    with support.cpu_vllm():
        layer = build("fp8_static")
    _assert_vllm_choice(layer)
    assert moe_logs.matching("AotExperts") == []


def test_unknown_variable_leaves_vllm_alone(monkeypatch, moe_logs):
    from vllm_moe_aot.integration import _reset_log_once, hook, plugin

    plugin._reset()
    _reset_log_once()
    monkeypatch.setenv(ENV_VAR, "asmjit")
    plugin.register()
    try:
        assert not hook.is_installed()
        with support.cpu_vllm():
            layer = build("ct_channel_token")
        _assert_vllm_choice(layer)
        assert len(moe_logs.matching("valid values")) == 1
    finally:
        plugin._reset()
        _reset_log_once()


def test_explicit_moe_backend_ep_formats_and_other_methods_defer(plugin_on, moe_logs):
    import sys

    import torch
    from vllm.model_executor.layers.quantization.utils.quant_utils import kFp8StaticTensorSym

    from vllm_moe_aot.integration import hook

    static = (kFp8StaticTensorSym, kFp8StaticTensorSym)
    fp8_module = "vllm.model_executor.layers.quantization.fp8"
    with support.cpu_vllm():
        config = build("fp8_static").experts.moe_config
        assert hook.unsupported_reason(fp8_module, config, *static) is None

        explicit = dataclasses.replace(config, moe_backend="triton")
        why = hook.unsupported_reason(fp8_module, explicit, *static)
        assert why is not None and "--moe-backend triton" in why

        # expert parallelism in the standard format is taken (8 of 16 experts on this rank);
        # an all2all backend with its own dispatch, or an uneven split, is not
        ep_pc = dataclasses.replace(config.moe_parallel_config, use_ep=True, ep_size=2)
        ep = dataclasses.replace(config, moe_parallel_config=ep_pc, num_local_experts=8)
        assert hook.unsupported_reason(fp8_module, ep, *static) is None
        deepep = dataclasses.replace(ep, moe_parallel_config=dataclasses.replace(
            ep_pc, dp_size=2, all2all_backend="deepep_high_throughput"))
        why = hook.unsupported_reason(fp8_module, deepep, *static)
        assert why is not None and "deepep_high_throughput all2all backend" in why
        uneven = dataclasses.replace(ep, num_experts=15)
        why = hook.unsupported_reason(fp8_module, uneven, *static)
        assert why is not None and "uneven expert split: 15 experts over ep=2" in why

        fp16 = dataclasses.replace(config, in_dtype=torch.float16)
        why = hook.unsupported_reason(fp8_module, fp16, *static)
        assert why is not None and "bfloat16" in why

        # ModelOpt's and Quark's bindings are wrapped but always answer with vLLM's function
        modelopt = sys.modules["vllm.model_executor.layers.quantization.modelopt"]
        _backend, cls = modelopt.select_fp8_moe_backend(
            config=config, weight_key=static[0], activation_key=static[1])
    assert cls is None
    assert len(moe_logs.matching("modelopt layers are not served")) == 1


@pytest.mark.parametrize("step", ["unsupported_reason", "delegate_for"])
def test_a_bug_in_the_hook_defers_to_vllm(step, monkeypatch, plugin_on, moe_logs):
    from vllm_moe_aot.integration import hook

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(hook, step, broken)
    with support.cpu_vllm():
        layer = build("fp8_dynamic")
    _assert_vllm_choice(layer)
    assert len(moe_logs.matching("hook error RuntimeError: boom")) >= 1


def test_oracle_env_value_is_read_per_call(monkeypatch, plugin_on):
    """A wrapper installed in one process state still follows the variable at call time."""
    monkeypatch.setenv(ENV_VAR, BACKEND_NAME)
    with support.cpu_vllm():
        assert build("fp8_dynamic").method.experts_cls is not None
