"""CUDA launcher: CUBINs through the driver API of ``cuda-bindings`` (``cuda.bindings.driver``).

Modules are loaded into the device's primary context (the one PyTorch uses). A launch writes
the arguments into the kernel's preallocated parameter buffer and calls ``cuLaunchKernel`` (or
``cuLaunchKernelEx`` with programmatic stream serialization when ``pdl=True``) on PyTorch's
current stream: no allocation, no synchronisation, so launches can be captured in CUDA graphs.

The launch assumes, like every PyTorch and Triton kernel launch, that the calling thread works
on the kernel's device (``torch.cuda.current_device()``); a thread with no current context gets
the kernel's primary context pushed for the call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vllm_moe_aot.runtime.code_object import CodeObject
from vllm_moe_aot.runtime.errors import CodeObjectError
from vllm_moe_aot.runtime.kernel import DriverKernel, DriverLauncher, torch_stream_fn

__all__ = ["CudaKernel", "CudaLauncher", "torch_stream_fn"]

#: the default dynamic shared-memory limit; more needs the per-function opt-in
DEFAULT_MAX_DYNAMIC_SHARED = 48 * 1024

_HINTS = {
    "CUDA_ERROR_NO_BINARY_FOR_GPU": "the GPU is not an sm_90 (H100/H200) device",
    "CUDA_ERROR_INVALID_IMAGE": "the CUBIN is corrupt or not for this GPU",
    "CUDA_ERROR_UNSUPPORTED_PTX_VERSION": "the NVIDIA driver is older than the compiler that "
    "built the CUBIN; update the driver",
    "CUDA_ERROR_INVALID_VALUE": "check the grid (x < 2**31, y and z < 65536) and arguments",
    "CUDA_ERROR_INVALID_CONTEXT": "no CUDA context is current on this thread; call "
    "torch.cuda.set_device() first",
    "CUDA_ERROR_INVALID_HANDLE": "the stream or kernel belongs to another device; launch "
    "with torch.cuda.current_device() equal to the kernel's device",
    "CUDA_ERROR_OUT_OF_RESOURCES": "too many registers or too much shared memory for this launch",
    "CUDA_ERROR_ILLEGAL_ADDRESS": "an earlier kernel faulted (run with CUDA_LAUNCH_BLOCKING=1 "
    "to find it)",
}


def _enum_name(drv: Any, status: Any) -> str:
    try:
        err, name = drv.cuGetErrorName(status)
        if int(err) == 0 and name:
            return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # noqa: BLE001 - only improves the message
        pass
    return getattr(status, "name", str(status))


def _enum_text(drv: Any, status: Any) -> str:
    try:
        err, text = drv.cuGetErrorString(status)
        if int(err) == 0 and text:
            return text.decode() if isinstance(text, bytes) else str(text)
    except Exception:  # noqa: BLE001
        pass
    return ""


class CudaLauncher(DriverLauncher):
    """Loads CUBINs on one CUDA device. ``driver`` defaults to ``cuda.bindings.driver``."""

    target = "sm_90a"
    HINTS = _HINTS
    DEVICE_KIND = "CUDA"

    def __init__(
        self,
        device_index: int,
        *,
        driver: Any = None,
        stream_fn: Callable[[], int] | None = None,
        alloc: Callable[[int], tuple[int, object]] | None = None,
    ):
        if driver is None:
            import torch
            from cuda.bindings import driver as cuda_driver

            torch.cuda.init()
            driver = cuda_driver
        super().__init__(device_index, driver, driver.CUresult.CUDA_SUCCESS, stream_fn, alloc)
        self.check("cuInit", driver.cuInit(0))
        self.device = self.check("cuDeviceGet", driver.cuDeviceGet(device_index))
        self.context = self.check("cuDevicePrimaryCtxRetain",
                                  driver.cuDevicePrimaryCtxRetain(self.device))
        attr = driver.CUdevice_attribute
        self.max_shared_optin = int(self.check(
            "cuDeviceGetAttribute", driver.cuDeviceGetAttribute(
                attr.CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, self.device)))

    def status_name(self, status: Any) -> str:
        return _enum_name(self.drv, status)

    def status_text(self, status: Any) -> str:
        return _enum_text(self.drv, status)

    def push(self, kernel: str | None = None) -> None:
        self.check("cuCtxPushCurrent", self.drv.cuCtxPushCurrent(self.context), kernel)

    def pop(self, kernel: str | None = None) -> None:
        self.check("cuCtxPopCurrent", self.drv.cuCtxPopCurrent(), kernel)

    # ---- loading ---------------------------------------------------------------------------------
    def load(self, co: CodeObject, *, max_programs: int | None = None) -> CudaKernel:
        e, drv = co.entry, self.drv
        where = f" ({e.target}, {co.path})"
        if e.target != self.target:
            raise CodeObjectError(f"kernel {e.name!r}{where}: a {e.target} code object cannot "
                                  f"load on CUDA; the CUDA launcher takes {self.target}")
        if e.num_ctas != 1:
            raise CodeObjectError(f"kernel {e.name!r}{where}: num_ctas={e.num_ctas} (clusters) "
                                  f"is not supported by this launcher; build it with num_ctas=1")
        if e.shared > self.max_shared_optin:
            raise CodeObjectError(
                f"kernel {e.name!r}{where} needs {e.shared} bytes of shared memory per block; "
                f"CUDA device {self.device_index} allows at most {self.max_shared_optin}. Pick a "
                f"variant with smaller tiles or fewer stages"
            )
        fattr = drv.CUfunction_attribute
        self.push(e.name)
        try:
            module = self.check("cuModuleLoadData", drv.cuModuleLoadData(co.data), e.name, where)
            func = self.check("cuModuleGetFunction",
                              drv.cuModuleGetFunction(module, e.symbol.encode()), e.name, where)
            max_threads = int(self.check("cuFuncGetAttribute", drv.cuFuncGetAttribute(
                fattr.CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK, func), e.name, where))
            if e.threads_per_block > max_threads:
                raise CodeObjectError(
                    f"kernel {e.name!r}{where}: {e.threads_per_block} threads per block, but "
                    f"its register use allows {max_threads}; build it with fewer warps"
                )
            if e.shared > DEFAULT_MAX_DYNAMIC_SHARED:
                static = int(self.check("cuFuncGetAttribute", drv.cuFuncGetAttribute(
                    fattr.CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, func), e.name, where))
                if e.shared + static > self.max_shared_optin:
                    raise CodeObjectError(
                        f"kernel {e.name!r}{where} needs {e.shared} + {static} (static) bytes of "
                        f"shared memory; CUDA device {self.device_index} allows "
                        f"{self.max_shared_optin}"
                    )
                self.check("cuFuncSetAttribute", drv.cuFuncSetAttribute(
                    func, fattr.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, e.shared),
                    e.name, where)
        finally:
            self.pop(e.name)
        return CudaKernel(self, co, module, func, max_programs)


class CudaKernel(DriverKernel):
    def __init__(self, launcher: CudaLauncher, co: CodeObject, module: Any, func: Any,
                 max_programs: int | None):
        super().__init__(launcher, co, module, func, max_programs)
        e = co.entry
        self._drv = launcher.drv
        self._launch_fn = launcher.drv.cuLaunchKernel
        self._configs: dict[bool, Any] = {}
        # a cooperative kernel always goes through cuLaunchKernelEx with its attribute
        self._always_ex = bool(e.launch_cooperative_grid or e.launch_pdl)

    def _config(self, pdl: bool) -> Any:
        cfg = self._configs.get(pdl)
        if cfg is None:
            drv = self._drv
            cfg = drv.CUlaunchConfig()
            cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ = self._threads, 1, 1
            cfg.sharedMemBytes = self._shared
            attrs = []
            ids = drv.CUlaunchAttributeID
            if pdl:
                a = drv.CUlaunchAttribute()
                a.id = ids.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
                a.value.programmaticStreamSerializationAllowed = 1
                attrs.append(a)
            if self.entry.launch_cooperative_grid:
                a = drv.CUlaunchAttribute()
                a.id = ids.CU_LAUNCH_ATTRIBUTE_COOPERATIVE
                a.value.cooperative = 1
                attrs.append(a)
            cfg.attrs = attrs
            cfg.numAttrs = len(attrs)
            self._configs[pdl] = cfg
        return cfg

    def _enqueue(self, gx: int, gy: int, gz: int, pdl: bool, args: tuple,
                 named: dict[str, Any]) -> None:
        stream = self._stream()
        if pdl or self._always_ex:
            cfg = self._config(pdl or self.entry.launch_pdl)
            cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ = gx, gy, gz
            cfg.hStream = stream
            (err,) = self._drv.cuLaunchKernelEx(cfg, self.func, self._addr, 0)
            call = "cuLaunchKernelEx"
        else:
            (err,) = self._launch_fn(self.func, gx, gy, gz, self._threads, 1, 1, self._shared,
                                     stream, self._addr, 0)
            call = "cuLaunchKernel"
        if err != self._ok:
            self._retry(call, err, gx, gy, gz, stream, pdl)

    def _retry(self, call: str, err: Any, gx: int, gy: int, gz: int, stream: int,
               pdl: bool) -> None:
        """No context current on this thread: push the kernel's primary context, launch again."""
        drv, where = self._drv, f" ({self.target}, {self.path})"
        if err != drv.CUresult.CUDA_ERROR_INVALID_CONTEXT:
            raise self.launcher.error(call, err, self.name, where)
        self.launcher.push(self.name)
        try:
            if call == "cuLaunchKernelEx":
                (err,) = drv.cuLaunchKernelEx(self._config(pdl or self.entry.launch_pdl),
                                              self.func, self._addr, 0)
            else:
                (err,) = self._launch_fn(self.func, gx, gy, gz, self._threads, 1, 1,
                                         self._shared, stream, self._addr, 0)
        finally:
            self.launcher.pop(self.name)
        if err != self._ok:
            raise self.launcher.error(call, err, self.name, where)
