"""``manifest.json``: what the AOT build produced, read without Triton or the kernel sources.

Schema 1::

    {"schema": 1, "package_version": "0.1.0",
     "compiler": {"triton": "3.8.0", "ptxas": "12.9", "llvm": "LLD 23.0.0 (...)"},
     "objects": [{"name", "target", "file", "symbol", "params": [{"name", "type", "offset",
                  "size", "appended"}], "num_warps", "threads_per_block", "shared",
                  "global_scratch_size", "global_scratch_align", "profile_scratch_size",
                  "profile_scratch_align", "num_ctas", "launch_pdl", "launch_cooperative_grid",
                  "config", "constexprs", "family", "source", "sha256", "size", "cache_key",
                  "compiler_version"}, ...],
     "variants": [{...PipelineVariant fields...}, ...]}

``file`` is relative to the manifest's folder. ``params`` is the full launch order, including
the parameters the compiler appends (``"appended": true``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm_moe_aot.runtime.errors import ManifestError

SCHEMA = 1
MANIFEST_NAME = "manifest.json"
#: environment variable naming another artifacts folder (tests, local builds)
ARTIFACTS_ENV = "VLLM_MOE_AOT_ARTIFACTS"


def default_artifacts_dir() -> Path:
    env = os.environ.get(ARTIFACTS_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "artifacts"


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    offset: int | None = None
    size: int | None = None
    appended: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "offset": self.offset, "size": self.size,
                "appended": self.appended}


_REQUIRED = ("name", "target", "file", "symbol", "params", "num_warps", "threads_per_block",
             "shared", "sha256")


@dataclass(frozen=True)
class ObjectEntry:
    """One code object: a kernel spec compiled for one target."""

    name: str
    target: str
    file: str
    symbol: str
    params: tuple[Param, ...]
    num_warps: int
    threads_per_block: int
    shared: int
    sha256: str
    global_scratch_size: int = 0
    global_scratch_align: int = 1
    profile_scratch_size: int = 0
    profile_scratch_align: int = 1
    num_ctas: int = 1
    launch_pdl: bool = False
    launch_cooperative_grid: bool = False
    config: str = ""
    constexprs: dict[str, Any] = field(default_factory=dict)
    family: str = ""
    source: str = ""
    size: int | None = None
    cache_key: str = ""
    compiler_version: str = ""

    @property
    def user_params(self) -> tuple[Param, ...]:
        """The parameters callers pass to ``launch`` (appended ones excluded)."""
        return tuple(p for p in self.params if not p.appended)

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str) -> ObjectEntry:
        missing = [k for k in _REQUIRED if k not in d]
        if missing:
            raise ManifestError(f"{where}: object entry {d.get('name')!r} lacks {missing}; "
                                f"rebuild with `vllm-moe-aot build`")
        try:
            params = tuple(
                Param(name=p["name"], type=p["type"], offset=p.get("offset"),
                      size=p.get("size"), appended=bool(p.get("appended", False)))
                for p in d["params"]
            )
            known = {f for f in cls.__dataclass_fields__ if f != "params"}
            kwargs = {k: v for k, v in d.items() if k in known}
            return cls(params=params, **kwargs)
        except (KeyError, TypeError) as e:
            raise ManifestError(f"{where}: malformed object entry {d.get('name')!r}: {e}") from e

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in self.__dataclass_fields__:
            v = getattr(self, f)
            out[f] = [p.to_json() for p in v] if f == "params" else v
        return out


@dataclass(frozen=True)
class Manifest:
    """The parsed manifest; :meth:`for_target` gives the view a :class:`Runtime` holds."""

    schema: int
    package_version: str
    compiler: dict[str, Any]
    objects: tuple[ObjectEntry, ...]
    variants: tuple[dict[str, Any], ...]
    path: Path | None = None
    #: set on a per-target view; ``get(name)`` then needs no target
    target: str | None = None

    @property
    def directory(self) -> Path:
        if self.path is None:
            raise ManifestError("manifest has no path")
        return self.path.parent

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> Manifest:
        p = Path(path) if path is not None else default_artifacts_dir()
        if p.is_dir():
            p = p / MANIFEST_NAME
        if not p.is_file():
            raise ManifestError(
                f"no code-object manifest at {p}. Installed wheels ship it under "
                f"vllm_moe_aot/artifacts/; in a source checkout run `vllm-moe-aot build`"
                f" (or point {ARTIFACTS_ENV} at a build folder)"
            )
        try:
            data = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ManifestError(f"cannot read {p}: {e}; rebuild with `vllm-moe-aot build`") from e
        return cls.from_json(data, p)

    @classmethod
    def from_json(cls, data: dict[str, Any], path: Path | None = None) -> Manifest:
        where = str(path) if path else "manifest"
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            got = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise ManifestError(f"{where}: schema {got!r}, this runtime reads schema {SCHEMA}; "
                                f"rebuild the code objects or upgrade vllm-moe-aot")
        objs = tuple(ObjectEntry.from_json(o, where) for o in data.get("objects", []))
        seen: set[tuple[str, str]] = set()
        for o in objs:
            if (o.name, o.target) in seen:
                raise ManifestError(f"{where}: duplicate object {o.name} for {o.target}")
            seen.add((o.name, o.target))
        return cls(schema=SCHEMA, package_version=str(data.get("package_version", "")),
                   compiler=dict(data.get("compiler", {})), objects=objs,
                   variants=tuple(data.get("variants", [])), path=path)

    def to_json(self) -> dict[str, Any]:
        return {"schema": self.schema, "package_version": self.package_version,
                "compiler": self.compiler, "objects": [o.to_json() for o in self.objects],
                "variants": list(self.variants)}

    # ---- lookups ---------------------------------------------------------------------------------
    def targets(self) -> list[str]:
        return sorted({o.target for o in self.objects})

    def names(self, target: str | None = None) -> list[str]:
        t = target or self.target
        return sorted(o.name for o in self.objects if t is None or o.target == t)

    def for_target(self, target: str) -> Manifest:
        return Manifest(self.schema, self.package_version, self.compiler,
                        tuple(o for o in self.objects if o.target == target), self.variants,
                        self.path, target)

    def get(self, name: str, target: str | None = None) -> ObjectEntry:
        t = target or self.target
        if t is None:
            raise ManifestError("Manifest.get needs a target on an unfiltered manifest")
        for o in self.objects:
            if o.name == name and o.target == t:
                return o
        others = sorted(o.target for o in self.objects if o.name == name)
        if others:
            raise ManifestError(f"kernel {name!r} has no code object for {t} in {self.path} "
                                f"(built for {others}); rebuild with `vllm-moe-aot build --target "
                                f"{t}`")
        raise ManifestError(f"kernel {name!r} is not in {self.path} (known for {t}: "
                            f"{self.names(t)}); is the manifest current? "
                            f"`vllm-moe-aot build --check`")

    def constexprs(self, name: str, target: str | None = None) -> dict[str, Any]:
        """The resolved constexpr values kernel ``name`` was compiled with (JSON values)."""
        return dict(self.get(name, target).constexprs)

    def variant(self, name: str) -> dict[str, Any]:
        for v in self.variants:
            if v.get("name") == name:
                return v
        raise ManifestError(f"pipeline variant {name!r} is not in {self.path}")
