#!/usr/bin/env bash
# GPU proof, run on the device machine from the repo root (installs nothing from the network):
#   versions -> GPU-marked tests -> compute-sanitizer memcheck -> launch overhead -> summary.
# Needs the committed code objects (vllm_moe_aot/artifacts). Optional: wheels in .whl/ for
# packages the machine lacks (pytest, pyelftools, tqdm), and .vllm_stock/ for the stock path.
# Logs go to $OUT (the device tool's output folder) or ./out.
# memcheck ignores host API return codes (--report-api-errors no): cuda-bindings probes driver
# entry points with cuGetProcAddress, and the misses it expects are not memory errors.
set -u
OUT=${OUT:-./out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=".:.vllm_stock${PYTHONPATH:+:$PYTHONPATH}"
status=()

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 - <<'PY'
import json, torch, triton
import cuda.bindings as cb
from cuda.bindings import driver
driver.cuInit(0)
err, ver = driver.cuDriverGetVersion()
man = json.load(open("vllm_moe_aot/artifacts/manifest.json"))
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}); triton here {triton.__version__}; "
      f"cuda-bindings {cb.__version__}; driver CUDA API {ver // 1000}.{ver % 1000 // 10}")
print(f"code objects built with: {man.get('compiler')}")
PY
} 2>&1 | tee "$OUT/env.txt"

python3 -m pytest -m gpu tests/gpu -q -rA -s -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
status+=("gpu tests: rc=${PIPESTATUS[0]}")

compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 99 --print-limit 20 \
  python3 scripts/sanitize_pipeline.py 2>&1 | tee "$OUT/sanitizer.log"
status+=("memcheck: rc=${PIPESTATUS[0]}")
# EP8 layers (issue 13): one grouped and one gemv variant each, memcheck then racecheck
# (shared-memory hazards; slow, so one small batch)
compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 99 --print-limit 20 \
  python3 scripts/sanitize_pipeline.py --layers ep8 --tokens 37 512 2>&1 \
  | tee "$OUT/sanitizer_ep8_memcheck.log"
status+=("memcheck ep8: rc=${PIPESTATUS[0]}")
compute-sanitizer --tool racecheck --report-api-errors no --error-exitcode 99 --print-limit 20 \
  python3 scripts/sanitize_pipeline.py --layers ep8 --tokens 37 2>&1 \
  | tee "$OUT/sanitizer_ep8_racecheck.log"
status+=("racecheck ep8: rc=${PIPESTATUS[0]}")

if [ -f scripts/launch_overhead.py ]; then
  python3 scripts/launch_overhead.py 2>&1 | tee "$OUT/launch_overhead.log"
  status+=("launch overhead: rc=${PIPESTATUS[0]}")
fi

echo "== summary =="
grep -E "passed|failed|error" "$OUT/gpu_tests.log" | tail -1
grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT"/sanitizer*.log | tail -3
printf '%s\n' "${status[@]}" | tee "$OUT/summary.txt"
for s in "${status[@]}"; do [[ "$s" == *"rc=0" ]] || exit 1; done
