"""Helpers for the vLLM integration tests (tests/test_integration_*.py).

Builds real vLLM 0.33 FP8 MoE layers on a CPU-only machine through vLLM's own classes, as
``notes/vllm-0.33-on-cpu.md`` describes: a CPU ``VllmConfig``, ``FusedMoEFactory`` with
``tp_size=dp_size=pcp_size=1``, vLLM's workspace manager on the CPU, and torch stand-ins for
the few compiled ops the CUDA wheel lacks here (assigned to ``vllm._custom_ops``
attributes, which every caller reads at call time).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from dataclasses import dataclass
from typing import Any

import pytest
import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0

@functools.cache
def vllm_problem() -> str:
    """Why vLLM cannot be imported here ("" when it can). Importing it takes seconds, so only
    the modules that need it ask."""
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the machine
        return f"vllm is not importable: {type(exc).__name__}: {exc}"
    return ""


def requires_vllm() -> pytest.MarkDecorator:
    """Skip (with the reason) when vLLM cannot be imported."""
    problem = vllm_problem()
    return pytest.mark.skipif(bool(problem), reason=problem or "vllm importable")


_prefixes = itertools.count()

#: the schemes the hook takes, as the layer kinds these helpers build
KINDS = ("fp8_static", "fp8_dynamic", "ct_channel_token", "ct_tensor_static",
         "ct_tensor_dynamic", "online_ptpc", "online_tensor")
#: block FP8 (128x128 weight blocks, activations per token per 128 columns): FP8 checkpoints
#: with ``weight_block_size: [128, 128]`` and compressed-tensors ``strategy: block``; their N
#: and K must be multiples of 128 (:data:`BLOCK_SHAPE`)
BLOCK_KINDS = ("fp8_block", "ct_block")
#: block FP8 layers that are not taken: 64x64 weight blocks
OTHER_BLOCK_KINDS = ("fp8_block64", "ct_block64")


# --- torch stand-ins for vLLM's compiled ops ---------------------------------------------------

def scaled_fp8_quant(input, scale=None, num_token_padding=None, scale_ub=None,
                     use_per_token_if_dynamic=False, output=None, group_shape=None):
    """``vllm._custom_ops.scaled_fp8_quant`` in torch (per tensor / per token, static or
    dynamic); dynamic scales floored like vLLM's kernel."""
    x = input.float()
    if scale is None:
        if use_per_token_if_dynamic:
            scale = x.abs().amax(dim=-1, keepdim=True) / FP8_MAX
        else:
            scale = (x.abs().amax() / FP8_MAX).reshape(1)
        scale = scale.clamp(min=1.0 / (FP8_MAX * 512.0))
    s = scale.float()
    q = (x / (s if s.dim() == x.dim() else s.reshape(-1)[0])).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    if output is not None:
        output.copy_(q)
        q = output
    return q, scale


def per_token_group_quant_fp8(x, group_size, eps=1e-10, dtype=None, column_major_scales=False,
                              tma_aligned_scales=False, out_q=None, use_ue8m0=None):
    """``fp8_utils.per_token_group_quant_fp8`` in torch (row-major fp32 scales, no UE8M0
    rounding: what vLLM's kernel computes on a machine without DeepGEMM's E8M0)."""
    assert not column_major_scales and not tma_aligned_scales and not use_ue8m0
    shape = x.shape
    g = x.float().reshape(*shape[:-1], shape[-1] // group_size, group_size)
    scale = g.abs().amax(dim=-1, keepdim=True).clamp(min=eps) / FP8_MAX
    q = (g / scale).clamp(-FP8_MAX, FP8_MAX).to(dtype or FP8).reshape(shape)
    if out_q is not None:
        out_q.copy_(q)
        q = out_q
    return q, scale.squeeze(-1).contiguous()


def silu_and_mul(out: torch.Tensor, x: torch.Tensor) -> None:
    n = x.shape[-1] // 2
    out.copy_((torch.nn.functional.silu(x[..., :n].float()) * x[..., n:].float()).to(out.dtype))


def moe_sum(input: torch.Tensor, output: torch.Tensor, topk_ids=None, expert_map=None) -> None:
    output.copy_(input.float().sum(dim=1).to(output.dtype))


@pytest.fixture
def fake_ops(monkeypatch):
    """Install the stand-ins; returns a dict of call counters."""
    import vllm._custom_ops as ops
    from vllm.model_executor.layers.fused_moe import activation

    calls = {"scaled_fp8_quant": 0, "silu_and_mul": 0, "moe_sum": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(ops, "scaled_fp8_quant", counted("scaled_fp8_quant", scaled_fp8_quant))
    monkeypatch.setattr(ops, "moe_sum", counted("moe_sum", moe_sum))

    real_apply = activation.apply_moe_activation

    def apply_moe_activation(act, output, input, *args, **kwargs):
        if act == activation.MoEActivation.SILU:
            calls["silu_and_mul"] += 1
            return silu_and_mul(output, input)
        return real_apply(act, output, input, *args, **kwargs)

    monkeypatch.setattr(activation, "apply_moe_activation", apply_moe_activation)
    import vllm.model_executor.layers.fused_moe.modular_kernel as mk

    monkeypatch.setattr(mk, "apply_moe_activation", apply_moe_activation, raising=False)
    # block FP8: vLLM's per-token-group quantisation runs a CUDA op or a Triton kernel (vLLM
    # disables Triton without a GPU driver); the name fused_moe.utils calls it by
    from vllm.model_executor.layers.fused_moe import utils as moe_utils

    calls["per_token_group_quant_fp8"] = 0
    monkeypatch.setattr(moe_utils, "per_token_group_quant_fp8",
                        counted("per_token_group_quant_fp8", per_token_group_quant_fp8))
    return calls


# --- plugin state --------------------------------------------------------------------------------

@pytest.fixture
def plugin_on(monkeypatch):
    """``VLLM_MOE_BACKEND=asmjit_aot`` and the plugin registered; undone afterwards."""
    from vllm_moe_aot import BACKEND_NAME, caches
    from vllm_moe_aot.integration import ENV_VAR, plugin

    monkeypatch.setenv(ENV_VAR, BACKEND_NAME)
    caches.clear_all()
    plugin.register()
    yield
    caches.clear_all()


class Captured:
    """Log records of the ``vllm.moe_aot`` tree (vLLM stops propagation at ``vllm``, so
    pytest's caplog, which listens on the root logger, would miss them)."""

    def __init__(self) -> None:
        import logging

        self.records: list[logging.LogRecord] = []
        outer = self

        class _H(logging.Handler):
            def emit(self, record):
                outer.records.append(record)

        self.handler = _H(level=logging.DEBUG)

    @property
    def messages(self) -> list[str]:
        return [r.getMessage() for r in self.records]

    def matching(self, text: str) -> list[str]:
        return [m for m in self.messages if text in m]


@pytest.fixture
def moe_logs():
    import logging

    from vllm_moe_aot.integration import LOGGER_NAME

    cap = Captured()
    log = logging.getLogger(LOGGER_NAME)
    old = log.level
    log.setLevel(logging.DEBUG)
    log.addHandler(cap.handler)
    yield cap
    log.removeHandler(cap.handler)
    log.setLevel(old)


# --- building vLLM layers on the CPU -------------------------------------------------------------

@contextlib.contextmanager
def cpu_vllm(**parallel):
    """A fresh CPU ``VllmConfig`` as the current config, with vLLM's workspace manager."""
    from vllm.config import DeviceConfig, ParallelConfig, VllmConfig, set_current_vllm_config
    from vllm.v1.worker import workspace

    cfg = VllmConfig(device_config=DeviceConfig(device="cpu"),
                     parallel_config=ParallelConfig(**parallel))
    with set_current_vllm_config(cfg):
        if getattr(workspace, "_manager", None) is None:
            workspace.init_workspace_manager(torch.device("cpu"))
        yield cfg


def load_oracle_backends() -> None:
    """Import what vLLM's FP8 MoE oracle would import lazily (every binding module of the hook,
    every backend's experts class), so that stand-ins can patch those modules beforehand."""
    from vllm.model_executor.layers.fused_moe.oracle import fp8 as oracle

    from vllm_moe_aot.integration import hook

    if not hook.is_installed():  # importing every binding module imports the oracle's
        hook.install()
        hook.uninstall()
    for backend in oracle.Fp8MoeBackend:
        try:
            oracle.backend_to_kernel_cls(backend)
        except ValueError:
            pass


@functools.cache
def h100_platform() -> type:
    """A vLLM ``Platform`` class reporting an H100 (CUDA, capability 9.0, e4m3fn fp8): set
    as ``current_platform.__class__`` for a while, it makes the oracle see an sm_90 GPU."""
    from vllm.platforms.interface import DeviceCapability, Platform, PlatformEnum

    class H100Platform(Platform):
        _enum = PlatformEnum.CUDA
        device_name = "cuda"
        device_type = "cuda"
        dispatch_key = "CUDA"
        ray_device_key = "GPU"

        @classmethod
        def get_device_capability(cls, device_id: int = 0):
            return DeviceCapability(9, 0)

        @classmethod
        def get_device_name(cls, device_id: int = 0) -> str:
            return "NVIDIA H100 80GB HBM3"

        @classmethod
        def supports_fp8(cls) -> bool:
            return True

        @classmethod
        def is_fp8_fnuz(cls) -> bool:
            return False

        @classmethod
        def fp8_dtype(cls) -> torch.dtype:
            return torch.float8_e4m3fn

    return H100Platform


#: block FP8 kinds -> their weight block
BLOCKS = {"fp8_block": [128, 128], "ct_block": [128, 128], "fp8_block64": [64, 64],
          "ct_block64": [64, 64]}


def quant_config(kind: str):
    """vLLM's quantization config that gives the FP8 MoE method of ``kind``."""
    if kind in ("fp8_static", "fp8_dynamic", "fp8_block", "fp8_block64"):
        from vllm.model_executor.layers.quantization.fp8 import Fp8Config

        return Fp8Config(is_checkpoint_fp8_serialized=True,
                         activation_scheme="static" if kind == "fp8_static" else "dynamic",
                         weight_block_size=BLOCKS.get(kind))
    if kind in ("ct_block", "ct_block64"):
        from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (  # noqa: E501
            CompressedTensorsConfig,
        )

        # llm-compressor's FP8_BLOCK scheme: static block weights, dynamic 1x128 groups
        return CompressedTensorsConfig.from_config({
            "format": "float-quantized",
            "config_groups": {"group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "strategy": "block",
                            "block_structure": BLOCKS[kind], "dynamic": False,
                            "symmetric": True},
                "input_activations": {"num_bits": 8, "type": "float", "strategy": "group",
                                      "group_size": 128, "dynamic": True, "symmetric": True},
            }},
            "ignore": [],
            "quant_method": "compressed-tensors",
        })
    if kind.startswith("ct_"):
        from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (  # noqa: E501
            CompressedTensorsConfig,
        )

        strategy_w, strategy_a, dynamic = {
            "ct_channel_token": ("channel", "token", True),
            "ct_tensor_static": ("tensor", "tensor", False),
            "ct_tensor_dynamic": ("tensor", "tensor", True),
        }[kind]
        return CompressedTensorsConfig.from_config({
            "format": "float-quantized",
            "config_groups": {"group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "strategy": strategy_w,
                            "dynamic": False, "symmetric": True},
                "input_activations": {"num_bits": 8, "type": "float", "strategy": strategy_a,
                                      "dynamic": dynamic, "symmetric": True},
            }},
            "ignore": [],
            "quant_method": "compressed-tensors",
        })
    if kind in ("online_ptpc", "online_tensor"):
        from vllm.config.quantization import resolve_quantization_config
        from vllm.model_executor.layers.quantization.online.base import (
            OnlineQuantizationConfig,
        )

        name = "fp8_per_channel" if kind == "online_ptpc" else "fp8_per_tensor"
        return OnlineQuantizationConfig(resolve_quantization_config(name, None))
    raise ValueError(kind)


def scheme_of(kind: str):
    from vllm_moe_aot.shapes import Scheme

    return {"fp8_static": Scheme.FP8_PER_TENSOR_STATIC,
            "ct_tensor_static": Scheme.FP8_PER_TENSOR_STATIC,
            "fp8_dynamic": Scheme.FP8_PER_TENSOR_DYNAMIC,
            "ct_tensor_dynamic": Scheme.FP8_PER_TENSOR_DYNAMIC,
            "online_tensor": Scheme.FP8_PER_TENSOR_DYNAMIC,
            "ct_channel_token": Scheme.FP8_PTPC,
            "online_ptpc": Scheme.FP8_PTPC,
            "fp8_block": Scheme.FP8_BLOCK,
            "ct_block": Scheme.FP8_BLOCK}[kind]


@dataclass
class Layer:
    kind: str
    runner: Any  # MoERunner
    experts: Any  # RoutedExperts (the layer holding the parameters)

    @property
    def method(self):
        return self.experts.quant_method

    @property
    def fused_experts(self):
        kernel = getattr(self.method, "moe_kernel", None)
        return None if kernel is None else kernel.fused_experts


def ep_parallel_config(ep_size: int = 2, ep_rank: int = 0, dp_size: int = 1,
                       all2all_backend: str = "allgather_reducescatter"):
    """vLLM's ``FusedMoEParallelConfig`` of one rank under expert parallelism, as
    ``FusedMoEParallelConfig.make`` gives it with ``--enable-expert-parallel`` (TP folded into
    EP: ``tp_size`` 1). ``dp_size`` 1: EP over TP ranks, no all2all (tokens replicated);
    ``dp_size`` > 1: ``all2all_backend`` dispatches."""
    from vllm.model_executor.layers.fused_moe.config import FusedMoEParallelConfig

    return FusedMoEParallelConfig(tp_size=1, tp_rank=0, pcp_size=1, pcp_rank=0,
                                  dp_size=dp_size, dp_rank=0, ep_size=ep_size,
                                  ep_rank=ep_rank, sp_size=1, use_ep=True,
                                  all2all_backend=all2all_backend, enable_eplb=False)


@contextlib.contextmanager
def one_tp_rank():
    """vLLM's block-FP8 shape checks ask the TP group's size, which a CPU test has no group
    for: one rank (the layers are built with ``tp_size=1``)."""
    from unittest import mock

    import vllm.distributed
    import vllm.model_executor.layers.quantization.fp8 as fp8

    with mock.patch.object(vllm.distributed, "get_tensor_model_parallel_world_size",
                           lambda *a, **k: 1), \
            mock.patch.object(fp8, "get_tensor_model_parallel_world_size",
                              lambda *a, **k: 1):
        yield


@contextlib.contextmanager
def parallel_config(config):
    """Layers built inside get ``config`` as their ``FusedMoEParallelConfig`` (vLLM's
    ``FusedMoEFactory`` would ask the distributed groups, which a CPU test has none of).
    The DeepEP / NIXL hidden-size roundings need those packages (absent here): K unchanged."""
    from unittest import mock

    import vllm.model_executor.layers.fused_moe.all2all_utils as all2all_utils
    import vllm.model_executor.layers.fused_moe.layer as moe_layer

    with mock.patch.object(moe_layer, "make_parallel_config", lambda **kw: config), \
            mock.patch.object(all2all_utils, "maybe_roundup_layer_hidden_size",
                              lambda hidden_size, act_dtype, moe_parallel_config: hidden_size):
        yield config


def make_layer(kind: str, E: int, K: int, N: int, topk: int, seed: int = 0,
               load: bool = True, parallel=None) -> Layer:
    """Create an FP8 MoE layer of ``kind`` (``E`` global experts) and, with ``load``, fill it
    with random weights and run its ``process_weights_after_loading`` (must be inside
    :func:`cpu_vllm`). ``parallel``: the layer's ``FusedMoEParallelConfig``
    (:func:`ep_parallel_config`), else no parallelism."""
    from vllm.model_executor.layers.fused_moe.layer import FusedMoEFactory

    with parallel_config(parallel) if parallel is not None else contextlib.nullcontext(), \
            one_tp_rank():
        runner = FusedMoEFactory(num_experts=E, top_k=topk, hidden_size=K,
                                 intermediate_size=N, params_dtype=torch.bfloat16,
                                 quant_config=quant_config(kind), tp_size=1, dp_size=1,
                                 pcp_size=1, prefix=f"model.layers.{next(_prefixes)}.mlp.experts")
    layer = Layer(kind, runner, runner.routed_experts)
    if load:
        load_random_weights(layer, seed)
    return layer


def load_random_weights(layer: Layer, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    ex = layer.experts
    if layer.kind.startswith("online_"):
        E, K, N = ex.local_num_experts, ex.hidden_size, ex.intermediate_size_per_partition
        for e in range(E):
            for shard, rows, cols in (("w1", N, K), ("w3", N, K), ("w2", K, N)):
                param = ex.w2_weight if shard == "w2" else ex.w13_weight
                w = (torch.randn(rows, cols, generator=g) * 0.05).bfloat16()
                param.weight_loader(param, w, f"experts.{e}.{shard}.weight", shard_id=shard,
                                    expert_id=e)
        if not getattr(ex, "_already_called_process_weights_after_loading", False):
            layer.method.process_weights_after_loading(ex)
        return
    w13, w2 = ex.w13_weight, ex.w2_weight
    w13.data.copy_((torch.randn(w13.shape, generator=g) * 64).clamp(-448, 448).to(FP8))
    w2.data.copy_((torch.randn(w2.shape, generator=g) * 64).clamp(-448, 448).to(FP8))
    # block FP8 (Fp8MoEMethod): w13_weight_scale_inv [E, 2N/128, K/128], w2 [E, K/128, N/128]
    suffix = "weight_scale_inv" if hasattr(ex, "w13_weight_scale_inv") else "weight_scale"
    for name in (f"w13_{suffix}", f"w2_{suffix}"):
        p = getattr(ex, name)
        p.data.copy_(torch.rand(p.shape, generator=g) * 2e-4 + 1e-4)
    for name in ("w13_input_scale", "w2_input_scale"):
        p = getattr(ex, name, None)
        if p is not None:
            p.data.copy_(torch.full(p.shape, 0.02) + torch.rand(p.shape, generator=g) * 0.01)
    layer.method.process_weights_after_loading(ex)


def routing(M: int, E: int, topk: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.rand(M, E, generator=g).argsort(dim=1)[:, :topk].to(torch.int32).contiguous()
    w = torch.rand(M, topk, generator=g)
    return (w / w.sum(1, keepdim=True)).float().contiguous(), ids


def forward(layer: Layer, x: torch.Tensor, topk_weights: torch.Tensor,
            topk_ids: torch.Tensor, expert_map: torch.Tensor | None = None) -> torch.Tensor:
    """The layer's modular kernel (prepare -> experts -> finalize) on given routing, with the
    layer's own ``expert_map`` (None without EP), or ``expert_map`` when given."""
    ex = layer.experts
    if expert_map is None:
        return layer.method.apply(ex, x, topk_weights, topk_ids, None, None)
    return layer.method.moe_kernel.apply(
        hidden_states=x, w1=ex.w13_weight, w2=ex.w2_weight, topk_weights=topk_weights,
        topk_ids=topk_ids, activation=ex.activation, global_num_experts=ex.global_num_experts,
        expert_map=expert_map, apply_router_weight_on_input=False)


def reference(layer: Layer, x, topk_weights, topk_ids, quantize_activations: bool = True,
              expert_map: torch.Tensor | None = None, act_group: int = 0):
    """float64 reference of the layer as loaded (scales as the experts object holds them);
    under EP ``topk_ids`` are global ids and ``expert_map`` maps them to the local experts."""
    from vllm_moe_aot.measure.reference import reference_moe

    qc = layer.fused_experts.quant_config
    ex = layer.experts
    return reference_moe(x, ex.w13_weight, ex.w2_weight, qc.w1_scale, qc.w2_scale,
                         topk_weights, topk_ids, scheme_of(layer.kind), qc.a1_scale,
                         qc.a2_scale, quantize_activations=quantize_activations,
                         expert_map=expert_map, act_group=act_group)


# --- tuned configs and the pipeline ------------------------------------------------------------

def write_tuned(directory, shape, scheme, choices: dict[int, str], gpu: str = "cpu",
                arch: str = "interpreter", name: str = "test_fp8_tp1.tuned.csv"):
    """A tuned CSV whose rows send batch size M to ``choices[M]`` ("stock" or a variant)."""
    from pathlib import Path

    from vllm_moe_aot.dispatch.configs import RowKey, TunedRow
    from vllm_moe_aot.dispatch.configs import write_tuned as _write

    rows = [TunedRow(key=RowKey.of(shape, scheme, m), gpu=gpu, arch=arch, cu_num=1,
                     backend="stock" if c == "stock" else "aot",
                     variant="" if c == "stock" else c, us=10.0, stock_us=12.0,
                     stock_provider="test", speedup=1.2, tflops=1.0, gbps=1.0, err=1e-3,
                     version="test", tuned_at="2026-11-25T00:00:00")
            for m, c in sorted(choices.items())]
    path = Path(directory) / name
    _write(path, rows)
    return path


def real_pipeline_problem() -> str:
    """Why the real pipeline cannot run here ("" when its manifest loads)."""
    try:
        from vllm_moe_aot.runtime.manifest import Manifest

        Manifest.load()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


@pytest.fixture
def pipeline_kind(monkeypatch):
    """"real": the real FusedMoE through the Triton interpreter (needs the code-object
    manifest); "stand-in": tests/_moe_fakes.FakeFusedMoE, which computes the float64 reference,
    when no manifest is there yet."""
    problem = real_pipeline_problem()
    if not problem:
        return "real"
    import warnings

    import vllm_moe_aot.pipeline as pipeline
    from tests import _moe_fakes

    warnings.warn(f"integration tests use the stand-in pipeline: {problem}", stacklevel=2)
    monkeypatch.setattr(pipeline, "FusedMoE", _moe_fakes.FakeFusedMoE)
    return "stand-in"


def pick_variants(shape, scheme, kind: str) -> tuple[str, str]:
    """Two variants to route to: (single-token one, multi-token one)."""
    if kind == "stand-in":
        return "fake_w8a8", "fake_w8a16"
    from vllm_moe_aot.pipeline import FusedMoE

    names = FusedMoE(shape, scheme, torch.device("cpu"), max_tokens=8).variants
    gemv = next(v for v in names if v.startswith("gemv"))
    grouped = next(v for v in names if v.startswith("grouped"))
    return gemv, grouped


class StockSpy:
    """Stands in for the delegate's ``apply`` (vLLM's Triton MoE cannot run here): records
    each call's arguments the tests look at and writes a marker (7.0) into the output."""

    def __init__(self):
        self.calls = []

    def __call__(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation,
                 global_num_experts, expert_map, a1q_scale, a2_scale, *rest):
        self.calls.append(dict(hidden_states=hidden_states, a1q_scale=a1q_scale,
                               a2_scale=a2_scale, expert_map=expert_map,
                               global_num_experts=global_num_experts,
                               apply_router_weight_on_input=rest[-1]))
        output.fill_(7.0)


def spy_on_stock(experts, monkeypatch) -> StockSpy:
    """Put a :class:`StockSpy` in place of ``experts``' delegate ``apply``; returns it."""
    spy = StockSpy()
    monkeypatch.setattr(experts.stock, "apply", spy)
    return spy


def forbid_pipeline(experts, monkeypatch) -> None:
    """Make any run of ``experts``' AOT pipeline fail the test."""
    monkeypatch.setattr(experts.metadata.pipeline, "run",
                        lambda *a, **k: pytest.fail("the pipeline must not run"))
