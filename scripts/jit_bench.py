"""Kernel development on the GPU: run the pipeline's kernels through Triton's JIT (no AOT
build), check them against vLLM's stock path and the float64 reference, and time both with
CUDA-graph replays over rotated input sets.

    PYTHONPATH=.vllm_stock python3 scripts/jit_bench.py --preset qwen3.5-397b-a17b --tokens 1,16

Not part of the product (the product never JIT-compiles): it exists so that kernel changes can
be measured in one device call before the AOT build is refreshed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import kernels.moe as km  # noqa: E402
import vllm_moe_aot.pipeline as pl  # noqa: E402
from kernels.spec import TARGETS  # noqa: E402
from vllm_moe_aot.reference import gate, reference_moe  # noqa: E402
from vllm_moe_aot.shapes import PRESETS, MoEShape, Scheme  # noqa: E402


class _JitKernel:
    def __init__(self, spec):
        self.spec = spec
        self.consts = dict(spec.resolved(TARGETS["sm_90a"])[1])
        self.fn = getattr(km, spec.source.split(":")[1])

    def launch(self, grid, *args, pdl=False):
        self.fn[tuple(grid)](*args, **self.consts, num_warps=self.spec.num_warps,
                             num_stages=self.spec.num_stages)


class _JitManifest:
    def __init__(self):
        self.variants = [dataclasses.asdict(v) for v in km.VARIANTS]
        self.specs = {s.name: s for s in km.SPECS}

    def constexprs(self, name):
        return dict(self.specs[name].resolved(TARGETS["sm_90a"])[1])


class JitRuntime:
    target = "sm_90a"
    manifest = _JitManifest()

    def kernel(self, name):
        return _JitKernel(self.manifest.specs[name])


def make_inputs(shape: MoEShape, scheme: Scheme, M: int, gen: torch.Generator, dev="cuda"):
    E, K, N, topk = shape.E, shape.K, shape.N, shape.topk
    x = torch.randn(M, K, generator=gen, device=dev).bfloat16()
    ids = torch.rand(M, E, generator=gen, device=dev).argsort(dim=1)[:, :topk].int().contiguous()
    tw = torch.rand(M, topk, generator=gen, device=dev)
    tw = (tw / tw.sum(1, keepdim=True)).float().contiguous()
    return x, tw, ids


def make_weights(shape: MoEShape, scheme: Scheme, gen: torch.Generator, dev="cuda"):
    E, K, N = shape.E, shape.K, shape.N
    f8 = torch.float8_e4m3fn
    w13 = (torch.randn(E, 2 * N, K, generator=gen, device=dev) * 64).clamp(-448, 448).to(f8)
    w2 = (torch.randn(E, K, N, generator=gen, device=dev) * 64).clamp(-448, 448).to(f8)
    if scheme.per_channel_weights:
        s13 = torch.rand(E, 2 * N, generator=gen, device=dev) * 2e-3 + 5e-4
        s2 = torch.rand(E, K, generator=gen, device=dev) * 2e-3 + 5e-4
    else:
        s13 = torch.rand(E, generator=gen, device=dev) * 2e-3 + 5e-4
        s2 = torch.rand(E, generator=gen, device=dev) * 2e-3 + 5e-4
    a13 = a2 = None
    if scheme.static_activations:
        a13 = torch.tensor([4.5 / 448], device=dev)
        a2 = torch.tensor([0.05 / 448 * 64], device=dev)
    return w13, w2, s13, s2, a13, a2


def graph_time_us(fn, n_sets: int, replays: int = 20) -> float:
    """Median µs per call of fn(i) over CUDA-graph replays, i rotating over n_sets."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(n_sets):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(n_sets):
            fn(i)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000 / n_sets)
    times.sort()
    return times[len(times) // 2]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen3.5-397b-a17b")
    ap.add_argument("--tokens", default="1,16,256,4096")
    ap.add_argument("--variants", default="", help="comma list; default all")
    ap.add_argument("--sets", type=int, default=4)
    ap.add_argument("--json", default="")
    ap.add_argument("--no-stock", action="store_true")
    args = ap.parse_args()
    preset = PRESETS[args.preset]
    shape, scheme = preset.shape, preset.scheme
    gen = torch.Generator(device="cuda").manual_seed(0)
    w13, w2, s13, s2, a13, a2 = make_weights(shape, scheme, gen)
    tokens = [int(t) for t in args.tokens.split(",")]
    moe = pl.FusedMoE(shape, scheme, "cuda", max_tokens=max(tokens), runtime=JitRuntime())
    variants = args.variants.split(",") if args.variants else moe.variants
    stock = None
    if not args.no_stock:
        try:
            import vllm_stock
            stock = vllm_stock
        except Exception as exc:  # noqa: BLE001
            print(f"stock unavailable: {exc}")
    skw = dict(scheme=scheme.family, w13_scale=s13, w2_scale=s2)
    if scheme.static_activations:
        skw.update(a13_scale=a13, a2_scale=a2)
    rows = []
    for M in tokens:
        sets = [make_inputs(shape, scheme, M, gen) for _ in range(args.sets)]
        outs = [torch.empty(M, shape.K, device="cuda", dtype=torch.bfloat16) for _ in sets]
        row = {"M": M}
        x, tw, ids = sets[0]
        check_ref = M <= 256
        if check_ref:
            refs = {q: reference_moe(x, w13, w2, s13, s2, tw, ids, scheme, a13, a2,
                                     quantize_activations=q) for q in (False, True)}
        if stock is not None:
            so = stock.fused_experts(x, w13, w2, tw, ids, **skw)
            if check_ref:
                row["stock_err"] = gate(so, refs[True]).rel_fro
            row["stock_us"] = graph_time_us(
                lambda i: stock.fused_experts(sets[i][0], w13, w2, sets[i][1], sets[i][2],
                                              **skw), len(sets))
        for v in variants:
            if moe.regime(v) == "gemv" and M > 256:
                continue
            try:
                out = outs[0].fill_(float("nan"))
                moe.run(v, x, w13, w2, s13, s2, tw, ids, out, a13, a2)
                torch.cuda.synchronize()
                if check_ref:
                    g = gate(out, refs[moe.quantize_activations(v)])
                    err = g.rel_fro if g.passed else f"FAIL {g}"
                elif stock is not None:
                    err = gate(out, so).rel_fro
                else:
                    err = float(torch.isnan(out).any())
                us = graph_time_us(lambda i, v=v: moe.run(
                    v, sets[i][0], w13, w2, s13, s2, sets[i][1], sets[i][2], outs[i], a13, a2),
                    len(sets))
                row[v] = {"us": round(us, 2), "err": err}
            except Exception as exc:  # noqa: BLE001
                row[v] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        rows.append(row)
        best = min((r["us"], k) for k, r in row.items() if isinstance(r, dict) and "us" in r)
        print(f"M={M:6d} stock={row.get('stock_us', float('nan')):9.1f}us best={best[0]:9.1f}"
              f"us {best[1]}  " + " ".join(
                  f"{k}={r.get('us', r.get('error', '?'))}" for k, r in row.items()
                  if isinstance(r, dict)), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": args.preset, "device": torch.cuda.get_device_name(),
                       "rows": rows}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
