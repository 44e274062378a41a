"""Helpers for the build and runtime tests: a real (subprocess) build of the smoke kernels, and
recording fakes of cuda-bindings' ``driver`` module and hip-python's ``hip`` module.

The fakes behave like the real driver where the tests look: modules are parsed from the image
bytes (symbol lookup, parameter layout from the ELF), and a launch reads the argument bytes
through the ``kernelParams`` pointer array exactly as the driver does, laying them out at the
offsets the code object declares.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import enum
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from vllm_moe_aot.runtime.elf import KernelParam, kernel_params, read_info

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ("smoke_axpy", "smoke_fp8_gemm")
SMOKE_FAMILY = "smoke"


# ---- real builds (subprocess, no TRITON_INTERPRET) -----------------------------------------------
def compile_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run_build(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vllm_moe_aot.cli", "build", *args], cwd=ROOT,
                          env=compile_env(), capture_output=True, text=True, timeout=timeout)


def run_python(code: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=compile_env(),
                          capture_output=True, text=True, timeout=timeout)


@functools.cache
def smoke_artifacts() -> Path:
    """The smoke kernels built once per test session (all three targets) into a temp folder."""
    d = Path(tempfile.mkdtemp(prefix="vllm-moe-aot-smoke-"))
    atexit.register(shutil.rmtree, d, True)
    r = run_build("--family", SMOKE_FAMILY, "--out", str(d), "--no-progress", "--jobs", "2")
    assert r.returncode == 0, f"smoke build failed:\n{r.stdout}\n{r.stderr}"
    return d


def copy_smoke_artifacts(dst: Path) -> Path:
    shutil.copytree(smoke_artifacts(), dst)
    return dst


# ---- the driver's view of a launch ---------------------------------------------------------------
def read_kernel_params(params: list[KernelParam], address: int) -> bytes:
    """What the driver copies: each ``kernelParams[i]`` dereferenced for its declared size."""
    if not params:
        return b""
    end = max(p.offset + p.size for p in params)
    buf = bytearray(end)
    for i, p in enumerate(params):
        ptr = ctypes.c_void_p.from_address(address + 8 * i).value
        assert ptr, f"kernelParams[{i}] is null"
        buf[p.offset : p.offset + p.size] = ctypes.string_at(ptr, p.size)
    return bytes(buf)


@dataclass
class FakeFunction:
    symbol: str
    params: list[KernelParam]
    attrs: dict[Any, int] = field(default_factory=dict)


@dataclass
class Launch:
    api: str
    symbol: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared: int
    stream: Any
    args: bytes
    extra: Any = None
    attrs: list[tuple[Any, dict[str, int]]] = field(default_factory=list)


class _Failing:
    def __init__(self) -> None:
        self.fail: dict[str, list[Any]] = {}
        self.calls: list[tuple[str, tuple]] = []

    def _status(self, name: str, args: tuple, ok: Any) -> Any:
        self.calls.append((name, args))
        q = self.fail.get(name)
        return q.pop(0) if q else ok

    def call_names(self) -> list[str]:
        return [c[0] for c in self.calls]


# ---- cuda-bindings -------------------------------------------------------------------------------
class FakeCuda(_Failing):
    """Stands in for ``cuda.bindings.driver``."""

    class CUresult(enum.IntEnum):
        CUDA_SUCCESS = 0
        CUDA_ERROR_INVALID_VALUE = 1
        CUDA_ERROR_INVALID_IMAGE = 200
        CUDA_ERROR_INVALID_CONTEXT = 201
        CUDA_ERROR_NOT_FOUND = 500
        CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES = 701

    class CUdevice_attribute(enum.IntEnum):
        CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN = 97

    class CUfunction_attribute(enum.IntEnum):
        CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK = 0
        CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES = 1
        CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8

    class CUlaunchAttributeID(enum.IntEnum):
        CU_LAUNCH_ATTRIBUTE_COOPERATIVE = 2
        CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6

    class CUlaunchConfig:
        def __init__(self) -> None:
            self.gridDimX = self.gridDimY = self.gridDimZ = 0
            self.blockDimX = self.blockDimY = self.blockDimZ = 0
            self.sharedMemBytes = 0
            self.hStream = 0
            self.attrs: list = []
            self.numAttrs = 0

    class CUlaunchAttribute:
        def __init__(self) -> None:
            self.id = None
            self.value = SimpleNamespace(programmaticStreamSerializationAllowed=0, cooperative=0)

    def __init__(self, optin: int = 227 * 1024, max_threads: int = 1024, static_shared: int = 0):
        super().__init__()
        self.optin, self.max_threads, self.static_shared = optin, max_threads, static_shared
        self.modules: dict[int, bytes] = {}
        self.launches: list[Launch] = []
        self.context_stack: list[Any] = []

    def _r(self, name: str, *args: Any) -> Any:
        return self._status(name, args, self.CUresult.CUDA_SUCCESS)

    def cuInit(self, flags):
        return (self._r("cuInit", flags),)

    def cuDeviceGet(self, ordinal):
        return self._r("cuDeviceGet", ordinal), ("dev", ordinal)

    def cuDevicePrimaryCtxRetain(self, dev):
        return self._r("cuDevicePrimaryCtxRetain", dev), ("ctx", dev)

    def cuDeviceGetAttribute(self, attr, dev):
        return self._r("cuDeviceGetAttribute", attr, dev), self.optin

    def cuCtxPushCurrent(self, ctx):
        self.context_stack.append(ctx)
        return (self._r("cuCtxPushCurrent", ctx),)

    def cuCtxPopCurrent(self):
        ctx = self.context_stack.pop() if self.context_stack else None
        return self._r("cuCtxPopCurrent"), ctx

    def cuModuleLoadData(self, image):
        st = self._r("cuModuleLoadData", len(image))
        h = len(self.modules) + 1
        self.modules[h] = bytes(image)
        return st, h

    def cuModuleGetFunction(self, module, name):
        st = self._r("cuModuleGetFunction", module, name)
        image, sym = self.modules[module], name.decode()
        if sym not in read_info(image).functions:
            return self.CUresult.CUDA_ERROR_NOT_FOUND, None
        return st, FakeFunction(sym, kernel_params(image, sym))

    def cuFuncGetAttribute(self, attr, f):
        st = self._r("cuFuncGetAttribute", attr, f.symbol)
        fa = self.CUfunction_attribute
        value = {fa.CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK: self.max_threads,
                 fa.CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES: self.static_shared}[attr]
        return st, value

    def cuFuncSetAttribute(self, f, attr, value):
        st = self._r("cuFuncSetAttribute", f.symbol, attr, value)
        f.attrs[attr] = value
        return (st,)

    def _dyn_limit(self, f: FakeFunction) -> int:
        key = self.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        return f.attrs.get(key, 48 * 1024)

    def cuLaunchKernel(self, f, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
        st = self._r("cuLaunchKernel", f.symbol)
        if st == self.CUresult.CUDA_SUCCESS and shared > self._dyn_limit(f):
            st = self.CUresult.CUDA_ERROR_INVALID_VALUE  # what the real driver does
        if st == self.CUresult.CUDA_SUCCESS:
            self.launches.append(Launch("cuLaunchKernel", f.symbol, (gx, gy, gz), (bx, by, bz),
                                        shared, stream, read_kernel_params(f.params, params),
                                        extra))
        return (st,)

    def cuLaunchKernelEx(self, cfg, f, params, extra):
        st = self._r("cuLaunchKernelEx", f.symbol)
        if st == self.CUresult.CUDA_SUCCESS:
            attrs = [(a.id, dict(vars(a.value))) for a in cfg.attrs[: cfg.numAttrs]]
            self.launches.append(Launch(
                "cuLaunchKernelEx", f.symbol, (cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ),
                (cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ), cfg.sharedMemBytes, cfg.hStream,
                read_kernel_params(f.params, params), extra, attrs))
        return (st,)

    def cuGetErrorName(self, status):
        return self.CUresult.CUDA_SUCCESS, self.CUresult(status).name.encode()

    def cuGetErrorString(self, status):
        return self.CUresult.CUDA_SUCCESS, b"fake driver says no"


# ---- hip-python ----------------------------------------------------------------------------------
class FakeHip(_Failing):
    """Stands in for hip-python's ``hip`` module."""

    class hipError_t(enum.IntEnum):
        hipSuccess = 0
        hipErrorInvalidValue = 1
        hipErrorInvalidImage = 200
        hipErrorNotFound = 500
        hipErrorLaunchOutOfResources = 701

    class hipDeviceAttribute_t(enum.IntEnum):
        hipDeviceAttributeMaxSharedMemoryPerBlock = 74
        hipDeviceAttributeSharedMemPerBlockOptin = 81

    class hipFunction_attribute(enum.IntEnum):
        HIP_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK = 0

    def __init__(self, max_shared: int = 64 * 1024, max_threads: int = 1024):
        super().__init__()
        self.max_shared, self.max_threads = max_shared, max_threads
        self.modules: dict[int, bytes] = {}
        self.launches: list[Launch] = []

    def _r(self, name: str, *args: Any) -> Any:
        return self._status(name, args, self.hipError_t.hipSuccess)

    def hipDeviceGetAttribute(self, attr, device):
        return self._r("hipDeviceGetAttribute", attr, device), self.max_shared

    def hipModuleLoadData(self, image):
        st = self._r("hipModuleLoadData", len(image))
        h = len(self.modules) + 1
        self.modules[h] = bytes(image)
        return st, h

    def hipModuleGetFunction(self, module, name):
        st = self._r("hipModuleGetFunction", module, name)
        image, sym = self.modules[module], name.decode()
        if sym not in read_info(image).functions:
            return self.hipError_t.hipErrorNotFound, None
        return st, FakeFunction(sym, kernel_params(image, sym))

    def hipFuncGetAttribute(self, attr, f):
        return self._r("hipFuncGetAttribute", attr, f.symbol), self.max_threads

    def hipModuleLaunchKernel(self, f, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
        st = self._r("hipModuleLaunchKernel", f.symbol)
        if st == self.hipError_t.hipSuccess:
            self.launches.append(Launch("hipModuleLaunchKernel", f.symbol, (gx, gy, gz),
                                        (bx, by, bz), shared, stream,
                                        read_kernel_params(f.params, params), extra))
        return (st,)

    def hipGetErrorString(self, status):
        return self.hipError_t.hipSuccess, b"fake hip says no"


class RecordingGuard:
    """Device guard for the HIP launcher: records that loads happen inside it."""

    def __init__(self) -> None:
        self.entered = 0

    @contextlib.contextmanager
    def __call__(self):
        self.entered += 1
        yield


class FakeAlloc:
    """Scratch allocator: host buffers (the fake driver never dereferences them)."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def __call__(self, nbytes: int) -> tuple[int, object]:
        self.sizes.append(nbytes)
        buf = (ctypes.c_uint8 * nbytes)()
        return ctypes.addressof(buf), buf
