// SiLU-and-mul (see common.cuh for what each file of this folder holds)
#include "common.cuh"

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
