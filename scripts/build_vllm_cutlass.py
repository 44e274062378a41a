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
import concurrent.futures
import datetime
import glob
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vllm_cutlass_sources import (  # noqa: E402 - the script's own folder, put on the path above
    UNCHANGED,
    VLLM_DIR,
    VLLM_VERSION,
    BuildError,
    fetch_cutlass,
    fetch_vllm,
    log,
    sha256_file,
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
# Compile and link

def nvcc_path(arg: str | None) -> str:
    for c in (arg, os.environ.get("NVCC"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if c and Path(c).exists():
            return c
    raise BuildError("nvcc not found (pass --nvcc)")


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


def nvcc_home(nvcc: str) -> Path:
    """The CUDA toolkit folder of ``nvcc`` (it may be a wrapper script elsewhere)."""
    real = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", "/dev/null"],
                          capture_output=True, text=True).stderr
    m = re.search(r"TOP=(\S+)", real)
    if m:
        return Path(m.group(1).strip('"'))
    return Path(os.path.realpath(nvcc)).parent.parent


def cublas_include(nvcc: str) -> Path | None:
    """vLLM's torch_utils.h includes <cublas_v2.h> (declarations only; nothing of cuBLAS is
    used or linked): the toolkit's, else the one of the nvidia-cublas wheel."""
    home = nvcc_home(nvcc)
    for c in [home / "include", *map(Path, glob.glob(
            str(ROOT / ".venv/lib/python3*/site-packages/nvidia/cu*/include")))]:
        if (c / "cublas_v2.h").is_file():
            return c
    return None


def _stamp(cmd: list[str], inputs: list[Path]) -> str:
    h = hashlib.sha256(json.dumps(cmd).encode())
    for p in inputs:
        h.update(p.read_bytes())
    return h.hexdigest()


def compile_all(args, out: Path, gen: Path, cutlass: dict, configs: list[str]) -> list[Path]:
    nvcc = nvcc_path(args.nvcc)
    csrc = VLLM_DIR / "csrc"
    includes = [
        f"-I{gen}", f"-I{csrc}", f"-I{csrc / 'quantization/w8a8/cutlass/moe'}",
        f"-I{csrc / 'quantization/w8a8/fp8'}", f"-I{cutlass['include']}",
        f"-I{torch_include()}",
    ]
    cub = cublas_include(nvcc)
    if cub is not None and cub != Path(nvcc_home(nvcc)) / "include":
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
    tus: list[tuple[str, Path, list[str], list[Path]]] = []
    unit = {n: WRAPPER_DIR / f"{n}.cu" for n in ("gemm", "routing", "act", "quant")}
    for cfg in configs:
        tus.append((f"gemm_{cfg}", unit["gemm"], [f"-DVLLM_CUTLASS_GEMM_CFG={cfg}"],
                    [unit["gemm"], COMMON, gen / "sm90_configs.inc"]))
    tus.append(("routing", unit["routing"], have,
                [unit["routing"], COMMON, gen / "moe_data_kernels.inc",
                 gen / "shuffle_rows_kernel.inc", gen / "build_info.h"]))
    tus.append(("act", unit["act"], [],
                [unit["act"], COMMON, gen / "activation_kernels_head.inc"]))
    tus.append(("quant", unit["quant"], [],
                [unit["quant"], COMMON, gen / "fp8_quant_kernels_head.inc"]))
    permute_cu = csrc / "moe/permute_unpermute_kernels/moe_permute_unpermute_kernel.cu"
    tus.append(("vllm_moe_permute_unpermute_kernel", permute_cu, [], [permute_cu]))

    objdir = out / "obj"
    logdir = out / "logs"
    objdir.mkdir(parents=True, exist_ok=True)
    logdir.mkdir(parents=True, exist_ok=True)

    def build(tu):
        name, src, defs, inputs = tu
        obj = objdir / f"{name}.o"
        cmd = [nvcc, *flags, *includes, *defs, "-x", "cu", "-c", str(src), "-o", str(obj)]
        stamp = _stamp(cmd, inputs)
        stamp_file = obj.with_suffix(".stamp")
        if obj.exists() and stamp_file.exists() and stamp_file.read_text() == stamp:
            return name, obj, 0.0, "reused"
        if args.threads:
            cmd.insert(1, f"--threads={args.threads}")
        t0 = time.monotonic()
        logf = logdir / f"{name}.log"
        with open(logf, "w") as lf:
            lf.write(shlex.join(cmd) + "\n\n")
            lf.flush()
            r = subprocess.run(cmd, stdout=lf, stderr=subprocess.STDOUT)
        dt = time.monotonic() - t0
        if r.returncode != 0:
            tail = "".join(logf.read_text().splitlines(True)[-40:])
            raise BuildError(f"{name}: nvcc failed (rc={r.returncode}, log {logf}):\n{tail}")
        stamp_file.write_text(stamp)
        return name, obj, dt, "compiled"

    if args.only:
        wanted = set(args.only.split(","))
        tus = [t for t in tus if t[0] in wanted]
    # slowest first so that the cores stay busy
    order = sorted(tus, key=lambda t: 0 if t[0].startswith("gemm_") else 1)
    objs: dict[str, Path] = {}
    log(f"compiling {len(tus)} translation units with {args.jobs} jobs "
        f"(logs in {logdir.relative_to(ROOT) if logdir.is_relative_to(ROOT) else logdir})")
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as ex:
        futs = [ex.submit(build, tu) for tu in order]
        for f in concurrent.futures.as_completed(futs):
            name, obj, dt, how = f.result()
            objs[name] = obj
            log(f"  {name}: {how}" + (f" in {dt:.0f} s" if dt else ""))
    return [objs[t[0]] for t in tus]


def link(args, objs: list[Path], lib: Path) -> None:
    nvcc = nvcc_path(args.nvcc)
    tmp = lib.with_suffix(".so.tmp")
    cmd = [nvcc, "-shared", "-gencode", "arch=compute_90a,code=sm_90a", "-cudart", "static",
           "-o", str(tmp), *map(str, objs),
           "-Xcompiler=-static-libstdc++,-static-libgcc",
           "-Xlinker", "--exclude-libs,ALL", "-Xlinker", "-z,defs", "-Xlinker", "--gc-sections",
           "-Xlinker", "-soname," + LIB_NAME]
    log("linking: " + shlex.join(cmd))
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise BuildError(f"link failed:\n{r.stdout}\n{r.stderr}")
    strip = shutil.which("strip")
    if strip:
        subprocess.run([strip, "--strip-unneeded", str(tmp)], check=True)
    tmp.replace(lib)


# ----------------------------------------------------------------------------------------------
# Checks

def find_cuobjdump(nvcc: str) -> Path:
    """cuobjdump beside nvcc, on PATH, or the copy Triton ships (a toolkit may lack it)."""
    cands = [nvcc_home(nvcc) / "bin" / "cuobjdump",
             Path(shutil.which("cuobjdump") or "/nonexistent")]
    try:
        import triton

        cands.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    except ImportError:
        pass
    for c in cands:
        if c.is_file():
            return c
    raise BuildError("cuobjdump not found (beside nvcc, on PATH, or in triton's backends)")


def check_library(lib: Path, nvcc: str) -> dict:
    res: dict = {}
    nm = subprocess.run(["nm", "-D", "--undefined-only", str(lib)], capture_output=True,
                        text=True).stdout
    undefined = sorted({ln.split()[-1] for ln in nm.splitlines() if ln.strip()})
    bad = [s for s in undefined if re.search(r"aoti_|torch|c10|_ZN3c10|_ZN5torch|cublas", s)]
    if bad:
        raise BuildError(f"{lib.name} references torch/cuBLAS symbols: {bad[:10]}")
    glibc = sorted({m for s in undefined for m in re.findall(r"@GLIBC_([\d.]+)", s)},
                   key=lambda v: tuple(map(int, v.split("."))))
    res["max_glibc"] = glibc[-1] if glibc else None
    needed = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True).stdout
    res["needed"] = re.findall(r"\(NEEDED\).*\[(.*)\]", needed)
    exported = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True,
                              text=True).stdout
    res["exports"] = sorted(ln.split()[-1] for ln in exported.splitlines()
                            if " T " in ln and ln.split()[-1].startswith("vllm_cutlass_"))
    cuobjdump = find_cuobjdump(nvcc)
    elf = subprocess.run([str(cuobjdump), "-lelf", str(lib)], capture_output=True, text=True)
    arches = sorted(set(re.findall(r"\.(sm_\w+)\.cubin", elf.stdout)))
    res["cubin_arches"] = arches
    res["cubins"] = len(re.findall(r"\.cubin", elf.stdout))
    if arches != ["sm_90a"]:
        raise BuildError(f"cuobjdump -lelf: expected sm_90a cubins only, got {arches}\n"
                         f"{elf.stdout[-2000:]}{elf.stderr[-500:]}")
    ptx = subprocess.run([str(cuobjdump), "-lptx", str(lib)], capture_output=True, text=True)
    res["ptx_entries"] = len(re.findall(r"PTX file", ptx.stdout))
    # load with ctypes in a fresh process (no GPU needed: cudart is static and initialises
    # lazily, nothing calls the driver at load time)
    code = ("import ctypes,sys; l=ctypes.CDLL(sys.argv[1]); "
            "l.vllm_cutlass_build_info.restype=ctypes.c_char_p; "
            "print(l.vllm_cutlass_abi_version()); print(l.vllm_cutlass_build_info().decode())")
    r = subprocess.run([sys.executable, "-c", code, str(lib)], capture_output=True, text=True)
    if r.returncode != 0:
        raise BuildError(f"ctypes could not load {lib}: {r.stderr[-2000:]}")
    res["ctypes_load"] = "ok"
    res["abi_version"] = int(r.stdout.splitlines()[0])
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (build/vllm_cutlass)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                    help="translation units compiled in parallel (default: CPU count)")
    ap.add_argument("--threads", type=int, default=0, help="nvcc --threads per unit (0: off)")
    ap.add_argument("--configs", default="vllm-presets",
                    help="sm90 tile configs to build: 'vllm-presets' (M4,M64,default: all vLLM "
                         "picks for n, k < 8192), 'all', or a comma list of "
                         + ",".join(ALL_CONFIGS))
    ap.add_argument("--vllm-sdist", help="a downloaded vllm-0.33.0.tar.gz to unpack")
    ap.add_argument("--cutlass-dir", help="a CUTLASS checkout (also $VLLM_CUTLASS_SRC_DIR)")
    ap.add_argument("--cutlass-git-dir", help="a bare CUTLASS clone to `git archive` from")
    ap.add_argument("--strict-cutlass", action="store_true",
                    help="refuse a CUTLASS tag other than vLLM's pin")
    ap.add_argument("--nvcc", help="nvcc to use (default: $NVCC, then PATH)")
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
    try:
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
        nvcc = nvcc_path(args.nvcc)
        nvcc_version = subprocess.run([nvcc, "--version"], capture_output=True,
                                      text=True).stdout.strip().splitlines()[-1]
        short = {"vllm": VLLM_VERSION, "cutlass_pinned": pin,
                 "cutlass_used": cutlass.get("tag") or cutlass["version"],
                 "configs": configs, "arch": "sm_90a", "nvcc": nvcc_version}
        literal = json.dumps(json.dumps(short, separators=(",", ":")))  # a C string literal
        (gen / "build_info.h").write_text(f"#define VLLM_CUTLASS_BUILD_INFO {literal}\n")
        objs = compile_all(args, out, gen, cutlass, configs)
        if args.only:
            return 0
        lib = out / LIB_NAME
        link(args, objs, lib)
        checks = check_library(lib, nvcc)
        info = {
            **short,
            "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            "library": str(lib.relative_to(ROOT)) if lib.is_relative_to(ROOT) else str(lib),
            "size_bytes": lib.stat().st_size,
            "sha256": sha256_file(lib),
            "vllm_sources": vsrc,
            "cutlass": {k: v for k, v in cutlass.items() if k != "include"},
            "vllm_files_unchanged": [{"file": f"csrc/{f}",
                                      "sha256": sha256_file(VLLM_DIR / "csrc" / f)}
                                     for f in UNCHANGED],
            "vllm_excerpts_unchanged_text": excerpts,
            "ours": {str(f.relative_to(ROOT)): sha256_file(f)
                     for f in sorted(WRAPPER_DIR.iterdir()) if f.suffix in (".cu", ".cuh")},
            "checks": checks,
        }
        (out / "BUILD_INFO.json").write_text(json.dumps(info, indent=1) + "\n")
        log(f"built {lib} ({lib.stat().st_size / 2**20:.2f} MiB): {checks['cubins']} sm_90a "
            f"cubins, exports {len(checks['exports'])} functions, needs {checks['needed']}, "
            f"GLIBC <= {checks['max_glibc']}; ctypes load ok")
        return 0
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
