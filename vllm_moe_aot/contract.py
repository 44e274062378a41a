"""What the AOT build promises the runtime: targets, code-object entries, variants, the manifest.

The one statement of the contract between ``kernels/`` (the build) and the runtime side
(``runtime/``, ``pipeline.py``): the build writes ``manifest.json`` through
:class:`ManifestDoc` and the runtime reads it back into the same types. Standard library only:
no torch, Triton or vLLM, so the build, the runtime, the CLI and the tests all import it.

Schema 2::

    {"schema": 2, "package_version": "0.1.0",
     "compiler": {"triton": "3.8.0", "ptxas": "12.9", "llvm": "LLD 23.0.0 (...)"},
     "objects": [ObjectEntry.to_json(), ...],
     "variants": [Variant.to_json(), ...]}

An object's ``file`` is relative to the manifest's folder; its ``params`` are the full launch
order of the compiled artifact, including the parameters the compiler appends
(``"appended": true``). Launch arguments are bound to these names.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

#: bump when an entry of the manifest changes meaning or gains a required field
SCHEMA = 2
MANIFEST_NAME = "manifest.json"
#: the dispatch choice that means vLLM's own TritonExperts (tuned CSVs, dispatch tables)
STOCK = "stock"
#: relative error against the float64 reference a variant is held to unless it says otherwise
DEFAULT_TOLERANCE = 1e-2
#: largest token count a variant is meant for unless it says otherwise ("no limit")
UNBOUNDED_TOKENS = 1 << 30


class AotRuntimeError(RuntimeError):
    """Base class of every error the runtime raises."""


class ManifestError(AotRuntimeError):
    """``manifest.json`` is missing, malformed, or lacks the kernel asked for."""


# ---- targets ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """A GPU target code objects are built for."""

    name: str  # "sm_90a", "gfx942", "gfx950"
    backend: str  # "cuda" | "hip"
    arch: int | str  # 90 | "gfx942"
    warp_size: int
    fp8_type: str  # Triton pointer element type for e4m3 on this target
    fp8_max: float
    suffix: str  # code-object file suffix
    torch_fp8: str  # torch dtype name of the target's e4m3 flavour
    description: str  # the devices it means


TARGETS: dict[str, Target] = {
    "sm_90a": Target("sm_90a", "cuda", 90, 32, "fp8e4nv", 448.0, "cubin", "float8_e4m3fn",
                     "NVIDIA Hopper (H100/H200, compute capability 9.0)"),
    "gfx942": Target("gfx942", "hip", "gfx942", 64, "fp8e4b8", 240.0, "hsaco", "float8_e4m3fnuz",
                     "AMD MI300X/MI325X"),
    "gfx950": Target("gfx950", "hip", "gfx950", 64, "fp8e4nv", 448.0, "hsaco", "float8_e4m3fn",
                     "AMD MI350X/MI355X"),
}
#: the arch name of the CPU path: kernels run from their Triton sources in the interpreter
INTERPRETER = "interpreter"
#: the manifest target whose entries the interpreter follows
REFERENCE_TARGET = "sm_90a"


def fp8_dtype_name(arch: str) -> str:
    """torch dtype name of the e4m3 flavour on ``arch`` (the interpreter follows sm_90a)."""
    t = TARGETS.get(arch)
    return t.torch_fp8 if t is not None else TARGETS[REFERENCE_TARGET].torch_fp8


def supported_targets_text() -> str:
    return ", ".join(f"{t.name} ({t.description})" for t in TARGETS.values())


# ---- code objects -------------------------------------------------------------------------------
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
    def from_json(cls, d: Mapping[str, Any], where: str = "manifest") -> ObjectEntry:
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
            known = {f.name for f in fields(cls) if f.name != "params"}
            kwargs = {k: v for k, v in d.items() if k in known}
            return cls(params=params, **kwargs)
        except (KeyError, TypeError) as e:
            raise ManifestError(f"{where}: malformed object entry {d.get('name')!r}: {e}") from e

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = [p.to_json() for p in v] if f.name == "params" else v
        return out


# ---- variants -----------------------------------------------------------------------------------
class Role(str, enum.Enum):
    """A kernel's place in a variant's chain."""

    PREP = "prep"
    ALIGN = "align"
    SCATTER = "scatter"
    STAGE1 = "stage1"
    STAGE2 = "stage2"
    REDUCE = "reduce"


class Regime(str, enum.Enum):
    #: single token and decode: two kernels, no sorting
    GEMV = "gemv"
    #: prefill: routing (prep, align, scatter), two grouped GEMMs, reduce
    GROUPED = "grouped"

    @property
    def roles(self) -> tuple[Role, ...]:
        """The kernels a variant of this regime runs, in launch order."""
        if self is Regime.GEMV:
            return (Role.STAGE1, Role.STAGE2)
        return (Role.PREP, Role.ALIGN, Role.SCATTER, Role.STAGE1, Role.STAGE2, Role.REDUCE)


def _value(v: Any) -> str:
    return str(getattr(v, "value", v))


@dataclass(frozen=True)
class Variant:
    """A whole-layer variant the dispatch table can name: a regime plus the kernels it runs.

    ``kernels`` maps a scheme value (:class:`vllm_moe_aot.shapes.Scheme`) to the kernel run in
    each :class:`Role` for that scheme; the schemes a variant implements are its keys.
    ``max_n`` bounds N per scheme where a stage needs a whole row of N in one tile (dynamic
    re-quantisation in the stage-1 epilogue, the resident stage 2). ``max_topk`` is the most
    top-k slots its kernels hold in one tile (their ``TOPK_PAD``). ``quantize_activations``
    says which reference semantics it matches (False: W8A16, activations kept in fp32).
    ``max_tokens`` is the largest batch it is meant for: the tuner does not try it beyond (it
    would be correct, only pointlessly slow). ``tolerance`` is the relative error against the
    float64 reference it is held to in tests; variants that chain Hopper's reduced-precision
    fp8 MMA accumulator over all of K (like vLLM's stock kernel) declare the product gate;
    ``scheme_tolerance`` overrides it for a scheme whose arithmetic is looser than the
    variant's others (block FP8's per-chunk scaled MMA sums).
    ``block_m`` is what it needs from the workspace: the row block its sorted expert rows are
    padded to (0: it sorts nothing). ``act_group`` (per scheme) is the width of one dynamic
    scale of the re-quantised intermediate where it is not the whole row of N: the stage-1 N
    tile of the variants that re-quantise per tile (the reference follows it).
    """

    name: str
    regime: Regime
    kernels: dict[str, dict[Role, str]]
    quantize_activations: bool
    max_n: dict[str, int] = field(default_factory=dict)
    max_topk: int = 16
    max_tokens: int = UNBOUNDED_TOKENS
    tolerance: float = DEFAULT_TOLERANCE
    block_m: int = 0
    act_group: dict[str, int] = field(default_factory=dict)
    scheme_tolerance: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "regime", Regime(self.regime))
        object.__setattr__(self, "kernels", {
            _value(s): {Role(r): str(k) for r, k in roles.items()}
            for s, roles in self.kernels.items()})
        object.__setattr__(self, "max_n", {_value(s): int(n) for s, n in self.max_n.items()})
        object.__setattr__(self, "act_group",
                           {_value(s): int(n) for s, n in self.act_group.items()})
        object.__setattr__(self, "scheme_tolerance",
                           {_value(s): float(t) for s, t in self.scheme_tolerance.items()})
        for scheme, roles in self.kernels.items():
            if set(roles) != set(self.regime.roles):
                raise ManifestError(
                    f"variant {self.name!r} ({scheme}) names roles "
                    f"{sorted(r.value for r in roles)}; a {self.regime.value} variant runs "
                    f"{[r.value for r in self.regime.roles]}")

    @property
    def schemes(self) -> list[str]:
        return list(self.kernels)

    def kernel_names(self) -> list[str]:
        """Every kernel the variant runs, over all its schemes (sorted, distinct)."""
        return sorted({k for roles in self.kernels.values() for k in roles.values()})

    def serves(self, shape: Any, scheme: Any) -> str | None:
        """Why this variant cannot run ``shape`` (``.N``, ``.topk``) under ``scheme`` (a
        :class:`~vllm_moe_aot.shapes.Scheme` or its value); None when it can."""
        s = _value(scheme)
        if s not in self.kernels:
            return f"{self.name} implements {', '.join(self.kernels)}, not {s}"
        if s in self.max_n and shape.N > self.max_n[s]:
            return f"{self.name} holds N <= {self.max_n[s]} in one tile, the layer has {shape.N}"
        if shape.topk > self.max_topk:
            return f"{self.name} holds topk <= {self.max_topk} slots, the layer has {shape.topk}"
        return None

    def act_group_for(self, scheme: Any) -> int:
        """Columns per dynamic scale of the re-quantised intermediate (0: the whole row)."""
        return self.act_group.get(_value(scheme), 0)

    def tolerance_for(self, scheme: Any) -> float:
        """The relative error against the float64 reference this variant is held to under
        ``scheme``."""
        return self.scheme_tolerance.get(_value(scheme), self.tolerance)

    def chain(self, scheme: Any) -> dict[Role, str]:
        """Role -> kernel name for ``scheme``, in launch order."""
        roles = self.kernels[_value(scheme)]
        return {r: roles[r] for r in self.regime.roles}

    def means_tokens(self, tokens: int) -> bool:
        """Whether the variant is meant for a batch of ``tokens`` (it is correct at any size)."""
        return tokens <= self.max_tokens

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "regime": self.regime.value,
                "kernels": {s: {r.value: k for r, k in roles.items()}
                            for s, roles in self.kernels.items()},
                "quantize_activations": self.quantize_activations, "max_n": dict(self.max_n),
                "max_topk": self.max_topk, "max_tokens": self.max_tokens,
                "tolerance": self.tolerance, "block_m": self.block_m,
                "act_group": dict(self.act_group),
                "scheme_tolerance": dict(self.scheme_tolerance)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any], where: str = "manifest") -> Variant:
        try:
            return cls(name=d["name"], regime=d["regime"], kernels=d["kernels"],
                       quantize_activations=bool(d["quantize_activations"]),
                       max_n=d.get("max_n", {}), max_topk=int(d["max_topk"]),
                       max_tokens=int(d.get("max_tokens", UNBOUNDED_TOKENS)),
                       tolerance=float(d["tolerance"]), block_m=int(d["block_m"]),
                       act_group=d.get("act_group", {}),
                       scheme_tolerance=d.get("scheme_tolerance", {}))
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(f"{where}: malformed variant entry {d.get('name')!r}: "
                                f"{type(e).__name__}: {e}; rebuild with `vllm-moe-aot build`"
                                ) from e


# ---- the manifest document ----------------------------------------------------------------------
@dataclass(frozen=True)
class ManifestDoc:
    """The manifest's content, as the build writes it and the runtime reads it."""

    package_version: str
    compiler: dict[str, Any]
    objects: tuple[ObjectEntry, ...]
    variants: tuple[Variant, ...]
    schema: int = SCHEMA

    def to_json(self) -> dict[str, Any]:
        return {"schema": self.schema, "package_version": self.package_version,
                "compiler": self.compiler, "objects": [o.to_json() for o in self.objects],
                "variants": [v.to_json() for v in self.variants]}

    @classmethod
    def parse(cls, data: Any, where: str = "manifest") -> ManifestDoc:
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
        variants = tuple(Variant.from_json(v, where) for v in data.get("variants", []))
        return cls(package_version=str(data.get("package_version", "")),
                   compiler=dict(data.get("compiler", {})), objects=objs, variants=variants)
