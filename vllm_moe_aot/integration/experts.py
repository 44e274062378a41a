"""``AotExperts``: vLLM 0.33 FP8 MoE experts that run the AOT pipeline where it was tuned faster,
and vLLM's own choice of experts for every other batch.

How the object learns its weights: vLLM's FP8 MoE methods (``Fp8MoEMethod``, the
compressed-tensors W8A8 FP8 method, the online FP8 methods) never call
``fused_experts.process_weights_after_loading``. They build the kernel at the end of their own
``process_weights_after_loading``, once the checkpoint's scales have been converted, by
constructing the experts with a ``FusedMoEQuantConfig`` that holds those final scales (the
layer's parameters). The weights themselves arrive with every ``apply`` call. So the
metadata is built in ``__init__`` (``process_weights_after_loading`` stays an idempotent entry
for callers that do call it).

The delegate ("stock"): the hook asks vLLM's unhooked oracle what it would pick for the layer
and answers a subclass made by :meth:`AotExperts.delegating_to` that knows the choice
(``TritonExperts`` for ``TRITON``, ``TritonOrCutlassExperts`` for ``VLLM_CUTLASS``; vLLM's other
choices cannot share the pipeline's weights and keep the layer, see
:mod:`vllm_moe_aot.integration.providers`). ``__init__`` builds that class exactly as
``make_fp8_moe_kernel`` would, ``cls(moe_config=..., quant_config=...)``, with the same quant
config: vLLM builds its experts at this same point (after the weights are loaded, on the
worker), so nothing is deferred. If it cannot be built the delegate is ``TritonExperts`` (one
warning with the cause). ``AotExperts`` itself delegates to ``TritonExperts``.

Inputs: ``expects_unquantized_inputs`` is True whenever the pipeline is in use, so ``apply``
receives bf16 hidden states (the pipeline quantises them itself, per scheme). Batches that go
to the delegate are quantised inside ``apply`` with vLLM's own ``moe_kernel_quantize_input`` and
the layer's quant config, exactly the call vLLM's prepare step would have made, then handed to
the delegate. The AOT path allocates nothing and never synchronises; the delegate allocates
what it always allocates.

Block FP8 (``Fp8MoEMethod`` with ``weight_block_size: [128, 128]``, compressed-tensors
``strategy: block``): the quant config's ``w1_scale``/``w2_scale`` are vLLM's ``weight_scale_inv``
(``[E, 2N/128, K/128]`` / ``[E, K/128, N/128]`` fp32), which the pipeline takes as they are;
activations are quantised per token per 128 columns (by the pipeline, or for stock batches by
vLLM's ``per_token_group_quant_fp8`` in ``apply``). Other block sizes (a checkpoint's own, or
128x128 refined by vLLM to fit a TP shard) and E8M0 block scales are not built: those layers
stay with vLLM (:func:`scheme_unsupported_reason`).

Expert parallelism: layers in vLLM's standard activation format are taken (EP without DP, where
every rank sees all tokens, and EP over the all-gather / reduce-scatter path); the shape's
``E`` is the rank's local experts and ``ep`` vLLM's ``ep_size``, and ``apply`` hands vLLM's
``expert_map`` to the pipeline. Layers whose all2all backend dispatches with its own kernels
(DeepEP, MoRI, NIXL, FlashInfer NVLink, MoonEP, passthrough; some in the batched format) stay
with vLLM (:func:`parallel_unsupported_reason`), as do uneven expert splits.
"""

from __future__ import annotations

import logging
import os
import threading

import torch
import vllm.model_executor.layers.fused_moe.modular_kernel as mk
from vllm.model_executor.layers.fused_moe.activation import MoEActivation
from vllm.model_executor.layers.fused_moe.config import (
    FusedMoEConfig,
    FusedMoEParallelConfig,
    FusedMoEQuantConfig,
)
from vllm.model_executor.layers.fused_moe.experts.triton_moe import TritonExperts
from vllm.model_executor.layers.fused_moe.topk_weight_and_reduce import (
    TopKWeightAndReduceNoOP,
)
from vllm.model_executor.layers.fused_moe.utils import moe_kernel_quantize_input
from vllm.model_executor.layers.quantization.utils.quant_utils import (
    QuantKey,
    kFp8Dynamic128Sym,
    kFp8DynamicTensorSym,
    kFp8DynamicTokenSym,
    kFp8Static128BlockSym,
    kFp8StaticChannelSym,
    kFp8StaticTensorSym,
)

from vllm_moe_aot.contract import INTERPRETER, STOCK
from vllm_moe_aot.device import cuda_arch
from vllm_moe_aot.info import PlatformInfo, platform_info
from vllm_moe_aot.integration import get_logger, log_once
from vllm_moe_aot.integration.metadata import DEFAULT_MAX_TOKENS, ExpertMetadata
from vllm_moe_aot.integration.providers import NO_BACKEND_DELEGATE, provider_name
from vllm_moe_aot.shapes import WEIGHT_BLOCK, MoEShape, Scheme, unsupported_reason

logger = get_logger("experts")

#: (weight key, activation key) the oracle passes -> our scheme
SCHEME_BY_KEYS: dict[tuple[QuantKey, QuantKey], Scheme] = {
    (kFp8StaticTensorSym, kFp8StaticTensorSym): Scheme.FP8_PER_TENSOR_STATIC,
    (kFp8StaticTensorSym, kFp8DynamicTensorSym): Scheme.FP8_PER_TENSOR_DYNAMIC,
    # compressed-tensors hands per-tensor weights with dynamic per-tensor activations to the
    # oracle as the 1x128 group key; its quant config is plain dynamic per tensor.
    (kFp8StaticTensorSym, kFp8Dynamic128Sym): Scheme.FP8_PER_TENSOR_DYNAMIC,
    (kFp8StaticChannelSym, kFp8DynamicTokenSym): Scheme.FP8_PTPC,
    # 128x128 weight blocks (weight_scale_inv), activations per token per 128 columns
    (kFp8Static128BlockSym, kFp8Dynamic128Sym): Scheme.FP8_BLOCK,
}

#: scale dtypes read as they are (converted to fp32 once); E8M0 (``float8_e8m0fnu``, or
#: UE8M0 packed in int32 / uint8) is not one of them
_FLOAT_SCALES = (torch.float32, torch.bfloat16, torch.float16)

#: why block FP8 layers of other block sizes stay with vLLM
OTHER_BLOCKS = "block sizes other than 128x128 are not built"


def _block_shape_text(block) -> str:
    return "x".join(str(int(b)) for b in block)


def scheme_unsupported_reason(weight_key: QuantKey | None,
                              activation_key: QuantKey | None) -> str | None:
    """Why the pipeline does not take this (weight key, activation key) pair, None when it
    does (:data:`SCHEME_BY_KEYS`). Block keys get a reason of their own: the block size when
    it is not 128x128 (vLLM encodes the block, refined ones too, in the key), or the scale
    dtype when it is not fp32 (E8M0, DeepGEMM's UE8M0)."""
    if (weight_key, activation_key) in SCHEME_BY_KEYS:
        return None
    scale = getattr(weight_key, "scale", None)
    group = getattr(scale, "group_shape", None)
    if group is not None and group[0] > 1 and group[1] > 1:  # a block key
        if scale.dtype != torch.float32:
            return (f"block-quantised FP8 with {scale.dtype} block scales: E8M0 (power-of-two, "
                    "DeepGEMM's UE8M0) block scales are not taken; the pipeline takes fp32 "
                    "weight_scale_inv")
        if tuple(group) != WEIGHT_BLOCK:
            return (f"block-quantised FP8 with {_block_shape_text(group)} weight blocks: "
                    f"{OTHER_BLOCKS}")
        return (f"block-quantised FP8 weights with activations {activation_key} (the pipeline "
                "quantises them dynamically per token per 128 columns)")
    return f"quantization scheme {weight_key} x {activation_key}"


def vllm_platform_info() -> PlatformInfo:
    """This process's GPU, asked through vLLM's platform (NVML/amdsmi: no CUDA init)."""
    from vllm.platforms import current_platform as p

    if p.is_cuda():
        cap = p.get_device_capability()
        arch = cuda_arch(cap.major, cap.minor) if cap is not None else "sm_unknown"
        return platform_info(torch.device("cuda"), p.get_device_name(), arch)
    if p.is_rocm():
        from vllm.platforms import rocm

        arch = "gfx942" if rocm.on_gfx942() else "gfx950" if rocm.on_gfx950() else "gfx"
        return platform_info(torch.device("cuda"), p.get_device_name(), arch)
    if os.environ.get("TRITON_INTERPRET") == "1":
        return platform_info(torch.device("cpu"), "cpu", INTERPRETER)
    return PlatformInfo(None, None, None, False, f"no GPU ({type(p).__name__})")


def layer_shape(moe_config: FusedMoEConfig) -> MoEShape:
    """The per-rank shape: local experts, hidden, intermediate per partition, top-k, and the
    expert-parallel ranks (``ep_size`` under ``use_ep``, else 1)."""
    pc = moe_config.moe_parallel_config
    return MoEShape(E=moe_config.num_local_experts, K=moe_config.hidden_dim,
                    N=moe_config.intermediate_size_per_partition,
                    topk=moe_config.experts_per_token, ep=pc.ep_size if pc.use_ep else 1)


def expert_split_problem(moe_config: FusedMoEConfig) -> str | None:
    """Why the layer's expert counts do not fit ``MoEShape`` (None when they do): the pipeline
    takes ``E`` local experts of ``E * ep`` global ones (vLLM's ``num_experts``, redundant
    EPLB experts included), the same count on every rank. vLLM spreads experts unevenly when
    ``ep`` does not divide them (some ranks hold one more)."""
    shape = layer_shape(moe_config)
    G = moe_config.num_experts
    if G == shape.global_experts:
        return None
    if shape.ep > 1 and G % shape.ep:
        return (f"uneven expert split: {G} experts over ep={shape.ep} ranks, {shape.E} on "
                "this rank (the pipeline takes the same number of experts on every rank)")
    return (f"{shape.E} experts on this rank with ep={shape.ep} do not make the layer's {G} "
            "global experts")


#: what the all2all backends do with the tokens, for the reason a layer stays with vLLM
_ALL2ALL_KIND = {
    "deepep_high_throughput": "DeepEP high-throughput dispatch/combine",
    "deepep_low_latency": "DeepEP low-latency dispatch/combine, batched activation format",
    "deepep_v2": "DeepEP v2 dispatch/combine",
    "mori_high_throughput": "MoRI dispatch/combine",
    "mori_low_latency": "MoRI dispatch/combine",
    "moonep": "MoonEP dispatch/combine with redundant experts",
    "nixl_ep": "NIXL EP dispatch/combine, batched activation format",
    "flashinfer_all2allv": "FlashInfer NVLink two-sided all2all",
    "flashinfer_nvlink_two_sided": "FlashInfer NVLink two-sided all2all",
    "flashinfer_nvlink_one_sided": "FlashInfer NVLink one-sided all2all",
}


def parallel_unsupported_reason(pc: FusedMoEParallelConfig) -> str | None:
    """Why ``AotExperts`` cannot run under this parallel config (None when it can).

    It takes vLLM's standard activation format: ``[M, K]`` tokens, ``topk_ids`` of global
    experts and vLLM's ``expert_map``. That is TP/DP without EP, EP without an all2all
    (``not use_all2all_kernels``: EP over TP ranks, tokens replicated, the output all-reduced)
    and EP over the all-gather / reduce-scatter path (``use_ag_rs_all2all_kernels``). Every
    other all2all backend dispatches and combines with its own kernels (and some in the
    batched format): those layers stay with vLLM.
    """
    backend = pc.all2all_backend
    if pc.use_passthrough_all2all:
        return (f"all2all backend {backend} (the experts dispatch and combine themselves; "
                "AotExperts takes the standard activation format only)")
    if pc.use_batched_activation_format or (pc.use_all2all_kernels
                                            and not pc.use_ag_rs_all2all_kernels):
        kind = _ALL2ALL_KIND.get(backend, "its own dispatch/combine")
        if pc.use_batched_activation_format and "batched" not in kind:
            kind += ", batched activation format"
        return (f"expert parallelism with the {backend} all2all backend ({kind}): AotExperts "
                "takes the standard activation format only (EP without DP, or "
                "allgather_reducescatter)")
    if not TritonExperts._supports_parallel_config(pc):  # the default delegate must run it
        return f"all2all backend {backend} (vLLM's TritonExperts does not support it)"
    return None


def scheme_for_quant_config(qc: FusedMoEQuantConfig) -> Scheme:
    """The scheme a layer's final quant config describes; ValueError if not ours."""
    if not qc.use_fp8_w8a8:
        raise ValueError(f"quant config is not FP8 W8A8 (quant dtype {qc.quant_dtype})")
    if qc.block_shape is not None:
        block = tuple(int(b) for b in qc.block_shape)
        if block != WEIGHT_BLOCK:
            raise ValueError(f"block-quantised FP8 with {_block_shape_text(block)} weight "
                             f"blocks: {OTHER_BLOCKS}")
        if qc.per_act_token_quant or qc.per_out_ch_quant:
            raise ValueError("block-quantised FP8 with per-token/per-channel scales as well")
        if qc.a1_scale is not None or qc.a2_scale is not None:
            raise ValueError("block-quantised FP8 with static activation scales")
        for name, scale in (("w1_scale", qc.w1_scale), ("w2_scale", qc.w2_scale)):
            if scale is not None and scale.dtype not in _FLOAT_SCALES:
                raise ValueError(f"block-quantised FP8 with {scale.dtype} {name}: E8M0 or "
                                 "packed UE8M0 block scales are not taken (the pipeline takes "
                                 "fp32 weight_scale_inv)")
        return Scheme.FP8_BLOCK
    if qc.per_out_ch_quant:
        if not qc.per_act_token_quant:
            raise ValueError("per-channel weights with per-tensor activations")
        return Scheme.FP8_PTPC
    if qc.per_act_token_quant:
        raise ValueError("per-tensor weights with per-token activations (VLLM_BATCH_INVARIANT)")
    return Scheme.FP8_PER_TENSOR_STATIC if qc.a1_scale is not None else (
        Scheme.FP8_PER_TENSOR_DYNAMIC)


def layer_unsupported_reason(moe_config: FusedMoEConfig, weight_key: QuantKey | None,
                             activation_key: QuantKey | None) -> str | None:
    """What vLLM's generic checks leave out; None when the AOT pipeline can take the layer."""
    reason = scheme_unsupported_reason(weight_key, activation_key)
    if reason is not None:
        return reason
    scheme = SCHEME_BY_KEYS[(weight_key, activation_key)]
    if moe_config.moe_backend != "auto":
        return f"--moe-backend {moe_config.moe_backend} was asked for explicitly"
    if moe_config.in_dtype != torch.bfloat16:
        return f"activation dtype {moe_config.in_dtype} (the pipeline takes bfloat16)"
    if moe_config.has_bias:
        return "expert biases"
    if any(v is not None for v in (moe_config.swiglu_limit, moe_config.swiglu_alpha,
                                    moe_config.swiglu_beta)):
        return "SwiGLU limit/alpha/beta"
    reason = parallel_unsupported_reason(moe_config.moe_parallel_config)
    if reason is not None:
        return reason
    from vllm.config import get_current_vllm_config_or_none

    vllm_config = get_current_vllm_config_or_none()
    if vllm_config is not None and vllm_config.parallel_config.enable_dbo:
        return ("dual-batch overlap (two micro-batches at once would share the pipeline's "
                "workspace)")
    reason = expert_split_problem(moe_config)
    if reason is not None:
        return reason
    reason = unsupported_reason(layer_shape(moe_config), scheme)
    return None if reason is None else f"shape {layer_shape(moe_config)}: {reason}"


def _backend_value(backend: object) -> str:
    return str(getattr(backend, "value", backend))


def delegate_problem(delegate: mk.FusedMoEExperts, moe_config: FusedMoEConfig) -> str | None:
    """Why ``delegate`` cannot run the batches ``AotExperts`` does not take inside the same
    modular kernel (None when it can): same standard-format prepare/finalize, and it writes
    the weighted, top-k-reduced ``[M, K]`` output itself, as the pipeline does."""
    if not isinstance(delegate, mk.FusedMoEExpertsModular):
        return f"{type(delegate).__name__} is a monolithic kernel (its own prepare/finalize)"
    if delegate.activation_format() != mk.FusedMoEActivationFormat.Standard:
        return f"{type(delegate).__name__} uses the {delegate.activation_format()} format"
    reduce = delegate.finalize_weight_and_reduce_impl()
    if not isinstance(reduce, TopKWeightAndReduceNoOP):
        return (f"{type(delegate).__name__} leaves the top-k reduction to finalize "
                f"({type(reduce).__name__})")
    K = moe_config.hidden_dim
    out = delegate.workspace_shapes(1, 2 * moe_config.intermediate_size_per_partition, K,
                                    moe_config.experts_per_token, moe_config.num_experts,
                                    moe_config.num_local_experts, None, moe_config.activation)[2]
    if tuple(out) != (1, K):
        return f"{type(delegate).__name__} writes a {tuple(out)} output for M=1, not (1, {K})"
    return None


_subclass_lock = threading.Lock()


class AotExperts(mk.FusedMoEExpertsModular):
    """Per batch size: the AOT pipeline (tuned faster) or the delegate, vLLM's own choice of
    experts for the layer (``stock``)."""

    #: vLLM's backend (``Fp8MoeBackend`` value) and experts class for this layer without the
    #: plugin: what runs every batch the pipeline does not take. Set on the subclasses
    #: :meth:`delegating_to` makes; ``AotExperts`` itself delegates to ``TritonExperts``.
    delegate_backend: str = "TRITON"
    delegate_cls: type[mk.FusedMoEExperts] = TritonExperts
    _delegating: dict[tuple[str, type], type[AotExperts]] = {}

    @classmethod
    def delegating_to(cls, backend: object,
                      experts_cls: type[mk.FusedMoEExperts] | None) -> type[AotExperts]:
        """The ``AotExperts`` class whose delegate is vLLM's choice ``(backend, experts_cls)``
        (an ``Fp8MoeBackend`` or its value; ``experts_cls`` None for ``NONE``, where vLLM has
        no FP8 MoE backend: ``TritonExperts``). One class per choice, importable by name from
        this module (so that it pickles)."""
        value = _backend_value(backend)
        if experts_cls is None:
            value, experts_cls = NO_BACKEND_DELEGATE, TritonExperts
        if (value, experts_cls) == (AotExperts.delegate_backend, AotExperts.delegate_cls):
            return AotExperts
        with _subclass_lock:
            sub = AotExperts._delegating.get((value, experts_cls))
            if sub is None:
                name = f"AotExperts_{experts_cls.__name__}"
                while name in globals():
                    name += "_"
                sub = type(name, (AotExperts,), {
                    "__module__": __name__, "__qualname__": name,
                    "__doc__": f"AotExperts delegating to vLLM's {experts_cls.__name__} "
                               f"({value}).",
                    "delegate_backend": value, "delegate_cls": experts_cls})
                globals()[name] = sub
                AotExperts._delegating[(value, experts_cls)] = sub
            return sub

    def __init__(
        self,
        moe_config: FusedMoEConfig,
        quant_config: FusedMoEQuantConfig,
        max_num_tokens: int | None = None,
        num_dispatchers: int | None = None,
    ):
        super().__init__(moe_config, quant_config, max_num_tokens, num_dispatchers)
        #: the delegate: vLLM's own choice of experts on the same quant config; every batch
        #: the pipeline does not take
        self.stock: mk.FusedMoEExpertsModular
        #: its ``Fp8MoeBackend`` value and short provider name (``vllm_cutlass``, ...)
        self.stock_backend: str
        self.stock, self.stock_backend = self._build_delegate()
        self.stock_provider: str = provider_name(self.stock_backend)
        self.metadata: ExpertMetadata | None = None
        #: why this layer runs stock at every batch size, when metadata could not be built
        self.fallback_reason: str | None = None
        self.process_weights_after_loading(None)

    def _build_delegate(self) -> tuple[mk.FusedMoEExpertsModular, str]:
        cls, backend = type(self).delegate_cls, type(self).delegate_backend
        if cls is not TritonExperts:
            try:
                delegate = cls(moe_config=self.moe_config, quant_config=self.quant_config)
                problem = delegate_problem(delegate, self.moe_config)
            except Exception as exc:  # e.g. a compiled op this build lacks
                problem = f"{type(exc).__name__}: {exc}"
            if problem is None:
                return delegate, backend
            log_once(logger, logging.WARNING,
                     f"vllm-moe-aot: cannot use vLLM's {cls.__name__} ({backend}) for the "
                     f"batches AotExperts does not take: {problem}; they go to vLLM's "
                     "TritonExperts")
        return TritonExperts(self.moe_config, self.quant_config), "TRITON"

    @property
    def stock_name(self) -> str:
        """``vLLM's <delegate class>`` (for log lines)."""
        return f"vLLM's {type(self.stock).__name__}"

    # --- what the oracle asks -----------------------------------------------------------------

    @staticmethod
    def is_supported_config(
        cls: type[mk.FusedMoEExperts],
        moe_config: FusedMoEConfig,
        weight_key: QuantKey | None,
        activation_key: QuantKey | None,
        activation_format: mk.FusedMoEActivationFormat,
    ) -> tuple[bool, str | None]:
        device = vllm_platform_info()
        if not device.supported:
            return False, f"kernel does not support this device: {device.note}"
        # before vLLM's generic checks, whose reasons would be the whole parallel config or
        # "kernel does not support quantization scheme ..." without the block size
        reason = (parallel_unsupported_reason(moe_config.moe_parallel_config)
                  or scheme_unsupported_reason(weight_key, activation_key))
        if reason is not None:
            return False, reason
        supported, reason = mk.FusedMoEExperts.is_supported_config(
            cls, moe_config, weight_key, activation_key, activation_format)
        if not supported:
            return False, reason
        reason = layer_unsupported_reason(moe_config, weight_key, activation_key)
        return reason is None, reason

    @staticmethod
    def activation_format() -> mk.FusedMoEActivationFormat:
        return mk.FusedMoEActivationFormat.Standard

    @staticmethod
    def _supports_current_device() -> bool:
        return vllm_platform_info().supported

    @staticmethod
    def _supports_no_act_and_mul() -> bool:
        return False

    @staticmethod
    def _supports_quant_scheme(weight_key: QuantKey | None,
                               activation_key: QuantKey | None) -> bool:
        return (weight_key, activation_key) in SCHEME_BY_KEYS

    @staticmethod
    def _supports_activation(activation: MoEActivation) -> bool:
        return activation == MoEActivation.SILU

    @staticmethod
    def _supports_parallel_config(moe_parallel_config: FusedMoEParallelConfig) -> bool:
        # TP, DP, and EP in the standard activation format (no all2all, or all-gather /
        # reduce-scatter): parallel_unsupported_reason says why not for the rest
        return parallel_unsupported_reason(moe_parallel_config) is None

    @staticmethod
    def _supports_batch_invariance() -> bool:
        return False  # the variant (and so the rounding) changes with the batch size

    # --- weights ------------------------------------------------------------------------------

    def process_weights_after_loading(self, layer: torch.nn.Module | None) -> None:
        """Build :class:`ExpertMetadata` once (from the quant config's final scales; the
        weights come with each ``apply``, and the pipeline checks them there); on any failure
        log the cause and run stock."""
        if self.metadata is not None or self.fallback_reason is not None:
            return
        shape = layer_shape(self.moe_config)
        try:
            problem = (parallel_unsupported_reason(self.moe_config.moe_parallel_config)
                       or expert_split_problem(self.moe_config))
            if problem is not None:  # built without the oracle's support check
                raise ValueError(problem)
            qc = self.quant_config
            scheme = scheme_for_quant_config(qc)
            from vllm_moe_aot.info import config_dir_arg

            self.metadata = ExpertMetadata.build(
                shape, scheme, qc.w1_scale, qc.w2_scale, qc.a1_scale, qc.a2_scale,
                max_tokens=max(1, min(DEFAULT_MAX_TOKENS, self.moe_config.max_num_tokens)),
                config_directory=config_dir_arg(),
                tp_size=self._tune_tp_size(),
            )
        except Exception as exc:  # anything at all: this layer runs stock, once said why
            self.fallback_reason = f"{type(exc).__name__}: {exc}"
            log_once(logger, logging.WARNING,
                     f"vllm-moe-aot: MoE layer {shape} runs {self.stock_name} at every batch "
                     f"size: {self.fallback_reason}")

    def _tune_tp_size(self) -> int | None:
        """The ``--tp`` of the tuning command this layer's hint names: the TP partitions of
        N without EP (vLLM flattens DP x TP into the MoE's ``tp_size``); under EP, where the
        MoE's ``tp_size`` is 1, vLLM's ``--tensor-parallel-size`` (None when unknown)."""
        if not self.moe_config.moe_parallel_config.use_ep:
            return self.moe_config.tp_size
        from vllm.config import get_current_vllm_config_or_none

        vllm_config = get_current_vllm_config_or_none()
        return None if vllm_config is None else vllm_config.parallel_config.tensor_parallel_size

    def _give_up(self, reason: str) -> None:
        """From now on this layer runs stock (and vLLM quantises its input again)."""
        self.metadata = None
        self.fallback_reason = reason
        log_once(logger, logging.ERROR,
                 f"vllm-moe-aot: MoE layer {layer_shape(self.moe_config)} runs "
                 f"{self.stock_name} from now on: {reason}")

    # --- forward ------------------------------------------------------------------------------

    @property
    def expects_unquantized_inputs(self) -> bool:
        # Only when some batch size may go to the pipeline, which quantises its input itself;
        # otherwise vLLM's prepare step does what it does for the delegate.
        # The trade-off under DP (EP or not) on the all-gather / reduce-scatter path: vLLM's
        # prepare quantises before it gathers, so with this True every rank's tokens cross the
        # links as bf16 (2 bytes per element) instead of fp8 plus scales (1 byte, and one fp32
        # per token for the per-token schemes). The pipeline takes bf16 [M, K] and quantises
        # per scheme itself (so stock batches are quantised again in apply); for the decode
        # and small prefill batches the pipeline is tuned for, the gathered bytes are small
        # beside the expert weights read.
        if self.metadata is not None and self.metadata.uses_pipeline:
            return True
        return self.stock.expects_unquantized_inputs

    def finalize_weight_and_reduce_impl(self) -> mk.TopKWeightAndReduce:
        # Both paths write the weighted, top-k-reduced [M, K] output themselves (a delegate
        # that does not is never used: delegate_problem).
        return TopKWeightAndReduceNoOP()

    def workspace_dtype(self, act_dtype: torch.dtype) -> torch.dtype:
        return self.stock.workspace_dtype(act_dtype)

    def workspace_shapes(self, M, N, K, topk, global_num_experts, local_num_experts,
                         expert_tokens_meta, activation):
        # The delegate's, for every M: vLLM's workspace manager locks its high-water mark after
        # profiling, so a size that depended on the M -> path choice could outgrow it later.
        # The pipeline's own workspace is allocated once, when the pipeline is built.
        return self.stock.workspace_shapes(M, N, K, topk, global_num_experts,
                                           local_num_experts, expert_tokens_meta, activation)

    def route(self, hidden_states: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, activation: MoEActivation,
              expert_map: torch.Tensor | None, apply_router_weight_on_input: bool,
              global_num_experts: int = -1) -> str:
        """``"stock"`` or the pipeline variant for this call (host-side checks only: attribute
        reads, no device work). Under expert parallelism ``topk_ids`` are global ids and
        ``expert_map`` (vLLM's: int32 over the global experts, global id -> local slot, -1 on
        another rank) goes to the pipeline; an EP layer without one, or a map the pipeline
        would not take, runs stock."""
        md = self.metadata
        if (md is None or not md.uses_pipeline
                or apply_router_weight_on_input or activation != MoEActivation.SILU
                or self.post_gemm2_hook is not None
                or hidden_states.dtype != torch.bfloat16 or not hidden_states.is_contiguous()
                or topk_ids.dtype != torch.int32 or topk_weights.dtype != torch.float32):
            return STOCK
        G = md.shape.global_experts
        if global_num_experts not in (-1, G):
            return STOCK
        if expert_map is None:
            if md.shape.ep != 1:
                return STOCK  # global ids without their map
        elif (expert_map.dtype != torch.int32 or expert_map.dim() != 1
              or expert_map.numel() != G or not expert_map.is_contiguous()
              or expert_map.device != hidden_states.device):
            return STOCK
        return md.choose(hidden_states.size(0))

    def apply(
        self,
        output: torch.Tensor,
        hidden_states: torch.Tensor,
        w1: torch.Tensor,
        w2: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        activation: MoEActivation,
        global_num_experts: int,
        expert_map: torch.Tensor | None,
        a1q_scale: torch.Tensor | None,
        a2_scale: torch.Tensor | None,
        workspace13: torch.Tensor,
        workspace2: torch.Tensor,
        expert_tokens_meta: mk.ExpertTokensMetadata | None,
        apply_router_weight_on_input: bool,
    ):
        variant = self.route(hidden_states, topk_weights, topk_ids, activation, expert_map,
                             apply_router_weight_on_input, global_num_experts)
        if variant != STOCK:
            md = self.metadata
            try:
                md.pipeline.run(variant, hidden_states, w1, w2, md.w13_scale, md.w2_scale,
                                topk_weights, topk_ids, output, md.a13_scale, md.a2_scale,
                                expert_map=expert_map)
                return None
            except Exception as exc:  # e.g. code objects that do not match this package
                self._give_up(f"the pipeline failed running {variant!r} at M="
                              f"{hidden_states.size(0)}: {type(exc).__name__}: {exc}")
        if hidden_states.dtype != w1.dtype and not self.stock.expects_unquantized_inputs:
            # We asked vLLM not to quantise (expects_unquantized_inputs): do what its prepare
            # step would have done for the delegate, with the same helper and quant config.
            assert a1q_scale is None
            qc = self.quant_config
            hidden_states, a1q_scale = moe_kernel_quantize_input(
                hidden_states, self.a1_scale, self.quant_dtype, self.per_act_token_quant,
                self.block_shape, is_scale_swizzled=qc.is_scale_swizzled,
                is_scale_transposed=qc.is_scale_transposed, mx_alignment=qc.mx_alignment)
        self.stock.post_gemm2_hook = self.post_gemm2_hook
        return self.stock.apply(output, hidden_states, w1, w2, topk_weights, topk_ids,
                                activation, global_num_experts, expert_map, a1q_scale,
                                a2_scale, workspace13, workspace2, expert_tokens_meta,
                                apply_router_weight_on_input)
