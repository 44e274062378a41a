"""Peers: what vLLM or torch would run for a layer, timed beside ours in the same run.

``vllm_triton`` (vLLM's Triton fused-MoE path: the real vLLM where importable, else the carried
copy of its kernels), ``torch_grouped`` (torch's ``_scaled_grouped_mm`` pipeline and the two
GEMMs alone as the CUTLASS-class bound), ``vllm_cutlass`` (vLLM's CUTLASS MoE kernels built
without vLLM, through ctypes) and ``deepgemm_bound`` (block FP8: the two GEMMs alone on
DeepGEMM's grouped-contiguous kernel, built ahead of time, through ctypes).
"""
