"""Building and checking a torch-free sm_90a shared library with nvcc: what
``scripts/build_deepgemm.py`` and ``scripts/build_vllm_cutlass.py`` share.

Both compile translation units in parallel (an object is reused while its command and inputs
are unchanged), link them with ``-cudart static`` into a stripped library that exports its C ABI
only, and check the result before recording it: no torch/c10/aoti, cuBLAS or CUDA driver symbol
referenced, only ``<prefix>*`` functions exported, sm_90a cubins only (``cuobjdump -lelf``), and
the library loads with ctypes in a fresh process. What differs between the two builds (sources,
flags, the ctypes probe of their ABI) stays in the scripts.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import functools
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import NamedTuple, ParamSpec

_P = ParamSpec("_P")

ROOT = Path(__file__).resolve().parent.parent

#: undefined symbols a torch-free library must not reference: torch/c10/aoti, cuBLAS (its
#: headers are included for declarations only) and the CUDA driver API (cu[A-Z]...: cudart is
#: static and reaches the driver through its entry-point table, so libcuda is not linked)
FORBIDDEN_SYMBOLS = re.compile(r"aoti_|torch|c10|_ZN3c10|_ZN5torch|cublas|^cu[A-Z]")


class BuildError(RuntimeError):
    """A build step failed; the scripts print it and exit 1."""


def make_log(tag: str) -> Callable[[str], None]:
    """A ``log(msg)`` printing ``[tag HH:MM:SS] msg``, flushed (builds run for minutes)."""

    def log(msg: str) -> None:
        print(f"[{tag} {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    return log


def reports_build_errors(main: Callable[_P, int]) -> Callable[_P, int]:
    """``main`` printing ``error: <message>`` to stderr and returning 1 on a :class:`BuildError`
    (a failed step says what failed; no traceback)."""

    @functools.wraps(main)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except BuildError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1

    return wrapper


def add_build_options(ap: argparse.ArgumentParser, default_out: Path) -> None:
    """The options both builds take: ``--out``, ``--jobs``, ``--threads``, ``--nvcc``."""
    rel = default_out.relative_to(ROOT) if default_out.is_relative_to(ROOT) else default_out
    ap.add_argument("--out", default=str(default_out), help=f"output folder ({rel})")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                    help="translation units compiled in parallel (default: CPU count)")
    ap.add_argument("--threads", type=int, default=0, help="nvcc --threads per unit (0: off)")
    ap.add_argument("--nvcc", help="nvcc to use (default: $NVCC, then PATH)")


def sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def sha256_file(p: Path) -> str:
    return sha256_bytes(p.read_bytes())


# ----------------------------------------------------------------------------------------------
# nvcc


def nvcc_path(arg: str | None) -> str:
    """``--nvcc``, else ``$NVCC``, else nvcc on PATH, else /usr/local/cuda's."""
    for c in (arg, os.environ.get("NVCC"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if c and Path(c).exists():
            return c
    raise BuildError("nvcc not found (pass --nvcc)")


def nvcc_home(nvcc: str) -> Path:
    """The CUDA toolkit folder of ``nvcc`` (it may be a wrapper script elsewhere)."""
    real = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", "/dev/null"],
                          capture_output=True, text=True).stderr
    m = re.search(r"TOP=(\S+)", real)
    if m:
        return Path(m.group(1).strip('"'))
    return Path(os.path.realpath(nvcc)).parent.parent


def nvcc_version(nvcc: str) -> str:
    """The last line of ``nvcc --version`` (``Build cuda_13.0.r13.0/...``), for BUILD_INFO."""
    return subprocess.run([nvcc, "--version"], capture_output=True,
                          text=True).stdout.strip().splitlines()[-1]


class Unit(NamedTuple):
    """A translation unit: object ``<name>.o`` from ``src`` compiled with ``flags``; it is
    rebuilt when the command or one of ``inputs`` (hashed) changes."""

    name: str
    src: Path
    flags: list[str]
    inputs: list[Path]


class Compiled(NamedTuple):
    name: str
    obj: Path
    seconds: float
    how: str  # "compiled" or "reused"
    log: Path


def _stamp(cmd: list[str], inputs: list[Path]) -> str:
    h = hashlib.sha256(json.dumps(cmd).encode())
    for p in inputs:
        h.update(p.read_bytes())
    return h.hexdigest()


def compile_unit(nvcc: str, unit: Unit, objdir: Path, logdir: Path,
                 threads: int = 0) -> Compiled:
    """Compile one unit (nvcc's output to ``logdir/<name>.log``), or reuse its object when the
    stamp beside it matches. ``--threads`` is not part of the stamp: it does not change the
    object."""
    obj = objdir / f"{unit.name}.o"
    cmd = [nvcc, *unit.flags, "-x", "cu", "-c", str(unit.src), "-o", str(obj)]
    stamp = _stamp(cmd, unit.inputs)
    stamp_file = obj.with_suffix(".stamp")
    logf = logdir / f"{unit.name}.log"
    if obj.exists() and stamp_file.exists() and stamp_file.read_text() == stamp:
        return Compiled(unit.name, obj, 0.0, "reused", logf)
    if threads:
        cmd.insert(1, f"--threads={threads}")
    t0 = time.monotonic()
    with open(logf, "w") as lf:
        lf.write(shlex.join(cmd) + "\n\n")
        lf.flush()
        r = subprocess.run(cmd, stdout=lf, stderr=subprocess.STDOUT)
    dt = time.monotonic() - t0
    if r.returncode != 0:
        tail = "".join(logf.read_text().splitlines(True)[-40:])
        raise BuildError(f"{unit.name}: nvcc failed (rc={r.returncode}, log {logf}):\n{tail}")
    stamp_file.write_text(stamp)
    return Compiled(unit.name, obj, dt, "compiled", logf)


def compile_units(nvcc: str, units: Iterable[Unit], out: Path, jobs: int,
                  log: Callable[[str], None], threads: int = 0,
                  what: str | None = None) -> dict[str, Compiled]:
    """Compile ``units`` (started in the given order) with ``jobs`` in parallel into
    ``out/obj`` (logs in ``out/logs``); on a failure the units not yet started are cancelled.
    ``what`` names the units in the log line (default: their count)."""
    units = list(units)
    objdir, logdir = out / "obj", out / "logs"
    objdir.mkdir(parents=True, exist_ok=True)
    logdir.mkdir(parents=True, exist_ok=True)
    rel = logdir.relative_to(ROOT) if logdir.is_relative_to(ROOT) else logdir
    log(f"compiling {what or f'{len(units)} translation units'} with {jobs} jobs "
        f"(logs in {rel})")
    done: dict[str, Compiled] = {}
    t_start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as ex:
        futs = [ex.submit(compile_unit, nvcc, u, objdir, logdir, threads) for u in units]
        try:
            for f in concurrent.futures.as_completed(futs):
                c = f.result()
                done[c.name] = c
                log(f"  [{len(done)}/{len(units)}] {c.name}: {c.how}"
                    + (f" in {c.seconds:.0f} s" if c.seconds else "")
                    + f" ({time.monotonic() - t_start:.0f} s elapsed)")
        except BaseException:
            for fut in futs:
                fut.cancel()
            raise
    return done


def link(nvcc: str, objs: list[Path], lib: Path, log: Callable[[str], None]) -> None:
    """Link ``objs`` into ``lib`` (soname: its file name): cudart, libstdc++ and libgcc static
    and their symbols kept local, every symbol resolved (``-z defs``), unused sections dropped,
    then stripped; written beside and renamed, so a failed link leaves the old library."""
    tmp = lib.with_suffix(".so.tmp")
    cmd = [nvcc, "-shared", "-gencode", "arch=compute_90a,code=sm_90a", "-cudart", "static",
           "-o", str(tmp), *map(str, objs),
           "-Xcompiler=-static-libstdc++,-static-libgcc",
           "-Xlinker", "--exclude-libs,ALL", "-Xlinker", "-z,defs", "-Xlinker", "--gc-sections",
           "-Xlinker", "-soname," + lib.name]
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
    except ImportError:  # another interpreter than the venv's: its triton's copy
        cands += sorted(ROOT.glob(".venv/lib/python3*/site-packages/triton/backends/nvidia/bin/"
                                  "cuobjdump"))
    for c in cands:
        if c.is_file():
            return c
    raise BuildError("cuobjdump not found (beside nvcc, on PATH, or in triton's backends)")


def check_shared_library(lib: Path, nvcc: str, export_prefix: str) -> dict:
    """The checks every such library passes (see the module docstring), as BUILD_INFO's
    ``checks``: ``max_glibc``, ``needed``, ``exports``, ``cubin_arches``, ``cubins``,
    ``ptx_entries``."""
    res: dict = {}
    nm = subprocess.run(["nm", "-D", "--undefined-only", str(lib)], capture_output=True,
                        text=True).stdout
    undefined = sorted({ln.split()[-1] for ln in nm.splitlines() if ln.strip()})
    bad = [s for s in undefined if FORBIDDEN_SYMBOLS.search(s)]
    if bad:
        raise BuildError(f"{lib.name} references torch/cuBLAS/driver symbols: {bad[:10]}")
    glibc = sorted({m for s in undefined for m in re.findall(r"@GLIBC_([\d.]+)", s)},
                   key=lambda v: tuple(map(int, v.split("."))))
    res["max_glibc"] = glibc[-1] if glibc else None
    needed = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True).stdout
    res["needed"] = re.findall(r"\(NEEDED\).*\[(.*)\]", needed)
    exported = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True,
                              text=True).stdout
    names = sorted(ln.split()[-1] for ln in exported.splitlines() if " T " in ln)
    res["exports"] = names
    stray = [n for n in names if not n.startswith(export_prefix)]
    if stray:
        raise BuildError(f"{lib.name} exports more than its C ABI: {stray[:10]}")
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
    return res


def load_in_fresh_process(lib: Path, code: str) -> str:
    """Run ``code`` (``sys.argv[1]`` is the library's path; it loads it with ctypes and prints
    what it read) in a fresh interpreter and return its stdout. No GPU is needed: cudart is
    static and initialises lazily, nothing calls the driver at load time."""
    r = subprocess.run([sys.executable, "-c", code, str(lib)], capture_output=True, text=True)
    if r.returncode != 0:
        raise BuildError(f"ctypes could not load {lib}: {r.stderr[-2000:]}")
    return r.stdout


# ----------------------------------------------------------------------------------------------
# BUILD_INFO.json


def library_record(lib: Path) -> dict:
    """BUILD_INFO's entries about the built file: when, where (relative to the repository when
    inside it), its size and sha256."""
    return {
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "library": str(lib.relative_to(ROOT)) if lib.is_relative_to(ROOT) else str(lib),
        "size_bytes": lib.stat().st_size,
        "sha256": sha256_file(lib),
    }


def sources_record(folder: Path) -> dict[str, str]:
    """sha256 of our own CUDA sources (``*.cu``, ``*.cuh`` in ``folder``), by repository path."""
    return {str(f.relative_to(ROOT)): sha256_file(f)
            for f in sorted(folder.iterdir()) if f.suffix in (".cu", ".cuh")}


def write_build_info(out: Path, lib: Path, info: dict, log: Callable[[str], None],
                     counts: Sequence[str] = (), note: str = "") -> None:
    """``out/BUILD_INFO.json`` written, and a line logged summing up the library and its
    ``info["checks"]`` (``counts`` after the cubins', ``note`` at the end)."""
    (out / "BUILD_INFO.json").write_text(json.dumps(info, indent=1) + "\n")
    checks = info["checks"]
    log(f"built {lib} ({lib.stat().st_size / 2**20:.2f} MiB): "
        + ", ".join([f"{checks['cubins']} sm_90a cubins", *counts,
                     f"exports {len(checks['exports'])} functions", f"needs {checks['needed']}",
                     f"GLIBC <= {checks['max_glibc']}; ctypes load ok{note}"]))
