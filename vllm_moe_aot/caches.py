"""Every process-wide cache and once-flag of the package, cleared by one call.

A module that keeps state for the whole process (loaded runtimes, shared workspaces and
pipelines, dispatch tables, log-once memory, manifest counts, the plugin's registration)
registers how to forget it with :func:`register`; :func:`clear_all` forgets everything that
has been registered so far (tests; a serving process never needs it). Standard library only.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

_lock = threading.Lock()
_resets: dict[str, Callable[[], None]] = {}


def register(name: str, reset: Callable[[], None]) -> Callable[[], None]:
    """Record ``reset`` as the way to clear the cache called ``name``; returns ``reset``."""
    with _lock:
        _resets[name] = reset
    return reset


def names() -> list[str]:
    with _lock:
        return sorted(_resets)


def clear_all() -> None:
    """Clear every registered cache (in registration order)."""
    with _lock:
        resets = list(_resets.values())
    for reset in resets:
        reset()
