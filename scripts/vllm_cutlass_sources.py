"""vLLM 0.33.0's and CUTLASS's sources for scripts/build_vllm_cutlass.py: obtaining them into the
git-ignored ``.build_cache/`` and extracting, byte for byte, the torch-free parts of vLLM files
that also hold torch-facing host code (see that script's docstring for the steps)."""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from cuda_shared_lib import BuildError, make_log, sha256_bytes, sha256_file

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".build_cache"
VLLM_VERSION = "0.33.0"
VLLM_DIR = CACHE / f"vllm-{VLLM_VERSION}"
DEFAULT_CUTLASS_GIT_DIRS = ["/work/.mirror/NVIDIA+cutlass/repo"]

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

log = make_log("build_vllm_cutlass")


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


