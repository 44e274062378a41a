"""AOT build: compile every :class:`~kernels.spec.KernelSpec` for each target, write the manifest.

``vllm-moe-aot build`` (see :mod:`vllm_moe_aot.build_cli`) drives :func:`build`, :func:`check`
and :func:`listing`. For each (spec, target) the build calls ``triton.compile`` on an
``ASTSource`` with the spec's explicit signature (constexprs listed as ``"constexpr"``),
resolved constexprs and ``tt.divisibility`` hints, writes ``<out>/<target>/<name>.<suffix>``
and records in ``<out>/manifest.json`` everything a launcher needs, the parameter list read back
from the compiled ELF (so the parameters Triton appends are taken from the artifact, never
assumed).

Caching: each object has a cache key, the sha256 of the kernel's source files (its module and
the ``kernels`` modules it imports), the spec's resolved declaration, the Triton version, the
target, the build format and Triton's cache-invalidating environment variables. An object whose
key, file and hash are unchanged is reused; objects of removed specs are deleted.
"""

from __future__ import annotations

import ast
import concurrent.futures as cf
import contextlib
import dataclasses
import hashlib
import importlib
import importlib.util
import json
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kernels.spec import TARGETS, KernelSpec, PipelineVariant, Target

#: bump when the build writes different objects or entries for the same inputs
BUILD_FORMAT = 1
MANIFEST_NAME = "manifest.json"
SCHEMA = 1
#: scratch pointers Triton appends after the user's parameters, in order, when its metadata
#: has the matching ``<name>_size`` field (Triton 3.6 - 3.8: both, always)
APPENDED = ("global_scratch", "profile_scratch")
APPENDED_TYPE = "*i8"
#: environment variables that never change generated code (kept out of the cache key)
_ENV_NOT_IN_KEY = {"TRITON_INTERPRET", "TRITON_CACHE_DIR", "TRITON_HOME"}


class BuildError(RuntimeError):
    """A user-facing build problem (bad selection, no sources, interpreter mode...)."""


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def package_artifacts_dir() -> Path:
    return repo_root() / "vllm_moe_aot" / "artifacts"


# ---- selection ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    spec: KernelSpec
    target: Target
    key: str

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def file(self) -> str:
        return f"{self.target.name}/{self.spec.name}.{self.target.suffix}"

    def payload(self, cache_dir: str) -> dict[str, Any]:
        sig, consts = self.spec.resolved(self.target)
        return {"name": self.spec.name, "source": self.spec.source, "target": self.target.name,
                "signature": sig, "constexprs": consts,
                "divisible_by_16": list(self.spec.divisible_by_16),
                "num_warps": self.spec.num_warps, "num_stages": self.spec.num_stages,
                "config": self.spec.config, "family": self.spec.family, "key": self.key,
                "file": self.file, "cache_dir": cache_dir}


def _split(values: Iterable[str] | None) -> list[str] | None:
    if not values:
        return None
    out = [v.strip() for item in values for v in str(item).split(",") if v.strip()]
    return out or None


def select(specs: Sequence[KernelSpec], targets: Iterable[str] | None = None,
           kernels: Iterable[str] | None = None, families: Iterable[str] | None = None,
           ) -> list[tuple[KernelSpec, Target]]:
    """(spec, target) pairs matching the filters; unknown names are an error."""
    t_sel, k_sel, f_sel = _split(targets), _split(kernels), _split(families)
    names = {s.name for s in specs}
    fams = {s.family for s in specs}
    for kind, sel, known in (("target", t_sel, set(TARGETS)), ("kernel", k_sel, names),
                             ("family", f_sel, fams)):
        bad = sorted(set(sel or ()) - known)
        if bad:
            raise BuildError(f"unknown {kind}(s) {bad}; known: {sorted(known)}")
    out = []
    for s in specs:
        unknown = [t for t in s.targets if t not in TARGETS]
        if unknown:
            raise BuildError(f"spec {s.name!r} names unknown targets {unknown}")
        if k_sel and s.name not in k_sel or f_sel and s.family not in f_sel:
            continue
        for t in s.targets:
            if t_sel is None or t in t_sel:
                out.append((s, TARGETS[t]))
    return out


def desired_pairs(specs: Sequence[KernelSpec]) -> set[tuple[str, str]]:
    return {(s.name, t) for s in specs for t in s.targets}


# ---- cache keys ---------------------------------------------------------------------------------
def triton_version() -> str:
    try:
        from importlib.metadata import version

        return version("triton")
    except Exception:  # noqa: BLE001
        import triton

        return triton.__version__


def _module_file(mod: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(mod)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin)


def _imports(path: Path, mod: str) -> set[str]:
    tree = ast.parse(path.read_bytes(), str(path))
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                base_mod = ".".join(base + ([node.module] if node.module else []))
            else:
                base_mod = node.module or ""
            out.add(base_mod)
            out.update(f"{base_mod}.{a.name}" for a in node.names)  # submodules, if they exist
    return out


def source_files(source: str) -> dict[str, Path]:
    """The kernel's module and every module of the same top-level package (or ``kernels``) it
    imports, transitively: module name -> file."""
    mod = source.partition(":")[0]
    top = {mod.split(".")[0], "kernels"}
    files: dict[str, Path] = {}
    stack = [mod]
    while stack:
        m = stack.pop()
        if m in files:
            continue
        path = _module_file(m)
        if path is None:
            continue
        if m != mod and path.name == "__init__.py":
            continue  # packages themselves: only their submodules matter
        files[m] = path
        for dep in _imports(path, m):
            if dep.split(".")[0] in top and dep not in files:
                stack.append(dep)
    if mod not in files:
        raise BuildError(f"cannot find the source file of module {mod!r}")
    return files


def _json_const(v: Any, where: str) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    try:
        import triton.language as tl

        if isinstance(v, tl.dtype):
            return {"dtype": str(v)}
    except ImportError:  # pragma: no cover
        pass
    raise BuildError(f"{where}: constexpr value {v!r} ({type(v).__name__}) cannot be recorded in "
                     f"the manifest; use a bool, int, float, str or triton dtype")


def declaration(spec: KernelSpec, target: Target) -> dict[str, Any]:
    sig, consts = spec.resolved(target)
    return {
        "name": spec.name, "source": spec.source, "family": spec.family, "signature": sig,
        "constexprs": {k: _json_const(v, spec.name) for k, v in consts.items()},
        "divisible_by_16": list(spec.divisible_by_16), "num_warps": spec.num_warps,
        "num_stages": spec.num_stages,
    }


def _env_key() -> dict[str, str]:
    try:
        from triton._C.libtriton import get_cache_invalidating_env_vars

        env = dict(get_cache_invalidating_env_vars())
    except Exception:  # noqa: BLE001
        env = {}
    return {k: str(v) for k, v in sorted(env.items()) if k not in _ENV_NOT_IN_KEY}


class KeyMaker:
    """Cache keys, with each source file hashed once."""

    def __init__(self) -> None:
        self.triton = triton_version()
        self.env = _env_key()
        self._hash: dict[Path, str] = {}
        self._files: dict[str, dict[str, Path]] = {}

    def _file_hash(self, p: Path) -> str:
        h = self._hash.get(p)
        if h is None:
            h = self._hash[p] = hashlib.sha256(p.read_bytes()).hexdigest()
        return h

    def key(self, spec: KernelSpec, target: Target) -> str:
        files = self._files.get(spec.source)
        if files is None:
            files = self._files[spec.source] = source_files(spec.source)
        blob = json.dumps({
            "format": BUILD_FORMAT, "triton": self.triton, "target": target.name,
            "env": self.env, "spec": declaration(spec, target),
            "sources": {m: self._file_hash(p) for m, p in sorted(files.items())},
        }, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


# ---- compiling one object (runs in worker processes) --------------------------------------------
def _import_fn(source: str) -> Any:
    mod, _, name = source.partition(":")
    return getattr(importlib.import_module(mod), name)


def _ptxas_version() -> str | None:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        tool = get_ptxas(90)
        out = tool.version if isinstance(tool.version, str) else str(tool.version)
        try:
            import subprocess

            text = subprocess.run([tool.path, "--version"], capture_output=True, text=True,
                                  timeout=30).stdout
            m = re.search(r"V(\d+\.\d+\.\d+)", text)
            if m:
                out = m.group(1)
        except Exception:  # noqa: BLE001
            pass
        return out
    except Exception:  # noqa: BLE001
        return None


def _llvm_version(binary: bytes) -> str | None:
    import io

    from elftools.elf.elffile import ELFFile

    try:
        sec = ELFFile(io.BytesIO(binary)).get_section_by_name(".comment")
        if sec is None:
            return None
        text = sec.data().split(b"\0")[0].decode(errors="replace")
        return text.removeprefix("Linker: ").strip() or None
    except Exception:  # noqa: BLE001
        return None


@contextlib.contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def compile_payload(p: dict[str, Any]) -> tuple[str, Any, Any]:
    """Compile one object. Returns ("ok", entry, bytes) or ("error", message, None)."""
    try:
        with _env("TRITON_CACHE_DIR", p["cache_dir"]):
            entry, binary = _compile(p)
        return "ok", entry, binary
    except Exception as e:  # noqa: BLE001 - reported per object, the build goes on
        msg = f"{type(e).__name__}: {e}".strip()
        if not str(e).strip():
            msg += "\n" + traceback.format_exc(limit=5)
        return "error", msg[:6000], None


def _compile(p: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from vllm_moe_aot.runtime.elf import kernel_params
    from vllm_moe_aot.runtime.params import layout

    name, target = p["name"], TARGETS[p["target"]]
    fn = _import_fn(p["source"])
    if not hasattr(fn, "arg_names") or type(fn).__name__ == "InterpretedFunction":
        raise BuildError(f"{p['source']} is not a Triton @jit function compiled for GPUs "
                         f"(is TRITON_INTERPRET set?)")
    sig: dict[str, str] = p["signature"]
    consts: dict[str, Any] = p["constexprs"]
    args = list(fn.arg_names)
    missing = [a for a in args if a not in sig and a not in consts]
    extra = [a for a in list(sig) + list(consts) if a not in args]
    both = [a for a in sig if a in consts]
    if missing or extra or both:
        raise BuildError(f"spec does not match {p['source']}{tuple(args)}: missing {missing}, "
                         f"unknown {extra}, both signature and constexpr {both}")
    order = [a for a in args if a in sig]
    if order != list(sig):
        raise BuildError(f"signature order {list(sig)} differs from the kernel's {order}; list "
                         f"the parameters in the kernel's own order (it is the launch order)")
    bad_div = [d for d in p["divisible_by_16"] if d not in sig]
    if bad_div:
        raise BuildError(f"divisible_by_16 names {bad_div}, which are not signature parameters")
    full_sig = {a: (sig[a] if a in sig else "constexpr") for a in args}
    attrs = {(args.index(d),): [["tt.divisibility", 16]] for d in p["divisible_by_16"]}
    src = ASTSource(fn, signature=full_sig, constexprs=consts, attrs=attrs)
    ck = triton.compile(src, target=GPUTarget(target.backend, target.arch, target.warp_size),
                        options={"num_warps": p["num_warps"], "num_stages": p["num_stages"]})
    binary: bytes = ck.asm[target.suffix]
    md = ck.metadata
    symbol = md.name

    # the launch parameters, from the artifact
    declared = kernel_params(binary, symbol)
    appended = [a for a in APPENDED if hasattr(md, f"{a}_size")]
    if len(declared) != len(sig) + len(appended):
        raise BuildError(
            f"the compiled kernel declares {len(declared)} parameters; expected the "
            f"{len(sig)} of the signature plus {len(appended)} appended by Triton "
            f"{triton_version()}"
            f" ({appended}). This Triton changed its calling convention: update APPENDED in "
            f"kernels/build.py"
        )
    params = [{"name": a, "type": t, "appended": False} for a, t in sig.items()]
    params += [{"name": a, "type": APPENDED_TYPE, "appended": True} for a in appended]
    ours = layout([q["type"] for q in params])
    theirs = [(d.offset, d.size) for d in declared]
    if ours != theirs:
        raise BuildError(f"parameter layout {ours} (from the signature) differs from the code "
                         f"object's {theirs}; check the signature's types")
    for q, d in zip(params, declared, strict=True):
        q["offset"], q["size"] = d.offset, d.size

    tv = triton_version()
    if target.backend == "cuda":
        tool = _ptxas_version()
        compiler_version = f"triton {tv}" + (f", ptxas {tool}" if tool else "")
    else:
        tool = _llvm_version(binary)
        compiler_version = f"triton {tv}" + (f", {tool}" if tool else "")
    entry = {
        "name": name,
        "target": target.name,
        "file": p["file"],
        "symbol": symbol,
        "params": params,
        "num_warps": md.num_warps,
        "threads_per_block": md.num_warps * target.warp_size,
        "shared": md.shared,
        "global_scratch_size": getattr(md, "global_scratch_size", 0) or 0,
        "global_scratch_align": getattr(md, "global_scratch_align", 1) or 1,
        "profile_scratch_size": getattr(md, "profile_scratch_size", 0) or 0,
        "profile_scratch_align": getattr(md, "profile_scratch_align", 1) or 1,
        "num_ctas": getattr(md, "num_ctas", 1),
        "launch_pdl": bool(getattr(md, "launch_pdl", False)),
        "launch_cooperative_grid": bool(getattr(md, "launch_cooperative_grid", False)),
        "config": p["config"],
        "constexprs": {k: _json_const(v, name) for k, v in consts.items()},
        "family": p["family"],
        "source": p["source"],
        "sha256": hashlib.sha256(binary).hexdigest(),
        "size": len(binary),
        "cache_key": p["key"],
        "compiler_version": compiler_version,
    }
    return entry, binary


def _init_worker(paths: list[str]) -> None:
    for pth in reversed(paths):
        if pth not in sys.path:
            sys.path.insert(0, pth)


# ---- build / check ------------------------------------------------------------------------------
@dataclass
class Failure:
    name: str
    target: str
    message: str

    def __str__(self) -> str:
        return f"{self.name} [{self.target}]: {self.message}"


@dataclass
class BuildReport:
    out_dir: Path
    compiled: list[tuple[str, str]] = field(default_factory=list)
    reused: list[tuple[str, str]] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # manifest-level (variants...)

    @property
    def ok(self) -> bool:
        return not self.failures and not self.problems

    def summary(self) -> str:
        s = (f"{len(self.compiled)} compiled, {len(self.reused)} unchanged, "
             f"{len(self.removed)} removed, {len(self.failures)} failed -> "
             f"{self.out_dir / MANIFEST_NAME}")
        return s


def _load_specs(specs: Sequence[KernelSpec] | None,
                variants: Sequence[PipelineVariant] | None):
    if specs is None or variants is None:
        from kernels import registry

        specs = registry.all_specs() if specs is None else specs
        variants = registry.all_variants() if variants is None else variants
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise BuildError(f"duplicate kernel spec names: {dup}")
    return list(specs), list(variants)


def _variant_kernels(v: PipelineVariant) -> list[tuple[str, str]]:
    """(where, kernel name) for every kernel a variant names (``kernels`` may nest by scheme)."""
    out: list[tuple[str, str]] = []

    def walk(obj: Any, where: str) -> None:
        if isinstance(obj, str):
            out.append((where, obj))
        elif isinstance(obj, dict):
            for k, val in obj.items():
                walk(val, f"{where}/{k}" if where else str(k))

    walk(v.kernels, "")
    return out


def variant_problems(specs: Sequence[KernelSpec], variants: Sequence[PipelineVariant]
                     ) -> list[str]:
    names = {s.name for s in specs}
    out = []
    seen: set[str] = set()
    for v in variants:
        if v.name in seen:
            out.append(f"duplicate variant name {v.name!r}")
        seen.add(v.name)
        for where, k in _variant_kernels(v):
            if k not in names:
                out.append(f"variant {v.name!r} uses kernel {k!r} ({where}), which no spec "
                           f"defines")
    return out


def read_manifest(out_dir: Path) -> dict[str, Any] | None:
    p = out_dir / MANIFEST_NAME
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        return None
    return data


def _package_version() -> str:
    try:
        from vllm_moe_aot import __version__

        return __version__
    except ImportError:  # pragma: no cover
        return "unknown"


def _file_ok(out_dir: Path, entry: dict[str, Any]) -> bool:
    path = out_dir / entry.get("file", "")
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest() == entry.get("sha256")
    except OSError:
        return False


def _variants_json(variants: Sequence[PipelineVariant]) -> list[dict[str, Any]]:
    return json.loads(json.dumps([dataclasses.asdict(v) for v in variants]))


def _compiler_info(objects: list[dict[str, Any]]) -> dict[str, Any]:
    info: dict[str, Any] = {"triton": triton_version()}
    for o in objects:
        cv = o.get("compiler_version", "")
        if o["target"] == "sm_90a" and "ptxas" not in info:
            m = re.search(r"ptxas (\S+)", cv)
            if m:
                info["ptxas"] = m.group(1)
        elif o["target"] != "sm_90a" and "llvm" not in info:
            _, _, rest = cv.partition(", ")
            if rest:
                info["llvm"] = rest
    return info


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


_FLAT_DICT = re.compile(r"\{\n\s+([^{}\[\]]*?)\n\s*\}")


def dump_manifest(manifest: dict[str, Any]) -> str:
    """Indented JSON with flat dicts (parameters, constexprs) on one line each: short diffs."""
    text = json.dumps(manifest, indent=1)
    text = _FLAT_DICT.sub(lambda m: "{" + re.sub(r"\n\s+", " ", m.group(1)) + "}", text)
    return text + "\n"


def _check_interpret() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise BuildError("TRITON_INTERPRET is set: the build compiles real code objects; run it "
                         "without TRITON_INTERPRET")


def build(out_dir: str | os.PathLike | None = None, *, specs: Sequence[KernelSpec] | None = None,
          variants: Sequence[PipelineVariant] | None = None,
          targets: Iterable[str] | None = None, kernels: Iterable[str] | None = None,
          families: Iterable[str] | None = None, jobs: int | None = None, force: bool = False,
          progress: bool = True, log: Callable[[str], None] = print) -> BuildReport:
    """Compile what is missing or stale (everything with ``force``) and rewrite the manifest."""
    _check_interpret()
    out = Path(out_dir) if out_dir is not None else package_artifacts_dir()
    specs, variants = _load_specs(specs, variants)
    chosen = select(specs, targets, kernels, families)
    report = BuildReport(out)
    report.problems += variant_problems(specs, variants)
    keys = KeyMaker()
    old = read_manifest(out) or {}
    old_by = {(o["name"], o["target"]): o for o in old.get("objects", [])}

    todo: list[Job] = []
    new_by: dict[tuple[str, str], dict[str, Any]] = {}
    for spec, target in chosen:
        job = Job(spec, target, keys.key(spec, target))
        prev = old_by.get((spec.name, target.name))
        if (not force and prev is not None and prev.get("cache_key") == job.key
                and prev.get("file") == job.file and _file_ok(out, prev)):
            new_by[(spec.name, target.name)] = prev
            report.reused.append((spec.name, target.name))
        else:
            todo.append(job)

    if todo:
        jobs = max(1, jobs or os.cpu_count() or 1)
        results = _run_jobs(todo, jobs, progress)
        for job, (status, a, b) in zip(todo, results, strict=True):
            pair = (job.name, job.target.name)
            if status == "ok":
                _atomic_write(out / a["file"], b)
                new_by[pair] = a
                report.compiled.append(pair)
            else:
                report.failures.append(Failure(job.name, job.target.name, a))
                if pair in old_by:  # keep the last good object; --check still calls it stale
                    new_by[pair] = old_by[pair]

    # keep objects outside this selection whose spec still exists; drop the rest
    wanted = desired_pairs(specs)
    for pair, o in old_by.items():
        if pair in new_by:
            continue
        if pair in wanted:
            new_by[pair] = o
        else:
            report.removed.append(o.get("file", f"{pair[1]}/{pair[0]}"))
    objects = [new_by[k] for k in sorted(new_by)]
    keep_files = {o["file"] for o in objects}
    for t in TARGETS.values():
        d = out / t.name
        if d.is_dir():
            for f in sorted(d.glob(f"*.{t.suffix}")):
                rel = f"{t.name}/{f.name}"
                if rel not in keep_files:
                    f.unlink()
                    if rel not in report.removed:
                        report.removed.append(rel)
            with contextlib.suppress(OSError):
                d.rmdir()  # only if empty
    manifest = {
        "schema": SCHEMA,
        "package_version": _package_version(),
        "compiler": _compiler_info(objects) if objects else {"triton": triton_version()},
        "objects": objects,
        "variants": _variants_json(variants),
    }
    _atomic_write(out / MANIFEST_NAME, dump_manifest(manifest).encode())
    for f in report.failures:
        log(f"FAILED {f}")
    for p in report.problems:
        log(f"PROBLEM {p}")
    return report


def _run_jobs(todo: list[Job], jobs: int, progress: bool) -> list[tuple[str, Any, Any]]:
    from tqdm import tqdm

    with tempfile.TemporaryDirectory(prefix="vllm-moe-aot-triton-cache-") as cache_dir:
        payloads = [j.payload(cache_dir) for j in todo]
        bar = tqdm(total=len(todo), desc="compile", unit="obj", disable=not progress,
                   dynamic_ncols=True)
        results: list[Any] = [None] * len(todo)
        try:
            if jobs == 1 or len(todo) == 1:
                for i, p in enumerate(payloads):
                    bar.set_postfix_str(f"{p['name']} [{p['target']}]", refresh=False)
                    results[i] = compile_payload(p)
                    bar.update()
            else:
                ctx = multiprocessing.get_context("spawn")
                paths = [str(repo_root())] + [p for p in sys.path if p]
                with cf.ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=ctx,
                                            initializer=_init_worker,
                                            initargs=(paths,)) as pool:
                    futs = {pool.submit(compile_payload, p): i for i, p in enumerate(payloads)}
                    for fut in cf.as_completed(futs):
                        i = futs[fut]
                        try:
                            results[i] = fut.result()
                        except Exception as e:  # noqa: BLE001 - a worker died
                            results[i] = ("error", f"worker failed: {type(e).__name__}: {e}",
                                          None)
                        bar.set_postfix_str(f"{todo[i].name} [{todo[i].target.name}]",
                                            refresh=False)
                        bar.update()
        finally:
            bar.close()
        shutil.rmtree(cache_dir, ignore_errors=True)
    return results


def check(out_dir: str | os.PathLike | None = None, *, specs: Sequence[KernelSpec] | None = None,
          variants: Sequence[PipelineVariant] | None = None,
          targets: Iterable[str] | None = None, kernels: Iterable[str] | None = None,
          families: Iterable[str] | None = None) -> list[str]:
    """Everything that a build would change, without compiling; empty when current."""
    out = Path(out_dir) if out_dir is not None else package_artifacts_dir()
    specs, variants = _load_specs(specs, variants)
    chosen = select(specs, targets, kernels, families)
    problems = variant_problems(specs, variants)
    data = read_manifest(out)
    if data is None:
        return problems + [f"no readable schema-{SCHEMA} manifest at {out / MANIFEST_NAME}"]
    if data.get("package_version") != _package_version():
        problems.append(f"manifest package_version {data.get('package_version')!r} != "
                        f"{_package_version()!r}")
    if data.get("variants") != _variants_json(variants):
        problems.append("manifest variants differ from kernels.registry.all_variants()")
    by = {(o["name"], o["target"]): o for o in data.get("objects", [])}
    keys = KeyMaker()
    for spec, target in chosen:
        o = by.get((spec.name, target.name))
        what = f"{spec.name} [{target.name}]"
        if o is None:
            problems.append(f"missing: {what}")
        elif o.get("cache_key") != keys.key(spec, target):
            problems.append(f"stale: {what} (sources, spec, Triton {keys.triton} or target "
                            f"changed)")
        elif not _file_ok(out, o):
            problems.append(f"bad file: {what} ({o.get('file')} missing or its sha256 differs)")
    wanted = desired_pairs(specs)
    for pair, o in sorted(by.items()):
        if pair not in wanted:
            problems.append(f"orphan: {pair[0]} [{pair[1]}] (no spec; {o.get('file')})")
    return problems


def listing(specs: Sequence[KernelSpec] | None = None,
            variants: Sequence[PipelineVariant] | None = None,
            targets: Iterable[str] | None = None, kernels: Iterable[str] | None = None,
            families: Iterable[str] | None = None) -> str:
    specs, variants = _load_specs(specs, variants)
    chosen = select(specs, targets, kernels, families)
    tsel = _split(targets)
    lines = [f"variants ({len(variants)}):"]
    for v in variants:
        schemes = [k for k, val in v.kernels.items() if isinstance(val, dict)]
        ks = sorted({k for _, k in _variant_kernels(v)})
        lines.append(f"  {v.name:28s} {v.regime:8s} a8={'yes' if v.quantize_activations else 'no'}"
                     + (f" schemes={','.join(schemes)}" if schemes else ""))
        lines.append(f"      kernels: {' '.join(ks)}")
    names = sorted({s.name for s, _ in chosen})
    lines.append(f"kernels ({len(names)}):")
    by = {s.name: s for s in specs}
    for n in names:
        s = by[n]
        ts = [t for t in s.targets if tsel is None or t in tsel]
        lines.append(f"  {n:32s} {s.config:48s} {','.join(ts)}")
    lines.append("targets:")
    for t in TARGETS.values():
        if tsel is None or t.name in tsel:
            lines.append(f"  {t.name:8s} {t.backend:5s} .{t.suffix:6s} fp8={t.fp8_type}")
    lines.append(f"{len(chosen)} code objects")
    return "\n".join(lines)
