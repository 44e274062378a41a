#!/usr/bin/env python3
"""Build vLLM 0.33.0's CUTLASS FP8 MoE kernels (sm_90a) as a torch-free shared library.

    python3 scripts/build_vllm_cutlass.py [--jobs N] [--configs vllm-presets|all|M4,M64,...]

Output: ``build/vllm_cutlass/libvllm_cutlass_moe.so`` (cudart linked statically, stripped) and
``build/vllm_cutlass/BUILD_INFO.json`` (what was compiled from where, with sha256 of every vLLM
file used). Nothing from vLLM is copied into the repository: the sources are obtained here into
the git-ignored ``.build_cache/``:

1. vLLM 0.33.0's sdist via ``pip download --no-deps --no-binary :all: --no-clean vllm==0.33.0``
   (metadata preparation fails without vLLM's build requirements, but ``--no-clean`` leaves the
   unpacked sdist in pip's temporary folder, which we point at ``.build_cache/pip-tmp``), or an
   already downloaded ``vllm-0.33.0.tar.gz`` (``--vllm-sdist``). Kept: ``csrc/``,
   ``CMakeLists.txt``, ``PKG-INFO`` and, for reading, the fused-MoE Python sources.
2. CUTLASS at the tag vLLM's CMakeLists.txt pins (``CUTLASS_REVISION``, v4.7.1): from
   ``--cutlass-dir`` / ``$VLLM_CUTLASS_SRC_DIR`` (vLLM's own variable), else a cached copy, else
   ``git clone --depth 1 --branch <tag>``, else ``git archive <tag> include`` from a bare clone
   (``--cutlass-git-dir`` / ``$CUTLASS_GIT_DIR``). If that tag is unavailable the newest tag of
   the same major.minor below it is used (``--strict-cutlass`` refuses instead); the version
   used is recorded in BUILD_INFO.json.

Then the torch-free parts of vLLM's .cu files that also hold torch-facing host functions are
extracted byte-for-byte into ``build/vllm_cutlass/gen/*.inc`` (with ``#line`` directives back to
the vLLM file), ``csrc/vllm_cutlass_moe/*.cu`` (our host wrapper, one translation unit per file)
is compiled, vLLM's ``moe_permute_unpermute_kernel.cu`` is compiled unchanged, and the
objects are linked with ``-cudart static``. Checks: no undefined torch/c10/aoti symbol, the .so
loads with ctypes, ``cuobjdump -lelf`` lists sm_90a code only.

CUTLASS translation units take minutes each (``--jobs`` runs them in parallel; objects whose
command and inputs did not change are reused).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cuda_shared_lib  # noqa: E402 - the script's own folder, put on the path above
from cuda_shared_lib import BuildError  # noqa: E402
from vllm_cutlass_sources import (  # noqa: E402
    UNCHANGED,
    VLLM_DIR,
    VLLM_VERSION,
    fetch_cutlass,
    fetch_vllm,
    log,
    vllm_cutlass_pin,
    write_excerpts,
)

ROOT = Path(__file__).resolve().parent.parent
#: our host wrapper: one translation unit per .cu file (gemm.cu once per tile config), each
#: including common.cuh
WRAPPER_DIR = ROOT / "csrc" / "vllm_cutlass_moe"
COMMON = WRAPPER_DIR / "common.cuh"
LIB_NAME = "libvllm_cutlass_moe.so"
DEFAULT_OUT = ROOT / "build" / "vllm_cutlass"

#: run_cutlass_moe_mm_sm90's configs, in its dispatch order.
ALL_CONFIGS = ("M4", "M64", "N8192", "K8192", "default")
#: What vLLM picks for the two presets' GEMMs (n, k <= 4096 < 8192): M4 (m <= 4), M64
#: (m <= 64), default. N8192 / K8192 only serve n >= 8192 / k >= 8192.
PRESET_CONFIGS = ("M4", "M64", "default")


# ----------------------------------------------------------------------------------------------
# Compile

def torch_include() -> Path:
    """torch's header-only includes (torch/headeronly, torch/csrc/stable): vLLM's headers
    include them; the build references no torch symbol (checked after linking)."""
    env = os.environ.get("TORCH_INCLUDE_DIR")
    if env:
        return Path(env)
    try:
        import torch  # noqa: F401
        return Path(torch.__file__).parent / "include"
    except ImportError:
        pass
    for c in glob.glob(str(ROOT / ".venv/lib/python3*/site-packages/torch/include")):
        return Path(c)
    raise BuildError("torch headers not found: set TORCH_INCLUDE_DIR")


def cublas_include(nvcc: str) -> Path | None:
    """vLLM's torch_utils.h includes <cublas_v2.h> (declarations only; nothing of cuBLAS is
    used or linked): the toolkit's, else the one of the nvidia-cublas wheel."""
    home = cuda_shared_lib.nvcc_home(nvcc)
    for c in [home / "include", *map(Path, glob.glob(
            str(ROOT / ".venv/lib/python3*/site-packages/nvidia/cu*/include")))]:
        if (c / "cublas_v2.h").is_file():
            return c
    return None


def compile_all(args, out: Path, gen: Path, cutlass: dict, configs: list[str]) -> list[Path]:
    nvcc = cuda_shared_lib.nvcc_path(args.nvcc)
    csrc = VLLM_DIR / "csrc"
    includes = [
        f"-I{gen}", f"-I{csrc}", f"-I{csrc / 'quantization/w8a8/cutlass/moe'}",
        f"-I{csrc / 'quantization/w8a8/fp8'}", f"-I{cutlass['include']}",
        f"-I{torch_include()}",
    ]
    cub = cublas_include(nvcc)
    if cub is not None and cub != Path(cuda_shared_lib.nvcc_home(nvcc)) / "include":
        # only the cuBLAS headers, so that no other header of that folder shadows the toolkit's
        shim = out / "cublas_include"
        shutil.rmtree(shim, ignore_errors=True)
        shim.mkdir(parents=True)
        for h in cub.glob("cublas*.h"):
            shutil.copy2(h, shim / h.name)
        includes.append(f"-I{shim}")
    # vLLM's flags for these sources (CMakeLists.txt, cmake/utils.cmake): C++20, release,
    # torch's COMMON_NVCC_FLAGS minus the half/bf16 operator switches (removed for CUDA >= 12),
    # -DENABLE_FP8, --compress-mode=size; gencode for 9.0a only. Not defined:
    # CUTLASS_ENABLE_DIRECT_CUDA_DRIVER_CALL (CUTLASS then gets cuTensorMapEncodeTiled through
    # cudaGetDriverEntryPointByVersion, so the library does not link libcuda).
    flags = ["-std=c++20", "-O3", "-DNDEBUG", "-gencode", "arch=compute_90a,code=sm_90a",
             "--expt-relaxed-constexpr", "--expt-extended-lambda", "-DENABLE_FP8", "-DUSE_CUDA",
             "--compress-mode=size",
             "-Xcompiler=-fPIC,-fvisibility=hidden,-ffunction-sections,-fdata-sections",
             "-Xcudafe", "--diag_suppress=177", "-Xcudafe", "--diag_suppress=550"]
    have = [f"-DVLLM_CUTLASS_HAVE_{c}=1" for c in configs]
    common = [*flags, *includes]
    tus: list[cuda_shared_lib.Unit] = []
    unit = {n: WRAPPER_DIR / f"{n}.cu" for n in ("gemm", "routing", "act", "quant")}
    for cfg in configs:
        tus.append(cuda_shared_lib.Unit(f"gemm_{cfg}", unit["gemm"],
                                        [*common, f"-DVLLM_CUTLASS_GEMM_CFG={cfg}"],
                                        [unit["gemm"], COMMON, gen / "sm90_configs.inc"]))
    tus.append(cuda_shared_lib.Unit("routing", unit["routing"], [*common, *have],
                                    [unit["routing"], COMMON, gen / "moe_data_kernels.inc",
                                     gen / "shuffle_rows_kernel.inc", gen / "build_info.h"]))
    tus.append(cuda_shared_lib.Unit("act", unit["act"], common,
                                    [unit["act"], COMMON, gen / "activation_kernels_head.inc"]))
    tus.append(cuda_shared_lib.Unit("quant", unit["quant"], common,
                                    [unit["quant"], COMMON, gen / "fp8_quant_kernels_head.inc"]))
    permute_cu = csrc / "moe/permute_unpermute_kernels/moe_permute_unpermute_kernel.cu"
    tus.append(cuda_shared_lib.Unit("vllm_moe_permute_unpermute_kernel", permute_cu, common,
                                    [permute_cu]))

    if args.only:
        wanted = set(args.only.split(","))
        tus = [t for t in tus if t.name in wanted]
    # slowest first so that the cores stay busy
    order = sorted(tus, key=lambda t: 0 if t.name.startswith("gemm_") else 1)
    done = cuda_shared_lib.compile_units(nvcc, order, out, args.jobs, log, args.threads)
    return [done[t.name].obj for t in tus]


# ----------------------------------------------------------------------------------------------
# Checks

def check_library(lib: Path, nvcc: str) -> dict:
    """cuda_shared_lib's checks, then the ABI version and build info read through ctypes."""
    res = cuda_shared_lib.check_shared_library(lib, nvcc, "vllm_cutlass_")
    code = ("import ctypes,sys; l=ctypes.CDLL(sys.argv[1]); "
            "l.vllm_cutlass_build_info.restype=ctypes.c_char_p; "
            "print(l.vllm_cutlass_abi_version()); print(l.vllm_cutlass_build_info().decode())")
    stdout = cuda_shared_lib.load_in_fresh_process(lib, code)
    res["ctypes_load"] = "ok"
    res["abi_version"] = int(stdout.splitlines()[0])
    return res


@cuda_shared_lib.reports_build_errors
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda_shared_lib.add_build_options(ap, DEFAULT_OUT)
    ap.add_argument("--configs", default="vllm-presets",
                    help="sm90 tile configs to build: 'vllm-presets' (M4,M64,default: all vLLM "
                         "picks for n, k < 8192), 'all', or a comma list of "
                         + ",".join(ALL_CONFIGS))
    ap.add_argument("--vllm-sdist", help="a downloaded vllm-0.33.0.tar.gz to unpack")
    ap.add_argument("--cutlass-dir", help="a CUTLASS checkout (also $VLLM_CUTLASS_SRC_DIR)")
    ap.add_argument("--cutlass-git-dir", help="a bare CUTLASS clone to `git archive` from")
    ap.add_argument("--strict-cutlass", action="store_true",
                    help="refuse a CUTLASS tag other than vLLM's pin")
    ap.add_argument("--only", help="compile only these translation units (comma list, e.g. "
                    "routing,act,quant,gemm_M4) and stop before linking (development)")
    ap.add_argument("--extract-only", action="store_true",
                    help="obtain sources and write the excerpts, compile nothing")
    args = ap.parse_args(argv)
    if args.configs == "vllm-presets":
        configs = list(PRESET_CONFIGS)
    elif args.configs == "all":
        configs = list(ALL_CONFIGS)
    else:
        configs = [c.strip() for c in args.configs.split(",") if c.strip()]
        unknown = set(configs) - set(ALL_CONFIGS)
        if unknown:
            ap.error(f"unknown configs {sorted(unknown)}; valid: {', '.join(ALL_CONFIGS)}")
    out = Path(args.out).resolve()
    gen = out / "gen"
    vsrc = fetch_vllm(args.vllm_sdist)
    pin = vllm_cutlass_pin()
    cutlass = fetch_cutlass(pin, args.cutlass_dir, args.cutlass_git_dir,
                            args.strict_cutlass)
    log(f"CUTLASS: vLLM pins {pin}; using {cutlass.get('tag') or cutlass['source']} "
        f"(version.h {cutlass['version']})")
    excerpts = write_excerpts(gen)
    log(f"excerpts written to {gen}")
    if args.extract_only:
        return 0
    nvcc = cuda_shared_lib.nvcc_path(args.nvcc)
    short = {"vllm": VLLM_VERSION, "cutlass_pinned": pin,
             "cutlass_used": cutlass.get("tag") or cutlass["version"],
             "configs": configs, "arch": "sm_90a", "nvcc": cuda_shared_lib.nvcc_version(nvcc)}
    literal = json.dumps(json.dumps(short, separators=(",", ":")))  # a C string literal
    (gen / "build_info.h").write_text(f"#define VLLM_CUTLASS_BUILD_INFO {literal}\n")
    objs = compile_all(args, out, gen, cutlass, configs)
    if args.only:
        return 0
    lib = out / LIB_NAME
    cuda_shared_lib.link(nvcc, objs, lib, log)
    checks = check_library(lib, nvcc)
    info = {
        **short,
        **cuda_shared_lib.library_record(lib),
        "vllm_sources": vsrc,
        "cutlass": {k: v for k, v in cutlass.items() if k != "include"},
        "vllm_files_unchanged": [{"file": f"csrc/{f}",
                                  "sha256": cuda_shared_lib.sha256_file(VLLM_DIR / "csrc" / f)}
                                 for f in UNCHANGED],
        "vllm_excerpts_unchanged_text": excerpts,
        "ours": cuda_shared_lib.sources_record(WRAPPER_DIR),
        "checks": checks,
    }
    cuda_shared_lib.write_build_info(out, lib, info, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
