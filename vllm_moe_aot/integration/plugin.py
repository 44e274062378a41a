"""vLLM general plugin (entry point ``vllm_moe_aot = "vllm_moe_aot:register"``).

vLLM calls :func:`register` in every process it starts, sometimes more than once. It does
nothing unless ``VLLM_MOE_BACKEND=asmjit_aot``; an unknown value gets one warning that lists
the valid ones. When on, it installs the backend-selection hook once per process and logs one
line: version, GPU arch, code objects available, tuned configs found (at registration when
vLLM's logging is set up by then, else at the hook's first backend selection).
"""

from __future__ import annotations

import logging
import os
import threading

from vllm_moe_aot import BACKEND_NAME, caches
from vllm_moe_aot.integration import ENV_VAR, get_logger, log_once

logger = get_logger("plugin")

#: values VLLM_MOE_BACKEND may take (unset or empty: the plugin stays out of the way)
VALID_VALUES = (BACKEND_NAME,)

_lock = threading.Lock()
_registered = False
_announced = False


def register() -> None:
    global _registered
    value = os.environ.get(ENV_VAR, "")
    if not value:
        return
    if value not in VALID_VALUES:
        log_once(logger, logging.WARNING,
                 f"vllm-moe-aot: {ENV_VAR}={value!r} is not a backend this plugin provides; "
                 f"valid values: {', '.join(VALID_VALUES)} (or unset for vLLM's own choice). "
                 "The plugin stays inactive.")
        return
    with _lock:
        if _registered:
            return
        from vllm_moe_aot.integration import hook

        hook.install(on_select=announce)
        _registered = True
    if logger.hasHandlers():
        announce()
    # else: vLLM has not configured its logging in this process yet (it does so after loading
    # plugins in some processes); the hook announces at its first backend selection instead.


def announce() -> None:
    """Log the start-up line, once per process (no-op before :func:`register`)."""
    global _announced
    with _lock:
        if not _registered or _announced:
            return
        _announced = True
    from vllm_moe_aot.info import summary_line
    from vllm_moe_aot.integration.experts import vllm_platform_info

    logger.info(summary_line(vllm_platform_info()))


def _reset() -> None:
    """Undo :func:`register` in this process (tests)."""
    global _registered, _announced
    with _lock:
        from vllm_moe_aot.integration import hook

        hook.uninstall()
        _registered = _announced = False


caches.register("integration.plugin", _reset)
