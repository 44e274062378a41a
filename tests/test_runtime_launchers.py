"""CudaLauncher and HipLauncher against recording fakes of cuda-bindings and hip-python, and
Runtime's platform selection. The fakes read the launch arguments through ``kernelParams`` the
way the driver does, so the bytes checked here are the bytes a GPU would see."""

from __future__ import annotations

import dataclasses
import struct
from types import SimpleNamespace

import pytest
import torch

from tests._aot_helpers import FakeAlloc, FakeCuda, FakeHip, RecordingGuard, smoke_artifacts
from vllm_moe_aot.runtime import (
    CodeObject,
    CodeObjectError,
    DriverError,
    LaunchArgumentError,
    Manifest,
    Runtime,
    UnsupportedPlatformError,
    detect_target,
)
from vllm_moe_aot.runtime.cuda import CudaLauncher
from vllm_moe_aot.runtime.hip import HipLauncher

STREAM = 0x7F00_1234


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    return Manifest.load(smoke_artifacts())


def code_object(manifest, name, target, **changes) -> CodeObject:
    e = manifest.get(name, target)
    co = CodeObject.load(e, manifest.directory)
    return dataclasses.replace(co, entry=dataclasses.replace(e, **changes)) if changes else co


def cuda(**kw) -> tuple[FakeCuda, CudaLauncher]:
    drv = FakeCuda(**kw)
    return drv, CudaLauncher(0, driver=drv, stream_fn=lambda: STREAM, alloc=FakeAlloc())


def hip(target="gfx942", **kw) -> tuple[FakeHip, HipLauncher, RecordingGuard]:
    drv, guard = FakeHip(**kw), RecordingGuard()
    return drv, HipLauncher(3, target, driver=drv, stream_fn=lambda: STREAM,
                            device_guard=guard, alloc=FakeAlloc()), guard


def axpy_args():
    x, y, out = torch.ones(8), torch.ones(8), torch.empty(8)
    want = struct.pack("<QQQifQQ", x.data_ptr(), y.data_ptr(), out.data_ptr(), 5000, 2.5, 0, 0)
    return (x, y, out, 5000, 2.5), want


def gemm_args():
    a = torch.zeros(4, 4, dtype=torch.uint8)
    b = torch.zeros(4, 4, dtype=torch.uint8)
    c = torch.zeros(4, 4, dtype=torch.bfloat16)
    sa, sb = torch.ones(1), torch.ones(1)
    args = (a, b, c, sa, sb, 100, 200, 300, 304, 320, 208)
    want = struct.pack("<QQQQQiiiiiiQQ", a.data_ptr(), b.data_ptr(), c.data_ptr(),
                       sa.data_ptr(), sb.data_ptr(), 100, 200, 300, 304, 320, 208, 0, 0)
    return args, want


# ---- CUDA ----------------------------------------------------------------------------------------
def test_cuda_load_and_launch_exact(manifest):
    drv, launcher = cuda()
    k = launcher.load(code_object(manifest, "smoke_axpy", "sm_90a"))
    assert drv.call_names()[:4] == ["cuInit", "cuDeviceGet", "cuDevicePrimaryCtxRetain",
                                    "cuDeviceGetAttribute"]
    # the module loads inside the primary context, pushed and popped again
    names = drv.call_names()
    assert names.index("cuCtxPushCurrent") < names.index("cuModuleLoadData") \
        < names.index("cuCtxPopCurrent")
    assert drv.context_stack == []
    args, want = axpy_args()
    k.launch((5,), *args)
    (launch,) = drv.launches
    assert launch.api == "cuLaunchKernel" and launch.symbol == "axpy_kernel"
    assert launch.grid == (5, 1, 1) and launch.block == (128, 1, 1)  # 4 warps x 32
    assert launch.shared == 0 and launch.stream == STREAM and launch.extra == 0
    assert launch.args == want


def test_cuda_fp8_gemm_bytes_and_grid_forms(manifest):
    drv, launcher = cuda()
    k = launcher.load(code_object(manifest, "smoke_fp8_gemm", "sm_90a"))
    args, want = gemm_args()
    for grid, expect in [(7, (7, 1, 1)), ((2, 3), (2, 3, 1)), ((2, 3, 4), (2, 3, 4)),
                         ([6], (6, 1, 1))]:
        k.launch(grid, *args)
        assert drv.launches[-1].grid == expect
        assert drv.launches[-1].args == want
        assert drv.launches[-1].shared == k.entry.shared > 0
    n = len(drv.launches)
    k.launch((0, 3), *args)  # empty grid: nothing to do, as with Triton
    assert len(drv.launches) == n
    with pytest.raises(LaunchArgumentError, match="grid"):
        k.launch((-1,), *args)
    with pytest.raises(LaunchArgumentError, match="1 to 3"):
        k.launch((1, 1, 1, 1), *args)
    with pytest.raises(LaunchArgumentError, match="takes 11 launch arguments"):
        k.launch((1,), *args[:-1])


def test_cuda_pdl_uses_launch_ex(manifest):
    drv, launcher = cuda()
    k = launcher.load(code_object(manifest, "smoke_axpy", "sm_90a"))
    args, want = axpy_args()
    k.launch((3, 2), *args, pdl=True)
    (launch,) = drv.launches
    assert launch.api == "cuLaunchKernelEx" and launch.grid == (3, 2, 1)
    assert launch.block == (128, 1, 1) and launch.stream == STREAM and launch.args == want
    pss = FakeCuda.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    assert [a[0] for a in launch.attrs] == [pss]
    assert launch.attrs[0][1]["programmaticStreamSerializationAllowed"] == 1
    k.launch((1,), *args)  # pdl off again: the plain call
    assert drv.launches[-1].api == "cuLaunchKernel"


def test_cuda_large_shared_memory_opt_in(manifest):
    drv, launcher = cuda()
    co = code_object(manifest, "smoke_fp8_gemm", "sm_90a", shared=100_000)
    k = launcher.load(co)
    dyn = FakeCuda.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    assert ("cuFuncSetAttribute", ("fp8_gemm_kernel", dyn, 100_000)) in drv.calls
    args, _ = gemm_args()
    k.launch((1,), *args)
    assert drv.launches[-1].shared == 100_000
    # below 48 KB no attribute is set
    drv2, launcher2 = cuda()
    launcher2.load(code_object(manifest, "smoke_fp8_gemm", "sm_90a"))
    assert "cuFuncSetAttribute" not in drv2.call_names()


def test_cuda_shared_memory_beyond_the_device(manifest):
    drv, launcher = cuda(optin=100_000)
    with pytest.raises(CodeObjectError, match=r"needs 150000 bytes of shared memory.*at most "
                                              r"100000"):
        launcher.load(code_object(manifest, "smoke_fp8_gemm", "sm_90a", shared=150_000))
    assert "cuModuleLoadData" not in drv.call_names()
    # static shared memory counts too
    drv, launcher = cuda(optin=100_000, static_shared=60_000)
    with pytest.raises(CodeObjectError, match=r"60000 \(static\)"):
        launcher.load(code_object(manifest, "smoke_fp8_gemm", "sm_90a", shared=50_000))


def test_cuda_too_many_threads(manifest):
    _, launcher = cuda(max_threads=64)
    with pytest.raises(CodeObjectError, match="128 threads per block"):
        launcher.load(code_object(manifest, "smoke_axpy", "sm_90a"))


def test_cuda_failing_driver_calls_are_named(manifest):
    drv, launcher = cuda()
    drv.fail["cuModuleLoadData"] = [FakeCuda.CUresult.CUDA_ERROR_INVALID_IMAGE]
    with pytest.raises(DriverError) as e:
        launcher.load(code_object(manifest, "smoke_axpy", "sm_90a"))
    msg = str(e.value)
    assert "cuModuleLoadData failed for kernel 'smoke_axpy'" in msg
    assert "CUDA_ERROR_INVALID_IMAGE" in msg and "fake driver says no" in msg
    assert e.value.call == "cuModuleLoadData" and e.value.kernel == "smoke_axpy"
    assert drv.context_stack == []  # popped even on failure

    k = launcher.load(code_object(manifest, "smoke_axpy", "sm_90a"))
    drv.fail["cuLaunchKernel"] = [FakeCuda.CUresult.CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES]
    args, _ = axpy_args()
    with pytest.raises(DriverError, match=r"cuLaunchKernel failed for kernel 'smoke_axpy'.*"
                                          r"OUT_OF_RESOURCES"):
        k.launch((1,), *args)
    drv.fail["cuLaunchKernelEx"] = [FakeCuda.CUresult.CUDA_ERROR_INVALID_VALUE]
    with pytest.raises(DriverError, match="cuLaunchKernelEx failed.*check the grid"):
        k.launch((1,), *args, pdl=True)
    with pytest.raises(DriverError, match="cuModuleGetFunction"):
        launcher.load(code_object(manifest, "smoke_axpy", "sm_90a", symbol="nope"))
    bad = FakeCuda()
    bad.fail["cuInit"] = [FakeCuda.CUresult.CUDA_ERROR_INVALID_VALUE]
    with pytest.raises(DriverError, match="cuInit failed for CUDA device 0"):
        CudaLauncher(0, driver=bad, stream_fn=lambda: 0)


def test_cuda_no_current_context_is_retried_in_the_primary_context(manifest):
    drv, launcher = cuda()
    k = launcher.load(code_object(manifest, "smoke_axpy", "sm_90a"))
    drv.fail["cuLaunchKernel"] = [FakeCuda.CUresult.CUDA_ERROR_INVALID_CONTEXT]
    args, want = axpy_args()
    k.launch((2,), *args)
    assert len(drv.launches) == 1 and drv.launches[0].args == want
    assert drv.call_names()[-3:] == ["cuCtxPushCurrent", "cuLaunchKernel", "cuCtxPopCurrent"]


def test_cuda_rejects_other_targets_and_clusters(manifest):
    _, launcher = cuda()
    with pytest.raises(CodeObjectError, match="gfx942 code object cannot load on CUDA"):
        launcher.load(code_object(manifest, "smoke_axpy", "gfx942"))
    with pytest.raises(CodeObjectError, match="num_ctas=2"):
        launcher.load(code_object(manifest, "smoke_axpy", "sm_90a", num_ctas=2))


def test_scratch_is_allocated_once_and_passed(manifest):
    drv, launcher = cuda()
    co = code_object(manifest, "smoke_axpy", "sm_90a", global_scratch_size=256,
                     global_scratch_align=8)
    with pytest.raises(CodeObjectError, match="max_programs"):
        launcher.load(co)
    k = launcher.load(co, max_programs=10)
    assert launcher._alloc.sizes == [2560]
    args, want = axpy_args()
    k.launch((10,), *args)
    addr = k.scratch.global_addr
    assert addr and drv.launches[-1].args == want[:32] + struct.pack("<QQ", addr, 0)
    with pytest.raises(LaunchArgumentError, match="max_programs"):
        k.launch((11,), *args)
    assert launcher._alloc.sizes == [2560]  # nothing allocated by launches


def test_runtime_caches_kernels(manifest):
    drv, launcher = cuda()
    rt = Runtime(torch.device("cpu"), "sm_90a", launcher, manifest)
    assert rt.target == "sm_90a" and rt.manifest.target == "sm_90a"
    k1, k2 = rt.kernel("smoke_axpy"), rt.kernel("smoke_axpy")
    assert k1 is k2 and drv.call_names().count("cuModuleLoadData") == 1
    assert rt.kernel("smoke_fp8_gemm") is not k1
    assert [v for v in rt.manifest.variants] == list(manifest.variants)


# ---- HIP -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["gfx942", "gfx950"])
def test_hip_load_and_launch_exact(manifest, target):
    drv, launcher, guard = hip(target)
    k = launcher.load(code_object(manifest, "smoke_axpy", target))
    assert guard.entered == 1
    args, want = axpy_args()
    k.launch((9, 2), *args, pdl=True)  # pdl is CUDA-only: ignored
    (launch,) = drv.launches
    assert launch.api == "hipModuleLaunchKernel" and launch.symbol == "axpy_kernel"
    assert launch.grid == (9, 2, 1) and launch.block == (256, 1, 1)  # 4 wavefronts x 64
    assert launch.shared == 0 and launch.stream == STREAM and launch.extra is None
    assert launch.args == want
    g = launcher.load(code_object(manifest, "smoke_fp8_gemm", target))
    gargs, gwant = gemm_args()
    g.launch((1, 2, 3), *gargs)
    assert drv.launches[-1].args == gwant and drv.launches[-1].shared == g.entry.shared


def test_hip_errors(manifest):
    drv, launcher, _ = hip("gfx942", max_shared=64 * 1024)
    with pytest.raises(CodeObjectError, match=r"needs 70000 bytes of shared memory \(LDS\)"):
        launcher.load(code_object(manifest, "smoke_fp8_gemm", "gfx942", shared=70_000))
    with pytest.raises(CodeObjectError, match="gfx950 code object cannot load on this gfx942"):
        launcher.load(code_object(manifest, "smoke_axpy", "gfx950"))
    drv.fail["hipModuleLoadData"] = [FakeHip.hipError_t.hipErrorInvalidImage]
    with pytest.raises(DriverError, match=r"hipModuleLoadData failed for kernel 'smoke_axpy'.*"
                                          r"hipErrorInvalidImage.*fake hip says no"):
        launcher.load(code_object(manifest, "smoke_axpy", "gfx942"))
    k = launcher.load(code_object(manifest, "smoke_axpy", "gfx942"))
    drv.fail["hipModuleLaunchKernel"] = [FakeHip.hipError_t.hipErrorLaunchOutOfResources]
    args, _ = axpy_args()
    with pytest.raises(DriverError, match="hipModuleLaunchKernel failed"):
        k.launch((1,), *args)
    with pytest.raises(LaunchArgumentError, match="takes 5 launch arguments"):
        k.launch((1,), *args, 1)


# ---- platform selection --------------------------------------------------------------------------
def _props(monkeypatch, hip_version=None, **props):
    monkeypatch.setattr(torch.version, "hip", hip_version, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(name="Fake GPU", **props))


@pytest.mark.parametrize("hip_version, props, target", [
    (None, dict(major=9, minor=0), "sm_90a"),
    ("6.3", dict(major=9, minor=4, gcnArchName="gfx942:sramecc+:xnack-"), "gfx942"),
    ("7.0", dict(major=9, minor=5, gcnArchName="gfx950:sramecc+:xnack-"), "gfx950"),
])
def test_detect_target(monkeypatch, hip_version, props, target):
    _props(monkeypatch, hip_version, **props)
    dev, t = detect_target("cuda:1")
    assert t == target and dev == torch.device("cuda", 1)


@pytest.mark.parametrize("hip_version, props, match", [
    (None, dict(major=8, minor=0), r"sm_80; code objects exist for sm_90a"),
    (None, dict(major=10, minor=0), r"sm_100"),
    ("6.3", dict(major=9, minor=0, gcnArchName="gfx90a:sramecc+:xnack-"), r"gfx90a.*gfx942"),
])
def test_unsupported_gpus(monkeypatch, hip_version, props, match):
    _props(monkeypatch, hip_version, **props)
    with pytest.raises(UnsupportedPlatformError, match=match):
        Runtime.get(torch.device("cuda", 0))


def test_unsupported_device_types(monkeypatch):
    with pytest.raises(UnsupportedPlatformError, match="'meta' is not supported"):
        Runtime.get("meta")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UnsupportedPlatformError, match="sees no CUDA/ROCm device"):
        Runtime.get("cuda")
    with pytest.raises(UnsupportedPlatformError, match="no CUDA/ROCm device is available"):
        Runtime.get(None)


def test_cpu_runtime_is_the_interpreter_and_cached():
    rt = Runtime.get("cpu", artifacts=smoke_artifacts())
    assert rt.target == "interpreter" and rt.manifest.target == "sm_90a"
    assert Runtime.get(torch.device("cpu"), artifacts=smoke_artifacts()) is rt
