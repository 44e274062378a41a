"""Every kernel spec and pipeline variant the AOT build compiles (the tune space)."""

from __future__ import annotations

from kernels.spec import KernelSpec
from vllm_moe_aot.contract import Variant


def all_specs() -> list[KernelSpec]:
    from kernels import smoke, tune_space

    specs = [*smoke.SPECS, *tune_space.SPECS]
    names = [s.name for s in specs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"duplicate kernel spec names: {sorted(dup)}")
    return specs


def all_variants() -> list[Variant]:
    from kernels import tune_space

    return list(tune_space.VARIANTS)
