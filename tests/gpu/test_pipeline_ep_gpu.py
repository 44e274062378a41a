"""Issue 13 on the GPU: the two EP8 layers (vLLM's ``-dp 8 --enable-expert-parallel``: rank 0
of 8, 1/8 of the experts at the full intermediate size) at all 18 token counts, every variant
meant for the batch, against the float64 reference with the expert map; wide-N ptpc layers;
and a soak of CUDA-graph replays over random buckets. Run by scripts/gpu_check.sh."""

from __future__ import annotations

import random

import pytest
import torch

from tests._problems import ARGS, check, check_every_variant, make_tokens, make_weights, run
from vllm_moe_aot.dispatch.configs import preset_shape
from vllm_moe_aot.shapes import PRESETS, TUNED_TOKEN_COUNTS, MoEShape, Scheme

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SAMPLE = 32  # reference rows checked per run (tokens are independent)
EP8 = {name: (preset_shape(p, tp=1, ep=8), p.scheme) for name, p in PRESETS.items()}


def _tokens(shape: MoEShape, scheme: Scheme, M: int, seed: int) -> dict:
    """Tokens routed over all E * ep experts, and rank 0's expert map (global experts
    [0, E) local, as vLLM places them)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    G = shape.global_experts
    ids = torch.rand(M, G, generator=g, device="cuda").argsort(dim=1)[:, :shape.topk]
    emap = torch.full((G,), -1, dtype=torch.int32, device="cuda")
    emap[:shape.E] = torch.arange(shape.E, dtype=torch.int32, device="cuda")
    local = MoEShape(shape.E, shape.K, shape.N, shape.topk)
    return {**make_tokens(local, scheme, M, g, device="cuda", ids=ids), "expert_map": emap}


@pytest.fixture(scope="module", params=list(EP8))
def ep_moe(request):
    from vllm_moe_aot.pipeline import FusedMoE

    shape, scheme = EP8[request.param]
    g = torch.Generator(device="cuda").manual_seed(4321)
    weights = make_weights(MoEShape(shape.E, shape.K, shape.N, shape.topk), scheme, g, "cuda")
    moe = FusedMoE(shape, scheme, "cuda", max_tokens=max(TUNED_TOKEN_COUNTS))
    return request.param, shape, scheme, moe, weights


@pytest.mark.parametrize("M", TUNED_TOKEN_COUNTS)
def test_ep8_every_variant_against_reference(ep_moe, M):
    name, shape, scheme, moe, weights = ep_moe
    p = {**weights, **_tokens(shape, scheme, M, seed=M)}
    assert check_every_variant(moe, p, M, f"{name} ep8", SAMPLE) > 0


@pytest.mark.parametrize("N", [640, 2048])
@pytest.mark.parametrize("M", [1, 32, 512, 4096])
def test_wide_n_ptpc_against_reference(N, M):
    from vllm_moe_aot.pipeline import FusedMoE

    shape = MoEShape(E=64, K=2048, N=N, topk=8)
    moe = FusedMoE(shape, Scheme.FP8_PTPC, "cuda", max_tokens=4096)
    assert any(moe.regime(v) == "grouped" for v in moe.variants_for(M))
    p = {**make_weights(shape, Scheme.FP8_PTPC, torch.Generator("cuda").manual_seed(N), "cuda"),
         **_tokens(shape, Scheme.FP8_PTPC, M, seed=N + M)}
    assert check_every_variant(moe, p, M, f"ptpc N={N}", SAMPLE) > 0


SOAK_REPLAYS = 10_000
SOAK_CHECK_EVERY = 100


def _soak_variant(moe, M: int) -> str:
    """What the tuned dispatch runs at M for this layer (AOT rows only), else the first
    deterministic variant of the regime the batch is meant for."""
    from vllm_moe_aot.device import identify
    from vllm_moe_aot.dispatch.configs import DispatchTable

    dev = identify(torch.device("cuda"))
    table = DispatchTable.for_layer(moe.shape, moe.scheme, dev.name, dev.arch)
    choice = table.choose(M)
    if choice in moe.variants:
        return choice
    return next(v for v in moe.variants_for(M) if not v.endswith("_atomic"))


@pytest.mark.parametrize("name", list(EP8))
def test_soak_graph_replays_over_random_buckets(name):
    """10,000 CUDA-graph replays over random buckets of the 18 token counts, one graph per
    bucket sharing one pipeline (as vLLM's captured sizes share a layer): every 100th
    replay's output must equal that bucket's eager output, checked once against the float64
    reference (atomic variants: within their tolerance of it)."""
    from vllm_moe_aot.pipeline import FusedMoE

    shape, scheme = EP8[name]
    g = torch.Generator(device="cuda").manual_seed(99)
    weights = make_weights(MoEShape(shape.E, shape.K, shape.N, shape.topk), scheme, g, "cuda")
    moe = FusedMoE(shape, scheme, "cuda", max_tokens=max(TUNED_TOKEN_COUNTS))
    buckets = {}
    for M in TUNED_TOKEN_COUNTS:
        v = _soak_variant(moe, M)
        p = {**weights, **_tokens(shape, scheme, M, seed=10_000 + M)}
        eager = run(moe, v, p).clone()
        rows = torch.randperm(M)[:SAMPLE]
        tol = moe.tolerance(v)
        check(moe, v, p, eager, rows=rows, rel_fro_max=tol, mean_rel_abs_max=tol)
        out = torch.empty_like(eager)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run(moe, v, p, out)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            moe.run(v, *[p[k] for k in ARGS], out, p["a13_scale"], p["a2_scale"],
                    expert_map=p["expert_map"])
        buckets[M] = (graph, out, eager, v, p, rows)
    rng = random.Random(7)
    checked = 0
    for i in range(1, SOAK_REPLAYS + 1):
        M = rng.choice(TUNED_TOKEN_COUNTS)
        graph, out, eager, v, p, rows = buckets[M]
        if i % SOAK_CHECK_EVERY == 0:
            out.fill_(float("nan"))
        graph.replay()
        if i % SOAK_CHECK_EVERY == 0:
            torch.cuda.synchronize()
            if v.endswith("_atomic"):
                tol = moe.tolerance(v)
                check(moe, v, p, out, rows=rows, rel_fro_max=tol, mean_rel_abs_max=tol)
            else:
                assert torch.equal(out, eager), f"replay {i}: M={M} {v} differs from eager"
            checked += 1
    torch.cuda.synchronize()
    assert checked == SOAK_REPLAYS // SOAK_CHECK_EVERY
    print(f"soak {name} ep8: {SOAK_REPLAYS} replays over {len(buckets)} buckets, "
          f"{checked} checked; variants {sorted({b[3] for b in buckets.values()})}")
