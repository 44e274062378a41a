"""Who runs the batches ``AotExperts`` does not take: vLLM 0.33's own choice, by name.

vLLM-free (importable without vLLM and without a GPU); :meth:`PlatformFlags.from_vllm` imports
vLLM when called.

At serve time the hook asks vLLM's real oracle (``select_fp8_moe_backend``, unhooked) and
``AotExperts`` delegates the batches it does not take to the experts class vLLM picked
(:mod:`.hook`, :mod:`.experts`). This module states the same decision as a rule, for callers
that want the answer without building a layer: the tuner, to name the stock provider in tuned
rows (:func:`stock_provider`), and ``info``-style reports. The rule covers the layer kinds of
the integration table (:data:`LAYER_KINDS`) on the GPUs the pipeline has code objects for; it
is checked against the installed vLLM's oracle on an sm_90 stand-in
(``tests/test_integration_delegate.py``). Conditions as in docs/vllm-integration.md:
``--moe-backend auto``, ``VLLM_USE_DEEP_GEMM`` not set explicitly, SiLU, bf16, standard activation
format. EP in the standard format gets the same answers for every layer kind but block FP8, for
which vLLM's order changes with EP (``ep`` > 1: FlashInfer CUTLASS first, then DeepGEMM, then
Triton; under TP Triton first: ``tests/test_integration_ep.py``).

Which of vLLM's choices ``AotExperts`` can delegate to (:data:`SHAREABLE_BACKENDS`): those whose
weights, scales and prepare/finalize are the ones the pipeline reads, i.e. vLLM converts the
checkpoint exactly as for ``TRITON`` (``w13`` ``[E, 2N, K]`` gate rows first, ``w2``
``[E, K, N]``), builds the standard ``fp8_w8a8`` quant config, a standard-format
prepare/finalize, and the experts reduce top-k themselves. ``TRITON`` and ``VLLM_CUTLASS`` do.
For block FP8 (``weight_scale_inv`` ``[E, 2N/128, K/128]`` / ``[E, K/128, N/128]``, activations
per token per 128 columns) ``TRITON`` keeps the checkpoint's weights and scales too; vLLM's
CUTLASS grouped GEMM takes no block FP8. The others convert the weights for their own kernel
(FlashInfer: ``w13`` and its block scales as ``[up; gate]``, per-tensor alphas folded into the
quant config; Humming/Marlin: repacked W8A16; AITER: shuffled; DeepGEMM: weights requantised to
power-of-two UE8M0 block scales, scales re-laid out for its TMA loads) or use a batched format; a
layer whose vLLM choice is one of them stays entirely with vLLM (:func:`delegate_provider`
answers None).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from vllm_moe_aot.shapes import Scheme

#: ``Fp8MoeBackend`` value -> the short provider name tuned rows and logs use
PROVIDER_BY_BACKEND: dict[str, str] = {
    "TRITON": "vllm_triton",
    "BATCHED_TRITON": "vllm_batched_triton",
    "VLLM_CUTLASS": "vllm_cutlass",
    "BATCHED_VLLM_CUTLASS": "vllm_batched_cutlass",
    "FLASHINFER_CUTLASS": "flashinfer_cutlass",
    "FLASHINFER_TRTLLM": "flashinfer_trtllm",
    "DEEPGEMM": "deepgemm",
    "BATCHED_DEEPGEMM": "batched_deepgemm",
    "HUMMING": "humming",
    "MARLIN": "marlin",
    "AITER": "aiter",
}

#: vLLM backends whose weights, quant config and prepare/finalize the pipeline shares
SHAREABLE_BACKENDS = frozenset({"TRITON", "VLLM_CUTLASS"})

#: the delegate when vLLM has no FP8 MoE backend for the platform (``NONE``: the CPU, where the
#: pipeline runs in the Triton interpreter for tests and demos)
NO_BACKEND_DELEGATE = "TRITON"

#: why a backend's layers cannot share the pipeline's weights (for the one log line)
NOT_SHAREABLE_WHY: dict[str, str] = {
    "FLASHINFER_CUTLASS": ("its weight conversion stores w13 (and block scales) as [up; gate] "
                           "(W31) and, per tensor, its quant config folds the scales into "
                           "per-tensor alphas"),
    "FLASHINFER_TRTLLM": "its weight conversion reorders and shuffles w13 and w2",
    "HUMMING": "its weight conversion repacks the weights for its W8A16 kernel",
    "MARLIN": "its weight conversion repacks the weights for its W8A16 kernel",
    "AITER": "its weight conversion shuffles w13 and w2",
    "DEEPGEMM": ("its weight conversion requantises the weights to power-of-two UE8M0 block "
                 "scales (VLLM_USE_DEEP_GEMM_E8M0, on by default) and re-lays out the scales "
                 "for DeepGEMM"),
}


def provider_name(backend: object) -> str:
    """Short provider name of an ``Fp8MoeBackend`` (the enum or its value)."""
    value = str(getattr(backend, "value", backend))
    return PROVIDER_BY_BACKEND.get(value, value.lower())


def not_shareable_reason(backend: object) -> str:
    value = str(getattr(backend, "value", backend))
    return NOT_SHAREABLE_WHY.get(value, "its weights or activation format differ from the "
                                        "pipeline's")


class QuantMethod(str, enum.Enum):
    """The vLLM 0.33 FP8 MoE quant methods the hook serves."""

    #: ``Fp8MoEMethod`` (FP8 checkpoints, ``quant_method: fp8``)
    FP8 = "fp8"
    #: ``CompressedTensorsW8A8Fp8MoEMethod``
    COMPRESSED_TENSORS = "compressed_tensors"
    #: ``Fp8PtpcOnlineMoEMethod`` / ``Fp8PerTensorOnlineMoEMethod`` (``--quantization
    #: fp8_per_channel`` / ``fp8_per_tensor`` on a bf16 checkpoint)
    ONLINE = "online"


@dataclass(frozen=True)
class LayerKind:
    """What a quant method hands vLLM's oracle for one scheme (names of vLLM's ``QuantKey``s)."""

    weight_key: str
    activation_key: str
    allow_vllm_cutlass: bool


#: (method, scheme) -> the oracle's arguments: the layer kinds of the integration table
LAYER_KINDS: dict[tuple[QuantMethod, Scheme], LayerKind] = {
    (QuantMethod.FP8, Scheme.FP8_PER_TENSOR_STATIC):
        LayerKind("kFp8StaticTensorSym", "kFp8StaticTensorSym", False),
    (QuantMethod.FP8, Scheme.FP8_PER_TENSOR_DYNAMIC):
        LayerKind("kFp8StaticTensorSym", "kFp8DynamicTensorSym", False),
    (QuantMethod.COMPRESSED_TENSORS, Scheme.FP8_PTPC):
        LayerKind("kFp8StaticChannelSym", "kFp8DynamicTokenSym", True),
    (QuantMethod.COMPRESSED_TENSORS, Scheme.FP8_PER_TENSOR_STATIC):
        LayerKind("kFp8StaticTensorSym", "kFp8StaticTensorSym", True),
    # compressed-tensors passes dynamic per-tensor activations as the 1x128 group key
    (QuantMethod.COMPRESSED_TENSORS, Scheme.FP8_PER_TENSOR_DYNAMIC):
        LayerKind("kFp8StaticTensorSym", "kFp8Dynamic128Sym", True),
    (QuantMethod.ONLINE, Scheme.FP8_PTPC):
        LayerKind("kFp8StaticChannelSym", "kFp8DynamicTokenSym", True),
    (QuantMethod.ONLINE, Scheme.FP8_PER_TENSOR_DYNAMIC):
        LayerKind("kFp8StaticTensorSym", "kFp8DynamicTensorSym", False),
    # block FP8, 128x128 weight blocks (``weight_block_size: [128, 128]``; compressed-tensors
    # ``strategy: block``), activations dynamic per token per 128 columns
    (QuantMethod.FP8, Scheme.FP8_BLOCK):
        LayerKind("kFp8Static128BlockSym", "kFp8Dynamic128Sym", False),
    (QuantMethod.COMPRESSED_TENSORS, Scheme.FP8_BLOCK):
        LayerKind("kFp8Static128BlockSym", "kFp8Dynamic128Sym", True),
}

#: the method a scheme usually comes from, when the caller (the tuner) knows only the scheme:
#: FP8 checkpoints (Hy3-FP8) for per tensor, ``--quantization fp8_per_channel`` for ptpc, FP8
#: checkpoints with ``weight_block_size: [128, 128]`` (the official FP8 releases) for block
DEFAULT_METHOD: dict[Scheme, QuantMethod] = {
    Scheme.FP8_PER_TENSOR_STATIC: QuantMethod.FP8,
    Scheme.FP8_PER_TENSOR_DYNAMIC: QuantMethod.FP8,
    Scheme.FP8_PTPC: QuantMethod.ONLINE,
    Scheme.FP8_BLOCK: QuantMethod.FP8,
}

_BLOCK = ("kFp8Static128BlockSym", "kFp8Dynamic128Sym")
# (weight key, activation key) pairs the experts classes accept (their _supports_quant_scheme)
_VLLM_CUTLASS = {("kFp8StaticChannelSym", "kFp8DynamicTokenSym"),
                 ("kFp8StaticTensorSym", "kFp8StaticTensorSym"),
                 ("kFp8StaticTensorSym", "kFp8DynamicTensorSym")}
_TRITON = _VLLM_CUTLASS | {_BLOCK}
_FLASHINFER_CUTLASS_SM90 = {("kFp8StaticTensorSym", "kFp8StaticTensorSym"), _BLOCK}
_DEEPGEMM = {_BLOCK}
_AITER = set(_TRITON)


@dataclass(frozen=True)
class PlatformFlags:
    """What vLLM's oracle consults about the machine, for the layer kinds above."""

    #: ``sm_90a``, ``gfx942``, ``gfx950``, another ``sm_XY`` / ``gfx...``, or ``cpu``
    arch: str
    #: FlashInfer's CUTLASS MoE is usable (vLLM's ``has_flashinfer_cutlass_fused_moe()``:
    #: ``flashinfer-cubin`` installed, or nvcc and ninja on the machine)
    flashinfer_cutlass_moe: bool = False
    #: vLLM's CUTLASS grouped GEMM is compiled for this GPU (``cutlass_group_gemm_supported()``;
    #: True for vLLM's CUDA wheel on sm_90)
    cutlass_grouped_gemm: bool = True
    #: Humming's kernels are installed (vLLM's ``has_humming()``; ``humming-kernels``, a
    #: dependency of vLLM 0.33); without them vLLM's W8A16 choice on sm_90 is Marlin
    humming: bool = True
    #: vLLM's DeepGEMM MoE is usable (``is_deep_gemm_supported()``: Hopper/Blackwell,
    #: ``VLLM_USE_DEEP_GEMM`` (default on) and DeepGEMM importable; vLLM 0.33's CUDA wheel
    #: vendors it, so True on an H100/H200). Only block FP8 under EP reaches it in the rule
    deep_gemm: bool = True
    #: ROCm: AITER's fused MoE is enabled (``VLLM_ROCM_USE_AITER=1``)
    aiter_moe: bool = False

    @classmethod
    def from_vllm(cls) -> PlatformFlags:
        """Ask the installed vLLM, through the same functions its oracle calls (NVML/amdsmi
        for the platform; no CUDA initialisation)."""
        from vllm.platforms import current_platform as p

        if p.is_cuda():
            # the module-level names the experts classes' support checks call
            from vllm.model_executor.layers.fused_moe.experts import (
                cutlass_moe,
                deep_gemm_moe,
                flashinfer_cutlass_moe,
                fused_humming_moe,
            )

            from vllm_moe_aot.device import cuda_arch

            cap = p.get_device_capability()
            arch = cuda_arch(cap.major, cap.minor) if cap is not None else "sm_unknown"
            return cls(arch=arch,
                       flashinfer_cutlass_moe=bool(
                           flashinfer_cutlass_moe.has_flashinfer_cutlass_fused_moe()),
                       cutlass_grouped_gemm=bool(cutlass_moe.cutlass_group_gemm_supported()),
                       humming=bool(fused_humming_moe.has_humming()),
                       deep_gemm=bool(deep_gemm_moe.is_deep_gemm_supported()))
        if p.is_rocm():
            from vllm._aiter_ops import rocm_aiter_ops
            from vllm.platforms import rocm

            arch = "gfx942" if rocm.on_gfx942() else "gfx950" if rocm.on_gfx950() else "gfx"
            return cls(arch=arch, cutlass_grouped_gemm=False, humming=False, deep_gemm=False,
                       aiter_moe=bool(rocm_aiter_ops.is_fused_moe_enabled()))
        return cls(arch="cpu", cutlass_grouped_gemm=False, humming=False, deep_gemm=False)


def _layer_kind(scheme: Scheme | str, method: QuantMethod | str | None) -> LayerKind:
    scheme = Scheme.parse(scheme) if isinstance(scheme, str) else scheme
    method = DEFAULT_METHOD[scheme] if method is None else QuantMethod(method)
    try:
        return LAYER_KINDS[(method, scheme)]
    except KeyError:
        raise ValueError(f"vLLM 0.33's {method.value} FP8 MoE method has no {scheme.value} "
                         "layers") from None


def vllm_backend(scheme: Scheme | str, method: QuantMethod | str | None = None,
                 flags: PlatformFlags | None = None, ep: int = 1) -> str | None:
    """The ``Fp8MoeBackend`` value vLLM 0.33's oracle picks for this layer kind without the
    plugin (``ep``: vLLM's ``ep_size``, > 1 under expert parallelism); ``"NONE"`` on the CPU;
    None where the rule does not cover the platform (GPUs the pipeline has no code objects
    for) or vLLM has no backend for the layer."""
    kind = _layer_kind(scheme, method)
    flags = PlatformFlags.from_vllm() if flags is None else flags
    keys = (kind.weight_key, kind.activation_key)
    if flags.arch == "cpu":
        return "NONE"
    if flags.arch == "sm_90a":
        if keys == _BLOCK and ep <= 1:
            return "TRITON"  # vLLM moves Triton to the front for block FP8 under TP on sm_90
        # priority on Hopper: FlashInfer TRT-LLM (Blackwell only), FlashInfer CUTLASS (moved to
        # the front for block FP8 under EP), DeepGEMM (block FP8 only), vLLM CUTLASS (if the
        # method allows it; no block FP8), Triton, then Humming ahead of Marlin (vLLM's
        # prioritize_humming on sm_90); both W8A16 kernels take any of these weight keys
        # whatever the activation key
        if flags.flashinfer_cutlass_moe and keys in _FLASHINFER_CUTLASS_SM90:
            return "FLASHINFER_CUTLASS"
        if flags.deep_gemm and keys in _DEEPGEMM:
            return "DEEPGEMM"
        if kind.allow_vllm_cutlass and flags.cutlass_grouped_gemm and keys in _VLLM_CUTLASS:
            return "VLLM_CUTLASS"
        if keys in _TRITON:
            return "TRITON"
        return "HUMMING" if flags.humming else "MARLIN"
    if flags.arch in ("gfx942", "gfx950"):
        if flags.aiter_moe:
            return "AITER" if keys in _AITER else None
        return "TRITON" if keys in _TRITON else None
    return None


def stock_provider(scheme: Scheme | str, method: QuantMethod | str | None = None,
                   flags: PlatformFlags | None = None, ep: int = 1) -> str | None:
    """Short name of what vLLM runs for this layer kind without the plugin (``vllm_cutlass``,
    ``flashinfer_cutlass``, ``vllm_triton``, ...); None where :func:`vllm_backend` is."""
    backend = vllm_backend(scheme, method, flags, ep)
    return None if backend is None else provider_name(backend)


def delegate_provider(scheme: Scheme | str, method: QuantMethod | str | None = None,
                      flags: PlatformFlags | None = None, ep: int = 1) -> str | None:
    """Short name of what runs the batches ``AotExperts`` does not take for this layer kind;
    None when the hook leaves the layer to vLLM altogether (vLLM's choice cannot share the
    pipeline's weights) or the rule does not cover the platform."""
    backend = vllm_backend(scheme, method, flags, ep)
    if backend == "NONE":
        return provider_name(NO_BACKEND_DELEGATE)
    if backend in SHAREABLE_BACKENDS:
        return provider_name(backend)
    return None
