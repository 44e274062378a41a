"""The FP8 MoE backend-selection hook.

vLLM 0.33 has no registration API for MoE backends. Its FP8 quant methods pick their experts
class by calling ``select_fp8_moe_backend``, each through its own module-level name (bound by
``from ... import select_fp8_moe_backend``). :func:`install` replaces that name in every module
that binds it with a wrapper that knows which module it sits in:

- from the modules of the quant methods we serve (``Fp8MoEMethod``, the compressed-tensors
  W8A8 FP8 method, the online FP8 methods), when ``AotExperts`` supports the layer (scheme,
  shape, GPU, parallel config, ...), the wrapper first asks vLLM's original function what it
  would pick for the layer (same arguments). If that choice can share the pipeline's weights
  (``TRITON``, ``VLLM_CUTLASS``: :data:`~vllm_moe_aot.integration.providers.SHAREABLE_BACKENDS`;
  or ``NONE``, no backend on this platform, the CPU) it answers
  ``(TRITON, AotExperts.delegating_to(choice))``: ``AotExperts`` runs the tuned batch sizes and
  hands the rest to vLLM's choice. ``TRITON`` is the backend whose weight conversion keeps the
  checkpoint layout and whose quant config is the standard ``fp8_w8a8`` one, which is what
  ``AotExperts`` and both shareable delegates take (for ``VLLM_CUTLASS`` vLLM converts and
  configures identically). Any other choice (FlashInfer CUTLASS, Humming, AITER, batched or
  monolithic kernels ...) converts the weights for its own kernel: the layer stays with vLLM,
  unchanged, and one line says why.
- otherwise, and always from the other modules (the oracle's own name, ModelOpt, Quark), it
  calls vLLM's original function: vLLM decides exactly as without the plugin.

Every module is imported before any is wrapped (a module imported after the oracle's name was
wrapped would bind the wrapper and get wrapped twice). Installing twice is a no-op;
:func:`uninstall` restores vLLM's function everywhere.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

from vllm_moe_aot import BACKEND_NAME
from vllm_moe_aot.integration import ENV_VAR, get_logger, log_once

logger = get_logger("hook")

ATTR = "select_fp8_moe_backend"
ORACLE_MODULE = "vllm.model_executor.layers.fused_moe.oracle.fp8"
CT_FP8_MODULE = ("vllm.model_executor.layers.quantization.compressed_tensors."
                 "compressed_tensors_moe.compressed_tensors_moe_w8a8_fp8")

#: every vLLM 0.33 module that binds ``select_fp8_moe_backend`` by name -> the quant methods
#: whose layers the hook may take through it (None: wrapped, but always vLLM's choice)
BINDINGS: dict[str, str | None] = {
    ORACLE_MODULE: None,
    "vllm.model_executor.layers.quantization.fp8": "Fp8MoEMethod",
    "vllm.model_executor.layers.quantization.online.fp8": "online FP8 MoE",
    CT_FP8_MODULE: "CompressedTensorsW8A8Fp8MoEMethod",
    "vllm.model_executor.layers.quantization.modelopt": None,
    "vllm.model_executor.layers.quantization.quark.quark_moe": None,
}

# attributes our wrappers carry
_ORIGINAL = "__vllm_moe_aot_original__"
_MODULE = "__vllm_moe_aot_module__"

_lock = threading.RLock()
#: called at every backend selection while the plugin is on (the plugin's start-up line);
#: set by :func:`install`, so this module never imports the plugin
_on_select: Callable[[], None] | None = None


def unsupported_reason(module: str, config: Any, weight_key: Any,
                       activation_key: Any) -> str | None:
    """Why ``AotExperts`` cannot take this layer (None when it can), before vLLM is asked."""
    taker = BINDINGS.get(module)
    if taker is None:
        return f"{module.rsplit('.', 1)[-1]} layers are not served by vllm-moe-aot"
    import vllm.model_executor.layers.fused_moe.modular_kernel as mk

    from vllm_moe_aot.integration.experts import AotExperts

    activation_format = (
        mk.FusedMoEActivationFormat.BatchedExperts
        if config.moe_parallel_config.use_batched_activation_format
        else mk.FusedMoEActivationFormat.Standard
    )
    supported, reason = AotExperts.is_supported_config(
        AotExperts, config, weight_key, activation_key, activation_format)
    return None if supported else f"{taker} layer: {reason}"


def delegate_for(vllm_choice: Any) -> tuple[type | None, str]:
    """Given vLLM's own answer for a layer ``AotExperts`` supports - ``(backend, experts
    class)``, the exception the oracle raised, or None when not asked - the ``AotExperts``
    class to answer and a note naming its delegate, or ``(None, why the layer stays with
    vLLM)``."""
    import vllm.model_executor.layers.fused_moe.modular_kernel as mk

    from vllm_moe_aot.integration.experts import AotExperts
    from vllm_moe_aot.integration.providers import (
        SHAREABLE_BACKENDS,
        not_shareable_reason,
        provider_name,
    )

    if vllm_choice is None:
        return AotExperts, "vLLM's TritonExperts"
    if isinstance(vllm_choice, BaseException):
        return AotExperts, (f"vLLM's TritonExperts (vLLM's own selection raised "
                            f"{type(vllm_choice).__name__}: {vllm_choice})")
    backend, experts_cls = vllm_choice
    value = str(getattr(backend, "value", backend))
    if experts_cls is None:  # NONE: vLLM has no FP8 MoE backend here (the CPU)
        return AotExperts.delegating_to(backend, None), (
            f"vLLM's TritonExperts (vLLM has no FP8 MoE backend on this platform: {value})")
    what = f"{experts_cls.__name__} ({value})"
    if not issubclass(experts_cls, mk.FusedMoEExpertsModular):
        return None, f"vLLM picks {what}, a monolithic kernel with its own prepare/finalize"
    if experts_cls.activation_format() != mk.FusedMoEActivationFormat.Standard:
        return None, (f"vLLM picks {what}, which takes the "
                      f"{experts_cls.activation_format().name} activation format")
    if value not in SHAREABLE_BACKENDS:
        return None, (f"vLLM picks {what}, and {not_shareable_reason(value)}: the AOT "
                      "pipeline cannot share its weights, so the whole layer stays with it")
    return AotExperts.delegating_to(backend, experts_cls), (
        f"vLLM's {experts_cls.__name__} ({provider_name(value)}, vLLM's own choice for this "
        "layer)")


def _scheme_name(weight_key: Any, activation_key: Any) -> str:
    from vllm_moe_aot.integration.experts import SCHEME_BY_KEYS

    scheme = SCHEME_BY_KEYS.get((weight_key, activation_key))
    return scheme.value if scheme is not None else f"{weight_key} x {activation_key}"


def _make_wrapper(original: Callable, module: str) -> Callable:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def select_fp8_moe_backend(*args: Any, **kwargs: Any):
        if os.environ.get(ENV_VAR) == BACKEND_NAME:
            if _on_select is not None:
                _on_select()
            answer: Any = None  # vLLM's own (backend, experts class), or what it raised
            experts_cls = None
            try:
                bound = signature.bind(*args, **kwargs)
                bound.apply_defaults()
                a = bound.arguments
                reason = unsupported_reason(module, a["config"], a["weight_key"],
                                            a["activation_key"])
                if reason is None:
                    try:
                        answer = original(*args, **kwargs)
                    except Exception as exc:  # vLLM without the plugin would raise this
                        answer = exc
                    experts_cls, note = delegate_for(answer)
                    if experts_cls is None:
                        reason = (f"{BINDINGS[module]} layer "
                                  f"({_scheme_name(a['weight_key'], a['activation_key'])}): "
                                  f"{note}")
            except Exception as exc:  # never let a bug of ours break vLLM's own selection
                experts_cls, reason = None, f"hook error {type(exc).__name__}: {exc}"
                log_once(logger, logging.WARNING, f"vllm-moe-aot: {reason}; vLLM chooses")
            if experts_cls is not None:
                from vllm.model_executor.layers.fused_moe.oracle.fp8 import Fp8MoeBackend

                log_once(logger,
                         logging.WARNING if isinstance(answer, BaseException) else logging.INFO,
                         f"vllm-moe-aot: {BINDINGS[module]} FP8 MoE layers "
                         f"({_scheme_name(a['weight_key'], a['activation_key'])}) use "
                         "AotExperts: the AOT pipeline for the batch sizes tuned faster; "
                         f"batches not taken go to {note}")
                return Fp8MoeBackend.TRITON, experts_cls
            log_once(logger, logging.INFO,
                     f"vllm-moe-aot: FP8 MoE layer left to vLLM's backend choice: {reason}")
            if isinstance(answer, tuple):
                return answer  # vLLM's own answer, asked once
        return original(*args, **kwargs)

    setattr(select_fp8_moe_backend, _ORIGINAL, original)
    setattr(select_fp8_moe_backend, _MODULE, module)
    return select_fp8_moe_backend


def install(on_select: Callable[[], None] | None = None) -> list[str]:
    """Wrap ``select_fp8_moe_backend`` in every binding module; returns those newly wrapped.
    ``on_select`` is called at each selection the plugin is on for."""
    global _on_select
    with _lock:
        if on_select is not None:
            _on_select = on_select
        modules = {}
        for name in BINDINGS:  # import all first, wrap after
            try:
                modules[name] = importlib.import_module(name)
            except Exception as exc:
                log_once(logger, logging.WARNING,
                         f"vllm-moe-aot: cannot import {name} ({type(exc).__name__}: {exc}); "
                         "its layers keep vLLM's backend choice")
        wrapped = []
        for name, module in modules.items():
            current = getattr(module, ATTR, None)
            if current is None:
                log_once(logger, logging.WARNING,
                         f"vllm-moe-aot: {name} has no {ATTR}; not a vLLM 0.33 layout?")
                continue
            if getattr(current, _MODULE, None) == name:
                continue  # ours already
            original = getattr(current, _ORIGINAL, current)
            setattr(module, ATTR, _make_wrapper(original, name))
            wrapped.append(name)
        return wrapped


def uninstall() -> None:
    """Put vLLM's own function back wherever one of our wrappers is bound."""
    with _lock:
        for name in BINDINGS:
            module = sys.modules.get(name)
            current = getattr(module, ATTR, None) if module is not None else None
            original = getattr(current, _ORIGINAL, None)
            if original is not None:
                setattr(module, ATTR, original)


def is_installed() -> bool:
    """True when every binding module is imported and bound to its own wrapper."""
    for name in BINDINGS:
        module = sys.modules.get(name)
        if module is None or getattr(getattr(module, ATTR, None), _MODULE, None) != name:
            return False
    return True
