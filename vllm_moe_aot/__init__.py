"""vllm-moe-aot: ahead-of-time compiled FP8 fused-MoE kernels for vLLM.

The core (contract, pipeline, runtime, configs, tuner, bench) imports no vLLM;
:mod:`vllm_moe_aot.integration` does, only when :func:`register` is asked to act, and so does
:mod:`vllm_moe_aot.stock` when a tool asks it for vLLM's own kernel to compare against.
"""

from __future__ import annotations

__version__ = "0.1.0"

#: the value of VLLM_MOE_BACKEND that turns the plugin on
BACKEND_NAME = "asmjit_aot"


def register() -> None:
    """vLLM general-plugin entry point (group ``vllm.general_plugins``).

    Does nothing unless ``VLLM_MOE_BACKEND=asmjit_aot``; safe to call any number of times.
    """
    from vllm_moe_aot.integration.plugin import register as _register

    _register()
