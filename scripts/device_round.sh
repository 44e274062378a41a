#!/usr/bin/env bash
# One device call that does a whole round (the device tool returns at most 8 files, so
# everything is packed into $OUT/round.tar.gz):
#   STEPS="check tune profile bench" bash scripts/device_round.sh
# check: scripts/gpu_check.sh; tune: `vllm-moe-aot tune` for both presets (tuned CSVs and
# their logs); profile: per-kernel times ($PROFILE_ARGS lines, ';'-separated); bench: `vllm-moe-aot
# bench` for both presets (JSON, PNG, stdout; with the configs this call's tune step wrote, if
# any); peertest: the peers' GPU tests (vLLM CUTLASS, torch); heldout: the default policy's
# second held-out check (scripts/validate_policy.py --layers held-out-2); eptest: the EP8 and
# wide-N GPU tests with the soak, and the peers'; gputest: every GPU-marked test
# ($GPUTEST_K, $GPUTEST_ARGS); sanitize: the EP8 layers under memcheck and racecheck; ncu:
# Nsight Compute sections of the GEMM kernels ($NCU_ARGS, profile_pipeline.py arguments); pmemcheck:
# compute-sanitizer memcheck of eager calls at any layer ($PMEMCHECK_ARGS, profile_pipeline.py
# arguments, run with --plain-calls 2). Needs carry
# [".vllm_stock", ".whl", "build/vllm_cutlass", "build/deepgemm"], all four built on the CPU machine by
# scripts/prepare_device_carry.sh.
# STEP_TIMEOUT (s, default 560) bounds each step so that the tarball is always written.
# TUNE_INSTALL=1 makes the tune step's CSVs the package's configs for the later steps of the call.
set -u
OUT=${OUT:-./out}
W=$(mktemp -d)
export PYTHONUNBUFFERED=1
STEPS=${STEPS:-check tune bench}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=".:.vllm_stock${PYTHONPATH:+:$PYTHONPATH}"
rc=0
T=${STEP_TIMEOUT:-560}
# the tarball is rewritten after every step: a call cut by the device's limit inside a step
# still returns every step before it
pack() { tar -C "$W" -czf "$OUT/round.tar.gz" .; }
# each_line LINES FN: FN N ARGS for each ';'-separated line of LINES (N counts from 1)
each_line() {
  local lines a i=0
  IFS=';' read -ra lines <<< "$1"
  for a in "${lines[@]}"; do i=$((i + 1)); "$2" "$i" "$a"; done
}
# shellcheck disable=SC2086  # $2: the line's arguments, split on spaces
profile_line() { python3 scripts/profile_pipeline.py $2 2>&1 | tee "$W/profile/p$1.txt" || rc=1; }
# shellcheck disable=SC2086
ncu_line() {
  timeout "$T" ncu --clock-control none -k "regex:${NCU_KERNELS:-moe_grouped_stage}" \
    --launch-skip "${NCU_SKIP:-6}" --launch-count "${NCU_COUNT:-2}" \
    --section SpeedOfLight --section ComputeWorkloadAnalysis \
    --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \
    python3 scripts/profile_pipeline.py --plain-calls 5 $2 > "$W/ncu/n$1.txt" 2>&1 || rc=1
  grep -E "moe_grouped|Duration|Compute \(SM\) Throughput|Memory Throughput|L2 Cache Throughput" \
    "$W/ncu/n$1.txt" | head -20
  pack
}
# sanitizer TOOL CMD...: CMD under compute-sanitizer, bounded by the step timeout (host API
# return codes ignored, as in gpu_check.sh: cuda-bindings' probes are not memory errors)
sanitizer() {
  timeout "$T" compute-sanitizer --tool "$1" --report-api-errors no --error-exitcode 99 \
    --print-limit 20 "${@:2}"
}
# shellcheck disable=SC2086
pmemcheck_line() {
  sanitizer memcheck python3 scripts/profile_pipeline.py --plain-calls 2 $2 \
    > "$W/pmemcheck/m$1.txt" 2>&1 || rc=1
  grep -E "ERROR SUMMARY|Error" "$W/pmemcheck/m$1.txt" | tail -4
  pack
}
for step in $STEPS; do
  echo "== $step $(date -u +%H:%M:%S)"
  case $step in
    check)
      mkdir -p "$W/check"; OUT="$W/check" bash scripts/gpu_check.sh > "$W/check/stdout.txt" 2>&1 \
        || rc=1
      tail -6 "$W/check/stdout.txt" ;;
    tune)
      # TUNE_UPDATE=1: start from the committed tuned CSVs (with TUNE_ARGS="--tokens .. --force"
      # to re-tune some rows); TUNE_PRESETS: which layers (default both)
      mkdir -p "$W/tune"
      [ "${TUNE_UPDATE:-0}" = 1 ] && cp vllm_moe_aot/configs/*.tuned.csv "$W/tune/"
      # TUNE_INPUTS: more untuned CSVs (paths) to tune beside the presets
      inputs=()
      for p in ${TUNE_PRESETS:-qwen3.5-397b-a17b_fp8_ptpc_tp8 hy3_fp8_per_tensor_tp8}; do
        inputs+=("configs/$p.untuned.csv")
      done
      for f in ${TUNE_INPUTS:-}; do inputs+=("$f"); done
      for f in "${inputs[@]}"; do
        p=$(basename "$f" .untuned.csv)
        # shellcheck disable=SC2086
        timeout "$T" python3 -m vllm_moe_aot.cli tune -i "$f" -o "$W/tune/$p.tuned.csv" \
          --timeout 120 --no-progress ${TUNE_ARGS:-} > "$W/tune/$p.stdout.txt" 2>&1 || rc=1
        tail -22 "$W/tune/$p.stdout.txt"
      done
      # TUNE_INSTALL=1: the tuned CSVs into this copy's vllm_moe_aot/configs too, so that the
      # steps after this one that read the package's configs (eptest, gputest, check) run them
      if [ "${TUNE_INSTALL:-0}" = 1 ]; then
        cp "$W/tune/"*.tuned.csv vllm_moe_aot/configs/ && echo "tuned CSVs installed in vllm_moe_aot/configs"
      fi
      CONFIG_DIR=${CONFIG_DIR:-$W/tune} ;;
    peertest)
      mkdir -p "$W/peertest"
      timeout "$T" python3 -m pytest -m gpu -q -p no:cacheprovider -s tests/gpu/test_vllm_cutlass_gpu.py \
        tests/gpu/test_torch_peer_gpu.py > "$W/peertest/stdout.txt" 2>&1 || rc=1
      grep -E "vllm_cutlass|passed|failed|error" "$W/peertest/stdout.txt" | tail -40 ;;
    heldout)
      mkdir -p "$W/heldout"
      timeout "$T" python3 scripts/validate_policy.py --layers held-out-2 --out "$W/heldout" \
        > "$W/heldout/stdout.txt" 2>&1 || rc=1
      tail -30 "$W/heldout/stdout.txt" ;;
    profile)
      mkdir -p "$W/profile"
      each_line "${PROFILE_ARGS:-}" profile_line ;;
    bench)
      # BENCH_LAYERS: ';'-separated "label=bench arguments" (default: both presets at TP8)
      mkdir -p "$W/bench"
      IFS=';' read -ra layers <<< "${BENCH_LAYERS:-qwen3.5-397b-a17b=--preset qwen3.5-397b-a17b;hy3=--preset hy3}"
      for l in "${layers[@]}"; do
        p=${l%%=*}
        # shellcheck disable=SC2086
        timeout "$T" python3 -m vllm_moe_aot.cli bench ${l#*=} ${BENCH_ARGS:-} \
          --config-dir "${CONFIG_DIR:-vllm_moe_aot/configs}" \
          --json "$W/bench/bench_$p.json" --plot "$W/bench/bench_$p.png" \
          > "$W/bench/bench_$p.txt" 2>&1 || rc=1
        sed -n '/^ *M variant/,$p' "$W/bench/bench_$p.txt"
        pack  # a call cut in a later layer still returns this one
      done ;;
    eptest)
      # issue 13: EP8 and wide-N GPU tests (with the soak), the peers' GPU tests, and the EP8
      # layers under memcheck and racecheck
      mkdir -p "$W/eptest"
      # EPTEST_K: a pytest -k expression (spaces allowed); EPTEST_ARGS: more test paths
      # -m gpu: the Triton interpreter stays off (tests/conftest.py)
      timeout "$T" python3 -m pytest -m gpu -q -p no:cacheprovider -s -rA ${EPTEST_K:+-k "$EPTEST_K"} \
        ${EPTEST_ARGS:-} tests/gpu/test_pipeline_ep_gpu.py tests/gpu/test_vllm_cutlass_gpu.py \
        tests/gpu/test_torch_peer_gpu.py > "$W/eptest/stdout.txt" 2>&1 || rc=1
      grep -E "soak|passed|failed|Error" "$W/eptest/stdout.txt" | tail -30 ;;
    gputest)
      # every GPU-marked test (gpu_check.sh's pytest part alone); GPUTEST_K: a -k expression,
      # GPUTEST_ARGS: test paths instead of tests/gpu
      mkdir -p "$W/gputest"
      # shellcheck disable=SC2086
      timeout "$T" python3 -m pytest -m gpu -q -p no:cacheprovider -s -rfE \
        ${GPUTEST_K:+-k "$GPUTEST_K"} ${GPUTEST_ARGS:-tests/gpu} > "$W/gputest/stdout.txt" 2>&1 \
        || rc=1
      grep -E "soak|passed|failed|FAIL|Error" "$W/gputest/stdout.txt" | tail -30 ;;
    sanitize)
      mkdir -p "$W/sanitize"
      # SANITIZE_TOOLS (default both), SANITIZE_LAYERS (ep8 | presets), SANITIZE_TOKENS (ep8),
      # SANITIZE_ONLY (preset names; default all), SANITIZE_VARIANTS (ep8: grouped variants)
      for tool in ${SANITIZE_TOOLS:-memcheck racecheck}; do
        # shellcheck disable=SC2086
        sanitizer $tool python3 scripts/sanitize_pipeline.py --layers ${SANITIZE_LAYERS:-ep8} \
          --tokens ${SANITIZE_TOKENS:-37} ${SANITIZE_ONLY:+--only $SANITIZE_ONLY} \
          ${SANITIZE_VARIANTS:+--variants $SANITIZE_VARIANTS} \
          > "$W/sanitize/$tool.txt" 2>&1 || rc=1
        grep -E "sanitize|SUMMARY" "$W/sanitize/$tool.txt" | tail -8
      done ;;
    ncu)
      # Nsight Compute on the GEMM kernels of one pipeline call: NCU_ARGS lines (';'-separated)
      # of scripts/profile_pipeline.py arguments; the 4th call's kernels matching NCU_KERNELS
      # (default: both grouped GEMM stages) are profiled at the card's own clocks
      mkdir -p "$W/ncu"
      each_line "${NCU_ARGS:-}" ncu_line ;;
    pmemcheck)
      mkdir -p "$W/pmemcheck"
      each_line "${PMEMCHECK_ARGS:-}" pmemcheck_line ;;
    *) echo "unknown step $step"; rc=2 ;;
  esac
  pack
done
pack
echo "== done $(date -u +%H:%M:%S) rc=$rc"
exit $rc
