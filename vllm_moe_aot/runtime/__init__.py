"""Load and launch the AOT-compiled code objects listed in ``artifacts/manifest.json``.

The pipeline uses exactly this::

    from vllm_moe_aot.runtime import Runtime
    rt = Runtime.get(device)        # once per (process, device)
    k = rt.kernel("smoke_axpy")     # loads + validates the code object once
    k.launch(grid, *args, pdl=False)

``Runtime.get`` picks the launcher from the device: CUDA sm_90 -> :class:`CudaLauncher`
(target ``sm_90a``), ROCm gfx942/gfx950 -> :class:`HipLauncher`, ``cpu`` ->
:class:`InterpreterLauncher` (Triton interpreter, for CPU tests); anything else raises
:class:`UnsupportedPlatformError`.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from vllm_moe_aot import caches as _caches
from vllm_moe_aot.contract import INTERPRETER, REFERENCE_TARGET, TARGETS
from vllm_moe_aot.runtime.code_object import CodeObject
from vllm_moe_aot.runtime.errors import (
    AotRuntimeError,
    CodeObjectError,
    DriverError,
    LaunchArgumentError,
    ManifestError,
    UnsupportedPlatformError,
)
from vllm_moe_aot.runtime.kernel import Kernel
from vllm_moe_aot.runtime.manifest import Manifest, ObjectEntry, Param, default_artifacts_dir

__all__ = [
    "AotRuntimeError",
    "CodeObject",
    "CodeObjectError",
    "DriverError",
    "Kernel",
    "LaunchArgumentError",
    "Manifest",
    "ManifestError",
    "ObjectEntry",
    "Param",
    "Runtime",
    "SUPPORTED_TARGETS",
    "UnsupportedPlatformError",
    "detect_target",
]

#: GPU targets code objects are built for, with the devices they mean (the contract's table)
SUPPORTED_TARGETS = {t.name: t.description for t in TARGETS.values()}


def _supported() -> str:
    return ", ".join(f"{t} ({d})" for t, d in SUPPORTED_TARGETS.items())


def _as_device(device: Any):
    import torch

    if device is None:
        if not torch.cuda.is_available():
            raise UnsupportedPlatformError(
                f"Runtime.get(None): no CUDA/ROCm device is available; pass "
                f"torch.device('cpu') for the interpreter. Supported GPUs: {_supported()}"
            )
        return torch.device("cuda", torch.cuda.current_device())
    if isinstance(device, int):
        return torch.device("cuda", device)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UnsupportedPlatformError(
            f"{dev}: PyTorch sees no CUDA/ROCm device here; pass torch.device('cpu') for the "
            f"interpreter. Supported GPUs: {_supported()}"
        )
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def detect_target(device: Any) -> tuple[Any, str]:
    """(normalised torch.device, target) for ``device``; raises for unsupported devices."""
    import torch

    dev = _as_device(device)
    if dev.type == "cpu":
        return dev, INTERPRETER
    if dev.type != "cuda":
        raise UnsupportedPlatformError(
            f"device type {dev.type!r} is not supported; supported: {_supported()}, or 'cpu' "
            f"(Triton interpreter, tests only)"
        )
    from vllm_moe_aot.device import identify

    ident = identify(dev)
    if ident.target is not None:
        return dev, ident.arch
    if getattr(torch.version, "hip", None):
        raise UnsupportedPlatformError(
            f"ROCm device {dev.index} ({ident.name}) is {ident.arch or 'an unknown gfx arch'}; "
            f"code objects exist for {_supported()}"
        )
    raise UnsupportedPlatformError(
        f"CUDA device {dev.index} ({ident.name}) is {ident.arch}; code objects exist for "
        f"{_supported()}. Use vLLM's stock MoE path on this GPU"
    )


class Runtime:
    """Code objects for one device, loaded once per process. Use :meth:`get`."""

    _instances: dict[tuple, Runtime] = {}
    _lock = threading.Lock()

    def __init__(self, device: Any, target: str, launcher: Any, manifest: Manifest):
        self.device = device
        self.target = target
        self.launcher = launcher
        view = REFERENCE_TARGET if target == INTERPRETER else target
        self.manifest: Manifest = manifest.for_target(view)
        self.artifacts_dir: Path = manifest.directory
        self._kernels: dict[str, Kernel] = {}
        self._klock = threading.Lock()

    @classmethod
    def get(cls, device: Any = None, *, artifacts: str | os.PathLike | None = None) -> Runtime:
        """The runtime for ``device`` (torch.device, 'cuda:0', int index, 'cpu' or None)."""
        dev, target = detect_target(device)
        art = Path(artifacts) if artifacts is not None else default_artifacts_dir()
        key = (os.getpid(), str(dev), str(art.resolve()))
        rt = cls._instances.get(key)
        if rt is not None:
            return rt
        with cls._lock:
            rt = cls._instances.get(key)
            if rt is None:
                manifest = Manifest.load(art)
                rt = cls(dev, target, cls._make_launcher(dev, target), manifest)
                cls._instances[key] = rt
        return rt

    @staticmethod
    def _make_launcher(dev: Any, target: str) -> Any:
        if target == INTERPRETER:
            from vllm_moe_aot.runtime.interpreter import InterpreterLauncher

            return InterpreterLauncher()
        if target == "sm_90a":
            from vllm_moe_aot.runtime.cuda import CudaLauncher

            return CudaLauncher(dev.index)
        from vllm_moe_aot.runtime.hip import HipLauncher

        return HipLauncher(dev.index, target)

    @classmethod
    def clear_cache(cls) -> None:
        """Forget every runtime of this process (tests)."""
        with cls._lock:
            cls._instances.clear()

    def kernel(self, name: str, *, max_programs: int | None = None) -> Kernel:
        """The loaded kernel ``name`` (cached). ``max_programs`` sizes scratch, if it needs any."""
        k = self._kernels.get(name)
        if k is not None:
            cap = getattr(getattr(k, "scratch", None), "max_programs", None)
            if max_programs and cap is not None and max_programs > cap:
                raise CodeObjectError(
                    f"kernel {name!r} was loaded with scratch for {cap} programs; ask for the "
                    f"largest max_programs on the first Runtime.kernel call"
                )
            return k
        with self._klock:
            k = self._kernels.get(name)
            if k is None:
                entry = self.manifest.get(name)
                if self.target == INTERPRETER:
                    k = self.launcher.load(entry, max_programs=max_programs)
                else:
                    co = CodeObject.load(entry, self.artifacts_dir)
                    k = self.launcher.load(co, max_programs=max_programs)
                self._kernels[name] = k
        return k

    def __repr__(self) -> str:
        return (f"<Runtime {self.target} on {self.device}: {len(self.manifest.objects)} code "
                f"objects from {self.artifacts_dir}>")


_caches.register("runtime.Runtime", Runtime.clear_cache)
