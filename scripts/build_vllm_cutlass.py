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
the vLLM file), ``csrc/vllm_cutlass_moe/wrapper.cu`` (our host wrapper) is compiled once per
translation unit, vLLM's ``moe_permute_unpermute_kernel.cu`` is compiled unchanged, and the
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
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".build_cache"
VLLM_VERSION = "0.33.0"
VLLM_DIR = CACHE / f"vllm-{VLLM_VERSION}"
WRAPPER = ROOT / "csrc" / "vllm_cutlass_moe" / "wrapper.cu"
LIB_NAME = "libvllm_cutlass_moe.so"
DEFAULT_OUT = ROOT / "build" / "vllm_cutlass"
DEFAULT_CUTLASS_GIT_DIRS = ["/work/.mirror/NVIDIA+cutlass/repo"]

#: run_cutlass_moe_mm_sm90's configs, in its dispatch order.
ALL_CONFIGS = ("M4", "M64", "N8192", "K8192", "default")
#: What vLLM picks for the two presets' GEMMs (n, k <= 4096 < 8192): M4 (m <= 4), M64
#: (m <= 64), default. N8192 / K8192 only serve n >= 8192 / k >= 8192.
PRESET_CONFIGS = ("M4", "M64", "default")

#: vLLM files compiled as they are (paths under csrc/), directly or through #include.
UNCHANGED = [
    "quantization/w8a8/cutlass/moe/grouped_mm_c3x.cuh",
    "quantization/w8a8/cutlass/moe/get_group_starts.cuh",
    "cutlass_extensions/common.hpp",
    "cutlass_extensions/epilogue/scaled_mm_epilogues_c3x.hpp",
    "cutlass_extensions/epilogue/broadcast_load_epilogue_c3x.hpp",
    "cutlass_extensions/epilogue/broadcast_load_epilogue_array_c3x.hpp",
    "moe/permute_unpermute_kernels/moe_permute_unpermute_kernel.cu",
    "moe/permute_unpermute_kernels/moe_permute_unpermute_kernel.h",
    "moe/permute_unpermute_kernels/moe_permute_unpermute_kernel.inl",
    "moe/permute_unpermute_kernels/dispatch.h",
    "torch_utils.h",
    "dispatch_utils.h",
    "core/cuda_compat.h",
    "cub_helpers.h",
    "cuda_vec_utils.cuh",
    "async_util.cuh",
    "quantization/vectorization.cuh",
    "quantization/vectorization_utils.cuh",
    "quantization/utils.cuh",
    "quantization/w8a8/fp8/common.cuh",
    "quantization/w8a8/fp8/nvidia/quant_utils.cuh",
]


class BuildError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[build_vllm_cutlass {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def sha256_file(p: Path) -> str:
    return sha256_bytes(p.read_bytes())


# ----------------------------------------------------------------------------------------------
# vLLM sources

def _pkg_version(pkg_info: Path) -> str | None:
    if not pkg_info.is_file():
        return None
    m = re.search(r"^Version:\s*(\S+)", pkg_info.read_text(errors="replace"), re.M)
    return m.group(1) if m else None


def _keep_vllm_subset(src: Path) -> None:
    """Copy what the build (and a reader) needs from an unpacked sdist into VLLM_DIR."""
    tmp = VLLM_DIR.with_name(VLLM_DIR.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copytree(src / "csrc", tmp / "csrc")
    for f in ("CMakeLists.txt", "PKG-INFO", "LICENSE"):
        if (src / f).exists():
            shutil.copy2(src / f, tmp / f)
    for rel in ("vllm/model_executor/layers/fused_moe", "vllm/_custom_ops.py"):
        s = src / rel
        if s.is_dir():
            shutil.copytree(s, tmp / rel)
        elif s.is_file():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(s, tmp / rel)
    shutil.rmtree(VLLM_DIR, ignore_errors=True)
    tmp.rename(VLLM_DIR)


def fetch_vllm(sdist: str | None) -> dict:
    if _pkg_version(VLLM_DIR / "PKG-INFO") == VLLM_VERSION and (VLLM_DIR / "csrc").is_dir():
        log(f"vLLM {VLLM_VERSION} sources: cached in {VLLM_DIR.relative_to(ROOT)}")
        return {"how": "cached", "dir": str(VLLM_DIR)}
    CACHE.mkdir(exist_ok=True)
    if sdist:
        log(f"unpacking {sdist}")
        dest = CACHE / "sdist-unpack"
        shutil.rmtree(dest, ignore_errors=True)
        with tarfile.open(sdist) as tf:
            tf.extractall(dest, filter="data")
        cands = [p for p in dest.iterdir() if (p / "PKG-INFO").is_file()]
        if not cands:
            raise BuildError(f"{sdist}: no PKG-INFO at the top of the archive")
        _keep_vllm_subset(cands[0])
        shutil.rmtree(dest, ignore_errors=True)
        return {"how": f"sdist {sdist}", "sha256": sha256_file(Path(sdist))}
    tmp = CACHE / "pip-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dl = CACHE / "pip-dl"
    dl.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--no-clean", f"vllm=={VLLM_VERSION}", "-d", str(dl)]
    log("obtaining vLLM sources: " + shlex.join(cmd) + f"  (TMPDIR={tmp})")
    env = dict(os.environ, TMPDIR=str(tmp))
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    (CACHE / "pip-download.log").write_text(r.stdout + r.stderr)
    tarball = dl / f"vllm-{VLLM_VERSION}.tar.gz"
    if tarball.is_file():  # pip got through metadata preparation after all
        shutil.rmtree(tmp, ignore_errors=True)
        return fetch_vllm(str(tarball))
    found = None
    for pkg_info in glob.glob(str(tmp / "**" / "PKG-INFO"), recursive=True):
        p = Path(pkg_info).parent
        text = Path(pkg_info).read_text(errors="replace")
        if (re.search(r"^Name:\s*vllm\s*$", text, re.M) and _pkg_version(Path(pkg_info))
                == VLLM_VERSION and (p / "csrc").is_dir()):
            found = p
            break
    if found is None:
        raise BuildError("pip left no unpacked vLLM sdist (see .build_cache/pip-download.log); "
                         "download vllm-0.33.0.tar.gz yourself and pass --vllm-sdist")
    log(f"unpacked sdist left by pip at {found} (pip's metadata step failed as expected)")
    _keep_vllm_subset(found)
    shutil.rmtree(tmp, ignore_errors=True)
    return {"how": "pip download --no-clean (unpacked sdist)"}


def vllm_cutlass_pin() -> str:
    text = (VLLM_DIR / "CMakeLists.txt").read_text()
    m = re.search(r'set\(CUTLASS_REVISION\s+"([^"]+)"\)', text)
    if not m:
        raise BuildError("CUTLASS_REVISION not found in vLLM's CMakeLists.txt")
    return m.group(1)


# ----------------------------------------------------------------------------------------------
# CUTLASS

def _cutlass_version(include: Path) -> str:
    text = (include / "cutlass" / "version.h").read_text()
    parts = [re.search(rf"#define CUTLASS_{k}\s+(\d+)", text).group(1)
             for k in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(parts)


def _git(gitdir: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", f"--git-dir={gitdir}", *args], capture_output=True, text=True)


def fetch_cutlass(tag: str, cutlass_dir: str | None, git_dir: str | None,
                  strict: bool) -> dict:
    cutlass_dir = cutlass_dir or os.environ.get("VLLM_CUTLASS_SRC_DIR")
    if cutlass_dir:
        inc = Path(cutlass_dir) / "include"
        if not (inc / "cutlass" / "cutlass.h").is_file():
            raise BuildError(f"{cutlass_dir}: no include/cutlass/cutlass.h")
        return {"requested": tag, "source": f"directory {cutlass_dir}", "include": str(inc),
                "version": _cutlass_version(inc), "tag": None}
    for cached in sorted(CACHE.glob("cutlass-v*"), reverse=True):
        info_file = cached / "CUTLASS_SOURCE.json"
        if (cached / "include" / "cutlass" / "cutlass.h").is_file() and info_file.is_file():
            info = json.loads(info_file.read_text())
            if info.get("tag") == tag or (not strict and info.get("requested") == tag):
                log(f"CUTLASS: cached {cached.relative_to(ROOT)} ({info['tag']})")
                info["include"] = str(cached / "include")
                return info
    dest = CACHE / f"cutlass-{tag}"
    # git clone over the network
    if shutil.which("git"):
        shutil.rmtree(dest, ignore_errors=True)
        r = subprocess.run(["git", "clone", "--depth", "1", "--branch", tag,
                            "https://github.com/NVIDIA/cutlass.git", str(dest)],
                           capture_output=True, text=True, timeout=600)
        if r.returncode == 0:
            commit = subprocess.run(["git", "-C", str(dest), "rev-parse", "HEAD"],
                                    capture_output=True, text=True).stdout.strip()
            info = {"requested": tag, "tag": tag, "commit": commit,
                    "source": "git clone https://github.com/NVIDIA/cutlass.git",
                    "version": _cutlass_version(dest / "include")}
            (dest / "CUTLASS_SOURCE.json").write_text(json.dumps(info, indent=1))
            info["include"] = str(dest / "include")
            return info
        log(f"git clone of CUTLASS {tag} failed: {r.stderr.strip().splitlines()[-1:]}")
        shutil.rmtree(dest, ignore_errors=True)
    # bare clone (e.g. a mirror) -> git archive
    candidates = [git_dir] if git_dir else []
    if os.environ.get("CUTLASS_GIT_DIR"):
        candidates.append(os.environ["CUTLASS_GIT_DIR"])
    candidates += DEFAULT_CUTLASS_GIT_DIRS
    for gd in candidates:
        if not gd or not Path(gd).exists():
            continue
        use = tag
        if _git(gd, "rev-parse", "--verify", "--quiet", f"{tag}^{{commit}}").returncode != 0:
            if strict:
                raise BuildError(f"CUTLASS tag {tag} not in {gd} (--strict-cutlass)")
            m = re.fullmatch(r"v(\d+)\.(\d+)\.(\d+)", tag)
            tags = _git(gd, "tag", "--list", f"v{m.group(1)}.{m.group(2)}.*").stdout.split()
            older = sorted((t for t in tags if re.fullmatch(r"v\d+\.\d+\.\d+", t)
                            and int(t.split(".")[2]) < int(m.group(3))),
                           key=lambda t: int(t.split(".")[2]))
            if not older:
                continue
            use = older[-1]
            log(f"WARNING: CUTLASS {tag} (vLLM's pin) is not in {gd}; using {use}, the newest "
                f"{m.group(1)}.{m.group(2)}.x tag below it")
        commit = _git(gd, "rev-parse", f"{use}^{{commit}}").stdout.strip()
        dest = CACHE / f"cutlass-{use}"
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        arch = subprocess.run(["git", f"--git-dir={gd}", "archive", "--format=tar", use,
                               "include"], capture_output=True)
        if arch.returncode != 0:
            raise BuildError(f"git archive {use} failed: {arch.stderr.decode()[-500:]}")
        tar_path = dest / "include.tar"
        tar_path.write_bytes(arch.stdout)
        with tarfile.open(tar_path) as tf:
            tf.extractall(dest, filter="data")
        tar_path.unlink()
        info = {"requested": tag, "tag": use, "commit": commit,
                "source": f"git archive {use} include (from {gd})",
                "version": _cutlass_version(dest / "include")}
        (dest / "CUTLASS_SOURCE.json").write_text(json.dumps(info, indent=1))
        info["include"] = str(dest / "include")
        return info
    raise BuildError(f"could not obtain CUTLASS {tag}: pass --cutlass-dir (a checkout) or "
                     "--cutlass-git-dir (a bare clone)")


# ----------------------------------------------------------------------------------------------
# Excerpts: the torch-free parts of vLLM .cu files that also define torch-facing host functions

def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _match_braces(text: str, open_pos: int) -> int:
    """Index just past the brace closing the one at ``open_pos`` (comments and string
    literals skipped)."""
    depth, i, n = 0, open_pos, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            i = text.index("\n", i)
            continue
        if text.startswith("/*", i):
            i = text.index("*/", i) + 2
            continue
        if c in "\"'":
            j = i + 1
            while text[j] != c:
                j += 2 if text[j] == "\\" else 1
            i = j + 1
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise BuildError("unbalanced braces")


def _definition(text: str, pattern: str) -> tuple[int, int]:
    """(start, end) of the top-level definition whose head matches ``pattern`` (from the start
    of its line, a preceding ``template <...>`` included, through the closing brace)."""
    m = re.search(pattern, text, re.M)
    if not m:
        raise BuildError(f"pattern not found: {pattern}")
    start = text.rfind("\n", 0, m.start()) + 1
    before = text[:start]
    t = before.rfind("template")
    if t >= 0 and re.fullmatch(r"template\s*<[^;{}]*>\s*", before[t:]):
        start = before.rfind("\n", 0, t) + 1
    brace = text.index("{", m.end() - 1)
    end = _match_braces(text, brace)
    if text[end:end + 1] == ";":
        end += 1
    return start, end


def _range(text: str, begin_pat: str, end_pat: str, include_end: bool) -> tuple[int, int]:
    b = re.search(begin_pat, text, re.M)
    if not b:
        raise BuildError(f"begin pattern not found: {begin_pat}")
    start = text.rfind("\n", 0, b.start()) + 1
    e = re.compile(end_pat, re.M).search(text, b.end())
    if not e:
        raise BuildError(f"end pattern not found: {end_pat}")
    if include_end:
        end = text.find("\n", e.end())
        end = len(text) if end < 0 else end + 1
    else:
        end = text.rfind("\n", 0, e.start()) + 1
    return start, end


# name -> (vLLM file under csrc/, list of (kind, args...) pieces, expected names)
EXCERPTS: dict[str, tuple[str, list[tuple], list[str]]] = {
    "sm90_configs.inc": (
        "quantization/w8a8/cutlass/moe/grouped_mm_c3x_sm90.cu",
        [("range", r"^template <typename InType, typename OutType,\s*$",
          r"^template <typename InType, typename OutType>\s*\nvoid run_cutlass_moe_mm_sm90",
          False)],
        ["sm90_fp8_config_default", "sm90_fp8_config_M4", "sm90_fp8_config_M64",
         "sm90_fp8_config_K8192", "sm90_fp8_config_N8192"]),
    "moe_data_kernels.inc": (
        "quantization/w8a8/cutlass/moe/moe_data.cu",
        [("range", r"^constexpr uint64_t THREADS_PER_EXPERT", r"^constexpr int SWAP_AB_THRESHOLD",
          True),
         ("def", r"^__global__ void compute_problem_sizes\("),
         ("def", r"^__global__ void compute_expert_offsets\("),
         ("def", r"^__global__ void compute_arg_sorts\("),
         ("def", r"^__global__ void compute_problem_sizes_from_expert_offsets\(")],
        ["THREADS_PER_EXPERT", "SWAP_AB_THRESHOLD", "compute_problem_sizes",
         "compute_expert_offsets", "compute_arg_sorts",
         "compute_problem_sizes_from_expert_offsets"]),
    "shuffle_rows_kernel.inc": (
        "moe/moe_permute_unpermute_op.cu",
        [("def", r"^__global__ void shuffleInputRowsKernel\(")],
        ["shuffleInputRowsKernel"]),
    "activation_kernels_head.inc": (
        "activation_kernels.cu",
        [("range", r"\A", r"^}  // namespace vllm\s*$", True)],
        ["act_and_mul_kernel", "silu_kernel", "packed_silu_kernel"]),
    "fp8_quant_kernels_head.inc": (
        "quantization/w8a8/fp8/common.cu",
        [("range", r"\A", r"^}  // namespace vllm\s*$", True)],
        ["scaled_fp8_quant_kernel_strided_group_shape", "absmax_reduction_flat",
         "segmented_max_reduction_strided", "scaled_fp8_quant_kernel_strided_dynamic",
         "dynamic_per_token_scaled_fp8_quant_kernel_strided"]),
}

#: torch-facing host constructs that must not be in an excerpt
_TORCH_HOST = re.compile(r"torch::stable::Tensor|get_current_cuda_stream\(|STABLE_TORCH_LIBRARY"
                         r"|TORCH_BOX|DeviceGuard")


def write_excerpts(gen: Path) -> list[dict]:
    gen.mkdir(parents=True, exist_ok=True)
    records = []
    for name, (rel, pieces, expect) in EXCERPTS.items():
        path = VLLM_DIR / "csrc" / rel
        text = path.read_text()
        parts = []
        out = [f"// Generated by scripts/build_vllm_cutlass.py from vllm-{VLLM_VERSION}/csrc/"
               f"{rel}: the pieces below are that file's text, unchanged.\n"]
        for piece in pieces:
            if piece[0] == "range":
                s, e = _range(text, piece[1], piece[2], piece[3])
            else:
                s, e = _definition(text, piece[1])
            body = text[s:e]
            if _TORCH_HOST.search(body):
                raise BuildError(f"{rel}: excerpt for {name} holds torch host code "
                                 f"({_TORCH_HOST.search(body).group(0)})")
            first, last = _line_of(text, s), _line_of(text, max(e - 1, s))
            out.append(f'#line {first} "{path}"\n')
            out.append(body if body.endswith("\n") else body + "\n")
            parts.append({"lines": [first, last], "sha256": sha256_bytes(body.encode())})
        blob = "".join(out)
        for ident in expect:
            if not re.search(rf"\b{re.escape(ident)}\b", blob):
                raise BuildError(f"{name}: {ident} missing from the excerpt of {rel}")
        (gen / name).write_text(blob)
        records.append({"generated": name, "vllm_file": f"csrc/{rel}",
                        "vllm_file_sha256": sha256_file(path), "pieces": parts})
    return records


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
    for cfg in configs:
        tus.append((f"gemm_{cfg}", WRAPPER,
                    ["-DVLLM_CUTLASS_TU_GEMM", f"-DVLLM_CUTLASS_GEMM_CFG={cfg}"],
                    [WRAPPER, gen / "sm90_configs.inc"]))
    tus.append(("routing", WRAPPER,
                ["-DVLLM_CUTLASS_TU_ROUTING", *have],
                [WRAPPER, gen / "moe_data_kernels.inc", gen / "shuffle_rows_kernel.inc",
                 gen / "build_info.h"]))
    tus.append(("act", WRAPPER, ["-DVLLM_CUTLASS_TU_ACT"],
                [WRAPPER, gen / "activation_kernels_head.inc"]))
    tus.append(("quant", WRAPPER, ["-DVLLM_CUTLASS_TU_QUANT"],
                [WRAPPER, gen / "fp8_quant_kernels_head.inc"]))
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
            "ours": "csrc/vllm_cutlass_moe/wrapper.cu",
            "wrapper_sha256": sha256_file(WRAPPER),
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
