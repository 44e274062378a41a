"""What the delegate tests share (tests/test_integration_delegate*.py): the layer kinds, the
machines, the sm_90 stand-in and the helpers that build layers and read vLLM's answers. See
tests/test_integration_delegate.py for what the stand-in does."""


from __future__ import annotations

import contextlib
import importlib
import inspect
import sys

import pytest

from tests import integration_support as support
from vllm_moe_aot.integration import providers as P
from vllm_moe_aot.shapes import MoEShape, Scheme

moe_logs, plugin_on, fake_ops = support.moe_logs, support.plugin_on, support.fake_ops  # fixtures
pipeline_kind = support.pipeline_kind  # fixture


SHAPE = MoEShape(E=16, K=128, N=32, topk=2)
#: the block FP8 kinds' shape (N and K multiples of the 128x128 weight block)
BLOCK_SHAPE = MoEShape(E=16, K=128, N=128, topk=2)


def shape_of(kind: str) -> MoEShape:
    return BLOCK_SHAPE if kind in support.BLOCK_KINDS else SHAPE

FP8_MODULE = "vllm.model_executor.layers.quantization.fp8"
ONLINE_MODULE = "vllm.model_executor.layers.quantization.online.fp8"
CT_MODULE = ("vllm.model_executor.layers.quantization.compressed_tensors."
             "compressed_tensors_moe.compressed_tensors_moe_w8a8_fp8")

#: the helpers' layer kinds -> (binding module, the providers.LAYER_KINDS key)
KINDS = {
    "fp8_static": (FP8_MODULE, (P.QuantMethod.FP8, Scheme.FP8_PER_TENSOR_STATIC)),
    "fp8_dynamic": (FP8_MODULE, (P.QuantMethod.FP8, Scheme.FP8_PER_TENSOR_DYNAMIC)),
    "ct_channel_token": (CT_MODULE, (P.QuantMethod.COMPRESSED_TENSORS, Scheme.FP8_PTPC)),
    "ct_tensor_static": (CT_MODULE, (P.QuantMethod.COMPRESSED_TENSORS,
                                     Scheme.FP8_PER_TENSOR_STATIC)),
    "ct_tensor_dynamic": (CT_MODULE, (P.QuantMethod.COMPRESSED_TENSORS,
                                      Scheme.FP8_PER_TENSOR_DYNAMIC)),
    "online_ptpc": (ONLINE_MODULE, (P.QuantMethod.ONLINE, Scheme.FP8_PTPC)),
    "online_tensor": (ONLINE_MODULE, (P.QuantMethod.ONLINE, Scheme.FP8_PER_TENSOR_DYNAMIC)),
    "fp8_block": (FP8_MODULE, (P.QuantMethod.FP8, Scheme.FP8_BLOCK)),
    "ct_block": (CT_MODULE, (P.QuantMethod.COMPRESSED_TENSORS, Scheme.FP8_BLOCK)),
}

H100 = P.PlatformFlags(arch="sm_90a", flashinfer_cutlass_moe=True)
H100_NO_FI = P.PlatformFlags(arch="sm_90a", flashinfer_cutlass_moe=False)
#: the two machines the docs' table is about, then two less usual ones
MACHINES = {
    "flashinfer": H100,
    "no-flashinfer": H100_NO_FI,
    "no-cutlass-gemm": P.PlatformFlags(arch="sm_90a", cutlass_grouped_gemm=False),
    "no-humming": P.PlatformFlags(arch="sm_90a", humming=False),
    # vLLM's CUDA wheel vendors DeepGEMM; without it (or VLLM_USE_DEEP_GEMM=0) block FP8 under
    # EP goes to Triton when FlashInfer is not usable
    "no-deep-gemm": P.PlatformFlags(arch="sm_90a", flashinfer_cutlass_moe=False,
                                    deep_gemm=False),
}

#: what the table in docs/vllm-integration.md says vLLM picks on an H100/H200 (FlashInfer
#: usable, not usable), written out so that a change in vLLM or in the rule shows here
TABLE = {
    "fp8_static": ("FLASHINFER_CUTLASS", "TRITON"),
    "fp8_dynamic": ("TRITON", "TRITON"),
    "ct_channel_token": ("VLLM_CUTLASS", "VLLM_CUTLASS"),
    "ct_tensor_static": ("FLASHINFER_CUTLASS", "VLLM_CUTLASS"),
    "ct_tensor_dynamic": ("HUMMING", "HUMMING"),
    "online_ptpc": ("VLLM_CUTLASS", "VLLM_CUTLASS"),
    "online_tensor": ("TRITON", "TRITON"),
    # under TP vLLM moves Triton to the front for block FP8 on sm_90
    "fp8_block": ("TRITON", "TRITON"),
    "ct_block": ("TRITON", "TRITON"),
}

#: the backends AotExperts may delegate to, as a spec (not read from providers): vLLM converts
#: the weights and builds the quant config for them exactly as for TRITON, which is what the
#: hook answers (test_shareable_backends_load_the_layer_as_triton checks that against vLLM)
SHAREABLE = frozenset({"TRITON", "VLLM_CUTLASS"})

_DEEP_GEMM_AND_AITER = ("VLLM_USE_DEEP_GEMM", "VLLM_MOE_USE_DEEP_GEMM", "VLLM_ROCM_USE_AITER",
                        "VLLM_ROCM_USE_AITER_MOE")


class Sm90:
    """The stand-in; ``with sm90:`` makes vLLM's platform an sm_90 CUDA GPU for a while."""

    def __init__(self, monkeypatch):
        import vllm._custom_ops as ops
        import vllm.platforms
        from vllm.model_executor.layers.fused_moe.experts import (
            deep_gemm_moe,
            flashinfer_cutlass_moe,
            fused_humming_moe,
        )

        support.load_oracle_backends()
        for name in _DEEP_GEMM_AND_AITER:
            monkeypatch.delenv(name, raising=False)

        self.flags = H100
        self._cls = support.h100_platform()
        self._platform = vllm.platforms.current_platform
        self._depth = 0
        # the support functions, as the oracle's experts classes call them
        monkeypatch.setattr(ops, "cutlass_group_gemm_supported",
                            lambda cap: self.flags.cutlass_grouped_gemm and 90 <= cap < 110)
        monkeypatch.setattr(flashinfer_cutlass_moe, "has_flashinfer_cutlass_fused_moe",
                            lambda: self.flags.flashinfer_cutlass_moe)
        monkeypatch.setattr(fused_humming_moe, "has_humming", lambda: self.flags.humming)
        monkeypatch.setattr(deep_gemm_moe, "is_deep_gemm_supported",
                            lambda: self.flags.deep_gemm)
        self._monkeypatch = monkeypatch

    def set(self, flags: P.PlatformFlags) -> Sm90:
        assert flags.arch == "sm_90a"
        self.flags = flags
        return self

    @contextlib.contextmanager
    def _on(self):
        import vllm_moe_aot.info as info

        real_class, real_counts = self._platform.__class__, info.code_objects_per_target
        self._platform.__class__ = self._cls
        info.code_objects_per_target = lambda manifest=None: {"sm_90a": 43}
        try:
            yield self
        finally:
            self._platform.__class__ = real_class
            info.code_objects_per_target = real_counts

    def __enter__(self):
        self._ctx = self._on()
        return self._ctx.__enter__()

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


@pytest.fixture
def sm90(monkeypatch):
    return Sm90(monkeypatch)


def _vllm_original(fn):
    from vllm_moe_aot.integration import hook

    return getattr(fn, hook._ORIGINAL, fn)


class Selection:
    """Wraps one binding module's ``select_fp8_moe_backend`` (whatever is bound now: vLLM's
    function or the hook's wrapper) and records the arguments the quant method passes;
    ``standin`` set: the call runs under it, so the layer gets the sm_90 answer."""

    def __init__(self, monkeypatch, module: str, standin: Sm90 | None = None):
        self.module = module
        self.bound = importlib.import_module(module).select_fp8_moe_backend
        self.original = _vllm_original(self.bound)
        self.calls: list[dict] = []
        self.answers: list[tuple] = []
        signature = inspect.signature(self.original)

        def select_fp8_moe_backend(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            self.calls.append(dict(bound.arguments))
            with standin if standin is not None else contextlib.nullcontext():
                answer = self.bound(*args, **kwargs)
            self.answers.append(answer)
            return answer

        monkeypatch.setattr(sys.modules[module], "select_fp8_moe_backend",
                            select_fp8_moe_backend)

    @property
    def arguments(self) -> dict:
        assert len(self.calls) == 1, self.calls
        return self.calls[0]


def _build(kind: str, load: bool = False):
    shape = shape_of(kind)
    with support.cpu_vllm():
        return support.make_layer(kind, shape.E, shape.K, shape.N, shape.topk, load=load)


def _selection_arguments(monkeypatch, kind: str) -> dict:
    """What ``kind``'s quant method hands the oracle (the layer is built on the CPU)."""
    module, _ = KINDS[kind]
    with monkeypatch.context() as m:
        selection = Selection(m, module)
        _build(kind)
    return selection.arguments


def _choice(answer) -> tuple[str, type | None]:
    backend, cls = answer
    return backend.value, cls


