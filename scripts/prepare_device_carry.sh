#!/usr/bin/env bash
# Builds, on the CPU machine, the git-ignored folders a device call carries to the GPU machine
# (which has no vLLM and no network), skipping each one that is already there:
#   .vllm_stock          vLLM 0.33's stock Triton MoE path (the shared vllm-stock tool, from the
#                        venv's vllm)
#   .whl                 pure-Python wheels the GPU machine lacks (pytest and its dependencies,
#                        pyelftools, tqdm), at the venv's versions
#   build/vllm_cutlass   vLLM's CUTLASS MoE as a torch-free library (scripts/build_vllm_cutlass.py)
#   build/deepgemm       DeepGEMM's block-scaled grouped GEMM (scripts/build_deepgemm.py)
# Needs the venv of the README's first command, nvcc, and bare clones of CUTLASS and DeepGEMM
# ($CUTLASS_GIT_DIR, $DEEPGEMM_GIT_DIR; the build scripts' defaults otherwise). About 8 minutes on
# 2 cores. It ends by printing the device tool's carry list for them.
set -euo pipefail
PY=${PY:-.venv/bin/python}
STOCK_PREPARE=${STOCK_PREPARE:-../shared/tools/vllm-stock/prepare.py}
JOBS=${JOBS:-$(nproc)}
log() { echo "[prepare_device_carry $(date -u +%H:%M:%S)] $*"; }

if [ ! -d .vllm_stock ]; then
  log ".vllm_stock: $STOCK_PREPARE"
  "$PY" "$STOCK_PREPARE"
fi
if ! ls .whl/*.whl >/dev/null 2>&1; then
  pins=$("$PY" - <<'EOF'
from importlib.metadata import version
print(" ".join(f"{p}=={version(p)}" for p in
               ("pytest", "pluggy", "iniconfig", "packaging", "pygments", "pyelftools", "tqdm")))
EOF
)
  log ".whl: $pins"
  # shellcheck disable=SC2086  # one argument per pin
  "$PY" -m pip download -q --no-deps --only-binary :all: -d .whl $pins
fi
if [ ! -f build/vllm_cutlass/libvllm_cutlass_moe.so ]; then
  log "build/vllm_cutlass"
  TORCH_INCLUDE_DIR=${TORCH_INCLUDE_DIR:-$("$PY" -c \
    "import torch.utils.cpp_extension as c; print(c.include_paths()[0])")} \
    "$PY" scripts/build_vllm_cutlass.py --jobs "$JOBS" --configs all
fi
if [ ! -f build/deepgemm/libdeepgemm_bound.so ]; then
  log "build/deepgemm"
  "$PY" scripts/build_deepgemm.py --jobs "$JOBS"
fi
log "ready: carry [\".vllm_stock\", \".whl\", \"build/vllm_cutlass\", \"build/deepgemm\"]"
