"""vLLM 0.33 integration: the general plugin, the FP8 MoE backend-selection hook and ``AotExperts``.

Only :mod:`.plugin`, :mod:`.hook` and :mod:`.experts` import vLLM, and only when the plugin is
asked to act (``VLLM_MOE_BACKEND=asmjit_aot``). :mod:`.metadata` and this module are vLLM-free.

Log lines go to a logger under ``vllm.`` (:data:`LOGGER_NAME`): vLLM configures handlers for its
``vllm`` logger only and stops propagation there, so a logger outside that tree would lose every
INFO line inside a vLLM process.
"""

from __future__ import annotations

import logging
import threading

from vllm_moe_aot import caches

#: parent logger of everything this package logs from inside vLLM
LOGGER_NAME = "vllm.moe_aot"

#: environment variable that selects the backend (owned by this plugin, unknown to vLLM itself)
ENV_VAR = "VLLM_MOE_BACKEND"

#: optional directory of tuned CSVs that replaces the shipped ``vllm_moe_aot/configs``
CONFIG_DIR_ENV = "VLLM_MOE_AOT_CONFIG_DIR"

_once_lock = threading.Lock()
_once_seen: set[tuple[str, str]] = set()


def get_logger(name: str) -> logging.Logger:
    """The logger ``vllm.moe_aot.<name>``."""
    return logging.getLogger(f"{LOGGER_NAME}.{name}")


def log_once(logger: logging.Logger, level: int, message: str) -> bool:
    """Log ``message`` the first time this process sees it on ``logger``; True if it logged.

    Sixty MoE layers of one model share a shape, so a per-layer cause would otherwise be
    repeated sixty times.
    """
    key = (logger.name, message)
    with _once_lock:
        if key in _once_seen:
            return False
        _once_seen.add(key)
    logger.log(level, message)
    return True


def _reset_log_once() -> None:
    """Forget what :func:`log_once` has seen (tests)."""
    with _once_lock:
        _once_seen.clear()


caches.register("integration.log_once", _reset_log_once)
