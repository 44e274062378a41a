"""The benchmark without a GPU: floors arithmetic, and the CPU path end to end (Triton
interpreter on a scaled-down shape, gate against the float64 reference, 'skipped' notice)."""

from __future__ import annotations

import argparse
import json
import sys
import types

import pytest
import torch

from tests._moe_fakes import DEFAULT_VARIANTS, FakeFusedMoE, factory
from vllm_moe_aot.cli import main
from vllm_moe_aot.measure import bench, bench_gpu, bench_report
from vllm_moe_aot.shapes import PRESETS, MoEShape

QWEN = PRESETS["qwen3.5-397b-a17b"].shape
HY3 = PRESETS["hy3"].shape


def test_floors_match_the_h100_baseline():
    """shared/baselines/h100-stock-2026-11-25.csv: its floors at its copy rate (3.021 TB/s,
    from Hy3's 192 experts x 4.5 MiB = 149.93 us)."""
    bw = 192 * 3 * 192 * 4096 / 149.93e-6
    f = bench_report.floors(QWEN, 1, 10.0, bw, 700e12)
    assert f.weight_floor_us == pytest.approx(5.21, abs=0.01)  # 10 experts x 1.5 MiB
    assert f.bytes == 10 * 3 * 128 * 4096 + 4 * 4096
    assert f.flops == 2 * 1 * 10 * 3 * 128 * 4096
    assert f.floor_us == f.byte_floor_us  # bytes rule decode
    f = bench_report.floors(HY3, 4096, 192.0, bw, 700e12)
    assert f.weight_floor_us == pytest.approx(149.93, abs=0.01)
    assert f.byte_floor_us == pytest.approx(172.14, abs=0.05)  # + bf16 x and out
    # FLOP-bound at large M: 131072 x 10 x 3NK x 2 / P
    f = bench_report.floors(QWEN, 131072, 512.0, bw, 1.2e15)
    assert f.floor_us == f.flop_floor_us == pytest.approx(2 * 131072 * 10 * 3 * 128 * 4096
                                                           / 1.2e15 * 1e6)


def _args(**kw):
    a = dict(preset="hy3", tp=8, tokens=None, shape=None, scheme=None, variant=["auto"],
             config_dir=None, stock="auto", gate_rows=256, json=None, plot=None, cpu=True)
    a.update(kw)
    return argparse.Namespace(**a)


def test_resolve_layer():
    assert bench.resolve_layer(_args())[:2] == (HY3, PRESETS["hy3"].scheme)
    shape, scheme, _ = bench.resolve_layer(_args(preset=None, shape="16,256,64,4",
                                                 scheme="fp8_ptpc"))
    assert shape == MoEShape(16, 256, 64, 4) and scheme.value == "fp8_ptpc"
    assert bench.resolve_layer(_args(preset="qwen3.5-397b-a17b", tp=4))[0].N == 256
    with pytest.raises(ValueError):
        bench.resolve_layer(_args(preset=None))
    assert bench.cpu_shape(QWEN) == MoEShape(8, 256, 64, 4)
    assert bench.scaled_down(QWEN, bench.cpu_shape(QWEN)) == [
        "E 512->8", "K 4096->256", "N 128->64", "topk 10->4"]
    # a shape within the caps runs as given; only the dimensions above a cap are cut
    for small in (MoEShape(8, 256, 64, 2), MoEShape(4, 128, 32, 4), MoEShape(2, 256, 64, 2)):
        assert bench.cpu_shape(small) == small and bench.scaled_down(small, small) == []
    assert bench.cpu_shape(MoEShape(16, 128, 96, 2)) == MoEShape(8, 128, 64, 2)
    assert bench.cpu_shape(MoEShape(4, 8192, 32, 4)) == MoEShape(4, 256, 32, 4)


@pytest.mark.parametrize("shape, scheme, why", [
    ("8,100,64,2", "fp8_ptpc", "K=100 must be a multiple of 128"),
    ("8,256,48,2", "fp8_per_tensor", "N=48 must be a multiple of 32"),
    ("8,256,64,9", "fp8_ptpc", "topk=9 must be between 1 and min(16, E=8)"),
    ("2048,256,64,2", "fp8_ptpc", "E=2048 must be between 1 and 1024"),
])
def test_bench_refuses_an_unsupported_shape_before_any_work(shape, scheme, why, monkeypatch,
                                                            capsys):
    def no_work(*a, **k):
        raise AssertionError("bench started work on an unsupported shape")

    monkeypatch.setattr(bench, "run_cpu", no_work)
    monkeypatch.setattr(bench_gpu, "run_gpu", no_work)
    with pytest.raises(ValueError, match="not supported by the AOT pipeline"):
        bench.resolve_layer(_args(preset=None, shape=shape, scheme=scheme))
    assert main(["bench", "--shape", shape, "--scheme", scheme]) == 2
    err = capsys.readouterr().err
    assert f"error: --shape {shape}" in err and why in err and "not supported" in err


def test_cpu_path_runs_a_small_shape_as_given(tmp_path, capsys):
    js = tmp_path / "s.json"
    good = {k: v for k, v in DEFAULT_VARIANTS.items() if k != "fake_wrong"}
    args = _args(preset=None, shape="4,128,32,2", scheme="fp8_ptpc", tokens=[1, 3],
                 json=str(js))
    shape, scheme, name = bench.resolve_layer(args)
    assert bench.run_cpu(args, shape, scheme, name, moe_factory=factory(good)) == 0
    out = capsys.readouterr().out
    assert "the given shape E=4,K=128,N=32,topk=2 (within the interpreter's caps, not scaled " \
           "down)" in out
    layer = json.loads(js.read_text())["layer"]
    assert layer["cpu_shape"] == layer["shape"] == {"E": 4, "K": 128, "N": 32, "topk": 2, "ep": 1}
    assert layer["cpu_scaled_down"] == []


def test_cpu_path_says_what_it_needs_without_triton(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "triton" else real(name, *a))
    rc = bench.run_cpu(_args(), HY3, PRESETS["hy3"].scheme, "hy3")
    out = capsys.readouterr().out
    assert rc == 1
    assert "needs triton 3.8, which is not installed: pip install 'triton~=3.8.0'" in out
    assert "SKIPPED" in out


def test_cpu_path_with_fake_pipeline(tmp_path, capsys):
    js = tmp_path / "b.json"
    good = {k: v for k, v in DEFAULT_VARIANTS.items() if k != "fake_wrong"}
    shape, scheme, name = bench.resolve_layer(_args())
    rc = bench.run_cpu(_args(json=str(js), plot=str(tmp_path / "p.png")), shape, scheme, name,
                       moe_factory=factory(good))
    out = capsys.readouterr().out
    assert rc == 0
    assert "Triton interpreter" in out and "SKIPPED (no GPU timing was done)" in out
    assert "plot skipped" in out and not (tmp_path / "p.png").exists()
    data = json.loads(js.read_text())
    assert data["mode"] == "cpu-interpreter"
    assert data["layer"]["cpu_shape"] == {"E": 8, "K": 256, "N": 64, "topk": 4, "ep": 1}
    assert data["layer"]["cpu_scaled_down"] == ["E 192->8", "K 4096->256", "N 192->64",
                                                "topk 8->4"]
    assert "scaled-down shape E=8,K=256,N=64,topk=4 (E 192->8, K 4096->256" in out
    assert [(r["M"], r["variant"]) for r in data["rows"]] == [
        (m, v) for m in (1, 5, 33) for v in good]
    assert all(r["gate"] == "pass" and r["err"] < 1e-2 for r in data["rows"])
    assert any("GPU timing" in s for s in data["skipped"])


def test_cpu_path_reports_a_wrong_variant(capsys):
    shape, scheme, name = bench.resolve_layer(_args(preset="qwen3.5-397b-a17b"))
    rc = bench.run_cpu(_args(tokens=[3]), shape, scheme, name, moe_factory=factory())
    out = capsys.readouterr().out
    assert rc == 1
    assert "fake_wrong" in out and "FAIL" in out and "failed the gate" in out


def test_cpu_path_pipeline_unavailable(capsys):
    def broken(*a):
        raise RuntimeError("no manifest")

    rc = bench.run_cpu(_args(), HY3, PRESETS["hy3"].scheme, "hy3", moe_factory=broken)
    out = capsys.readouterr().out
    assert rc == 1 and "cannot build the pipeline on CPU: RuntimeError: no manifest" in out
    assert "SKIPPED" in out


def test_cli_bench_cpu_through_the_pipeline_module(tmp_path, monkeypatch, capsys):
    """`vllm-moe-aot bench` as the command line runs it, the pipeline module swapped for the
    fake (the CPU path imports ``vllm_moe_aot.pipeline.FusedMoE``)."""
    fake = types.ModuleType("vllm_moe_aot.pipeline")
    fake.FusedMoE = FakeFusedMoE
    monkeypatch.setitem(sys.modules, "vllm_moe_aot.pipeline", fake)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    js = tmp_path / "c.json"
    rc = main(["bench", "--preset", "qwen3.5-397b-a17b", "--cpu", "--tokens", "1", "2",
               "--variant", "fake_w8a16", "nope", "--json", str(js)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "variant 'nope' is not compiled" in out
    rows = json.loads(js.read_text())["rows"]
    assert [(r["M"], r["variant"], r["gate"]) for r in rows] == [(1, "fake_w8a16", "pass"),
                                                                 (2, "fake_w8a16", "pass")]


def _real_pipeline_or_skip(scheme):
    try:
        from vllm_moe_aot.pipeline import FusedMoE

        return FusedMoE(bench.cpu_shape(HY3), scheme, "cpu", max_tokens=33)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"real pipeline not usable on CPU here: {type(exc).__name__}: {exc}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the automatic CPU path needs no GPU")
def test_bench_cpu_real_pipeline_end_to_end(tmp_path, capsys):
    """No --cpu: with no GPU the command must take the interpreter path by itself."""
    _real_pipeline_or_skip(PRESETS["hy3"].scheme)
    js = tmp_path / "r.json"
    rc = main(["bench", "--preset", "hy3", "--tokens", "1", "5", "--json", str(js)])
    out = capsys.readouterr().out
    assert "no GPU is present" in out and "SKIPPED" in out
    data = json.loads(js.read_text())
    assert {r["M"] for r in data["rows"]} == {1, 5}
    bad = [r for r in data["rows"] if r["gate"] != "pass"]
    assert rc == 0 and not bad, bad


_STOCK_SCRIPT = r"""
import torch
from vllm_moe_aot.measure.reference import gate
from vllm_moe_aot.shapes import MoEShape, Scheme
from vllm_moe_aot.measure.peers.vllm_triton import StockProvider, _vllm_stock_impl
from vllm_moe_aot.measure.workload import make_problem

prov = StockProvider("vllm_stock", _vllm_stock_impl(), channel_scale_3d=False)
for scheme in [s for s in Scheme if not s.block_weights]:
    p = make_problem(MoEShape(8, 256, 64, 2), scheme, 5, "cpu", seed=1)
    y = prov(p)
    out = p.new_out()
    assert prov(p, out=out) is out and torch.equal(out, y)
    y2 = prov(*p.tensors(), scheme=p.scheme, a13_scale=p.a13_scale, a2_scale=p.a2_scale)
    assert torch.equal(y2, y)
    assert y.shape == (5, 256) and y.dtype == torch.bfloat16 and bool(torch.isfinite(y).all())
    g = gate(y, p.reference(True))
    # the interpreter's fp8 rounding is off (see the vllm-stock README), so only gross layout
    # errors are caught here; on an H100 the stock path passes the real gate (1e-2 .. 2e-2)
    assert g.rel_fro < 0.3, (scheme, g)
    print(scheme.value, f"{g.rel_fro:.3f}")
"""


def test_vllm_stock_provider_plumbing_on_cpu():
    """The vllm_stock provider's argument layout for every scheme, in a subprocess (importing
    vllm_stock makes ``vllm`` its minimal tree for the rest of that process)."""
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if not (root / ".vllm_stock" / "vllm_stock").is_dir():
        pytest.skip(".vllm_stock not prepared (shared/tools/vllm-stock/prepare.py)")
    env = dict(os.environ, TRITON_INTERPRET="1", VLLM_STOCK_FAKE_CAPABILITY="90",
               VLLM_STOCK_FAKE_DEVICE_NAME="NVIDIA H100 80GB HBM3",
               PYTHONPATH=os.pathsep.join([str(root / ".vllm_stock"), str(root)]))
    r = subprocess.run([sys.executable, "-c", _STOCK_SCRIPT], env=env, cwd=root,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("\n") == 3
