#!/usr/bin/env python3
"""Build DeepGEMM's FP8 grouped-contiguous GEMM (sm_90a) ahead of time as a torch-free library.

    python3 scripts/build_deepgemm.py [--jobs N] [--shape E,K,N[,topk] ...] [--num-sms 132]
                                      [--max-tokens 131072] [--list]

Output: ``build/deepgemm/libdeepgemm_bound.so`` (cudart linked statically, stripped) and
``build/deepgemm/BUILD_INFO.json`` (sources, commits, every kernel with the m range that picks
it, checks). The library serves ``vllm_moe_aot/measure/peers/deepgemm_bound.py``, the
CUTLASS-class bound of block-FP8 layers (the two grouped GEMMs alone).

Which DeepGEMM. Commit 03d0be3 (2025-07-02, "Simplify expression"), the last of DeepGEMM's
pure-Python JIT: its kernel ``deep_gemm::fp8_gemm_kernel`` (``deep_gemm/include/deep_gemm/
fp8_gemm.cuh``) is header-only, and the JIT's whole job for
``m_grouped_gemm_fp8_fp8_bf16_nt_contiguous`` is to pick template arguments with a small
Python heuristic (``jit_kernels/gemm.py:get_best_configs``), write a .cu that takes the
instantiation's address (``FP8GemmRuntime.generate``), compile it with nvcc and launch it with
four TMA descriptors (``jit_kernels/runtime.py``). All of that is reproduced here: the heuristic
is ported to ``deepgemm_bound.best_config`` and evaluated at build time, the instantiations are
generated per kernel (``build/deepgemm/gen/kernel_NNN.cu``), and the host part (descriptors,
launch) is ``csrc/deepgemm_bound/host.cu``. The next commit (9da4a23, 2025-07-18) moved the JIT,
the heuristics and the host code into a torch C++ extension (``csrc/jit_kernels``, built
against ``torch/python.h``), which cannot be instantiated without torch short of porting much
more. DeepGEMM's post-compile SASS pass (``interleave_ffma``) runs for nvcc <= 12.8 only, so with
nvcc 13 the JIT produces exactly what nvcc produces here. CUTLASS: the commit DeepGEMM pins as
its ``third-party/cutlass`` submodule (eefa171, v3.8.0 + 1), headers only.

Which kernels. DeepGEMM's heuristic depends on the GEMM's row count m (the padded sorted
pairs: waves over SMs choose block_n, m >= 512 enables TMA multicast), its n, k and the SM
count. For each benched layer (the preset ``qwen3.5-397b-a17b-fp8`` at TP8, E=512 K=4096 N=128,
and at EP8, 64 local experts at N=1024, plus ``--shape``) and each of its two GEMMs (n=2N, k=K;
n=K, k=N) the heuristic is evaluated for every m = 128, 256, ... up to what ``--max-tokens``
tokens can produce (every pair local, each expert's group padded by up to 127 rows) and the
union of its picks is compiled (about ten kernels per GEMM). At bench time the peer evaluates the
same heuristic for the actual m and runs that kernel; a pick that was not built (another SM
count, more tokens) is an error naming the build option. K_in = 128 (the TP8 down projection,
a single 128-wide K block) is supported by this kernel: one pipeline stage (the heuristic's
``s <= max(k // 128, 1)``), one K iteration.

Sources are obtained into the git-ignored ``.build_cache/deepgemm/`` by ``git archive`` from
bare clones (``--deepgemm-git-dir`` / ``$DEEPGEMM_GIT_DIR``, default the mirror at
/work/.mirror/deepseek-ai+DeepGEMM/repo; ``--cutlass-git-dir`` / ``$CUTLASS_GIT_DIR``, default
/work/.mirror/NVIDIA+cutlass/repo), or taken from checkouts (``--deepgemm-dir``,
``--cutlass-dir``). Translation units whose command and inputs did not change are reused.
Checks after linking: no torch/c10 symbol, only ``deepgemm_bound_*`` exported, ``cuobjdump
-lelf`` lists sm_90a cubins only, the library loads with ctypes and its kernel table is the
planned one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# cuda_shared_lib is beside this file; its folder is on the path when this runs as a script, not
# when a test loads it by file path (appended there, so that it shadows nothing)
if str(ROOT / "scripts") not in sys.path:
    sys.path.append(str(ROOT / "scripts"))

import cuda_shared_lib  # noqa: E402 - after the path setup
from cuda_shared_lib import BuildError  # noqa: E402

from vllm_moe_aot.measure.peers.deepgemm_bound import (  # noqa: E402 - after the path setup
    DEEPGEMM_COMMIT,
    KernelConfig,
    configs_for,
    layer_gemms,
    max_rows,
)
from vllm_moe_aot.shapes import PRESETS, MoEShape  # noqa: E402

CACHE = ROOT / ".build_cache" / "deepgemm"
DEFAULT_OUT = ROOT / "build" / "deepgemm"
HOST_DIR = ROOT / "csrc" / "deepgemm_bound"
LIB_NAME = "libdeepgemm_bound.so"
DEFAULT_DEEPGEMM_GIT_DIRS = ["/work/.mirror/deepseek-ai+DeepGEMM/repo"]
DEFAULT_CUTLASS_GIT_DIRS = ["/work/.mirror/NVIDIA+cutlass/repo"]
#: the block-FP8 preset and the parallel layouts benched for it: (tp, ep)
PRESET = "qwen3.5-397b-a17b-fp8"
PRESET_LAYOUTS = ((8, 1), (8, 8))
#: H100 SXM / H200: 132 SMs
DEFAULT_NUM_SMS = (132,)
#: the bench's largest token count (shapes.TUNED_TOKEN_COUNTS)
DEFAULT_MAX_TOKENS = 131072
#: topk of a --shape given without one
DEFAULT_TOPK = 8
#: DeepGEMM's NVCC flags (03d0be3 jit/compiler.py: Compiler.flags + NVCCCompiler.flags), an
#: object instead of a cubin, host objects position independent and hidden
DEEPGEMM_NVCC_FLAGS = [
    "-std=c++20", "--ptxas-options=--register-usage-level=10,--verbose",
    "--diag-suppress=39,161,174,177,186,940",
    "-gencode=arch=compute_90a,code=sm_90a", "-O3", "--expt-relaxed-constexpr",
    "--expt-extended-lambda",
    "--compiler-options=-fPIC,-O3,-fconcepts,-Wno-deprecated-declarations,-Wno-abi,"
    "-fvisibility=hidden",
]

log = cuda_shared_lib.make_log("build_deepgemm")


# ----------------------------------------------------------------------------------------------
# What to build


def rank_shape(tp: int, ep: int) -> MoEShape:
    """The preset's per-rank shape (dispatch.configs.preset_shape, which needs pandas; the same
    rule inline where pandas is missing)."""
    preset = PRESETS[PRESET]
    try:
        from vllm_moe_aot.dispatch.configs import preset_shape
    except ImportError:
        s = preset.shape
        full_n = s.N * 8
        if ep > 1:
            return MoEShape(E=s.E // ep, K=s.K, N=full_n, topk=s.topk, ep=ep)
        return MoEShape(E=s.E, K=s.K, N=full_n // tp, topk=s.topk)
    return preset_shape(preset, tp, ep)


def parse_shape(text: str) -> MoEShape:
    """``E,K,N`` or ``E,K,N,topk`` (a trailing ep, as bench's --shape has it, is accepted)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if len(parts) not in (3, 4, 5) or not all(p.isdigit() for p in parts):
        raise ValueError(f"--shape wants E,K,N[,topk[,ep]] (positive integers), got {text!r}")
    E, K, N = map(int, parts[:3])
    topk = int(parts[3]) if len(parts) > 3 else DEFAULT_TOPK
    ep = int(parts[4]) if len(parts) > 4 else 1
    if min(E, K, N, topk, ep) < 1:
        raise ValueError(f"--shape {text!r}: every number must be >= 1")
    if K % 128 or N % 128:
        raise ValueError(f"--shape {text!r}: block FP8 needs K and N multiples of 128")
    return MoEShape(E=E, K=K, N=N, topk=min(topk, E * ep), ep=ep)


def planned_layers(shapes: list[MoEShape], presets: bool = True) -> list[tuple[str, MoEShape]]:
    out: list[tuple[str, MoEShape]] = []
    if presets:
        for tp, ep in PRESET_LAYOUTS:
            name = f"{PRESET} tp{tp}" + (f" ep{ep}" if ep > 1 else "")
            out.append((name, rank_shape(tp, ep)))
    for s in shapes:
        out.append((f"--shape {s.E},{s.K},{s.N},{s.topk}", s))
    return out


def planned_kernels(layers: list[tuple[str, MoEShape]], max_tokens: int,
                    num_sms: tuple[int, ...]) -> tuple[list[KernelConfig], list[dict]]:
    """The kernels to compile (deduplicated, in a stable order) and, per GEMM, what picks
    them: DeepGEMM's heuristic at every m up to the layer's largest."""
    gemms: dict[tuple[int, int, int], dict] = {}
    for name, s in layers:
        rows = max_rows(s.E, s.topk, max_tokens)
        for stage, (n, k, g) in zip((1, 2), layer_gemms(s.E, s.K, s.N), strict=True):
            rec = gemms.setdefault((n, k, g), {"n": n, "k": k, "num_groups": g, "layers": [],
                                               "max_rows": 0})
            rec["layers"].append(f"{name} stage {stage}")
            rec["max_rows"] = max(rec["max_rows"], rows)
    kernels: dict[KernelConfig, None] = {}
    records = []
    for (n, k, g), rec in gemms.items():
        picks = configs_for(n, k, g, rec["max_rows"], num_sms)
        rec["kernels"] = [{**c.to_json(), "m_first": span[0], "m_last": span[1]}
                          for c, span in sorted(picks.items(), key=lambda t: t[1][0])]
        for c, _span in sorted(picks.items(), key=lambda t: t[1][0]):
            kernels.setdefault(c, None)
        records.append(rec)
    return list(kernels), records


# ----------------------------------------------------------------------------------------------
# Sources


def _git(gitdir: str, *args: str, text: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["git", f"--git-dir={gitdir}", *args], capture_output=True, text=text)


def _archive(gitdir: str, commit: str, paths: list[str], dest: Path) -> int:
    """``git archive <commit> <paths>`` unpacked into ``dest``; the number of files, checked
    against ``git ls-tree`` (a partial mirror may lack objects)."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    r = _git(gitdir, "archive", "--format=tar", commit, *paths, text=False)
    if r.returncode != 0:
        raise BuildError(f"git archive {commit} {paths} in {gitdir} failed: "
                         f"{r.stderr.decode(errors='replace')[-500:]}")
    tar_path = dest / "src.tar"
    tar_path.write_bytes(r.stdout)
    with tarfile.open(tar_path) as tf:
        tf.extractall(dest, filter="data")
    tar_path.unlink()
    want = len(_git(gitdir, "ls-tree", "-r", "--name-only", commit, *paths).stdout.split())
    have = sum(1 for p in dest.rglob("*") if p.is_file())
    if have != want:
        raise BuildError(f"git archive {commit} {paths}: {have} files unpacked, ls-tree lists "
                         f"{want}")
    return have


def _git_dirs(arg: str | None, env: str, defaults: list[str]) -> list[str]:
    out = [arg] if arg else []
    if os.environ.get(env):
        out.append(os.environ[env])
    return [d for d in out + defaults if d and Path(d).exists()]


def fetch_deepgemm(commit: str, src_dir: str | None, git_dir: str | None) -> dict:
    """DeepGEMM's headers (``deep_gemm/include``) at ``commit`` and its CUTLASS submodule pin."""
    if src_dir:
        inc = Path(src_dir) / "deep_gemm" / "include"
        if not (inc / "deep_gemm" / "fp8_gemm.cuh").is_file():
            raise BuildError(f"{src_dir}: no deep_gemm/include/deep_gemm/fp8_gemm.cuh (this "
                             "build wants DeepGEMM's pure-Python-JIT layout, <= 03d0be3)")
        head = subprocess.run(["git", "-C", src_dir, "rev-parse", "HEAD"], capture_output=True,
                              text=True)
        pin = subprocess.run(["git", "-C", src_dir, "ls-tree", "HEAD", "third-party/cutlass"],
                             capture_output=True, text=True).stdout.split()
        return {"source": f"directory {src_dir}", "include": str(inc),
                "commit": head.stdout.strip() if head.returncode == 0 else None,
                "cutlass_pin": pin[2] if len(pin) >= 3 else None,
                "cutlass_dir": str(Path(src_dir) / "third-party" / "cutlass")}
    dest = CACHE / f"deepgemm-{commit[:12]}"
    info_file = dest / "SOURCE.json"
    if info_file.is_file() and (dest / "deep_gemm" / "include").is_dir():
        info = json.loads(info_file.read_text())
        if info.get("commit") == commit:
            log(f"DeepGEMM {commit[:12]}: cached in {dest.relative_to(ROOT)}")
            info["include"] = str(dest / "deep_gemm" / "include")
            return info
    for gd in _git_dirs(git_dir, "DEEPGEMM_GIT_DIR", DEFAULT_DEEPGEMM_GIT_DIRS):
        full = _git(gd, "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}")
        if full.returncode != 0:
            log(f"DeepGEMM {commit[:12]} is not in {gd}")
            continue
        full_commit = full.stdout.strip()
        n = _archive(gd, full_commit, ["deep_gemm/include", "LICENSE"], dest)
        pin = _git(gd, "ls-tree", full_commit, "third-party/cutlass").stdout.split()
        info = {"source": f"git archive {full_commit} deep_gemm/include LICENSE (from {gd})",
                "commit": full_commit, "files": n,
                "date": _git(gd, "log", "-1", "--format=%cI", full_commit).stdout.strip(),
                "subject": _git(gd, "log", "-1", "--format=%s", full_commit).stdout.strip(),
                "cutlass_pin": pin[2] if len(pin) >= 3 else None}
        info_file.write_text(json.dumps(info, indent=1))
        log(f"DeepGEMM {full_commit[:12]}: {n} files from {gd}")
        info["include"] = str(dest / "deep_gemm" / "include")
        return info
    raise BuildError(f"could not obtain DeepGEMM {commit}: pass --deepgemm-git-dir (a bare "
                     "clone holding it) or --deepgemm-dir (a checkout)")


def _cutlass_version(include: Path) -> str:
    text = (include / "cutlass" / "version.h").read_text()
    return ".".join(re.search(rf"#define CUTLASS_{k}\s+(\d+)", text).group(1)
                    for k in ("MAJOR", "MINOR", "PATCH"))


def fetch_cutlass(pin: str | None, src_dir: str | None, git_dir: str | None,
                  deepgemm: dict) -> dict:
    """CUTLASS's headers at DeepGEMM's submodule pin."""
    for d in (src_dir, deepgemm.get("cutlass_dir")):
        if d and (Path(d) / "include" / "cutlass" / "cutlass.h").is_file():
            inc = Path(d) / "include"
            return {"source": f"directory {d}", "include": str(inc), "commit": None,
                    "pinned_by_deepgemm": pin, "version": _cutlass_version(inc)}
    if src_dir:
        raise BuildError(f"{src_dir}: no include/cutlass/cutlass.h")
    if not pin:
        raise BuildError("DeepGEMM's CUTLASS submodule pin is unknown: pass --cutlass-dir")
    dest = CACHE / f"cutlass-{pin[:12]}"
    info_file = dest / "SOURCE.json"
    if info_file.is_file() and (dest / "include" / "cutlass" / "cutlass.h").is_file():
        info = json.loads(info_file.read_text())
        if info.get("commit") == pin:
            log(f"CUTLASS {pin[:12]}: cached in {dest.relative_to(ROOT)}")
            info["include"] = str(dest / "include")
            return info
    for gd in _git_dirs(git_dir, "CUTLASS_GIT_DIR", DEFAULT_CUTLASS_GIT_DIRS):
        if _git(gd, "rev-parse", "--verify", "--quiet", f"{pin}^{{commit}}").returncode != 0:
            log(f"CUTLASS {pin[:12]} is not in {gd}")
            continue
        n = _archive(gd, pin, ["include", "LICENSE.txt"], dest)
        described = _git(gd, "describe", "--tags", pin).stdout.strip()
        info = {"source": f"git archive {pin} include LICENSE.txt (from {gd})", "commit": pin,
                "describe": described, "files": n, "pinned_by_deepgemm": pin,
                "version": _cutlass_version(dest / "include")}
        info_file.write_text(json.dumps(info, indent=1))
        log(f"CUTLASS {pin[:12]} ({described}): {n} files from {gd}")
        info["include"] = str(dest / "include")
        return info
    raise BuildError(f"could not obtain CUTLASS {pin} (DeepGEMM's pin): pass --cutlass-git-dir "
                     "or --cutlass-dir")


# ----------------------------------------------------------------------------------------------
# Generated sources


def kernel_source(i: int, cfg: KernelConfig) -> str:
    return f"""// Generated by scripts/build_deepgemm.py: DeepGEMM kernel {i} ({cfg.n}x{cfg.k}, \
{cfg.num_groups} groups),
// the instantiation DeepGEMM's JIT writes (FP8GemmRuntime.generate), its address returned.
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <deep_gemm/fp8_gemm.cuh>

namespace dgb {{
const void* dgb_kernel_{i:03d}() {{
    return reinterpret_cast<const void*>(&deep_gemm::fp8_gemm_kernel<
        {cfg.template_args()}>);
}}
}}  // namespace dgb
"""


def table_source(kernels: list[KernelConfig]) -> str:
    decls = "".join(f"const void* dgb_kernel_{i:03d}();\n" for i in range(len(kernels)))
    rows = "".join(
        f"    {{{c.n}, {c.k}, {c.num_groups}, {c.block_m}, {c.block_n}, {c.block_k}, "
        f"{c.block_n_padding}, {c.swizzle_d}, {c.num_stages}, {c.num_tma_multicast}, "
        f"{int(c.multicast_on_a)}, {c.smem_size}, {c.num_threads}, &dgb_kernel_{i:03d}}},\n"
        for i, c in enumerate(kernels))
    return ("// Generated by scripts/build_deepgemm.py: the kernel table (KernelEntry order).\n"
            + decls + "static const KernelEntry kKernels[] = {\n" + rows + "};\n")


def write_if_changed(path: Path, text: str) -> None:
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)


# ----------------------------------------------------------------------------------------------
# Compile, link, check


def _header_inputs(*dirs: Path) -> list[Path]:
    return sorted(p for d in dirs for p in d.rglob("*") if p.is_file() and
                  p.suffix in (".cuh", ".h", ".hpp", ".inc"))


def _ptxas_resources(log_text: str) -> dict:
    regs = re.findall(r"Used (\d+) registers", log_text)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log_text)
    return {"registers": int(regs[-1]) if regs else None,
            "spill_bytes": sum(int(a) + int(b) for a, b in spills) if spills else None}


def compile_all(args, out: Path, gen: Path, kernels: list[KernelConfig], dg: dict,
                cutlass: dict) -> tuple[list[Path], dict[int, dict]]:
    """The objects (kernels, then host) and each kernel's ptxas resources (from its log)."""
    dg_inc, cl_inc = Path(dg["include"]), Path(cutlass["include"])
    kernel_inputs = _header_inputs(dg_inc / "deep_gemm")
    # CUTLASS's headers are identified by the commit (hashing 700 files per unit is slow)
    cutlass_id = cutlass.get("commit") or cutlass["include"]
    tus: list[cuda_shared_lib.Unit] = []
    for i in range(len(kernels)):
        src = gen / f"kernel_{i:03d}.cu"
        cmd = [*DEEPGEMM_NVCC_FLAGS, f"-I{dg_inc}", f"-I{cl_inc}", f"-DDGB_CUTLASS={cutlass_id}"]
        tus.append(cuda_shared_lib.Unit(f"kernel_{i:03d}", src, cmd, [src, *kernel_inputs]))
    host = HOST_DIR / "host.cu"
    host_cmd = ["-std=c++17", "-O2", "-gencode=arch=compute_90a,code=sm_90a", f"-I{gen}",
                f"-I{HOST_DIR}", "--compiler-options=-fPIC,-fvisibility=hidden"]
    tus.append(cuda_shared_lib.Unit("host", host, host_cmd,
                                    [host, HOST_DIR / "kernels.cuh", gen / "kernels.inc",
                                     gen / "build_info.h"]))
    done = cuda_shared_lib.compile_units(
        cuda_shared_lib.nvcc_path(args.nvcc), tus, out, args.jobs, log, args.threads,
        what=f"{len(tus)} translation units ({len(kernels)} kernels + host)")
    resources = {int(c.name.split("_")[1]): _ptxas_resources(c.log.read_text())
                 for c in done.values() if c.name.startswith("kernel_") and c.log.is_file()}
    return [done[t.name].obj for t in tus], resources


_LOAD_CHECK = """
import ctypes, json, sys
l = ctypes.CDLL(sys.argv[1])
l.deepgemm_bound_build_info.restype = ctypes.c_char_p
buf = (ctypes.c_int64 * 13)()
descs = []
for i in range(l.deepgemm_bound_kernel_count()):
    assert l.deepgemm_bound_kernel_desc(i, buf, 13) == 0
    descs.append(list(buf))
print(json.dumps({"abi": l.deepgemm_bound_abi_version(), "descs": descs,
                  "info": json.loads(l.deepgemm_bound_build_info().decode())}))
"""


def check_library(lib: Path, nvcc: str, kernels: list[KernelConfig]) -> dict:
    """cuda_shared_lib's checks, then the kernel table the library reports is the plan's."""
    res = cuda_shared_lib.check_shared_library(lib, nvcc, "deepgemm_bound_")
    got = json.loads(cuda_shared_lib.load_in_fresh_process(lib, _LOAD_CHECK))
    want = [[c.n, c.k, c.num_groups, c.block_m, c.block_n, c.block_k, c.block_n_padding,
             c.swizzle_d, c.num_stages, c.num_tma_multicast, int(c.multicast_on_a),
             c.smem_size, c.num_threads] for c in kernels]
    if got["descs"] != want:
        raise BuildError(f"{lib.name}: kernel table differs from the plan")
    res["ctypes_load"] = "ok"
    res["abi_version"] = got["abi"]
    res["kernels"] = len(got["descs"])
    return res


# ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda_shared_lib.add_build_options(ap, DEFAULT_OUT)
    ap.add_argument("--shape", action="append", default=[], metavar="E,K,N[,topk]",
                    help="another block-FP8 layer (per rank; topk default "
                         f"{DEFAULT_TOPK}); repeatable")
    ap.add_argument("--no-presets", action="store_true",
                    help=f"build only the --shape layers, not {PRESET} at TP8 and EP8")
    ap.add_argument("--num-sms", default=",".join(map(str, DEFAULT_NUM_SMS)),
                    help="SM counts DeepGEMM's heuristic is evaluated for (comma list; "
                         "default 132: H100 SXM, H200)")
    ap.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                    help="largest token count the bound must serve (default 131072)")
    ap.add_argument("--commit", default=DEEPGEMM_COMMIT,
                    help="DeepGEMM commit (default: the one the peer's heuristic is ported from)")
    ap.add_argument("--deepgemm-dir", help="a DeepGEMM checkout instead of git archive")
    ap.add_argument("--deepgemm-git-dir", help="a bare DeepGEMM clone (also $DEEPGEMM_GIT_DIR)")
    ap.add_argument("--cutlass-dir", help="a CUTLASS checkout instead of DeepGEMM's pin")
    ap.add_argument("--cutlass-git-dir", help="a bare CUTLASS clone (also $CUTLASS_GIT_DIR)")
    ap.add_argument("--list", action="store_true",
                    help="print the layers, GEMMs and kernels that would be built; build nothing")
    args = ap.parse_args(argv)
    try:
        args.shapes = [parse_shape(s) for s in args.shape]
        args.num_sms_list = tuple(sorted({int(v) for v in args.num_sms.split(",") if v.strip()}))
    except ValueError as exc:
        ap.error(str(exc))
    if not args.num_sms_list or min(args.num_sms_list) < 1:
        ap.error("--num-sms wants positive SM counts")
    if args.max_tokens < 1:
        ap.error("--max-tokens must be >= 1")
    if args.no_presets and not args.shapes:
        ap.error("--no-presets needs at least one --shape")
    if args.jobs < 1:
        ap.error("--jobs must be >= 1")
    return args


@cuda_shared_lib.reports_build_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    layers = planned_layers(args.shapes, presets=not args.no_presets)
    kernels, gemms = planned_kernels(layers, args.max_tokens, args.num_sms_list)
    log(f"{len(layers)} layers, {len(gemms)} GEMMs, {len(kernels)} kernels (DeepGEMM's "
        f"heuristic at every m up to {args.max_tokens} tokens, {list(args.num_sms_list)} SMs)")
    if args.list:
        for name, s in layers:
            print(f"layer {name}: E={s.E} K={s.K} N={s.N} topk={s.topk}")
        for g in gemms:
            print(f"gemm n={g['n']} k={g['k']} experts={g['num_groups']} (m <= {g['max_rows']}; "
                  f"{', '.join(g['layers'])}):")
            for c in g["kernels"]:
                print(f"    block_n={c['block_n']:<3} stages={c['num_stages']} multicast="
                      f"{c['num_tma_multicast']}{'A' if c['multicast_on_a'] else 'B'} "
                      f"smem={c['smem_size']} for m {c['m_first']}..{c['m_last']}")
        return 0
    out = Path(args.out).resolve()
    gen = out / "gen"
    dg = fetch_deepgemm(args.commit, args.deepgemm_dir, args.deepgemm_git_dir)
    cutlass = fetch_cutlass(dg.get("cutlass_pin"), args.cutlass_dir, args.cutlass_git_dir,
                            dg)
    nvcc = cuda_shared_lib.nvcc_path(args.nvcc)
    gen.mkdir(parents=True, exist_ok=True)
    for stale in gen.glob("kernel_*.cu"):
        if int(stale.stem.split("_")[1]) >= len(kernels):
            stale.unlink()
    for i, c in enumerate(kernels):
        write_if_changed(gen / f"kernel_{i:03d}.cu", kernel_source(i, c))
    write_if_changed(gen / "kernels.inc", table_source(kernels))
    short = {"deepgemm_commit": dg.get("commit"), "cutlass_commit": cutlass.get("commit"),
             "arch": "sm_90a", "nvcc": cuda_shared_lib.nvcc_version(nvcc),
             "num_sms": list(args.num_sms_list), "max_tokens": args.max_tokens,
             "kernels": len(kernels)}
    literal = json.dumps(json.dumps(short, separators=(",", ":")))
    write_if_changed(gen / "build_info.h", f"#define DGB_BUILD_INFO {literal}\n")
    objs, resources = compile_all(args, out, gen, kernels, dg, cutlass)
    lib = out / LIB_NAME
    cuda_shared_lib.link(nvcc, objs, lib, log)
    checks = check_library(lib, nvcc, kernels)
    spills = {i: r["spill_bytes"] for i, r in resources.items() if r.get("spill_bytes")}
    info = {
        **short,
        **cuda_shared_lib.library_record(lib),
        "why_this_commit": (
            "03d0be3 is the last DeepGEMM commit of the pure-Python JIT: the kernel "
            "(deep_gemm/include/deep_gemm/fp8_gemm.cuh) is header-only and the JIT only "
            "picks template arguments (jit_kernels/gemm.py:get_best_configs, ported to "
            "vllm_moe_aot/measure/peers/deepgemm_bound.py) and instantiates it; from "
            "9da4a23 on the JIT, heuristics and host code are a torch C++ extension. Its "
            "SASS FFMA-interleave pass runs for nvcc <= 12.8 only, so with nvcc 13 nothing "
            "is post-processed."),
        "heuristic": ("DeepGEMM's get_best_configs(m, n, k, 1, num_sms, "
                      "is_grouped_contiguous=True) evaluated for every m = 128, 256, ... up "
                      "to each GEMM's max_rows; the union of its picks is built"),
        "deepgemm": {k: v for k, v in dg.items() if k != "include"},
        "cutlass": {k: v for k, v in cutlass.items() if k != "include"},
        "deepgemm_headers": {str(p.relative_to(Path(dg["include"]))): cuda_shared_lib.sha256_file(p)
                             for p in _header_inputs(Path(dg["include"]) / "deep_gemm")},
        "nvcc_flags": DEEPGEMM_NVCC_FLAGS,
        "layers": [{"name": n, "E": s.E, "K": s.K, "N": s.N, "topk": s.topk, "ep": s.ep}
                   for n, s in layers],
        "gemms": gemms,
        "kernel_table": [{"index": i, **c.to_json(), **resources.get(i, {})}
                         for i, c in enumerate(kernels)],
        "ours": cuda_shared_lib.sources_record(HOST_DIR),
        "checks": checks,
    }
    cuda_shared_lib.write_build_info(out, lib, info, log, counts=[f"{checks['kernels']} kernels"],
                     note=f"; register spills in kernels {sorted(spills)}" if spills
                     else "; no spills")
    return 0


if __name__ == "__main__":
    sys.exit(main())
