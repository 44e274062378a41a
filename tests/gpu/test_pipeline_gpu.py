"""The AOT pipeline on the GPU: both presets at all 18 token counts against the float64
reference, and CUDA-graph replay against eager. Run by scripts/gpu_check.sh on the device."""

from __future__ import annotations

import pytest
import torch

from tests._problems import ARGS, check_every_variant, make_tokens, make_weights, run
from vllm_moe_aot.shapes import PRESETS, TUNED_TOKEN_COUNTS

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SAMPLE = 32  # reference rows checked per run (tokens are independent)


@pytest.fixture(scope="module", params=list(PRESETS))
def preset_moe(request):
    from vllm_moe_aot.pipeline import FusedMoE

    preset = PRESETS[request.param]
    g = torch.Generator(device="cuda").manual_seed(1234)
    weights = make_weights(preset.shape, preset.scheme, g, device="cuda")
    moe = FusedMoE(preset.shape, preset.scheme, "cuda", max_tokens=max(TUNED_TOKEN_COUNTS))
    return preset, moe, weights, g


@pytest.mark.parametrize("M", TUNED_TOKEN_COUNTS)
def test_every_variant_against_reference(preset_moe, M):
    preset, moe, weights, g = preset_moe
    p = {**weights, **make_tokens(preset.shape, preset.scheme, M, g, device="cuda")}
    assert check_every_variant(moe, p, M, preset.name, SAMPLE) > 0


@pytest.mark.parametrize("M", [1, 37, 4096])
def test_graph_replay_equals_eager(preset_moe, M):
    preset, moe, weights, g = preset_moe
    p = {**weights, **make_tokens(preset.shape, preset.scheme, M, g, device="cuda")}
    # the first two grouped variants are deterministic (partials + reduce, no atomics), so
    # replay must be bit-identical
    variants = [v for v in moe.variants if moe.regime(v) == "grouped"][:2]
    variants += [v for v in moe.variants_for(M) if moe.regime(v) == "gemv"][:1]
    for v in variants:
        eager = run(moe, v, p).clone()
        out = torch.empty_like(eager)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up on a side stream, as capture requires
            run(moe, v, p, out)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            moe.run(v, *[p[k] for k in ARGS], out, p["a13_scale"], p["a2_scale"])
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager), f"{v} M={M}: graph replay differs from eager"
