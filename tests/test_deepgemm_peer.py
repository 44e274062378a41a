"""The DeepGEMM bound (measure/peers/deepgemm_bound.py) without a GPU: why it is left out, its
port of DeepGEMM's heuristic (against DeepGEMM's own Python where the mirror is here), the
contiguous layout, quantisation and scale layouts it prepares (against float64 computations),
and the build script's arguments and kernel plan. tests/gpu/test_deepgemm_gpu.py runs it."""

from __future__ import annotations

import ast
import math
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from tests._scripts import load_script
from vllm_moe_aot.measure.peers import deepgemm_bound as dgb
from vllm_moe_aot.measure.peers import lineup
from vllm_moe_aot.measure.reference import block_dequant, group_quant, reference_moe
from vllm_moe_aot.measure.workload import make_problem
from vllm_moe_aot.shapes import PRESETS, MoEShape, Scheme

ROOT = Path(__file__).resolve().parent.parent
FP8 = torch.float8_e4m3fn
DEEPGEMM_MIRROR = Path("/work/.mirror/deepseek-ai+DeepGEMM/repo")


def _build_script():
    return load_script("build_deepgemm")


# ---------------------------------------------------------------------------- availability


def test_other_schemes_are_refused_with_a_reason():
    for scheme in (Scheme.FP8_PTPC, Scheme.FP8_PER_TENSOR_STATIC, "fp8_per_tensor_dynamic"):
        why = dgb.unavailable_reason(scheme)
        assert why is not None and "fp8_block" in why
    with pytest.raises(ValueError, match="fp8_block"):
        dgb.DeepGemmBound(Scheme.FP8_PTPC)


def test_missing_library_names_the_build_command(tmp_path, monkeypatch):
    monkeypatch.setenv(dgb.ENV_LIB, str(tmp_path / "nope.so"))
    why = dgb.unavailable_reason(Scheme.FP8_BLOCK)
    assert why is not None and dgb.BUILD_SCRIPT in why and "nope.so" in why
    assert dgb.library_path() == tmp_path / "nope.so"


def test_lineup_lists_the_bound_and_says_why_it_is_left_out(tmp_path, monkeypatch):
    assert "deepgemm_bound" in lineup.PEER_NAMES and "deepgemm_bound" not in lineup.COMPLETE
    assert set(lineup.DESCRIBE) == set(lineup.PEER_NAMES)
    peers, skipped = lineup.lineup(torch.device("cpu"), Scheme.FP8_PTPC, ("deepgemm_bound",))
    assert not peers and len(skipped) == 1 and skipped[0].startswith("deepgemm_bound: ")
    assert "fp8_block" in skipped[0]
    monkeypatch.setenv(dgb.ENV_LIB, str(tmp_path / "nope.so"))
    peers, skipped = lineup.lineup(torch.device("cpu"), Scheme.FP8_BLOCK, ("deepgemm_bound",),
                                   shape=PRESETS["qwen3.5-397b-a17b-fp8"].shape)
    assert not peers and dgb.BUILD_SCRIPT in skipped[0]


class _FakeLib:
    path = Path("libdeepgemm_bound.so")
    gemms = {(256, 4096, 512), (4096, 128, 512)}
    num_sms_built = [132]

    def missing_gemms(self, shape):
        return [g for g in dgb.layer_gemms(shape.E, shape.K, shape.N) if g not in self.gemms]


@pytest.fixture
def fake_hopper(monkeypatch):
    """A built library and an sm_90 GPU of 132 SMs, as far as unavailable_reason asks."""
    monkeypatch.setattr(dgb, "load_library", lambda path=None: _FakeLib())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: (9, 0))

    class Props:
        multi_processor_count = 132

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev=None: Props())
    return monkeypatch


def test_reasons_on_a_gpu_machine(fake_hopper):
    tp8 = PRESETS["qwen3.5-397b-a17b-fp8"].shape
    assert dgb.unavailable_reason(Scheme.FP8_BLOCK, tp8) is None
    why = dgb.unavailable_reason(Scheme.FP8_BLOCK, MoEShape(E=64, K=4096, N=1024, topk=10, ep=8))
    assert why is not None and "not built" in why and "--shape 64,4096,1024,10" in why
    fake_hopper.setattr(torch.cuda, "get_device_capability", lambda dev=None: (10, 0))
    assert "sm_90a only (this GPU: sm_100)" in dgb.unavailable_reason(Scheme.FP8_BLOCK, tp8)
    fake_hopper.setattr(torch.cuda, "get_device_capability", lambda dev=None: (9, 0))

    class Props:
        multi_processor_count = 114

    fake_hopper.setattr(torch.cuda, "get_device_properties", lambda dev=None: Props())
    assert "--num-sms 114" in dgb.unavailable_reason(Scheme.FP8_BLOCK, tp8)


def test_library_without_the_heuristics_pick_names_the_rebuild(tmp_path):
    lib = object.__new__(dgb.DeepGemmLibrary)
    lib.path, lib.kernels = tmp_path / "lib.so", {}
    lib.build_info = {"num_sms": [132], "max_tokens": 131072}
    with pytest.raises(dgb.DeepGemmCallError, match="--num-sms 114"):
        lib.kernel_for(1280, 256, 4096, 512, 114)


# ------------------------------------------------------------------------------- heuristic


@lru_cache(maxsize=1)
def _deepgemm_get_best_configs():
    """DeepGEMM's own get_best_configs (03d0be3 jit_kernels/gemm.py), executed from the mirror
    without its torch/JIT imports."""
    if not DEEPGEMM_MIRROR.exists():
        return None
    r = subprocess.run(["git", f"--git-dir={DEEPGEMM_MIRROR}", "show",
                        f"{dgb.DEEPGEMM_COMMIT}:deep_gemm/jit_kernels/gemm.py"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return None
    tree = ast.parse(r.stdout)
    keep = {"is_tma_multicast_legal", "get_swizzle_mode", "get_block_n_padding_for_smem_d",
            "get_smem_config", "get_best_configs"}
    tree.body = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in keep]
    ns = {"math": math, "lru_cache": lru_cache, "Tuple": tuple, "ceil_div": dgb.ceil_div,
          "get_m_alignment_for_contiguous_layout": lambda: 128}
    exec(compile(tree, "deep_gemm/jit_kernels/gemm.py", "exec"), ns)  # noqa: S102
    return ns["get_best_configs"]


def _port_as_deepgemm(m, n, k, sms):
    cfg, min_sms = dgb.best_config(m, n, k, 1, sms)
    return (min_sms, cfg.block_m, cfg.block_n, cfg.num_stages,
            (cfg.num_tma_multicast, cfg.multicast_on_a),
            (cfg.smem_size, cfg.swizzle_d, cfg.block_n_padding))


def test_heuristic_port_matches_deepgemms_own():
    theirs = _deepgemm_get_best_configs()
    if theirs is None:
        pytest.skip(f"DeepGEMM's mirror ({DEEPGEMM_MIRROR}) is not on this machine")
    cases = 0
    for n, k in ((256, 4096), (4096, 128), (2048, 4096), (4096, 1024), (768, 7168), (512, 256)):
        for m in [*range(128, 8193, 128), 12800, 65536, 1376256]:
            for sms in (132, 114, 78):
                want = theirs(m, n, k, 1, sms, is_grouped_contiguous=True)
                assert _port_as_deepgemm(m, n, k, sms) == tuple(want), (m, n, k, sms)
                cases += 1
    assert cases > 1000


def test_heuristic_for_the_tp8_layer():
    # the down projection's K of 128 is one block: one pipeline stage
    cfg, sms = dgb.best_config(5 * 128 * 10, 4096, 128, 512, 132)
    assert cfg.num_stages == 1 and cfg.k == 128 and cfg.num_groups == 512
    assert sms % cfg.num_tma_multicast == 0 and sms <= 132
    # few rows: no multicast (m < 512)
    small, _ = dgb.best_config(256, 256, 4096, 512, 132)
    assert small.num_tma_multicast == 1 and small.block_m == 128
    assert "deep_gemm::GemmType::GroupedContiguous" in small.template_args()
    assert small.num_threads == 384 and small.smem_size <= dgb.SM90_SMEM_CAPACITY


# --------------------------------------------------------------------- layout and inputs


def _layout_reference(local_ids: torch.Tensor, E: int, align: int = 128):
    """The contiguous layout written out with Python lists."""
    M, topk = local_ids.shape
    groups: dict[int, list[int]] = {e: [] for e in range(E)}
    for pair, e in enumerate(local_ids.reshape(-1).tolist()):
        if e >= 0:
            groups[e].append(pair)
    pairs, experts = [], []
    for e in range(E):
        g = groups[e]
        padded = -(-len(g) // align) * align
        pairs += g + [-1] * (padded - len(g))
        experts += [e] * len(g) + [-1] * (padded - len(g))
    return pairs, experts


@pytest.mark.parametrize("align", [128, 8])
def test_contiguous_layout_matches_a_written_out_one(align):
    g = torch.Generator().manual_seed(5)
    E, M, topk = 6, 37, 3
    ids = torch.rand(M, E, generator=g).argsort(dim=1)[:, :topk].int()
    ids[ids == 4] = -1  # another rank's expert
    lay = dgb.contiguous_layout(ids, E, align)
    pairs, experts = _layout_reference(ids, E, align)
    assert lay.m == len(pairs) and lay.m % align == 0
    assert lay.pairs.tolist() == pairs and lay.m_indices.tolist() == experts
    assert lay.m_indices.dtype == torch.int32
    assert lay.rows.tolist() == [p // topk if p >= 0 else -1 for p in pairs]
    assert lay.counts.tolist() == [int((ids == e).sum()) for e in range(E)]
    # every block of `align` rows belongs to one expert and starts with a real row
    blocks = lay.m_indices.view(-1, align)
    assert (blocks[:, 0] >= 0).all()
    assert ((blocks == blocks[:, :1]) | (blocks == -1)).all()


def test_contiguous_layout_with_no_local_pair():
    lay = dgb.contiguous_layout(torch.full((3, 2), -1, dtype=torch.int32), 4)
    assert lay.m == 0 and lay.rows.numel() == 0 and lay.m_indices.numel() == 0


def test_group_quant_is_vllms_per_token_group_quant():
    g = torch.Generator().manual_seed(1)
    t = torch.randn(7, 384, generator=g) * torch.logspace(-3, 3, 7)[:, None]
    t[2, 128:256] = 0.0
    q, s = dgb.group_quant(t, FP8)
    assert q.dtype == FP8 and s.shape == (7, 3) and s.dtype == torch.float32
    deq = q.double() * s.double().repeat_interleave(128, 1)
    ref = group_quant(t.double(), 128, FP8)
    assert ((deq - ref).norm() / ref.norm()).item() < 1e-6
    # the same fp8 codes as float64 scales give (float32 arithmetic here: a tie may differ)
    s64 = t.double().view(7, 3, 128).abs().amax(-1).clamp(min=1e-10) / 448.0
    assert torch.allclose(s.double(), s64, rtol=1e-6, atol=0)
    codes = (t.double().view(7, 3, 128) / s64[..., None]).clamp(-448, 448).float().to(FP8)
    same = (codes.view(7, 384).view(torch.uint8) == q.view(torch.uint8)).double().mean()
    assert same > 0.999
    assert torch.count_nonzero(deq[2, 128:256]) == 0


def test_scales_in_deepgemms_mn_major_form():
    s = torch.arange(10 * 3, dtype=torch.float32).reshape(10, 3)
    st = dgb.mn_major_scales(s)
    assert st.shape == (3, 12) and st.is_contiguous()  # M padded to 16 bytes (4 floats)
    assert torch.equal(st[:, :10], s.T) and torch.count_nonzero(st[:, 10:]) == 0


def test_gather_rows_zeroes_padding_rows():
    q = (torch.randn(4, 256) * 100).to(FP8)
    rows = torch.tensor([2, -1, 0, 3, -1])
    out = dgb.gather_rows(q, rows)
    assert out.dtype == FP8 and out.shape == (5, 256)
    assert torch.equal(out.view(torch.uint8)[[0, 2, 3]], q.view(torch.uint8)[[2, 0, 3]])
    assert torch.count_nonzero(out.view(torch.uint8)[[1, 4]]) == 0


def _small_block_problem(ep: int = 1, M: int = 9):
    shape = MoEShape(E=4, K=256, N=128, topk=3, ep=ep)
    return make_problem(shape, Scheme.FP8_BLOCK, M, "cpu", seed=11, fp8_dtype=FP8)


@pytest.mark.parametrize("ep", [1, 2])
def test_prepared_gemms_are_the_layers_two_gemms(ep):
    """The stage inputs, checked row by row against float64 block-dequantised GEMMs, and the
    two stages, summed over each token's slots with its routing weights, against the layer's
    float64 reference (so the bound times the layer's own GEMMs on the layer's own data)."""
    p = _small_block_problem(ep)
    x, w13, w2, s13, s2, tw, ids = p.tensors()
    inp = dgb.stage1_inputs(p)
    lay = inp.layout
    local = p.local_ids()
    assert lay.m == sum(-(-int((local == e).sum()) // 128) * 128 for e in range(p.shape.E))
    assert inp.lhs1.shape == (lay.m, 256) and inp.lhs1_scales.shape == (lay.m, 2)
    assert inp.lhs1_scales_t.shape == (2, lay.m)
    assert torch.equal(inp.lhs1_scales_t, inp.lhs1_scales.T)
    xq = group_quant(x.double(), 128, FP8)  # float64 per-token-group quantisation
    a1 = inp.lhs1.double() * inp.lhs1_scales.double().repeat_interleave(128, 1)
    real = lay.rows >= 0
    assert torch.allclose(a1[real], xq[lay.rows[real]], rtol=0, atol=1e-6 * xq.abs().max())
    assert torch.count_nonzero(a1[~real]) == 0
    h = dgb.reference_gemm(inp.lhs1, inp.lhs1_scales, w13, s13, lay.m_indices)
    for r in torch.nonzero(real).flatten()[::7].tolist():
        e = int(lay.m_indices[r])
        want = a1[r] @ block_dequant(w13[e], s13[e], (128, 128)).T
        assert torch.allclose(h[r], want, rtol=1e-12, atol=1e-12)
    assert torch.count_nonzero(h[~real]) == 0
    dgb.stage2_inputs(inp, h, p)
    assert inp.lhs2.shape == (lay.m, 128) and inp.lhs2_scales_t.shape == (1, lay.m)
    y = dgb.reference_gemm(inp.lhs2, inp.lhs2_scales, w2, s2, lay.m_indices)
    assert inp.out1.shape == (lay.m, 256) and inp.out2.shape == (lay.m, 256)
    # the layer from the two GEMMs: out[t] = sum over its local slots of weight * y[row]
    out = torch.zeros(p.M, p.shape.K, dtype=torch.float64)
    pairs = lay.pairs[real]
    out.index_add_(0, pairs // p.shape.topk, y[real] * tw.reshape(-1)[pairs].double()[:, None])
    ref = reference_moe(x, w13, w2, s13, s2, tw, ids, Scheme.FP8_BLOCK,
                        expert_map=p.expert_map)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-3


def test_problem_checks_name_what_is_wrong():
    p = _small_block_problem()
    with pytest.raises(ValueError, match="problem is fp8_block, peer is fp8_ptpc"):
        dgb.check_problem(p, Scheme.FP8_PTPC)
    dgb.check_problem(p, Scheme.FP8_BLOCK)


# ------------------------------------------------------------------------------ the build


def test_build_arguments_and_shapes():
    b = _build_script()
    args = b.parse_args([])
    assert args.num_sms_list == (132,) and args.max_tokens == 131072 and not args.shapes
    layers = dict(b.planned_layers(args.shapes))
    assert layers == {"qwen3.5-397b-a17b-fp8 tp8": MoEShape(E=512, K=4096, N=128, topk=10),
                      "qwen3.5-397b-a17b-fp8 tp8 ep8": MoEShape(E=64, K=4096, N=1024, topk=10,
                                                                ep=8)}
    args = b.parse_args(["--shape", "32,2048,256", "--shape", "16,1024,512,6",
                         "--num-sms", "132,114", "--no-presets"])
    assert args.shapes == [MoEShape(E=32, K=2048, N=256, topk=8),
                           MoEShape(E=16, K=1024, N=512, topk=6)]
    assert args.num_sms_list == (114, 132)
    assert [n for n, _ in b.planned_layers(args.shapes, presets=False)] == [
        "--shape 32,2048,256,8", "--shape 16,1024,512,6"]
    for bad in (["--shape", "32,2048"], ["--shape", "32,2000,256"], ["--shape", "a,b,c"],
                ["--no-presets"], ["--num-sms", "0"], ["--max-tokens", "0"]):
        with pytest.raises(SystemExit):
            b.parse_args(bad)


def test_build_plan_covers_every_m_the_bench_can_produce(capsys):
    b = _build_script()
    layers = b.planned_layers([])
    kernels, gemms = b.planned_kernels(layers, 4096, (132,))
    assert len({(g["n"], g["k"], g["num_groups"]) for g in gemms}) == 4
    assert len(set(kernels)) == len(kernels)
    for _name, s in layers:
        for n, k, e in dgb.layer_gemms(s.E, s.K, s.N):
            for m in range(128, dgb.max_rows(s.E, s.topk, 4096) + 1, 128 * 7):
                assert dgb.best_config(m, n, k, e, 132)[0] in kernels
    src = b.kernel_source(0, kernels[0])
    assert "deep_gemm::fp8_gemm_kernel<" in src and kernels[0].template_args() in src
    assert b.table_source(kernels).count("&dgb_kernel_") == len(kernels)
    assert b.main(["--list", "--max-tokens", "64"]) == 0
    printed = capsys.readouterr().out
    assert "gemm n=4096 k=128 experts=512" in printed and "stages=1" in printed


def test_built_library_agrees_with_the_heuristic():
    """The library's table holds DeepGEMM's pick for every m of the presets' GEMMs (loads the
    library with ctypes; no GPU needed)."""
    if not dgb.library_path().is_file():
        pytest.skip(f"library not built here (python3 {dgb.BUILD_SCRIPT})")
    lib = dgb.DeepGemmLibrary()
    assert lib.build_info["deepgemm_commit"] == dgb.DEEPGEMM_COMMIT
    assert lib.build_info["arch"] == "sm_90a"
    sms = lib.num_sms_built[0]
    b = _build_script()
    for _name, s in b.planned_layers([]):
        assert not lib.missing_gemms(s)
        for n, k, e in dgb.layer_gemms(s.E, s.K, s.N):
            for m in range(128, dgb.max_rows(s.E, s.topk, lib.build_info["max_tokens"]) + 1,
                           128 * 13):
                idx, cfg, launch = lib.kernel_for(m, n, k, e, sms)
                assert lib.kernels[cfg] == idx and 1 <= launch <= sms


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
