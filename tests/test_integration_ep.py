"""Expert parallelism in real vLLM 0.33 FP8 MoE layers built on the CPU (issue 13, item 2):
``AotExperts`` takes EP layers in vLLM's standard activation format (EP without DP: tokens
replicated, no all2all; EP over all-gather / reduce-scatter) and hands vLLM's ``expert_map`` to
the pipeline; every other EP format (DeepEP, NIXL, FlashInfer NVLink, MoonEP, passthrough, the
batched format) and uneven expert splits stay with vLLM, with one log line naming why.

The layers are vLLM's own (``FusedMoEFactory`` with the ``FusedMoEParallelConfig`` one rank of
``--enable-expert-parallel`` gets: ``tests/integration_support.ep_parallel_config``), 8 global
experts over ep=2 ranks, this rank (0) holding experts 0-3.
"""

from __future__ import annotations

import logging

import pytest
import torch

from tests import delegate_support
from tests import integration_support as support
from vllm_moe_aot.integration import CONFIG_DIR_ENV
from vllm_moe_aot.shapes import MoEShape, Scheme

pytestmark = [pytest.mark.vllm, support.requires_vllm()]
moe_logs, plugin_on, fake_ops = support.moe_logs, support.plugin_on, support.fake_ops  # fixtures
pipeline_kind = support.pipeline_kind  # fixture
sm90 = delegate_support.sm90  # fixture

GLOBAL_E, EP = 8, 2
#: the per-rank shape: 4 local experts of 8
SHAPE = MoEShape(E=4, K=128, N=64, topk=3, ep=EP)
LEFT = "left to vLLM's backend choice"


@pytest.fixture
def tuned_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(CONFIG_DIR_ENV, str(tmp_path))
    return tmp_path


def build(kind: str, parallel=None, load: bool = True, seed: int = 0, experts: int = GLOBAL_E):
    """``kind``'s layer on rank 0 of ep=2; block FP8 kinds with N=128 (whole weight blocks)."""
    parallel = support.ep_parallel_config(EP) if parallel is None else parallel
    N = 128 if kind in support.BLOCK_KINDS else SHAPE.N
    with support.cpu_vllm():
        return support.make_layer(kind, experts, SHAPE.K, N, SHAPE.topk, seed=seed,
                                  load=load, parallel=parallel)


def global_routing(M: int, seed: int):
    """topk_ids over the 8 global experts (as vLLM's router gives them under EP)."""
    return support.routing(M, GLOBAL_E, SHAPE.topk, seed=seed)


def expert_map(local: str, layer) -> torch.Tensor:
    """'half': vLLM's own map of this rank (global 0-3 -> slots 0-3, 4-7 on the other rank);
    'none': no expert local; 'all': every global expert on a local slot (id % 4)."""
    if local == "half":
        return layer.experts.expert_map
    if local == "none":
        return torch.full((GLOBAL_E,), -1, dtype=torch.int32)
    return (torch.arange(GLOBAL_E, dtype=torch.int32) % SHAPE.E).contiguous()


# --- the layers taken ---------------------------------------------------------------------------

def test_the_layer_is_vllms_ep_layer(plugin_on, fake_ops, tuned_dir, pipeline_kind):
    from vllm_moe_aot.integration.experts import AotExperts, layer_shape

    v1, v2 = support.pick_variants(SHAPE, Scheme.FP8_PTPC, pipeline_kind)
    support.write_tuned(tuned_dir, SHAPE, Scheme.FP8_PTPC, {1: v1, 2: v2, 4: "stock"})
    layer = build("ct_channel_token")
    ex, experts = layer.experts, layer.fused_experts
    cfg = experts.moe_config
    # what vLLM 0.33 gives an EP rank: local and global expert counts, the rank's map
    assert (cfg.num_local_experts, cfg.num_experts, cfg.moe_parallel_config.ep_size) == (4, 8, 2)
    assert cfg.moe_parallel_config.use_ep and not cfg.moe_parallel_config.use_all2all_kernels
    assert tuple(ex.w13_weight.shape) == (4, 2 * SHAPE.N, SHAPE.K)
    assert ex.global_num_experts == GLOBAL_E
    assert ex.expert_map.tolist() == [0, 1, 2, 3, -1, -1, -1, -1]
    assert ex.expert_map.dtype == torch.int32
    assert isinstance(experts, AotExperts) and layer_shape(cfg) == SHAPE
    md = experts.metadata
    assert experts.fallback_reason is None and md.shape == SHAPE and md.uses_pipeline
    assert md.table.origin == "tuned" and md.table.describe() == [(1, v1), (2, v2), (4, "stock")]
    assert experts.expects_unquantized_inputs


@pytest.mark.parametrize("local", ["half", "none", "all"])
@pytest.mark.parametrize("kind", ["ct_channel_token", "fp8_static", "online_ptpc",
                                  "fp8_dynamic"])
def test_apply_runs_the_pipeline_with_the_expert_map(kind, local, plugin_on, fake_ops,
                                                     tuned_dir, pipeline_kind, monkeypatch):
    from vllm_moe_aot.measure.reference import gate

    scheme = support.scheme_of(kind)
    v1, v2 = support.pick_variants(SHAPE, scheme, pipeline_kind)
    support.write_tuned(tuned_dir, SHAPE, scheme, {1: v1, 3: v2, 4: "stock"})
    layer = build(kind)
    experts = layer.fused_experts
    stock = support.spy_on_stock(experts, monkeypatch)
    pipeline = experts.metadata.pipeline
    runs = []
    real_run = pipeline.run
    monkeypatch.setattr(pipeline, "run", lambda variant, x, *a, **k: runs.append(
        (variant, x.shape[0], k.get("expert_map"))) or real_run(variant, x, *a, **k))
    emap = expert_map(local, layer)
    for M, variant in ((1, v1), (3, v2)):
        x = torch.randn(M, SHAPE.K, generator=torch.Generator().manual_seed(M)).bfloat16()
        tw, ids = global_routing(M, seed=M)
        out = support.forward(layer, x, tw, ids, expert_map=emap)
        assert runs[-1][:2] == (variant, M) and runs[-1][2] is emap
        if local == "none":
            assert torch.count_nonzero(out) == 0  # every pair is another rank's
        act_group = pipeline.act_group(variant) if hasattr(pipeline, "act_group") else 0
        ref = support.reference(layer, x, tw, ids, expert_map=emap, act_group=act_group,
                                quantize_activations=pipeline.quantize_activations(variant))
        if local == "half":  # some pairs are this rank's and some are not
            assert ref.abs().sum() > 0
            assert not torch.equal(ref, support.reference(layer, x, tw, ids, expert_map=(
                expert_map("all", layer)), act_group=act_group,
                quantize_activations=pipeline.quantize_activations(variant)))
        result = gate(out, ref)
        assert result.passed, f"{pipeline_kind} pipeline, {kind}, {local}, M={M}: {result}"
    assert stock.calls == []
    # an untuned batch size: the delegate, with the same map and the global expert count
    M = 4
    x = torch.randn(M, SHAPE.K).bfloat16()
    tw, ids = global_routing(M, seed=11)
    out = support.forward(layer, x, tw, ids, expert_map=emap)
    assert torch.all(out == 7.0) and len(runs) == 2
    assert stock.calls[-1]["expert_map"] is emap
    assert stock.calls[-1]["global_num_experts"] == GLOBAL_E


def test_the_layers_own_forward_passes_its_map(plugin_on, fake_ops, tuned_dir, pipeline_kind,
                                               monkeypatch):
    """Through the quant method's own ``apply`` (the layer's ``expert_map`` buffer)."""
    from vllm_moe_aot.measure.reference import gate

    v1, _ = support.pick_variants(SHAPE, Scheme.FP8_PER_TENSOR_STATIC, pipeline_kind)
    support.write_tuned(tuned_dir, SHAPE, Scheme.FP8_PER_TENSOR_STATIC, {2: v1})
    layer = build("fp8_static")
    seen = []
    pipeline = layer.fused_experts.metadata.pipeline
    real_run = pipeline.run
    monkeypatch.setattr(pipeline, "run", lambda *a, **k: seen.append(k.get("expert_map"))
                        or real_run(*a, **k))
    x = torch.randn(2, SHAPE.K).bfloat16()
    tw, ids = global_routing(2, seed=3)
    out = support.forward(layer, x, tw, ids)
    assert len(seen) == 1 and seen[0] is layer.experts.expert_map
    ref = support.reference(layer, x, tw, ids, expert_map=layer.experts.expert_map,
                            quantize_activations=pipeline.quantize_activations(v1))
    assert gate(out, ref).passed


def test_route_checks_the_map_on_the_host(plugin_on, fake_ops, tuned_dir, pipeline_kind):
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation

    v1, v2 = support.pick_variants(SHAPE, Scheme.FP8_PTPC, pipeline_kind)
    support.write_tuned(tuned_dir, SHAPE, Scheme.FP8_PTPC, {1: v1, 2: v2})
    layer = build("online_ptpc")
    experts, emap = layer.fused_experts, expert_map("half", layer)
    x = torch.randn(1, SHAPE.K).bfloat16()
    tw, ids = global_routing(1, seed=0)
    silu = MoEActivation.SILU
    assert experts.route(x, tw, ids, silu, emap, False) == v1
    assert experts.route(x, tw, ids, silu, emap, False, GLOBAL_E) == v1
    assert experts.route(x, tw, ids, silu, emap, False, -1) == v1
    assert experts.route(x, tw, ids, silu, emap, False, 4) == "stock"  # not this layer's
    assert experts.route(x, tw, ids, silu, None, False) == "stock"  # global ids, no map
    assert experts.route(x, tw, ids, silu, emap.long(), False) == "stock"
    assert experts.route(x, tw, ids, silu, emap[:4].clone(), False) == "stock"
    assert experts.route(x, tw, ids, silu, torch.cat([emap, emap]), False) == "stock"
    assert experts.route(x, tw, ids, silu, torch.stack([emap, emap], 1)[:, 0], False) == "stock"
    assert experts.route(x, tw, ids, silu, emap.reshape(2, 4), False) == "stock"


def test_all_gather_reduce_scatter_layers_are_taken(plugin_on, moe_logs):
    """EP across DP ranks over vLLM's all-gather / reduce-scatter: standard format too (the
    layer cannot be loaded here: its prepare step needs the EP process group)."""
    from vllm_moe_aot.integration.experts import (
        SCHEME_BY_KEYS,
        AotExperts,
        layer_unsupported_reason,
    )

    pc = support.ep_parallel_config(EP, dp_size=2)
    assert pc.use_all2all_kernels and pc.use_ag_rs_all2all_kernels
    layer = build("fp8_static", parallel=pc, load=False)
    assert issubclass(layer.method.experts_cls, AotExperts)
    static = next(k for k, s in SCHEME_BY_KEYS.items() if s is Scheme.FP8_PER_TENSOR_STATIC)
    with support.cpu_vllm():
        assert layer_unsupported_reason(layer.experts.moe_config, *static) is None
    assert moe_logs.matching("use AotExperts") and not moe_logs.matching(LEFT)


def test_untuned_ep_layers_run_stock_and_name_the_ep_tune_command(plugin_on, fake_ops,
                                                                   tuned_dir, moe_logs):
    """No tuned rows: the default policy was not measured under EP, so no entries; one line
    with the tuning command for an EP layer (--ep)."""
    layers = [build("ct_channel_token", seed=s) for s in range(2)]
    for layer in layers:
        md = layer.fused_experts.metadata
        assert md is not None and not md.uses_pipeline and md.table.is_empty
        assert "without expert parallelism" in md.table.source
        assert not layer.fused_experts.expects_unquantized_inputs
    hints = moe_logs.matching("no tuned configs for E=4,K=128,N=64,topk=3,ep=2 fp8_ptpc")
    assert len(hints) == 1, moe_logs.messages
    assert "without expert parallelism" in hints[0]
    assert "vllm-moe-aot tune --model <checkpoint or config.json> --tp 1 --ep 2" in hints[0]


@pytest.mark.parametrize("machine", ["flashinfer", "no-flashinfer", "no-deep-gemm"])
@pytest.mark.parametrize("kind", sorted(delegate_support.KINDS))
def test_ep_layers_delegate_to_vllms_choice_on_sm90(kind, machine, sm90, plugin_on,
                                                    monkeypatch, moe_logs):
    """On the sm_90 stand-in (tests/test_integration_delegate.py) an EP layer's oracle picks
    what the providers rule says for it (the TP answer, but for block FP8: FlashInfer CUTLASS,
    else DeepGEMM, else Triton under EP), and the hook answers AotExperts delegating to it
    exactly when it can share the weights."""
    import sys

    from vllm_moe_aot import caches
    from vllm_moe_aot.integration import providers as P
    from vllm_moe_aot.integration.experts import AotExperts

    flags = delegate_support.MACHINES[machine]
    module, (method, scheme) = delegate_support.KINDS[kind]
    with monkeypatch.context() as m:
        selection = delegate_support.Selection(m, module)
        build(kind, load=False)
    args = selection.arguments
    assert args["config"].moe_parallel_config.use_ep
    hooked = sys.modules[module].select_fp8_moe_backend
    caches.clear_all()
    moe_logs.records.clear()
    with support.cpu_vllm(), sm90.set(flags):
        want = selection.original(**args)
        got = hooked(**args)
    backend, vllm_cls = want[0].value, want[1]
    assert backend == P.vllm_backend(scheme, method, flags, ep=EP)
    if scheme is Scheme.FP8_BLOCK:  # vLLM's EP order for block FP8 on sm_90
        assert backend == {"flashinfer": "FLASHINFER_CUTLASS", "no-flashinfer": "DEEPGEMM",
                           "no-deep-gemm": "TRITON"}[machine]
    else:
        assert backend == P.vllm_backend(scheme, method, flags)  # as under TP
    if backend in delegate_support.SHAREABLE:
        assert issubclass(got[1], AotExperts) and got[1].delegate_cls is vllm_cls
        assert len(moe_logs.matching("use AotExperts")) == 1
    else:
        assert got == want and len(moe_logs.matching(LEFT)) == 1


# --- the layers left to vLLM ----------------------------------------------------------------------

@pytest.mark.parametrize("backend,batched", [
    ("deepep_high_throughput", False), ("deepep_low_latency", True), ("deepep_v2", False),
    ("nixl_ep", True), ("flashinfer_nvlink_two_sided", False),
    ("flashinfer_nvlink_one_sided", False), ("moonep", False), ("passthrough", False),
])
def test_other_ep_formats_stay_with_vllm_with_one_line(backend, batched, plugin_on, moe_logs):
    from vllm_moe_aot.integration.experts import AotExperts

    pc = support.ep_parallel_config(EP, dp_size=2, all2all_backend=backend)
    assert pc.use_batched_activation_format == batched
    layers = [build(kind, parallel=pc, load=False, seed=s)
              for s in range(2) for kind in ("fp8_static", "ct_channel_token")]
    for layer in layers:
        cls = layer.method.experts_cls
        assert cls is None or not issubclass(cls, AotExperts)
    left = moe_logs.matching(LEFT)
    # once per quant method (the two fp8 layers share one line, the two ct layers another)
    assert len(left) == 2, moe_logs.messages
    assert all(backend in line for line in left)
    assert all("standard activation format" in line for line in left)
    assert not moe_logs.matching("use AotExperts")
    assert any(line.startswith("vllm-moe-aot: FP8 MoE layer left to vLLM's backend choice: "
                               "Fp8MoEMethod layer") for line in left)


def test_uneven_expert_split_stays_with_vllm(plugin_on, moe_logs):
    """10 experts over 4 ranks: vLLM gives ranks 0-1 three and ranks 2-3 two."""
    from vllm_moe_aot.integration.experts import AotExperts, expert_split_problem

    for rank, local in ((0, 3), (3, 2)):
        pc = support.ep_parallel_config(4, ep_rank=rank)
        layers = [build("fp8_dynamic", parallel=pc, load=False, experts=10, seed=s)
                  for s in range(2)]
        for layer in layers:
            cfg = layer.experts.moe_config
            assert (cfg.num_local_experts, cfg.num_experts) == (local, 10)
            assert not issubclass(layer.method.experts_cls or object, AotExperts)
            assert "uneven expert split: 10 experts over ep=4 ranks" in (
                expert_split_problem(cfg))
    left = moe_logs.matching(LEFT)
    assert len(left) == 2 and all("uneven expert split" in m for m in left), moe_logs.messages


def test_an_uneven_layer_built_directly_runs_stock(plugin_on, fake_ops, moe_logs):
    """AotExperts built without the oracle's check (e.g. by a caller of its own) falls back
    with the same reason instead of running a shape the pipeline does not serve."""
    from vllm.model_executor.layers.fused_moe.config import fp8_w8a8_moe_quant_config

    from vllm_moe_aot.integration.experts import AotExperts

    layer = build("fp8_dynamic", parallel=support.ep_parallel_config(4), load=False,
                  experts=10)
    cfg = layer.experts.moe_config
    qc = fp8_w8a8_moe_quant_config(w1_scale=torch.ones(3), w2_scale=torch.ones(3))
    with support.cpu_vllm():
        experts = AotExperts(cfg, qc)
    assert experts.metadata is None and "uneven expert split" in experts.fallback_reason
    lines = [r for r in moe_logs.records if r.name.endswith(".experts")]
    assert [r.levelno for r in lines] == [logging.WARNING]
    assert "uneven expert split" in lines[0].getMessage()
