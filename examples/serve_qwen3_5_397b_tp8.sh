#!/usr/bin/env bash
# Serve Qwen3.5-397B-A17B on 8 GPUs (H100/H200, MI300X/MI325X, MI350X/MI355X) with online
# per-channel FP8 (ptpc: per-output-channel weight scales, dynamic per-token activations) and
# the AOT fused-MoE kernels for the batch sizes the shipped configs were tuned faster.
#
#   examples/serve_qwen3_5_397b_tp8.sh [extra vllm serve arguments]
#
# Environment: MODEL (default Qwen/Qwen3.5-397B-A17B), PORT (8000). Everything else is passed
# through to `vllm serve`. Unset VLLM_MOE_BACKEND (or run plain `vllm serve`) for vLLM's own
# MoE kernels; nothing else changes.
set -euo pipefail

MODEL=${MODEL:-Qwen/Qwen3.5-397B-A17B}
PORT=${PORT:-8000}

# The switch: vllm-moe-aot's plugin (installed with the package) acts only when this is set.
export VLLM_MOE_BACKEND=asmjit_aot

# What this GPU will run: code objects for its arch and, per batch size, AOT or stock.
vllm-moe-aot info --preset qwen3.5-397b-a17b

# Each vLLM process logs one "vllm-moe-aot ... on: GPU ..." line at start and, per MoE layer
# shape, either "... use AotExperts" or the reason the layer stays with vLLM.
exec vllm serve "$MODEL" \
    -tp 8 \
    --quantization fp8_per_channel \
    --port "$PORT" \
    "$@"
