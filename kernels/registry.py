"""Every kernel spec and pipeline variant the AOT build compiles (the tune space)."""

from __future__ import annotations

from kernels.spec import KernelSpec, PipelineVariant


def all_specs() -> list[KernelSpec]:
    from kernels import moe, smoke

    specs = [*smoke.SPECS, *moe.SPECS]
    names = [s.name for s in specs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"duplicate kernel spec names: {sorted(dup)}")
    return specs


def all_variants() -> list[PipelineVariant]:
    from kernels import moe

    return list(moe.VARIANTS)
