"""The build/runtime contract: variants say which layers they serve, entries round-trip."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vllm_moe_aot.contract import ManifestDoc, ManifestError, Regime, Role, Variant
from vllm_moe_aot.runtime.manifest import Manifest
from vllm_moe_aot.shapes import MoEShape, Scheme


def _gemv(**kw) -> Variant:
    roles = {Role.STAGE1: "s1", Role.STAGE2: "s2"}
    return Variant(name="v", regime=Regime.GEMV, kernels={"fp8_ptpc": roles},
                   quantize_activations=False, **kw)


def test_variant_says_whether_it_serves_a_layer():
    v = _gemv(max_topk=8, max_n={"fp8_ptpc": 128})
    assert v.serves(MoEShape(E=16, K=128, N=128, topk=8), Scheme.FP8_PTPC) is None
    assert "topk <= 8" in v.serves(MoEShape(E=16, K=128, N=128, topk=10), Scheme.FP8_PTPC)
    assert "N <= 128" in v.serves(MoEShape(E=16, K=128, N=256, topk=8), "fp8_ptpc")
    assert "not fp8_per_tensor_static" in v.serves(MoEShape(E=16, K=128, N=128, topk=8),
                                                   Scheme.FP8_PER_TENSOR_STATIC)


def test_variant_roles_must_match_the_regime():
    with pytest.raises(ManifestError, match="runs"):
        Variant(name="bad", regime="gemv", kernels={"fp8_ptpc": {"stage1": "a"}},
                quantize_activations=False)


def test_a_scheme_can_hold_a_variant_to_a_looser_tolerance():
    v = _gemv(tolerance=1e-2, scheme_tolerance={Scheme.FP8_BLOCK: 3e-2})
    assert v.tolerance_for(Scheme.FP8_BLOCK) == 3e-2 and v.tolerance_for("fp8_ptpc") == 1e-2
    assert Variant.from_json(v.to_json()) == v
    old = {k: x for k, x in v.to_json().items() if k != "scheme_tolerance"}
    assert Variant.from_json(old).tolerance_for("fp8_block") == 1e-2  # manifests before it
    block = [x for x in Manifest.load().variants if "fp8_block" in x.kernels]
    assert {x.tolerance_for("fp8_block") for x in block if x.regime is Regime.GROUPED} == {3e-2}


def test_committed_manifest_round_trips_into_the_same_types():
    m = Manifest.load()
    again = ManifestDoc.parse(m.to_json())
    assert again.variants == m.variants and again.objects == m.objects
    assert all(isinstance(v, Variant) for v in m.variants)


def test_identify_reads_name_arch_sm_count_and_fp8(monkeypatch):
    from vllm_moe_aot.device import identify

    monkeypatch.setattr(torch.version, "hip", "6.3", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(
        name="AMD Instinct MI300X", gcnArchName="gfx942:sramecc+:xnack-",
        multi_processor_count=304))
    ident = identify(torch.device("cuda", 0))
    assert (ident.name, ident.arch, ident.sm_count, ident.fp8_dtype) == (
        "AMD Instinct MI300X", "gfx942", 304, torch.float8_e4m3fnuz)
    assert ident.target is not None and ident.target.fp8_max == 240.0
    cpu = identify("cpu")
    assert cpu.arch == "interpreter" and cpu.fp8_dtype == torch.float8_e4m3fn
