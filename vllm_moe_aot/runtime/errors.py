"""Errors raised by the code-object runtime.

Every message names the kernel (and code object file or driver call where there is one) and
says what to do about it.
"""

from __future__ import annotations

# the contract reads the manifest, so its two errors are defined there
from vllm_moe_aot.contract import AotRuntimeError, ManifestError

__all__ = ["AotRuntimeError", "CodeObjectError", "DriverError", "LaunchArgumentError",
           "ManifestError", "UnsupportedPlatformError"]


class CodeObjectError(AotRuntimeError):
    """A code object is missing, corrupt, built for another target, or cannot run here."""


class DriverError(AotRuntimeError):
    """A CUDA driver / HIP runtime call returned an error status."""

    def __init__(self, message: str, *, call: str, status: object, kernel: str | None = None):
        super().__init__(message)
        self.call = call
        self.status = status
        self.kernel = kernel


class UnsupportedPlatformError(AotRuntimeError):
    """The device is not one the shipped code objects were built for."""


class LaunchArgumentError(AotRuntimeError, TypeError):
    """``Kernel.launch`` got the wrong number, type or range of arguments, or a bad grid."""
