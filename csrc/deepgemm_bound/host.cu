// Host side of libdeepgemm_bound.so: DeepGEMM's FP8 grouped-contiguous GEMM
// (m_grouped_gemm_fp8_fp8_bf16_nt_contiguous at the commit BUILD_INFO names) behind a C ABI of
// raw device pointers, without torch and without JIT.
//
// What DeepGEMM's Python host code does per call (jit_kernels/m_grouped_gemm.py, runtime.py)
// is done here: the four TMA descriptors (make_2d_tma_{a,b,d,scales}_desc, encoded with
// cuTensorMapEncodeTiled obtained through cudaGetDriverEntryPointByVersion, so the library
// does not link libcuda), the dynamic shared memory attribute and the launch (grid = the SM
// count DeepGEMM's heuristic asks for, a cluster of kNumTMAMulticast CTAs). Which kernel to
// run (get_best_configs) is decided by the caller (vllm_moe_aot/measure/peers/deepgemm_bound.py,
// the same heuristic the build used to choose what to instantiate).
//
// A plan (deepgemm_bound_plan_create) fixes one GEMM's pointers and M and holds its encoded
// descriptors; deepgemm_bound_plan_run launches it on a stream: no allocation, no host
// synchronisation, capturable in a CUDA graph.

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <mutex>
#include <new>
#include <string>

#include "build_info.h"
#include "kernels.cuh"

#define DGB_API extern "C" __attribute__((visibility("default")))

namespace dgb {

#include "kernels.inc"

constexpr int kAbiVersion = 1;
constexpr int kNumKernels = static_cast<int>(sizeof(kKernels) / sizeof(kKernels[0]));

enum Status : int {
    kOk = 0,
    kBadArgument = 1,
    kCudaError = 2,
    kNoSuchKernel = 3,
    kDriverError = 4,
    kException = 5,
};

thread_local std::string g_last_error;

int fail(int status, const std::string& msg) {
    g_last_error = msg;
    return status;
}

int cuda_fail(const char* what, cudaError_t err) {
    return fail(kCudaError, std::string(what) + ": " + cudaGetErrorName(err) + " (" +
                                cudaGetErrorString(err) + ")");
}

// cuTensorMapEncodeTiled from the driver, once
PFN_cuTensorMapEncodeTiled_v12000 g_encode = nullptr;
std::once_flag g_encode_once;
std::string g_encode_error;

bool get_encode() {
    std::call_once(g_encode_once, [] {
        void* fn = nullptr;
        cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
        cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000,
                                                           cudaEnableDefault, &q);
        if (err != cudaSuccess || q != cudaDriverEntryPointSuccess || fn == nullptr) {
            g_encode_error = std::string("cudaGetDriverEntryPointByVersion(cuTensorMapEncodeTiled,"
                                         " 12000) failed: ") + cudaGetErrorName(err) +
                             " (query result " + std::to_string(static_cast<int>(q)) + ")";
            return;
        }
        g_encode = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
    });
    return g_encode != nullptr;
}

CUtensorMapSwizzle swizzle_of(uint32_t mode) {
    switch (mode) {
        case 32: return CU_TENSOR_MAP_SWIZZLE_32B;
        case 64: return CU_TENSOR_MAP_SWIZZLE_64B;
        case 128: return CU_TENSOR_MAP_SWIZZLE_128B;
        default: return CU_TENSOR_MAP_SWIZZLE_NONE;
    }
}

// DeepGEMM's make_2d_tma_desc: a 2-D row-major tensor of `outer` rows of `inner` elements,
// `outer_stride` elements apart, loaded in boxes of smem_outer x smem_inner
int make_2d_desc(CUtensorMap* map, const char* name, CUtensorMapDataType dtype, size_t elem,
                 const void* ptr, uint64_t inner, uint64_t outer, uint64_t outer_stride,
                 uint32_t smem_inner, uint32_t smem_outer, CUtensorMapSwizzle swizzle) {
    if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0)
        return fail(kBadArgument, std::string(name) + ": TMA needs a 16-byte aligned address");
    if ((outer_stride * elem) % 16 != 0)
        return fail(kBadArgument, std::string(name) + ": TMA needs 16-byte aligned row strides (" +
                                      std::to_string(outer_stride * elem) + " bytes)");
    const cuuint64_t dims[2] = {inner, outer};
    const cuuint64_t strides[1] = {outer_stride * elem};
    const cuuint32_t box[2] = {smem_inner, smem_outer};
    const cuuint32_t elem_strides[2] = {1, 1};
    CUresult r = g_encode(map, dtype, 2, const_cast<void*>(ptr), dims, strides, box, elem_strides,
                          CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle,
                          CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                          CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (r != CUDA_SUCCESS)
        return fail(kDriverError, std::string("cuTensorMapEncodeTiled(") + name + ") failed: CUresult " +
                                      std::to_string(static_cast<int>(r)));
    return kOk;
}

uint32_t ceil_div(uint32_t a, uint32_t b) { return (a + b - 1) / b; }

// get_tma_aligned_size(m, 4): the LHS scales' M axis padded to 16 bytes
uint32_t tma_aligned_m(uint32_t m) { return ceil_div(m, 4) * 4; }

struct alignas(64) Plan {
    CUtensorMap tensor_map_a;
    CUtensorMap tensor_map_b;
    CUtensorMap tensor_map_scales_a;
    CUtensorMap tensor_map_d;
    const KernelEntry* entry;
    float* scales_b;
    int* m_indices;
    uint32_t m;
    int num_sms;
    int device;
};

int fill_plan(Plan* p, int idx, const void* lhs, const float* lhs_scales_t, const void* rhs,
              const float* rhs_scales, void* out, const int* m_indices, uint32_t m, int num_sms) {
    if (idx < 0 || idx >= kNumKernels)
        return fail(kNoSuchKernel, "kernel index " + std::to_string(idx) + " out of range (" +
                                       std::to_string(kNumKernels) + " kernels)");
    const KernelEntry& e = kKernels[idx];
    if (m == 0) return fail(kBadArgument, "m must be > 0 (DeepGEMM launches nothing for m == 0)");
    if (!lhs || !lhs_scales_t || !rhs || !rhs_scales || !out || !m_indices)
        return fail(kBadArgument, "null pointer argument");
    if (num_sms < 1 || num_sms % static_cast<int>(e.num_tma_multicast) != 0)
        return fail(kBadArgument, "num_sms=" + std::to_string(num_sms) +
                                      " must be a positive multiple of the TMA multicast " +
                                      std::to_string(e.num_tma_multicast));
    if (!get_encode()) return fail(kDriverError, g_encode_error);
    int dev = 0, sms = 0;
    cudaError_t err = cudaGetDevice(&dev);
    if (err != cudaSuccess) return cuda_fail("cudaGetDevice", err);
    err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    if (err != cudaSuccess) return cuda_fail("cudaDeviceGetAttribute", err);
    if (num_sms > sms)
        return fail(kBadArgument, "num_sms=" + std::to_string(num_sms) + " exceeds the device's " +
                                      std::to_string(sms) + " SMs");
    int rc;
    // make_2d_tma_a_desc (GroupedContiguous: m rows of k)
    rc = make_2d_desc(&p->tensor_map_a, "a", CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, lhs, e.k, m, e.k,
                      e.block_k, e.block_m, CU_TENSOR_MAP_SWIZZLE_128B);
    if (rc) return rc;
    // make_2d_tma_b_desc: num_groups * n rows of k
    rc = make_2d_desc(&p->tensor_map_b, "b", CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, rhs, e.k,
                      static_cast<uint64_t>(e.n) * e.num_groups, e.k, e.block_k, e.block_n,
                      CU_TENSOR_MAP_SWIZZLE_128B);
    if (rc) return rc;
    // make_2d_tma_d_desc: the swizzled store writes kSwizzleDMode-byte atoms
    rc = make_2d_desc(&p->tensor_map_d, "d", CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, out, e.n, m,
                      e.n, e.swizzle_d == 0 ? e.block_n : e.swizzle_d / 2, e.block_m,
                      swizzle_of(e.swizzle_d));
    if (rc) return rc;
    // make_2d_tma_scales_desc: the MN-major LHS scales, ceil(k/128) rows of align4(m)
    const uint32_t am = tma_aligned_m(m);
    rc = make_2d_desc(&p->tensor_map_scales_a, "scales_a", CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 4,
                      lhs_scales_t, am, ceil_div(e.k, e.block_k), am, e.block_m, 1,
                      CU_TENSOR_MAP_SWIZZLE_NONE);
    if (rc) return rc;
    err = cudaFuncSetAttribute(e.kernel(), cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(e.smem_size));
    if (err != cudaSuccess) return cuda_fail("cudaFuncSetAttribute(max dynamic smem)", err);
    p->entry = &e;
    p->scales_b = const_cast<float*>(rhs_scales);
    p->m_indices = const_cast<int*>(m_indices);
    p->m = m;
    p->num_sms = num_sms;
    p->device = dev;
    return kOk;
}

int launch(const Plan* p, cudaStream_t stream) {
    const KernelEntry& e = *p->entry;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = e.num_tma_multicast;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(static_cast<unsigned>(p->num_sms), 1, 1);
    cfg.blockDim = dim3(e.num_threads, 1, 1);
    cfg.dynamicSmemBytes = e.smem_size;
    cfg.stream = stream;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    // fp8_gemm_kernel(float* scales_b, int* grouped_layout, uint32_t shape_m,
    //                 CUtensorMap a, CUtensorMap b, CUtensorMap scales_a, CUtensorMap d)
    float* scales_b = p->scales_b;
    int* grouped = p->m_indices;
    uint32_t shape_m = p->m;
    void* args[] = {&scales_b, &grouped, &shape_m,
                    const_cast<CUtensorMap*>(&p->tensor_map_a),
                    const_cast<CUtensorMap*>(&p->tensor_map_b),
                    const_cast<CUtensorMap*>(&p->tensor_map_scales_a),
                    const_cast<CUtensorMap*>(&p->tensor_map_d)};
    cudaError_t err = cudaLaunchKernelExC(&cfg, e.kernel(), args);
    if (err != cudaSuccess) return cuda_fail("cudaLaunchKernelExC(fp8_gemm_kernel)", err);
    return kOk;
}

}  // namespace dgb

using namespace dgb;

DGB_API int deepgemm_bound_abi_version() { return kAbiVersion; }

DGB_API const char* deepgemm_bound_build_info() { return DGB_BUILD_INFO; }

DGB_API const char* deepgemm_bound_last_error() { return g_last_error.c_str(); }

DGB_API int deepgemm_bound_kernel_count() { return kNumKernels; }

// The fields of kernel `idx` in KernelEntry order (n, k, num_groups, block_m, block_n, block_k,
// block_n_padding, swizzle_d, num_stages, num_tma_multicast, multicast_on_a, smem_size,
// num_threads): `len` of them into `out`.
DGB_API int deepgemm_bound_kernel_desc(int idx, int64_t* out, int len) {
    if (idx < 0 || idx >= kNumKernels || out == nullptr)
        return fail(kNoSuchKernel, "kernel index " + std::to_string(idx) + " out of range");
    const KernelEntry& e = kKernels[idx];
    const uint32_t f[13] = {e.n, e.k, e.num_groups, e.block_m, e.block_n, e.block_k,
                            e.block_n_padding, e.swizzle_d, e.num_stages, e.num_tma_multicast,
                            e.multicast_on_a, e.smem_size, e.num_threads};
    for (int i = 0; i < len && i < 13; ++i) out[i] = f[i];
    return kOk;
}

// Initialise the CUDA runtime on the current device; its SM count and compute capability.
DGB_API int deepgemm_bound_init(int* sm_count, int* major, int* minor) {
    int dev = 0;
    cudaError_t err = cudaGetDevice(&dev);
    if (err != cudaSuccess) return cuda_fail("cudaGetDevice", err);
    err = cudaFree(nullptr);
    if (err != cudaSuccess) return cuda_fail("cudaFree(0)", err);
    int v = 0;
    if (sm_count) {
        err = cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev);
        if (err != cudaSuccess) return cuda_fail("cudaDeviceGetAttribute", err);
        *sm_count = v;
    }
    if (major) {
        err = cudaDeviceGetAttribute(&v, cudaDevAttrComputeCapabilityMajor, dev);
        if (err != cudaSuccess) return cuda_fail("cudaDeviceGetAttribute", err);
        *major = v;
    }
    if (minor) {
        err = cudaDeviceGetAttribute(&v, cudaDevAttrComputeCapabilityMinor, dev);
        if (err != cudaSuccess) return cuda_fail("cudaDeviceGetAttribute", err);
        *minor = v;
    }
    return get_encode() ? kOk : fail(kDriverError, g_encode_error);
}

// out [m, n] bf16 = per row r: (lhs[r] * lhs_scales) . (rhs[m_indices[r]] * rhs_scales)^T,
// rows with m_indices[r] < 0 skipped (DeepGEMM's contiguous layout: groups aligned to block_m).
//   lhs          fp8 e4m3 [m, k] row-major
//   lhs_scales_t fp32 [ceil(k/128), align4(m)] row-major (DeepGEMM's TMA-aligned MN-major form)
//   rhs          fp8 e4m3 [num_groups, n, k] row-major
//   rhs_scales   fp32 [num_groups, ceil(n/128), ceil(k/128)] row-major
//   out          bf16 [m, n] row-major
//   m_indices    int32 [m]
// Run on the device that is current at creation time.
DGB_API int deepgemm_bound_plan_create(int idx, const void* lhs, const float* lhs_scales_t,
                                       const void* rhs, const float* rhs_scales, void* out,
                                       const int* m_indices, uint32_t m, int num_sms,
                                       void** plan) {
    try {
        if (plan == nullptr) return fail(kBadArgument, "plan is null");
        auto* p = new Plan();
        int rc = fill_plan(p, idx, lhs, lhs_scales_t, rhs, rhs_scales, out, m_indices, m, num_sms);
        if (rc != kOk) {
            delete p;
            return rc;
        }
        *plan = p;
        return kOk;
    } catch (const std::exception& exc) {
        return fail(kException, exc.what());
    }
}

DGB_API int deepgemm_bound_plan_run(const void* plan, void* stream) {
    if (plan == nullptr) return fail(kBadArgument, "plan is null");
    return launch(static_cast<const Plan*>(plan), static_cast<cudaStream_t>(stream));
}

DGB_API void deepgemm_bound_plan_destroy(void* plan) { delete static_cast<Plan*>(plan); }

// One call without a plan (the descriptors encoded each time).
DGB_API int deepgemm_bound_gemm(int idx, const void* lhs, const float* lhs_scales_t,
                                const void* rhs, const float* rhs_scales, void* out,
                                const int* m_indices, uint32_t m, int num_sms, void* stream) {
    try {
        Plan p;
        int rc = fill_plan(&p, idx, lhs, lhs_scales_t, rhs, rhs_scales, out, m_indices, m, num_sms);
        if (rc != kOk) return rc;
        return launch(&p, static_cast<cudaStream_t>(stream));
    } catch (const std::exception& exc) {
        return fail(kException, exc.what());
    }
}
