"""vllm-moe-aot: ahead-of-time compiled FP8 fused-MoE kernels for vLLM.

Layout: the serving core (``runtime``, ``pipeline``, ``dispatch``, ``integration``, with the
shared ``contract``, ``shapes`` and ``device``) runs inside vLLM; ``measure`` (bench, tune,
timing, workload, reference, peers) only measures; ``cli`` holds the commands. Only
:mod:`vllm_moe_aot.integration` imports vLLM, and only when :func:`register` is asked to act;
the measuring side's :mod:`vllm_moe_aot.measure.peers.vllm_triton` does when a tool asks it for
vLLM's own kernel to compare against.
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
