"""How a kernel variant is declared for the AOT build.

A :class:`KernelSpec` names one Triton ``@jit`` function plus everything that makes its
compilation explicit: the ordered non-constexpr signature, constexpr values, divisibility hints
and launch options. The build compiles each spec for each target in :data:`TARGETS` and records
the result in ``manifest.json``; the runtime and the pipeline only ever read the manifest.
Targets and variants are the contract's (:mod:`vllm_moe_aot.contract`).

Type strings are Triton's (``*bf16``, ``*fp32``, ``i32``, ``i64``, ``fp32`` ...). The placeholder
``*fp8`` stands for the target's FP8 e4m3 flavour (``*fp8e4nv`` on sm_90a and gfx950,
``*fp8e4b8`` i.e. e4m3fnuz on gfx942), and the constexpr value :data:`FP8_MAX` for its largest
finite value (448 or 240).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm_moe_aot.contract import TARGETS, Target, Variant

__all__ = ["FP8_MAX", "FP8_PTR", "ON_CUDA", "TARGETS", "KernelSpec", "PipelineVariant", "Target"]

#: signature placeholder replaced by the target's fp8 pointer type
FP8_PTR = "*fp8"


class _Fp8Max:
    """Sentinel constexpr value: replaced per target by ``Target.fp8_max``."""

    def __repr__(self) -> str:
        return "FP8_MAX"


FP8_MAX = _Fp8Max()


class _OnCuda:
    """Sentinel constexpr value: True on CUDA targets, False on HIP ones. Kernels gate
    CUDA-only instructions on it (griddepcontrol for programmatic dependent launch); the
    interpreter launcher forces it False."""

    def __repr__(self) -> str:
        return "ON_CUDA"


ON_CUDA = _OnCuda()


@dataclass(frozen=True)
class KernelSpec:
    """One code object per target.

    ``name`` is unique and stable (it is the code object's file name and the key the pipeline
    asks the runtime for). ``source`` is ``"module:function"`` importable from the repo root
    (for the build and for the interpreter launcher used by CPU tests). ``signature`` lists the
    non-constexpr parameters in the kernel's own order. ``divisible_by_16`` names parameters the
    caller guarantees are 16-byte aligned (pointers) or multiples of 16 (integers).
    """

    name: str
    source: str
    family: str
    signature: dict[str, str]
    constexprs: dict[str, Any] = field(default_factory=dict)
    divisible_by_16: tuple[str, ...] = ()
    num_warps: int = 4
    num_stages: int = 3
    targets: tuple[str, ...] = tuple(TARGETS)

    @property
    def config(self) -> str:
        """Human-readable variant config string recorded in the manifest and tuned CSVs."""
        parts = [f"{k}={v}" for k, v in sorted(self.constexprs.items())
                 if v is not FP8_MAX and v is not ON_CUDA]
        return f"{self.family}:" + ",".join(parts + [f"w{self.num_warps}", f"s{self.num_stages}"])

    def resolved(self, target: Target) -> tuple[dict[str, str], dict[str, Any]]:
        """Signature and constexprs with the fp8 placeholders filled in for ``target``."""
        sig = {k: ("*" + target.fp8_type if v == FP8_PTR else v) for k, v in self.signature.items()}
        consts = {k: (target.fp8_max if v is FP8_MAX else
                      target.backend == "cuda" if v is ON_CUDA else v)
                  for k, v in self.constexprs.items()}
        return sig, consts


#: the variant type is the contract's (kept under its old name for the build's callers)
PipelineVariant = Variant
