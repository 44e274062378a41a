"""The FP8 MoE backend-selection hook.

vLLM 0.33 has no registration API for MoE backends. Its FP8 quant methods pick their experts
class by calling ``select_fp8_moe_backend``, each through its own module-level name (bound by
``from ... import select_fp8_moe_backend``). :func:`install` replaces that name in every module
that binds it with a wrapper that knows which module it sits in:

- from the modules of the quant methods we serve (``Fp8MoEMethod``, the compressed-tensors
  W8A8 FP8 method, the online FP8 methods) the wrapper answers ``(TRITON, AotExperts)`` when
  ``AotExperts`` supports the layer (scheme, shape, GPU, parallel config, ...). ``TRITON`` is
  the backend whose weight conversion keeps the checkpoint layout and whose quant config is the
  standard ``fp8_w8a8`` one, which is what ``AotExperts`` and its stock delegate take.
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


def choose_experts(module: str, config: Any, weight_key: Any,
                   activation_key: Any) -> tuple[type | None, str | None]:
    """``(AotExperts, None)`` if we take this layer, else ``(None, why not)``."""
    taker = BINDINGS.get(module)
    if taker is None:
        return None, f"{module.rsplit('.', 1)[-1]} layers are not served by vllm-moe-aot"
    import vllm.model_executor.layers.fused_moe.modular_kernel as mk

    from vllm_moe_aot.integration.experts import AotExperts

    activation_format = (
        mk.FusedMoEActivationFormat.BatchedExperts
        if config.moe_parallel_config.use_batched_activation_format
        else mk.FusedMoEActivationFormat.Standard
    )
    supported, reason = AotExperts.is_supported_config(
        AotExperts, config, weight_key, activation_key, activation_format)
    if supported:
        return AotExperts, None
    return None, f"{taker} layer: {reason}"


def _make_wrapper(original: Callable, module: str) -> Callable:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def select_fp8_moe_backend(*args: Any, **kwargs: Any):
        if os.environ.get(ENV_VAR) == BACKEND_NAME:
            if _on_select is not None:
                _on_select()
            try:
                bound = signature.bind(*args, **kwargs)
                bound.apply_defaults()
                a = bound.arguments
                experts_cls, reason = choose_experts(module, a["config"], a["weight_key"],
                                                     a["activation_key"])
            except Exception as exc:  # never let a bug of ours break vLLM's own selection
                experts_cls, reason = None, f"hook error {type(exc).__name__}: {exc}"
                log_once(logger, logging.WARNING, f"vllm-moe-aot: {reason}; vLLM chooses")
            if experts_cls is not None:
                from vllm.model_executor.layers.fused_moe.oracle.fp8 import Fp8MoeBackend

                log_once(logger, logging.INFO,
                         f"vllm-moe-aot: {BINDINGS[module]} FP8 MoE layers use AotExperts "
                         "(the AOT pipeline per tuned batch size, vLLM's TritonExperts for the "
                         "rest)")
                return Fp8MoeBackend.TRITON, experts_cls
            log_once(logger, logging.INFO,
                     f"vllm-moe-aot: FP8 MoE layer left to vLLM's backend choice: {reason}")
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
