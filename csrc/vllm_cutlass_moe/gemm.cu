// Grouped GEMM: one translation unit per sm90 tile config (-DVLLM_CUTLASS_GEMM_CFG=...).
#include "common.cuh"

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
