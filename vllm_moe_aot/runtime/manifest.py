"""``manifest.json``: what the AOT build produced, read without Triton or the kernel sources.

The entries' types and the schema are the contract's (:mod:`vllm_moe_aot.contract`); this
module finds the file, loads it and answers lookups.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_moe_aot.contract import (
    MANIFEST_NAME,
    SCHEMA,
    ManifestDoc,
    ManifestError,
    ObjectEntry,
    Param,
    Variant,
)

__all__ = ["ARTIFACTS_ENV", "MANIFEST_NAME", "SCHEMA", "Manifest", "ObjectEntry", "Param",
           "default_artifacts_dir"]

#: environment variable naming another artifacts folder (tests, local builds)
ARTIFACTS_ENV = "VLLM_MOE_AOT_ARTIFACTS"


def default_artifacts_dir() -> Path:
    env = os.environ.get(ARTIFACTS_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "artifacts"


@dataclass(frozen=True)
class Manifest:
    """The parsed manifest; :meth:`for_target` gives the view a :class:`Runtime` holds."""

    schema: int
    package_version: str
    compiler: dict[str, Any]
    objects: tuple[ObjectEntry, ...]
    variants: tuple[Variant, ...]
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
        doc = ManifestDoc.parse(data, str(path) if path else "manifest")
        return cls(schema=doc.schema, package_version=doc.package_version,
                   compiler=doc.compiler, objects=doc.objects, variants=doc.variants, path=path)

    def to_json(self) -> dict[str, Any]:
        return ManifestDoc(self.package_version, self.compiler, self.objects, self.variants,
                           self.schema).to_json()

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

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise ManifestError(f"pipeline variant {name!r} is not in {self.path}")
