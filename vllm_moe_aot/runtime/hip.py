"""ROCm launcher: HSACOs through hip-python (``from hip import hip``).

Same structure as :mod:`vllm_moe_aot.runtime.cuda`: ``hipModuleLoadData`` +
``hipModuleGetFunction`` once per process and device, then ``hipModuleLaunchKernel`` with the
kernel's preallocated parameter buffer on PyTorch's current stream.

Shared memory (LDS): Triton's AMD kernels declare it as dynamic shared memory, and Triton's own
HIP launcher passes it at launch without any per-function attribute; we do the same, after
checking it against the device's per-block limit. ``pdl`` is a CUDA feature and is ignored here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from vllm_moe_aot.runtime.code_object import CodeObject
from vllm_moe_aot.runtime.errors import CodeObjectError
from vllm_moe_aot.runtime.kernel import DriverKernel, DriverLauncher

_HINTS = {
    "hipErrorNoBinaryForGpu": "the code object is for another GPU (gfx942 vs gfx950?)",
    "hipErrorInvalidImage": "the HSACO is corrupt or not for this GPU",
    "hipErrorInvalidValue": "check the grid and the arguments",
    "hipErrorInvalidDevice": "set the HIP device (torch.cuda.set_device) before launching",
}


def _bytes_str(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _torch_device_guard(device_index: int) -> Callable[[], contextlib.AbstractContextManager]:
    def guard() -> contextlib.AbstractContextManager:
        import torch

        return torch.cuda.device(device_index)

    return guard


class HipLauncher(DriverLauncher):
    """Loads HSACOs on one ROCm device. ``driver`` defaults to hip-python's ``hip`` module."""

    HINTS = _HINTS
    DEVICE_KIND = "HIP"

    def __init__(
        self,
        device_index: int,
        target: str,
        *,
        driver: Any = None,
        stream_fn: Callable[[], int] | None = None,
        device_guard: Callable[[], contextlib.AbstractContextManager] | None = None,
        alloc: Callable[[int], tuple[int, object]] | None = None,
    ):
        if driver is None:
            try:
                from hip import hip as hip_driver
            except ImportError as e:
                raise ImportError(
                    "ROCm launches need hip-python matching your ROCm version: "
                    "pip install 'vllm-moe-aot[rocm]' (or hip-python==<your ROCm>.*)"
                ) from e
            driver = hip_driver
        super().__init__(device_index, driver, driver.hipError_t.hipSuccess, stream_fn, alloc)
        self.target = target
        self._guard = device_guard or _torch_device_guard(device_index)
        attrs = driver.hipDeviceAttribute_t
        limit = 0
        for name in ("hipDeviceAttributeSharedMemPerBlockOptin",
                     "hipDeviceAttributeMaxSharedMemoryPerBlock"):
            if hasattr(attrs, name):
                limit = max(limit, int(self.check("hipDeviceGetAttribute",
                                                  driver.hipDeviceGetAttribute(
                                                      getattr(attrs, name), device_index))))
        self.max_shared = limit

    def status_text(self, status: Any) -> str:
        try:
            _, text = self.drv.hipGetErrorString(status)
            return _bytes_str(text)
        except Exception:  # noqa: BLE001 - only improves the message
            return ""

    def load(self, co: CodeObject, *, max_programs: int | None = None) -> HipKernel:
        e, drv = co.entry, self.drv
        where = f" ({e.target}, {co.path})"
        if e.target != self.target:
            raise CodeObjectError(f"kernel {e.name!r}{where}: a {e.target} code object cannot "
                                  f"load on this {self.target} device")
        if e.shared > self.max_shared:
            raise CodeObjectError(
                f"kernel {e.name!r}{where} needs {e.shared} bytes of shared memory (LDS) per "
                f"block; HIP device {self.device_index} allows at most {self.max_shared}. Pick "
                f"a variant with smaller tiles or fewer stages"
            )
        with self._guard():
            module = self.check("hipModuleLoadData", drv.hipModuleLoadData(co.data), e.name,
                                where)
            func = self.check("hipModuleGetFunction",
                              drv.hipModuleGetFunction(module, e.symbol.encode()), e.name, where)
            fattr = drv.hipFunction_attribute
            max_threads = int(self.check("hipFuncGetAttribute", drv.hipFuncGetAttribute(
                fattr.HIP_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK, func), e.name, where))
            if e.threads_per_block > max_threads:
                raise CodeObjectError(
                    f"kernel {e.name!r}{where}: {e.threads_per_block} threads per block, but "
                    f"the device allows {max_threads} for it; build it with fewer warps"
                )
        return HipKernel(self, co, module, func, max_programs)


class HipKernel(DriverKernel):
    def __init__(self, launcher: HipLauncher, co: CodeObject, module: Any, func: Any,
                 max_programs: int | None):
        super().__init__(launcher, co, module, func, max_programs)
        e = co.entry
        self._launch_fn = launcher.drv.hipModuleLaunchKernel
        if e.launch_cooperative_grid:
            raise CodeObjectError(f"kernel {e.name!r}: cooperative launches are not supported "
                                  f"by the HIP launcher")

    def _enqueue(self, gx: int, gy: int, gz: int, pdl: bool, args: tuple,
                 named: dict[str, Any]) -> None:
        (err,) = self._launch_fn(self.func, gx, gy, gz, self._threads, 1, 1, self._shared,
                                 self._stream(), self._addr, None)
        if err != self._ok:
            raise self.launcher.error("hipModuleLaunchKernel", err, self.name,
                                      f" ({self.target}, {self.path})")
