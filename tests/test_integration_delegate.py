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

import contextlib
import importlib
import inspect
import logging
import pickle
import sys

import pytest
import torch

from tests import integration_support as support
from vllm_moe_aot.integration import CONFIG_DIR_ENV
from vllm_moe_aot.integration import providers as P
from vllm_moe_aot.shapes import MoEShape, Scheme

pytestmark = [pytest.mark.vllm, support.requires_vllm()]
moe_logs, plugin_on, fake_ops = support.moe_logs, support.plugin_on, support.fake_ops  # fixtures
pipeline_kind = support.pipeline_kind  # fixture

SHAPE = MoEShape(E=16, K=128, N=32, topk=2)

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
}

H100 = P.PlatformFlags(arch="sm_90a", flashinfer_cutlass_moe=True)
H100_NO_FI = P.PlatformFlags(arch="sm_90a", flashinfer_cutlass_moe=False)
#: the two machines the docs' table is about, then two less usual ones
MACHINES = {
    "flashinfer": H100,
    "no-flashinfer": H100_NO_FI,
    "no-cutlass-gemm": P.PlatformFlags(arch="sm_90a", cutlass_grouped_gemm=False),
    "no-humming": P.PlatformFlags(arch="sm_90a", humming=False),
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
            flashinfer_cutlass_moe,
            fused_humming_moe,
        )
        from vllm.model_executor.layers.fused_moe.oracle import fp8 as oracle
        from vllm.platforms.interface import DeviceCapability, Platform, PlatformEnum

        from vllm_moe_aot.integration import hook

        if not hook.is_installed():  # import every binding module (and the oracle's imports)
            hook.install()
            hook.uninstall()
        for backend in oracle.Fp8MoeBackend:  # the oracle imports backends lazily: do it now
            try:
                oracle.backend_to_kernel_cls(backend)
            except ValueError:
                pass
        for name in _DEEP_GEMM_AND_AITER:
            monkeypatch.delenv(name, raising=False)

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

        self.flags = H100
        self._cls = H100Platform
        self._platform = vllm.platforms.current_platform
        self._depth = 0
        # the support functions, as the oracle's experts classes call them
        monkeypatch.setattr(ops, "cutlass_group_gemm_supported",
                            lambda cap: self.flags.cutlass_grouped_gemm and 90 <= cap < 110)
        monkeypatch.setattr(flashinfer_cutlass_moe, "has_flashinfer_cutlass_fused_moe",
                            lambda: self.flags.flashinfer_cutlass_moe)
        monkeypatch.setattr(fused_humming_moe, "has_humming", lambda: self.flags.humming)
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
    with support.cpu_vllm():
        return support.make_layer(kind, SHAPE.E, SHAPE.K, SHAPE.N, SHAPE.topk, load=load)


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


# --- the layer kinds ------------------------------------------------------------------------------

def test_the_kinds_cover_the_integration_table():
    assert sorted(KINDS) == sorted(support.KINDS)
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


@pytest.mark.parametrize("kind", ["fp8_static", "ct_channel_token", "ct_tensor_static"])
def test_shareable_backends_load_the_layer_as_triton(kind, plugin_on, fake_ops):
    """Why exactly TRITON and VLLM_CUTLASS can be delegates: vLLM's weight conversion and
    quant config for them are TRITON's (what the method gets from the hook), so the delegate
    reads the very tensors AotExperts was built on. FlashInfer CUTLASS's are not."""
    from vllm.model_executor.layers.fused_moe.oracle import fp8 as oracle

    assert P.SHAREABLE_BACKENDS == SHAREABLE
    layer = _build(kind, load=True)
    ex = layer.experts
    tensors = (ex.w13_weight, ex.w2_weight, ex.w13_weight_scale, ex.w2_weight_scale)
    inputs = (getattr(ex, "w13_input_scale", None), getattr(ex, "w2_input_scale", None))
    per_token = kind == "ct_channel_token"

    def load_as(backend: str, module):
        converted = oracle.convert_to_fp8_moe_kernel_format(
            oracle.Fp8MoeBackend(backend), module, *tensors, *inputs)
        qc = oracle.make_fp8_moe_quant_config(
            oracle.Fp8MoeBackend(backend), converted[2], converted[3], inputs[0], inputs[1],
            per_act_token_quant=per_token, per_out_ch_quant=per_token)
        return converted, qc

    triton_weights, triton_qc = load_as("TRITON", ex)
    assert all(a is b for a, b in zip(triton_weights, tensors, strict=True))  # checkpoint layout
    for backend in sorted(SHAREABLE):
        weights, qc = load_as(backend, ex)
        assert all(a is b for a, b in zip(weights, tensors, strict=True)), backend
        assert _quant_config_fields(qc) == _quant_config_fields(triton_qc), backend
    if kind != "ct_channel_token":  # FlashInfer CUTLASS takes the per-tensor static layers
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
    ws = experts.workspace_shapes(5, 2 * SHAPE.N, SHAPE.K, SHAPE.topk, SHAPE.E, SHAPE.E, None,
                                  layer.experts.moe_config.activation)
    assert ws == experts.stock.workspace_shapes(5, 2 * SHAPE.N, SHAPE.K, SHAPE.topk, SHAPE.E,
                                                SHAPE.E, None,
                                                layer.experts.moe_config.activation)
    assert ws[2] == (5, SHAPE.K)


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
