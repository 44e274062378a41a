// fp8 quantisation (see common.cuh for what each file of this folder holds)
#include "common.cuh"

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
