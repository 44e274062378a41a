#!/usr/bin/env bash
# Offline throughput with and without the AOT MoE backend, same model, same prompts, same
# flags: `vllm bench throughput` twice, then the ratio.
#
#   examples/bench_throughput.sh [extra vllm bench throughput arguments]
#
# Environment (defaults): MODEL (Qwen/Qwen3.5-397B-A17B), TP (8), QUANT (fp8_per_channel; set
# QUANT= for a checkpoint that is FP8 already, e.g. Hy3-FP8), INPUT_LEN (1024), OUTPUT_LEN (256),
# NUM_PROMPTS (1000), OUT (out/bench_throughput).
set -euo pipefail

MODEL=${MODEL:-Qwen/Qwen3.5-397B-A17B}
TP=${TP:-8}
QUANT=${QUANT-fp8_per_channel}
INPUT_LEN=${INPUT_LEN:-1024}
OUTPUT_LEN=${OUTPUT_LEN:-256}
NUM_PROMPTS=${NUM_PROMPTS:-1000}
OUT=${OUT:-out/bench_throughput}
mkdir -p "$OUT"

args=(--model "$MODEL" -tp "$TP" --dataset-name random --input-len "$INPUT_LEN"
      --output-len "$OUTPUT_LEN" --num-prompts "$NUM_PROMPTS")
if [[ -n "$QUANT" ]]; then
    args+=(--quantization "$QUANT")
fi

echo "== stock: vLLM's own MoE kernels"
env -u VLLM_MOE_BACKEND vllm bench throughput "${args[@]}" \
    --output-json "$OUT/stock.json" "$@" 2>&1 | tee "$OUT/stock.log"

echo "== asmjit_aot: AOT kernels where tuned faster, vLLM's Triton MoE elsewhere"
VLLM_MOE_BACKEND=asmjit_aot vllm bench throughput "${args[@]}" \
    --output-json "$OUT/aot.json" "$@" 2>&1 | tee "$OUT/aot.log"

# The backend must really have been used: the plugin logs one line per process.
if ! grep -q "vllm-moe-aot .* on:" "$OUT/aot.log"; then
    echo "warning: no vllm-moe-aot start-up line in $OUT/aot.log: was the plugin installed?" >&2
fi

python3 - "$OUT/stock.json" "$OUT/aot.json" <<'PY'
import json, sys
stock, aot = (json.load(open(p)) for p in sys.argv[1:3])
for key in ("requests_per_second", "tokens_per_second"):
    print(f"{key:>20}: stock {stock[key]:10.2f}  asmjit_aot {aot[key]:10.2f}  "
          f"x{aot[key] / stock[key]:.3f}")
print(f"{'elapsed_time':>20}: stock {stock['elapsed_time']:9.2f}s  asmjit_aot "
      f"{aot['elapsed_time']:9.2f}s")
PY
