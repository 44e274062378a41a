"""AOT build: compile every :class:`~kernels.spec.KernelSpec` for each target, write the manifest.

``vllm-moe-aot build`` (see :mod:`vllm_moe_aot.cli.build`) drives :func:`build`, :func:`check`
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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kernels.spec import TARGETS, KernelSpec, Target
from vllm_moe_aot.contract import (
    MANIFEST_NAME,
    SCHEMA,
    ManifestDoc,
    ManifestError,
    ObjectEntry,
    Role,
    Variant,
)

#: bump when the build writes different objects or entries for the same inputs
BUILD_FORMAT = 1
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
                variants: Sequence[Variant] | None):
    if specs is None or variants is None:
        from kernels import registry

        specs = registry.all_specs() if specs is None else specs
        variants = registry.all_variants() if variants is None else variants
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise BuildError(f"duplicate kernel spec names: {dup}")
    return list(specs), list(variants)


def variant_problems(specs: Sequence[KernelSpec], variants: Sequence[Variant]) -> list[str]:
    """Variants that name unknown kernels, or whose declared limits (``max_topk``,
    ``block_m``) are not what their kernels were built with."""
    by = {s.name: s for s in specs}
    out = []
    seen: set[str] = set()
    for v in variants:
        if v.name in seen:
            out.append(f"duplicate variant name {v.name!r}")
        seen.add(v.name)
        for scheme, roles in v.kernels.items():
            for role, k in roles.items():
                if k not in by:
                    out.append(f"variant {v.name!r} uses kernel {k!r} ({scheme}/{role.value}), "
                               f"which no spec defines")
            pads = [by[k].constexprs["TOPK_PAD"] for k in roles.values()
                    if k in by and "TOPK_PAD" in by[k].constexprs]
            if pads and v.max_topk != min(pads):
                out.append(f"variant {v.name!r} ({scheme}) declares max_topk={v.max_topk}; its "
                           f"kernels hold {min(pads)} top-k slots")
            s1 = by.get(roles.get(Role.STAGE1, ""))
            if s1 is not None and v.block_m != s1.constexprs.get("BLOCK_M", 0):
                out.append(f"variant {v.name!r} ({scheme}) declares block_m={v.block_m}; its "
                           f"stage 1 is built with BLOCK_M={s1.constexprs.get('BLOCK_M', 0)}")
    return out


def read_manifest(out_dir: Path) -> ManifestDoc | None:
    p = out_dir / MANIFEST_NAME
    if not p.is_file():
        return None
    try:
        return ManifestDoc.parse(json.loads(p.read_text()), str(p))
    except (OSError, json.JSONDecodeError, ManifestError):
        return None


def _package_version() -> str:
    try:
        from vllm_moe_aot import __version__

        return __version__
    except ImportError:  # pragma: no cover
        return "unknown"


def _file_ok(out_dir: Path, entry: ObjectEntry) -> bool:
    path = out_dir / entry.file
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest() == entry.sha256
    except OSError:
        return False


def _compiler_info(objects: list[ObjectEntry]) -> dict[str, Any]:
    info: dict[str, Any] = {"triton": triton_version()}
    for o in objects:
        cv = o.compiler_version
        if TARGETS[o.target].backend == "cuda" and "ptxas" not in info:
            m = re.search(r"ptxas (\S+)", cv)
            if m:
                info["ptxas"] = m.group(1)
        elif TARGETS[o.target].backend != "cuda" and "llvm" not in info:
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
          variants: Sequence[Variant] | None = None,
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
    old = read_manifest(out)
    old_by = {(o.name, o.target): o for o in (old.objects if old else ())}

    todo: list[Job] = []
    new_by: dict[tuple[str, str], ObjectEntry] = {}
    for spec, target in chosen:
        job = Job(spec, target, keys.key(spec, target))
        prev = old_by.get((spec.name, target.name))
        if (not force and prev is not None and prev.cache_key == job.key
                and prev.file == job.file and _file_ok(out, prev)):
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
                entry = ObjectEntry.from_json(a, "build")
                _atomic_write(out / entry.file, b)
                new_by[pair] = entry
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
            report.removed.append(o.file)
    objects = [new_by[k] for k in sorted(new_by)]
    keep_files = {o.file for o in objects}
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
    manifest = ManifestDoc(
        package_version=_package_version(),
        compiler=_compiler_info(objects) if objects else {"triton": triton_version()},
        objects=tuple(objects), variants=tuple(variants))
    _atomic_write(out / MANIFEST_NAME, dump_manifest(manifest.to_json()).encode())
    for f in report.failures:
        log(f"FAILED {f}")
    for p in report.problems:
        log(f"PROBLEM {p}")
    return report


def _run_jobs(todo: list[Job], jobs: int, progress: bool) -> list[tuple[str, Any, Any]]:
    from tqdm import tqdm

    from kernels.compile import _init_worker, compile_payload

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
          variants: Sequence[Variant] | None = None,
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
    if data.package_version != _package_version():
        problems.append(f"manifest package_version {data.package_version!r} != "
                        f"{_package_version()!r}")
    if data.variants != tuple(variants):
        problems.append("manifest variants differ from kernels.registry.all_variants()")
    by = {(o.name, o.target): o for o in data.objects}
    keys = KeyMaker()
    for spec, target in chosen:
        o = by.get((spec.name, target.name))
        what = f"{spec.name} [{target.name}]"
        if o is None:
            problems.append(f"missing: {what}")
        elif o.cache_key != keys.key(spec, target):
            problems.append(f"stale: {what} (sources, spec, Triton {keys.triton} or target "
                            f"changed)")
        elif not _file_ok(out, o):
            problems.append(f"bad file: {what} ({o.file} missing or its sha256 differs)")
    wanted = desired_pairs(specs)
    for pair, o in sorted(by.items()):
        if pair not in wanted:
            problems.append(f"orphan: {pair[0]} [{pair[1]}] (no spec; {o.file})")
    return problems


def listing(specs: Sequence[KernelSpec] | None = None,
            variants: Sequence[Variant] | None = None,
            targets: Iterable[str] | None = None, kernels: Iterable[str] | None = None,
            families: Iterable[str] | None = None) -> str:
    specs, variants = _load_specs(specs, variants)
    chosen = select(specs, targets, kernels, families)
    tsel = _split(targets)
    lines = [f"variants ({len(variants)}):"]
    for v in variants:
        schemes = v.schemes
        ks = v.kernel_names()
        lines.append(f"  {v.name:28s} {v.regime.value:8s} "
                     f"a8={'yes' if v.quantize_activations else 'no'}"
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
