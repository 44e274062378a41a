#pragma once
// Thin host wrapper around vLLM 0.33.0's CUTLASS FP8 MoE kernels (sm_90a), without torch.
//
// Our own code (vllm-moe-aot). It compiles vLLM's kernel templates as they are and replaces only
// vLLM's torch-facing host functions (torch::stable::Tensor in, current stream from torch) with
// extern "C" functions that take raw device pointers, sizes and a cudaStream_t, so that the
// library loads with ctypes in any torch version (no libtorch symbol is referenced; the build
// script checks). Every launch configuration below is copied from the vLLM host function named
// in the comment above it. scripts/build_vllm_cutlass.py obtains vLLM's sources and CUTLASS,
// extracts the torch-free parts of vLLM's .cu files byte-for-byte into build/.../gen/*.inc and
// compiles one translation unit per file of this folder, each including this header:
//
//   gemm.cu (one unit per tile config, -DVLLM_CUTLASS_GEMM_CFG=...): grouped_mm_c3x.cuh and
//       get_group_starts.cuh (vLLM headers, unchanged) + gen/sm90_configs.inc (the sm90 tile
//       config structs of grouped_mm_c3x_sm90.cu, unchanged text); host code = our copy of
//       cutlass_group_gemm_caller with raw pointers and caller-provided scratch.
//   routing.cu: the exported API's error buffer and build info; the sm90 config choice of
//       run_cutlass_moe_mm_sm90; gen/moe_data_kernels.inc (kernels of moe_data.cu, unchanged);
//       gen/shuffle_rows_kernel.inc (shuffleInputRowsKernel of moe_permute_unpermute_op.cu,
//       unchanged); moe/permute_unpermute_kernels/moe_permute_unpermute_kernel.h (+ .inl,
//       unchanged); host code = new launches mirroring moe_data.cu / moe_permute_unpermute_op.cu.
//   act.cu: gen/activation_kernels_head.inc (activation_kernels.cu up to its first
//       `}  // namespace vllm`, unchanged); host = LAUNCH_ACTIVATION_GATE_KERNEL for silu_and_mul.
//   quant.cu: gen/fp8_quant_kernels_head.inc (quantization/w8a8/fp8/common.cu up to its first
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

// Defined in routing.cu; shared by all translation units (hidden, not exported).
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
