// Exported API basics, config choice, MoE data and permute launches (see common.cuh for what each file of this folder holds)
#include "common.cuh"

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

VC_EXPORT int vllm_cutlass_abi_version() { return 2; }  // 2: permute takes the expert map

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

// vLLM's moe_permute_with_scratch (moe_permute_unpermute_op.cu: moe_sort_routing +
// moe_permute_impl). topk_ids [n_token, topk] int32; token_expert_indices = arange(n_token *
// topk) int32; permuted_idx must be pre-filled with n_token * topk (the Python side does that,
// as vLLM's moe_permute does); elem_size 1 (fp8) or 2 (bf16). expert_map (nullable, int32
// [n_expert] global -> local slot or -1) as vLLM passes it under expert parallelism: pairs of
// other ranks sort past the local experts and expandInputRows stops at their count.
VC_EXPORT int vllm_cutlass_moe_permute(
    const void* input, const int32_t* topk_ids, const int32_t* token_expert_indices,
    const int32_t* expert_map,
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
  preprocessTopkIdLauncher(topk_ids_for_sort, static_cast<int>(expanded_rows), expert_map,
                           static_cast<int>(n_expert), stream);
  VC_CHECK_LAUNCH("preprocessTopkIdKernel");
  CubKeyValueSorter sorter{};
  sortAndScanExpert(topk_ids_for_sort, token_expert_indices, permuted_experts_id, sorted_row_idx,
                    expert_first_token_offset, static_cast<int>(n_token),
                    static_cast<int>(n_expert), static_cast<int>(n_local_expert),
                    static_cast<int>(topk), sorter, sort_workspace, stream, nullptr);
  VC_CHECK_LAUNCH("sortAndScanExpert");
  // moe_permute_impl: with an expert map, rows stop at the local experts' count
  int64_t const* valid_num = expert_map ? expert_first_token_offset + n_local_expert : nullptr;
  if (elem_size == 1)
    expandInputRowsKernelLauncher<__nv_fp8_e4m3>(
        static_cast<const __nv_fp8_e4m3*>(input), static_cast<__nv_fp8_e4m3*>(permuted_input),
        sorted_row_idx, inv_permuted_idx, permuted_idx, expert_first_token_offset, n_token,
        valid_num, n_hidden, static_cast<int>(topk), static_cast<int>(n_local_expert), stream);
  else
    expandInputRowsKernelLauncher<__nv_bfloat16>(
        static_cast<const __nv_bfloat16*>(input), static_cast<__nv_bfloat16*>(permuted_input),
        sorted_row_idx, inv_permuted_idx, permuted_idx, expert_first_token_offset, n_token,
        valid_num, n_hidden, static_cast<int>(topk), static_cast<int>(n_local_expert), stream);
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
