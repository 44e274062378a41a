// The table of DeepGEMM FP8 grouped-contiguous kernels compiled into libdeepgemm_bound.so.
//
// Each generated translation unit (build/deepgemm/gen/kernel_NNN.cu) instantiates one
// deep_gemm::fp8_gemm_kernel<...> exactly as DeepGEMM's JIT (jit_kernels/runtime.py,
// FP8GemmRuntime.generate) does and returns its address through dgb_kernel_NNN(); host.cu
// launches it. Nothing here depends on torch.
#pragma once

#include <cstdint>

namespace dgb {

//: one instantiation: DeepGEMM's template arguments and the launch parameters that follow from
//: them (get_best_configs' smem_config, get_num_threads_per_sm)
struct KernelEntry {
    uint32_t n, k, num_groups;             // SHAPE_N, SHAPE_K, kNumGroups
    uint32_t block_m, block_n, block_k;    // BLOCK_M, BLOCK_N, BLOCK_K
    uint32_t block_n_padding, swizzle_d;   // BLOCK_N_PADDING, kSwizzleDMode
    uint32_t num_stages;                   // kNumStages
    uint32_t num_tma_multicast;            // kNumTMAMulticast
    uint32_t multicast_on_a;               // kIsTMAMulticastOnA
    uint32_t smem_size;                    // dynamic shared memory (bytes)
    uint32_t num_threads;                  // 128 TMA threads + 128 per math warp group
    const void* (*kernel)();               // the __global__ function's address
};

}  // namespace dgb
