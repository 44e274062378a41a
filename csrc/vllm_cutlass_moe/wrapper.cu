// Thin host wrapper around vLLM 0.33.0's CUTLASS FP8 MoE kernels (sm_90a), without torch.
//
// Our own code (vllm-moe-aot). It compiles vLLM's kernel templates as they are and replaces only
// vLLM's torch-facing host functions (torch::stable::Tensor in, current stream from torch) with
// extern "C" functions that take raw device pointers, sizes and a cudaStream_t, so that the
// library loads with ctypes in any torch version (no libtorch symbol is referenced; the build
// script checks). Every launch configuration below is copied from the vLLM host function named
// in the comment above it. scripts/build_vllm_cutlass.py obtains vLLM's sources and CUTLASS,
// extracts the torch-free parts of vLLM's .cu files byte-for-byte into build/.../gen/*.inc and
// compiles this file once per translation unit (-DVLLM_CUTLASS_TU_*):
//
//   TU_GEMM (one per tile config, -DVLLM_CUTLASS_GEMM_CFG=...): grouped_mm_c3x.cuh and
//       get_group_starts.cuh (vLLM headers, unchanged) + gen/sm90_configs.inc (the sm90 tile
//       config structs of grouped_mm_c3x_sm90.cu, unchanged text); host code = our copy of
//       cutlass_group_gemm_caller with raw pointers and caller-provided scratch.
//   TU_ROUTING: the exported API's error buffer and build info; the sm90 config choice of
//       run_cutlass_moe_mm_sm90; gen/moe_data_kernels.inc (kernels of moe_data.cu, unchanged);
//       gen/shuffle_rows_kernel.inc (shuffleInputRowsKernel of moe_permute_unpermute_op.cu,
//       unchanged); moe/permute_unpermute_kernels/moe_permute_unpermute_kernel.h (+ .inl,
//       unchanged); host code = new launches mirroring moe_data.cu / moe_permute_unpermute_op.cu.
//   TU_ACT: gen/activation_kernels_head.inc (activation_kernels.cu up to its first
//       `}  // namespace vllm`, unchanged); host = LAUNCH_ACTIVATION_GATE_KERNEL for silu_and_mul.
//   TU_QUANT: gen/fp8_quant_kernels_head.inc (quantization/w8a8/fp8/common.cu up to its first
//       `}  // namespace vllm`, unchanged); host = static_scaled_fp8_quant (per-tensor scale),
//       dynamic_scaled_fp8_quant, dynamic_per_token_scaled_fp8_quant.
// moe/permute_unpermute_kernels/moe_permute_unpermute_kernel.cu (cub radix sort, offsets) is
// compiled unchanged as its own translation unit.
//
// Every exported function returns 0 on success, else a nonzero code; the message is then in
// vllm_cutlass_last_error() (thread-local). Nothing here synchronises or allocates device
// memory, so all of it can be captured in a CUDA graph (run once eagerly first: kernels load
// lazily and the SM count is cached on the first call).

#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdarg>
#include <exception>

#define VC_EXPORT extern "C" __attribute__((visibility("default")))

// Status codes (also in vllm_moe_aot/measure/peers/vllm_cutlass.py).
enum VcStatus : int {
  VC_OK = 0,
  VC_BAD_ARGUMENT = 1,
  VC_CUDA_ERROR = 2,
  VC_CUTLASS_ERROR = 3,
  VC_CONFIG_NOT_BUILT = 4,
  VC_SCRATCH_TOO_SMALL = 5,
  VC_EXCEPTION = 6,
};

// Defined in TU_ROUTING; shared by all translation units (hidden, not exported).
int vc_fail(int code, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
int vc_device_sm_count(int* device, int* sm_count, int* cc_major);

#define VC_CHECK_ARG(cond, ...)                        \
  do {                                                 \
    if (!(cond)) return vc_fail(VC_BAD_ARGUMENT, __VA_ARGS__); \
  } while (0)

#define VC_CHECK_LAUNCH(what)                                                     \
  do {                                                                            \
    cudaError_t _e = cudaGetLastError();                                          \
    if (_e != cudaSuccess)                                                        \
      return vc_fail(VC_CUDA_ERROR, "%s: %s", what, cudaGetErrorString(_e));      \
  } while (0)

#define VC_TRY try {
#define VC_CATCH(where_)                                                         \
  }                                                                              \
  catch (const std::exception& ex_) {                                            \
    return vc_fail(VC_EXCEPTION, "%s: %s", where_, ex_.what());                  \
  }                                                                              \
  catch (...) {                                                                  \
    return vc_fail(VC_EXCEPTION, "%s: unknown C++ exception", where_);           \
  }

// Arguments of one grouped GEMM, as vLLM's cutlass_moe_mm takes them (tensors -> pointers).
struct VcGemmArgs {
  void* out;                     // [m, n] bf16 (row stride c_strides[e])
  const void* a;                 // [m, k] fp8 e4m3, rows sorted by expert
  const void* b;                 // [E, n, k] fp8 e4m3 (= column-major [k, n] per expert)
  const float* a_scales;         // [m] (per token) or [1]
  const float* b_scales;         // [E, n] (per channel) or [E]
  const int64_t* expert_offsets; // [E] first row of each expert in a / out
  const int32_t* problem_sizes;  // [E, 3] from the moe data ops (swapped for m <= 64)
  const int64_t* a_strides;      // [E]
  const int64_t* b_strides;      // [E]
  const int64_t* c_strides;      // [E]
  int64_t m, n, k, num_experts;
  int64_t a_scales_numel, b_scales_numel;
  bool per_act_token, per_out_ch;
  void* ptr_scratch;             // 5 * E * 8 bytes: the pointer arrays cutlass reads
  size_t ptr_scratch_bytes;
  void* workspace;               // cutlass workspace (vllm_cutlass_moe_mm_workspace_size)
  size_t workspace_bytes;
  cudaStream_t stream;
};

// Tile configs of vLLM's grouped_mm_c3x_sm90.cu, in the order of its dispatch.
#define VC_FOR_EACH_CONFIG(X) X(M4) X(M64) X(N8192) X(K8192) X(default)

#define VC_DECLARE_CONFIG(CFG)                                         \
  int vc_gemm_run_##CFG(const VcGemmArgs& args);                       \
  int vc_gemm_workspace_##CFG(const VcGemmArgs& args, size_t* bytes);
VC_FOR_EACH_CONFIG(VC_DECLARE_CONFIG)
#undef VC_DECLARE_CONFIG

// ================================================================================================
#if defined(VLLM_CUTLASS_TU_GEMM)

#include "cutlass/cutlass.h"
#include "grouped_mm_c3x.cuh"  // vLLM csrc/quantization/w8a8/cutlass/moe/, unchanged

namespace {
#include "sm90_configs.inc"  // vLLM grouped_mm_c3x_sm90.cu's config structs, unchanged text
}  // namespace

#ifndef VLLM_CUTLASS_GEMM_CFG
#error "define VLLM_CUTLASS_GEMM_CFG (M4, M64, N8192, K8192 or default)"
#endif

#define VC_CAT_(a, b) a##b
#define VC_CAT(a, b) VC_CAT_(a, b)
#define VC_CFG_STRUCT VC_CAT(sm90_fp8_config_, VLLM_CUTLASS_GEMM_CFG)

namespace {

// The instantiation vLLM's dispatch_moe_mm_sm90 makes for bf16 output.
using VcGemm = typename VC_CFG_STRUCT<cutlass::float_e4m3_t, cutlass::bfloat16_t,
                                      vllm::c3x::ScaledEpilogueArray>::Cutlass3xGemm;

template <typename Gemm>
struct VcCaller {
  static constexpr bool swap_ab = Gemm::swap_ab;
  using ElementAB = typename Gemm::ElementAB;
  using ElementD = typename Gemm::ElementD;
  using GemmKernel = typename Gemm::GemmKernel;
  using StrideA = Stride<int64_t, Int<1>, Int<0>>;
  using StrideB = Stride<int64_t, Int<1>, Int<0>>;
  using StrideC = typename GemmKernel::InternalStrideC;
  using GemmOp = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;

  // The arguments cutlass_group_gemm_caller (grouped_mm_c3x.cuh) builds, from raw pointers;
  // a_ptrs..b_scales_ptrs are the five [E] int64 arrays it allocates per call, here the
  // caller's scratch.
  static typename GemmKernel::Arguments make_args(const VcGemmArgs& c, int device,
                                                  int sm_count) {
    int const num_experts = static_cast<int>(c.num_experts);
    int64_t* base = static_cast<int64_t*>(c.ptr_scratch);
    int64_t* a_ptrs = base;
    int64_t* b_ptrs = base + num_experts;
    int64_t* out_ptrs = base + 2 * num_experts;
    int64_t* a_scales_ptrs = base + 3 * num_experts;
    int64_t* b_scales_ptrs = base + 4 * num_experts;

    using ElementAccumulator = float;
    ProblemShape::UnderlyingProblemShape* problem_sizes_as_shapes =
        reinterpret_cast<ProblemShape::UnderlyingProblemShape*>(
            const_cast<int32_t*>(c.problem_sizes));
    ProblemShape prob_shape{num_experts, problem_sizes_as_shapes, nullptr};

    typename GemmKernel::MainloopArguments mainloop_args;
    if constexpr (swap_ab) {
      mainloop_args = typename GemmKernel::MainloopArguments{
          reinterpret_cast<const ElementAB**>(b_ptrs),
          reinterpret_cast<StrideB*>(const_cast<int64_t*>(c.b_strides)),
          reinterpret_cast<const ElementAB**>(a_ptrs),
          reinterpret_cast<StrideA*>(const_cast<int64_t*>(c.a_strides))};
    } else {
      mainloop_args = typename GemmKernel::MainloopArguments{
          reinterpret_cast<const ElementAB**>(a_ptrs),
          reinterpret_cast<StrideA*>(const_cast<int64_t*>(c.a_strides)),
          reinterpret_cast<const ElementAB**>(b_ptrs),
          reinterpret_cast<StrideB*>(const_cast<int64_t*>(c.b_strides))};
    }
    bool const per_act_token = c.per_act_token, per_out_ch = c.per_out_ch;
    typename GemmKernel::EpilogueArguments epilogue_args{
        Gemm::Epilogue::prepare_args(
            swap_ab ? reinterpret_cast<const ElementAccumulator**>(b_scales_ptrs)
                    : reinterpret_cast<const ElementAccumulator**>(a_scales_ptrs),
            swap_ab ? reinterpret_cast<const ElementAccumulator**>(a_scales_ptrs)
                    : reinterpret_cast<const ElementAccumulator**>(b_scales_ptrs),
            swap_ab ? per_out_ch : per_act_token, swap_ab ? per_act_token : per_out_ch),
        nullptr, reinterpret_cast<StrideC*>(const_cast<int64_t*>(c.c_strides)),
        reinterpret_cast<ElementD**>(out_ptrs),
        reinterpret_cast<StrideC*>(const_cast<int64_t*>(c.c_strides))};

    cutlass::KernelHardwareInfo hw_info{device, sm_count};
    return typename GemmKernel::Arguments{cutlass::gemm::GemmUniversalMode::kGrouped,
                                          prob_shape, mainloop_args, epilogue_args, hw_info};
  }

  static int workspace(const VcGemmArgs& c, size_t* bytes) {
    int device = 0, sm_count = 0, cc_major = 0;
    if (int rc = vc_device_sm_count(&device, &sm_count, &cc_major)) return rc;
    auto args = make_args(c, device, sm_count);
    *bytes = GemmOp::get_workspace_size(args);
    return VC_OK;
  }

  static int run(const VcGemmArgs& c) {
    int device = 0, sm_count = 0, cc_major = 0;
    if (int rc = vc_device_sm_count(&device, &sm_count, &cc_major)) return rc;
    int const num_experts = static_cast<int>(c.num_experts);
    int64_t* base = static_cast<int64_t*>(c.ptr_scratch);

    // run_get_group_gemm_starts (get_group_starts.cuh): its flags come from the scale
    // tensors' sizes, as there.
    bool const starts_per_act_token = c.a_scales_numel != 1;
    bool const starts_per_out_ch = c.b_scales_numel != c.num_experts;
    get_group_gemm_starts<cutlass::float_e4m3_t, cutlass::bfloat16_t, float>
        <<<1, num_experts, 0, c.stream>>>(
            const_cast<int64_t*>(c.expert_offsets),
            reinterpret_cast<cutlass::float_e4m3_t**>(base),
            reinterpret_cast<cutlass::float_e4m3_t**>(base + num_experts),
            reinterpret_cast<cutlass::bfloat16_t**>(base + 2 * num_experts),
            reinterpret_cast<float**>(base + 3 * num_experts),
            reinterpret_cast<float**>(base + 4 * num_experts),
            static_cast<cutlass::float_e4m3_t*>(const_cast<void*>(c.a)),
            static_cast<cutlass::float_e4m3_t*>(const_cast<void*>(c.b)),
            static_cast<cutlass::bfloat16_t*>(c.out), const_cast<float*>(c.a_scales),
            const_cast<float*>(c.b_scales), c.n, c.k, starts_per_act_token,
            starts_per_out_ch);
    VC_CHECK_LAUNCH("get_group_gemm_starts");

    auto args = make_args(c, device, sm_count);
    GemmOp gemm_op;
    cutlass::Status status = gemm_op.can_implement(args);
    if (status != cutlass::Status::kSuccess)
      return vc_fail(VC_CUTLASS_ERROR, "cutlass can_implement: %s",
                     cutlassGetStatusString(status));
    size_t const need = GemmOp::get_workspace_size(args);
    if (need > c.workspace_bytes)
      return vc_fail(VC_SCRATCH_TOO_SMALL, "cutlass workspace needs %zu bytes, got %zu", need,
                     c.workspace_bytes);
    status = gemm_op.run(args, need ? c.workspace : nullptr, c.stream);
    if (status != cutlass::Status::kSuccess)
      return vc_fail(VC_CUTLASS_ERROR, "cutlass run: %s", cutlassGetStatusString(status));
    VC_CHECK_LAUNCH("cutlass grouped gemm");
    return VC_OK;
  }
};

}  // namespace

#define VC_DEFINE(CFG)                                                         \
  int VC_CAT(vc_gemm_run_, CFG)(const VcGemmArgs& args) {                      \
    VC_TRY return VcCaller<VcGemm>::run(args);                                 \
    VC_CATCH("cutlass_moe_mm")                                                 \
  }                                                                            \
  int VC_CAT(vc_gemm_workspace_, CFG)(const VcGemmArgs& args, size_t* bytes) { \
    VC_TRY return VcCaller<VcGemm>::workspace(args, bytes);                    \
    VC_CATCH("cutlass_moe_mm workspace")                                       \
  }
VC_DEFINE(VLLM_CUTLASS_GEMM_CFG)

#endif  // VLLM_CUTLASS_TU_GEMM

// ================================================================================================
#if defined(VLLM_CUTLASS_TU_ROUTING)

#include <cuda_fp8.h>
#include <cuda_bf16.h>
#include <cstring>
#include <string>

#include "cutlass/array.h"
#include "moe_data_kernels.inc"     // vLLM moe_data.cu's kernels, unchanged text
#include "moe/permute_unpermute_kernels/moe_permute_unpermute_kernel.h"  // vLLM, unchanged
#include "shuffle_rows_kernel.inc"  // vLLM moe_permute_unpermute_op.cu's kernel, unchanged

#if __has_include("build_info.h")
#include "build_info.h"  // generated: #define VLLM_CUTLASS_BUILD_INFO "<json>"
#endif
#ifndef VLLM_CUTLASS_BUILD_INFO
#define VLLM_CUTLASS_BUILD_INFO "{}"
#endif

namespace {
thread_local char vc_error[1024] = "";
}

int vc_fail(int code, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(vc_error, sizeof(vc_error), fmt, ap);
  va_end(ap);
  return code;
}

int vc_device_sm_count(int* device, int* sm_count, int* cc_major) {
  // Cached per device like vLLM's `static const cutlass::KernelHardwareInfo hw_info`.
  static int cached_sm[64] = {0};
  static int cached_major[64] = {0};
  cudaError_t e = cudaGetDevice(device);
  if (e != cudaSuccess) return vc_fail(VC_CUDA_ERROR, "cudaGetDevice: %s", cudaGetErrorString(e));
  if (*device < 0 || *device >= 64) return vc_fail(VC_BAD_ARGUMENT, "device %d", *device);
  if (cached_sm[*device] == 0) {
    int sm = 0, major = 0;
    e = cudaDeviceGetAttribute(&sm, cudaDevAttrMultiProcessorCount, *device);
    if (e == cudaSuccess)
      e = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, *device);
    if (e != cudaSuccess)
      return vc_fail(VC_CUDA_ERROR, "cudaDeviceGetAttribute: %s", cudaGetErrorString(e));
    cached_major[*device] = major;
    cached_sm[*device] = sm;
  }
  *sm_count = cached_sm[*device];
  *cc_major = cached_major[*device];
  return VC_OK;
}

VC_EXPORT int vllm_cutlass_abi_version() { return 1; }

VC_EXPORT const char* vllm_cutlass_build_info() { return VLLM_CUTLASS_BUILD_INFO; }

VC_EXPORT const char* vllm_cutlass_last_error() { return vc_error; }

// Initialise the runtime on the current device and cache its SM count (call once, eagerly,
// before any graph capture). Returns the compute capability major in *cc_major.
VC_EXPORT int vllm_cutlass_init(int* cc_major) {
  int device = 0, sm = 0, major = 0;
  if (int rc = vc_device_sm_count(&device, &sm, &major)) return rc;
  if (cc_major) *cc_major = major;
  return VC_OK;
}

namespace {

// The tile config run_cutlass_moe_mm_sm90 (grouped_mm_c3x_sm90.cu) picks, same order:
//   m <= 4: M4 (swap_ab) / m <= 64: M64 (swap_ab) / n >= 8192: N8192 / k >= 8192: K8192 /
//   else default, with m = a_tensors.size(0) (all rows of the grouped GEMM), n =
//   out_tensors.size(1), k = a_tensors.size(1).
int vc_select_config(int64_t m, int64_t n, int64_t k) {
  uint32_t const um = static_cast<uint32_t>(m), un = static_cast<uint32_t>(n),
                 uk = static_cast<uint32_t>(k);
  if (um <= 4) return 0;
  if (um <= 64) return 1;
  if (un >= 8192) return 2;
  if (uk >= 8192) return 3;
  return 4;
}

const char* const vc_config_names[] = {"M4", "M64", "N8192", "K8192", "default"};

#ifndef VLLM_CUTLASS_HAVE_M4
#define VLLM_CUTLASS_HAVE_M4 0
#endif
#ifndef VLLM_CUTLASS_HAVE_M64
#define VLLM_CUTLASS_HAVE_M64 0
#endif
#ifndef VLLM_CUTLASS_HAVE_N8192
#define VLLM_CUTLASS_HAVE_N8192 0
#endif
#ifndef VLLM_CUTLASS_HAVE_K8192
#define VLLM_CUTLASS_HAVE_K8192 0
#endif
#ifndef VLLM_CUTLASS_HAVE_default
#define VLLM_CUTLASS_HAVE_default 0
#endif

const bool vc_config_built[] = {VLLM_CUTLASS_HAVE_M4, VLLM_CUTLASS_HAVE_M64,
                                VLLM_CUTLASS_HAVE_N8192, VLLM_CUTLASS_HAVE_K8192,
                                VLLM_CUTLASS_HAVE_default};

}  // namespace

// Weak fallbacks so that a build with a subset of configs links; never called when
// vc_config_built says the config is absent.
#define VC_WEAK(CFG)                                                                    \
  __attribute__((weak)) int vc_gemm_run_##CFG(const VcGemmArgs&) {                      \
    return vc_fail(VC_CONFIG_NOT_BUILT, "config " #CFG " not built");                   \
  }                                                                                     \
  __attribute__((weak)) int vc_gemm_workspace_##CFG(const VcGemmArgs&, size_t*) {       \
    return vc_fail(VC_CONFIG_NOT_BUILT, "config " #CFG " not built");                   \
  }
VC_FOR_EACH_CONFIG(VC_WEAK)
#undef VC_WEAK

// Which config vLLM would pick for (m, n, k): index into M4, M64, N8192, K8192, default; *name
// gets its name and *built whether this library has it.
VC_EXPORT int vllm_cutlass_moe_mm_config(int64_t m, int64_t n, int64_t k, const char** name,
                                         int* built) {
  int const cfg = vc_select_config(m, n, k);
  if (name) *name = vc_config_names[cfg];
  if (built) *built = vc_config_built[cfg] ? 1 : 0;
  return cfg;
}

static int vc_check_gemm(const VcGemmArgs& c) {
  VC_CHECK_ARG(c.m > 0 && c.n > 0 && c.k > 0, "m, n, k must be positive (%lld, %lld, %lld)",
               (long long)c.m, (long long)c.n, (long long)c.k);
  VC_CHECK_ARG(c.num_experts > 0 && c.num_experts <= 1024,
               "num_experts=%lld must be in [1, 1024] (one thread per expert)",
               (long long)c.num_experts);
  VC_CHECK_ARG(c.k % 16 == 0 && c.n % 16 == 0,
               "n=%lld and k=%lld must be multiples of 16 (128-bit aligned fp8 rows)",
               (long long)c.n, (long long)c.k);
  VC_CHECK_ARG(c.ptr_scratch_bytes >= size_t(5 * 8 * c.num_experts),
               "ptr_scratch needs %lld bytes", (long long)(5 * 8 * c.num_experts));
  int const cfg = vc_select_config(c.m, c.n, c.k);
  if (!vc_config_built[cfg])
    return vc_fail(VC_CONFIG_NOT_BUILT,
                   "vLLM picks sm90 config %s for m=%lld n=%lld k=%lld; this library was built "
                   "without it (scripts/build_vllm_cutlass.py --configs all)",
                   vc_config_names[cfg], (long long)c.m, (long long)c.n, (long long)c.k);
  return VC_OK;
}

static VcGemmArgs vc_gemm_args(void* out, const void* a, const void* b, const float* a_scales,
                               const float* b_scales, const int64_t* expert_offsets,
                               const int32_t* problem_sizes, const int64_t* a_strides,
                               const int64_t* b_strides, const int64_t* c_strides, int64_t m,
                               int64_t n, int64_t k, int64_t num_experts, int64_t a_scales_numel,
                               int64_t b_scales_numel, int per_act_token, int per_out_ch,
                               void* ptr_scratch, size_t ptr_scratch_bytes, void* workspace,
                               size_t workspace_bytes, void* stream) {
  VcGemmArgs c{};
  c.out = out;
  c.a = a;
  c.b = b;
  c.a_scales = a_scales;
  c.b_scales = b_scales;
  c.expert_offsets = expert_offsets;
  c.problem_sizes = problem_sizes;
  c.a_strides = a_strides;
  c.b_strides = b_strides;
  c.c_strides = c_strides;
  c.m = m;
  c.n = n;
  c.k = k;
  c.num_experts = num_experts;
  c.a_scales_numel = a_scales_numel;
  c.b_scales_numel = b_scales_numel;
  c.per_act_token = per_act_token != 0;
  c.per_out_ch = per_out_ch != 0;
  c.ptr_scratch = ptr_scratch;
  c.ptr_scratch_bytes = ptr_scratch_bytes;
  c.workspace = workspace;
  c.workspace_bytes = workspace_bytes;
  c.stream = static_cast<cudaStream_t>(stream);
  return c;
}

// Bytes of cutlass workspace the config vLLM picks for (m, n, k, E) needs.
VC_EXPORT int vllm_cutlass_moe_mm_workspace_size(int64_t m, int64_t n, int64_t k,
                                                 int64_t num_experts, size_t* bytes) {
  VC_CHECK_ARG(bytes != nullptr, "bytes is null");
  VcGemmArgs c = vc_gemm_args(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                              nullptr, nullptr, nullptr, m, n, k, num_experts, 1, num_experts, 0,
                              0, nullptr, size_t(5 * 8 * num_experts), nullptr, 0, nullptr);
  if (int rc = vc_check_gemm(c)) return rc;
  switch (vc_select_config(m, n, k)) {
    case 0: return vc_gemm_workspace_M4(c, bytes);
    case 1: return vc_gemm_workspace_M64(c, bytes);
    case 2: return vc_gemm_workspace_N8192(c, bytes);
    case 3: return vc_gemm_workspace_K8192(c, bytes);
    default: return vc_gemm_workspace_default(c, bytes);
  }
}

// (a) vLLM's cutlass_moe_mm on sm90 (scaled_mm_entry.cu -> cutlass_moe_mm_sm90 ->
// run_cutlass_moe_mm_sm90 -> cutlass_group_gemm_caller): out[rows of e] = (a * a_scale) @
// (b[e] * b_scale[e])^T in bf16, fp8 e4m3 inputs, fp32 accumulate.
VC_EXPORT int vllm_cutlass_moe_mm(void* out, const void* a, const void* b, const float* a_scales,
                                  const float* b_scales, const int64_t* expert_offsets,
                                  const int32_t* problem_sizes, const int64_t* a_strides,
                                  const int64_t* b_strides, const int64_t* c_strides, int64_t m,
                                  int64_t n, int64_t k, int64_t num_experts,
                                  int64_t a_scales_numel, int64_t b_scales_numel,
                                  int per_act_token, int per_out_ch, void* ptr_scratch,
                                  size_t ptr_scratch_bytes, void* workspace,
                                  size_t workspace_bytes, void* stream) {
  VcGemmArgs c = vc_gemm_args(out, a, b, a_scales, b_scales, expert_offsets, problem_sizes,
                              a_strides, b_strides, c_strides, m, n, k, num_experts,
                              a_scales_numel, b_scales_numel, per_act_token, per_out_ch,
                              ptr_scratch, ptr_scratch_bytes, workspace, workspace_bytes, stream);
  if (int rc = vc_check_gemm(c)) return rc;
  VC_CHECK_ARG(out && a && b && a_scales && b_scales && expert_offsets && problem_sizes &&
                   a_strides && b_strides && c_strides && ptr_scratch,
               "null pointer argument");
  switch (vc_select_config(m, n, k)) {
    case 0: return vc_gemm_run_M4(c);
    case 1: return vc_gemm_run_M64(c);
    case 2: return vc_gemm_run_N8192(c);
    case 3: return vc_gemm_run_K8192(c);
    default: return vc_gemm_run_default(c);
  }
}

// (b) vLLM's get_cutlass_moe_mm_data (moe_data.cu: get_cutlass_moe_mm_data_caller, fp8 path,
// no blockscale offsets). atomic_buffer: [num_experts + 1] int32 scratch (zeroed here, as the
// caller's new_zeros does there). expert_offsets: [num_experts + 1] int32.
VC_EXPORT int vllm_cutlass_get_moe_mm_data(const int32_t* topk_ids, int64_t topk_numel,
                                           int64_t topk, int32_t* expert_offsets,
                                           int32_t* problem_sizes1, int32_t* problem_sizes2,
                                           int32_t* input_permutation,
                                           int32_t* output_permutation, int32_t* atomic_buffer,
                                           int64_t num_experts, int64_t n, int64_t k,
                                           int is_gated, void* stream_) {
  VC_CHECK_ARG(topk_numel > 0 && topk > 0 && topk_numel % topk == 0,
               "topk_numel=%lld must be a positive multiple of topk=%lld",
               (long long)topk_numel, (long long)topk);
  VC_CHECK_ARG(num_experts > 0 && n > 0 && k > 0, "num_experts, n, k must be positive");
  cudaStream_t stream = static_cast<cudaStream_t>(stream_);
  cudaError_t e = cudaMemsetAsync(atomic_buffer, 0, sizeof(int32_t) * (num_experts + 1), stream);
  if (e != cudaSuccess) return vc_fail(VC_CUDA_ERROR, "memset: %s", cudaGetErrorString(e));
  int num_threads = static_cast<int>(
      topk_numel < int64_t(THREADS_PER_EXPERT) ? topk_numel : int64_t(THREADS_PER_EXPERT));
  bool const may_swap_ab = topk_numel <= SWAP_AB_THRESHOLD;
  if (may_swap_ab)
    compute_problem_sizes<true><<<num_experts, num_threads, 0, stream>>>(
        topk_ids, problem_sizes1, problem_sizes2, atomic_buffer, static_cast<int>(topk_numel),
        static_cast<int>(n), static_cast<int>(k), is_gated != 0);
  else
    compute_problem_sizes<false><<<num_experts, num_threads, 0, stream>>>(
        topk_ids, problem_sizes1, problem_sizes2, atomic_buffer, static_cast<int>(topk_numel),
        static_cast<int>(n), static_cast<int>(k), is_gated != 0);
  VC_CHECK_LAUNCH("compute_problem_sizes");
  compute_expert_offsets<<<1, 1, 0, stream>>>(problem_sizes1, expert_offsets, atomic_buffer,
                                              static_cast<int>(num_experts), may_swap_ab);
  VC_CHECK_LAUNCH("compute_expert_offsets");
  compute_arg_sorts<<<num_experts, num_threads, 0, stream>>>(
      topk_ids, input_permutation, output_permutation, atomic_buffer,
      static_cast<int>(topk_numel), static_cast<int>(topk));
  VC_CHECK_LAUNCH("compute_arg_sorts");
  return VC_OK;
}

// vLLM's get_cutlass_moe_mm_problem_sizes_from_expert_offsets (moe_data.cu), which 0.33's
// run_cutlass_moe_fp8 calls after moe_permute. expert_first_token_offset: [E + 1] int64.
VC_EXPORT int vllm_cutlass_problem_sizes_from_expert_offsets(
    const int64_t* expert_first_token_offset, int32_t* problem_sizes1, int32_t* problem_sizes2,
    int64_t num_experts, int64_t n, int64_t k, int swap_ab, void* stream_) {
  VC_CHECK_ARG(num_experts > 0 && num_experts <= INT32_MAX, "num_experts=%lld",
               (long long)num_experts);
  VC_CHECK_ARG(n > 0 && k > 0 && n <= INT32_MAX && k <= INT32_MAX, "n, k must fit in int32");
  cudaStream_t stream = static_cast<cudaStream_t>(stream_);
  int const ne = static_cast<int>(num_experts);
  int const threads = (ne < 256) ? ne : 256;
  int const blocks = (ne + threads - 1) / threads;
  if (swap_ab)
    compute_problem_sizes_from_expert_offsets<true><<<blocks, threads, 0, stream>>>(
        expert_first_token_offset, problem_sizes1, problem_sizes2, ne, static_cast<int>(n),
        static_cast<int>(k));
  else
    compute_problem_sizes_from_expert_offsets<false><<<blocks, threads, 0, stream>>>(
        expert_first_token_offset, problem_sizes1, problem_sizes2, ne, static_cast<int>(n),
        static_cast<int>(k));
  VC_CHECK_LAUNCH("compute_problem_sizes_from_expert_offsets");
  return VC_OK;
}

// (c) vLLM's shuffle_rows (moe_permute_unpermute_op.cu): output[r] = input[dst2src[r]] (zero
// rows for out-of-range sources); elem_size 1 (fp8 e4m3) or 2 (bf16).
VC_EXPORT int vllm_cutlass_shuffle_rows(const void* input, const int32_t* dst2src_map,
                                        void* output, int64_t num_src_rows,
                                        int64_t num_dst_rows, int64_t num_cols,
                                        int64_t elem_size, void* stream_) {
  VC_CHECK_ARG(elem_size == 1 || elem_size == 2, "elem_size must be 1 (fp8) or 2 (bf16)");
  VC_CHECK_ARG(num_cols % (128 / elem_size / 8) == 0,
               "num_cols must be divisible by 128 / element_size / 8");
  if (num_dst_rows == 0) return VC_OK;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_);
  const int64_t blocks = num_dst_rows;
  const int64_t threads = 256;
  if (elem_size == 1)
    shuffleInputRowsKernel<__nv_fp8_e4m3><<<blocks, threads, 0, stream>>>(
        static_cast<const __nv_fp8_e4m3*>(input), dst2src_map,
        static_cast<__nv_fp8_e4m3*>(output), num_src_rows, num_dst_rows, num_cols);
  else
    shuffleInputRowsKernel<__nv_bfloat16><<<blocks, threads, 0, stream>>>(
        static_cast<const __nv_bfloat16*>(input), dst2src_map,
        static_cast<__nv_bfloat16*>(output), num_src_rows, num_dst_rows, num_cols);
  VC_CHECK_LAUNCH("shuffleInputRowsKernel");
  return VC_OK;
}

// Bytes of cub radix-sort workspace moe_permute needs (moe_permute_sort_workspace_size).
VC_EXPORT int vllm_cutlass_moe_permute_sort_workspace_size(int64_t num_expanded_rows,
                                                           int64_t n_expert, size_t* bytes) {
  VC_CHECK_ARG(bytes && num_expanded_rows >= 0 && n_expert > 0, "bad arguments");
  VC_TRY *bytes = CubKeyValueSorter::getWorkspaceSize(static_cast<size_t>(num_expanded_rows),
                                                      static_cast<int>(n_expert));
  return VC_OK;
  VC_CATCH("moe_permute_sort_workspace_size")
}

// vLLM's moe_permute_with_scratch without an expert map (moe_permute_unpermute_op.cu:
// moe_sort_routing + moe_permute_impl). topk_ids [n_token, topk] int32; token_expert_indices
// = arange(n_token * topk) int32; permuted_idx must be pre-filled with n_token * topk (the
// Python side does that, as vLLM's moe_permute does); elem_size 1 (fp8) or 2 (bf16).
VC_EXPORT int vllm_cutlass_moe_permute(
    const void* input, const int32_t* topk_ids, const int32_t* token_expert_indices,
    int64_t n_token, int64_t topk, int64_t n_hidden, int64_t n_expert, int64_t n_local_expert,
    int64_t elem_size, void* permuted_input, int64_t* expert_first_token_offset,
    int32_t* inv_permuted_idx, int32_t* permuted_idx, void* sort_workspace,
    size_t sort_workspace_bytes, int32_t* permuted_experts_id, int32_t* sorted_row_idx,
    int32_t* topk_ids_for_sort, void* stream_) {
  VC_CHECK_ARG(elem_size == 1 || elem_size == 2, "elem_size must be 1 (fp8) or 2 (bf16)");
  VC_CHECK_ARG((n_hidden * elem_size) % 16 == 0, "permute kernel needs hidden dim aligned to 16B");
  VC_CHECK_ARG(n_token > 0 && topk > 0 && n_expert > 0 && n_local_expert > 0, "bad sizes");
  VC_TRY
  cudaStream_t stream = static_cast<cudaStream_t>(stream_);
  int64_t const expanded_rows = n_token * topk;
  size_t const need = CubKeyValueSorter::getWorkspaceSize(expanded_rows, static_cast<int>(n_expert));
  if (need > sort_workspace_bytes)
    return vc_fail(VC_SCRATCH_TOO_SMALL, "sort workspace needs %zu bytes, got %zu", need,
                   sort_workspace_bytes);
  // moe_sort_routing: copy_(topk_ids_for_sort, topk_ids), preprocess, sort and scan.
  cudaError_t e = cudaMemcpyAsync(topk_ids_for_sort, topk_ids, sizeof(int32_t) * expanded_rows,
                                  cudaMemcpyDeviceToDevice, stream);
  if (e != cudaSuccess) return vc_fail(VC_CUDA_ERROR, "copy: %s", cudaGetErrorString(e));
  preprocessTopkIdLauncher(topk_ids_for_sort, static_cast<int>(expanded_rows), nullptr,
                           static_cast<int>(n_expert), stream);
  VC_CHECK_LAUNCH("preprocessTopkIdKernel");
  CubKeyValueSorter sorter{};
  sortAndScanExpert(topk_ids_for_sort, token_expert_indices, permuted_experts_id, sorted_row_idx,
                    expert_first_token_offset, static_cast<int>(n_token),
                    static_cast<int>(n_expert), static_cast<int>(n_local_expert),
                    static_cast<int>(topk), sorter, sort_workspace, stream, nullptr);
  VC_CHECK_LAUNCH("sortAndScanExpert");
  // moe_permute_impl: no expert map, so valid_num_ptr is null.
  if (elem_size == 1)
    expandInputRowsKernelLauncher<__nv_fp8_e4m3>(
        static_cast<const __nv_fp8_e4m3*>(input), static_cast<__nv_fp8_e4m3*>(permuted_input),
        sorted_row_idx, inv_permuted_idx, permuted_idx, expert_first_token_offset, n_token,
        nullptr, n_hidden, static_cast<int>(topk), static_cast<int>(n_local_expert), stream);
  else
    expandInputRowsKernelLauncher<__nv_bfloat16>(
        static_cast<const __nv_bfloat16*>(input), static_cast<__nv_bfloat16*>(permuted_input),
        sorted_row_idx, inv_permuted_idx, permuted_idx, expert_first_token_offset, n_token,
        nullptr, n_hidden, static_cast<int>(topk), static_cast<int>(n_local_expert), stream);
  VC_CHECK_LAUNCH("expandInputRowsKernel");
  return VC_OK;
  VC_CATCH("moe_permute")
}

// vLLM's moe_unpermute (moe_permute_unpermute_op.cu): out[t] = sum_j w[t, j] *
// permuted[inv[t, j]] in bf16, rows at or past expert_first_token_offset[n_local_expert]
// skipped (pass the offsets as vLLM's run_cutlass_moe_fp8 does; null = no skip check).
VC_EXPORT int vllm_cutlass_moe_unpermute(const void* permuted_hidden_states,
                                         const float* topk_weights,
                                         const int32_t* inv_permuted_idx,
                                         const int64_t* expert_first_token_offset,
                                         int64_t n_local_expert, int64_t n_token,
                                         int64_t n_hidden, int64_t topk, void* out,
                                         void* stream_) {
  VC_CHECK_ARG((n_hidden * 2) % 16 == 0, "unpermute kernel needs hidden dim aligned to 16B");
  VC_CHECK_ARG(n_token > 0 && topk > 0, "bad sizes");
  cudaStream_t stream = static_cast<cudaStream_t>(stream_);
  int64_t const* valid_ptr =
      expert_first_token_offset ? expert_first_token_offset + n_local_expert : nullptr;
  finalizeMoeRoutingKernelLauncher<__nv_bfloat16, __nv_bfloat16>(
      static_cast<const __nv_bfloat16*>(permuted_hidden_states),
      static_cast<__nv_bfloat16*>(out), topk_weights, inv_permuted_idx, n_token, n_hidden, topk,
      valid_ptr, stream);
  VC_CHECK_LAUNCH("finalizeMoeRoutingKernel");
  return VC_OK;
}

#endif  // VLLM_CUTLASS_TU_ROUTING

// ================================================================================================
#if defined(VLLM_CUTLASS_TU_ACT)

#include "activation_kernels_head.inc"  // vLLM activation_kernels.cu's kernels, unchanged text

// vLLM's silu_and_mul (activation_kernels.cu, LAUNCH_ACTIVATION_GATE_KERNEL(silu_kernel,
// packed_silu_kernel, act_first=true, HAS_CLAMP=false, 0, 1, 0)) for bf16: out [T, d] =
// silu(in[:, :d]) * in[:, d:]. Its 256-bit branch needs compute capability >= 10 and is not
// built into this sm_90a library (an error is returned there).
VC_EXPORT int vllm_cutlass_silu_and_mul(void* out, const void* input, int64_t num_tokens,
                                        int64_t d, void* stream_) {
  using scalar_t = torch::headeronly::impl::ScalarTypeToCPPTypeT<
      torch::headeronly::ScalarType::BFloat16>;
  using packed_t = typename vllm::PackedTypeConverter<scalar_t>::Type;
  VC_CHECK_ARG(d > 0, "d must be positive");
  if (num_tokens == 0) return VC_OK;
  int device = 0, sm = 0, cc_major = 0;
  if (int rc = vc_device_sm_count(&device, &sm, &cc_major)) return rc;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_);
  dim3 grid(num_tokens);
  int const support_vec = (CUDA_VERSION >= 12090 && cc_major >= 10 && num_tokens > 128)
                              ? vllm::VecTraits<true>::ARCH_MAX_VEC_SIZE
                              : vllm::VecTraits<false>::ARCH_MAX_VEC_SIZE;
  int const vec_size = support_vec / static_cast<int>(sizeof(scalar_t));
  bool const use_vec = (d % vec_size == 0);
  int const di = static_cast<int>(d);
  if (use_vec) {
    if (CUDA_VERSION >= 12090 && cc_major >= 10 && num_tokens > 128)
      return vc_fail(VC_CONFIG_NOT_BUILT, "silu_and_mul 256-bit path (sm100) not built");
    dim3 block(std::min(di / vec_size, 1024));
    vllm::act_and_mul_kernel<scalar_t, packed_t, vllm::silu_kernel<scalar_t>,
                             vllm::packed_silu_kernel<packed_t>, true, true, false, false>
        <<<grid, block, 0, stream>>>(static_cast<scalar_t*>(out),
                                     static_cast<const scalar_t*>(input), di, 0.0f, 1.0f, 0.0f);
  } else {
    dim3 block(std::min(di, 1024));
    vllm::act_and_mul_kernel<scalar_t, packed_t, vllm::silu_kernel<scalar_t>,
                             vllm::packed_silu_kernel<packed_t>, true, false, false>
        <<<grid, block, 0, stream>>>(static_cast<scalar_t*>(out),
                                     static_cast<const scalar_t*>(input), di, 0.0f, 1.0f, 0.0f);
  }
  VC_CHECK_LAUNCH("act_and_mul_kernel");
  return VC_OK;
}

#endif  // VLLM_CUTLASS_TU_ACT

// ================================================================================================
#if defined(VLLM_CUTLASS_TU_QUANT)

#include "fp8_quant_kernels_head.inc"  // vLLM quantization/w8a8/fp8/common.cu, unchanged text

namespace {
using vc_in_t =
    torch::headeronly::impl::ScalarTypeToCPPTypeT<torch::headeronly::ScalarType::BFloat16>;
using vc_fp8_t =
    torch::headeronly::impl::ScalarTypeToCPPTypeT<torch::headeronly::ScalarType::Float8_e4m3fn>;
}  // namespace

// vLLM's static_scaled_fp8_quant (common.cu) with a one-element scale (per tensor): bf16 in,
// fp8 e4m3 out, rows of `hidden` elements at the given row strides (elements).
VC_EXPORT int vllm_cutlass_static_scaled_fp8_quant(void* out, const void* input,
                                                   const float* scale, int64_t num_tokens,
                                                   int64_t hidden, int64_t in_row_stride,
                                                   int64_t out_row_stride, void* stream_) {
  VC_CHECK_ARG(hidden > 0 && num_tokens >= 0, "bad sizes");
  if (num_tokens == 0) return VC_OK;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_);
  const int hidden_size = static_cast<int>(hidden);
  const int tokens = static_cast<int>(num_tokens);
  // scale.numel() == 1: group = whole tensor, both scale strides 0.
  const int group_m = tokens, group_n = hidden_size;
  const int64_t scale_stride_i = 0, scale_stride_j = 0;
  dim3 grid(tokens);
  dim3 block(256);
  vllm::scaled_fp8_quant_kernel_strided_group_shape<vc_in_t, vc_fp8_t, true, true>
      <<<grid, block, 0, stream>>>(static_cast<vc_fp8_t*>(out),
                                   static_cast<const vc_in_t*>(input), scale, hidden_size,
                                   in_row_stride, out_row_stride, group_m, group_n,
                                   scale_stride_i, scale_stride_j);
  VC_CHECK_LAUNCH("scaled_fp8_quant_kernel_strided_group_shape");
  return VC_OK;
}

// vLLM's dynamic_scaled_fp8_quant (common.cu): one tensor-wide scale (amax / FP8_MAX) into
// *scale, then the quantised tensor.
VC_EXPORT int vllm_cutlass_dynamic_scaled_fp8_quant(void* out, float* scale, const void* input,
                                                    int64_t num_tokens, int64_t hidden,
                                                    int64_t in_row_stride,
                                                    int64_t out_row_stride, void* stream_) {
  VC_CHECK_ARG(hidden > 0 && num_tokens > 0, "bad sizes");
  int device = 0, sm = 0, cc_major = 0;
  if (int rc = vc_device_sm_count(&device, &sm, &cc_major)) return rc;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_);
  const int hidden_size = static_cast<int>(hidden);
  const int tokens = static_cast<int>(num_tokens);
  const int block_size = vllm::kFp8QuantBlockSize;
  dim3 grid(tokens);
  dim3 block(block_size);
  cudaError_t e = cudaMemsetAsync(scale, 0, sizeof(float), stream);
  if (e != cudaSuccess) return vc_fail(VC_CUDA_ERROR, "memset: %s", cudaGetErrorString(e));
  const vc_in_t* in_ptr = static_cast<const vc_in_t*>(input);
  const bool flat = in_row_stride == hidden_size &&
                    hidden_size % vllm::kFp8QuantVecSize == 0 && vllm::ptr_vec_aligned(in_ptr);
  if (flat) {
    const int64_t num_vecs = num_tokens * hidden / vllm::kFp8QuantVecSize;
    const int64_t max_blocks = static_cast<int64_t>(sm) * 8;
    const int64_t num_blocks = std::max<int64_t>(
        1, std::min<int64_t>(max_blocks, (num_vecs + block_size - 1) / block_size));
    vllm::absmax_reduction_flat<vc_in_t, vc_fp8_t>
        <<<num_blocks, block, 0, stream>>>(scale, in_ptr, num_vecs);
  } else {
    vllm::segmented_max_reduction_strided<vc_in_t, vc_fp8_t><<<grid, block, 0, stream>>>(
        scale, in_ptr, hidden_size, in_row_stride, num_tokens);
  }
  VC_CHECK_LAUNCH("fp8 absmax reduction");
  vllm::scaled_fp8_quant_kernel_strided_dynamic<vc_in_t, vc_fp8_t><<<grid, block, 0, stream>>>(
      static_cast<vc_fp8_t*>(out), in_ptr, scale, hidden_size, in_row_stride, out_row_stride);
  VC_CHECK_LAUNCH("scaled_fp8_quant_kernel_strided_dynamic");
  return VC_OK;
}

// vLLM's dynamic_per_token_scaled_fp8_quant (common.cu): scales[t] = max(amax(row t) /
// FP8_MAX, min_scaling_factor), then the quantised rows. scale_ub may be null.
VC_EXPORT int vllm_cutlass_dynamic_per_token_scaled_fp8_quant(
    void* out, float* scales, const void* input, const float* scale_ub, int64_t num_tokens,
    int64_t hidden, int64_t in_row_stride, int64_t out_row_stride, void* stream_) {
  VC_CHECK_ARG(hidden > 0 && num_tokens >= 0, "bad sizes");
  if (num_tokens == 0) return VC_OK;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_);
  const int hidden_size = static_cast<int>(hidden);
  const int block_size = 256;
  dim3 grid(num_tokens);
  dim3 block(std::min(hidden_size, block_size));
  vllm::dynamic_per_token_scaled_fp8_quant_kernel_strided<vc_in_t, vc_fp8_t>
      <<<grid, block, 0, stream>>>(static_cast<vc_fp8_t*>(out), scales,
                                   static_cast<const vc_in_t*>(input), scale_ub, hidden_size,
                                   in_row_stride, out_row_stride);
  VC_CHECK_LAUNCH("dynamic_per_token_scaled_fp8_quant_kernel_strided");
  return VC_OK;
}

#endif  // VLLM_CUTLASS_TU_QUANT
