"""Per-kernel time of one pipeline variant (and of the stock path) on the GPU, from
torch.profiler's CUDA activity trace (CUPTI sees kernels launched through cuda-bindings too),
and the whole call's CUDA-graph time with and without programmatic dependent launch.

Kernels are launched without PDL here, so each kernel's time is its own (with PDL a kernel
starts early and waits in-kernel for its predecessor, which the trace would count as its time).

    PYTHONPATH=.:.vllm_stock python3 scripts/profile_pipeline.py --preset hy3 --tokens 16384 \\
        --variants grouped_m64 grouped_m64_fastacc
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from vllm_moe_aot.measure.bench import resolve_layer  # noqa: E402
from vllm_moe_aot.measure.peers.vllm_triton import get_stock_provider  # noqa: E402
from vllm_moe_aot.measure.timing import time_graph  # noqa: E402
from vllm_moe_aot.measure.workload import make_problem  # noqa: E402
from vllm_moe_aot.pipeline import FusedMoE  # noqa: E402
from vllm_moe_aot.shapes import PRESETS  # noqa: E402

REPS = 5


def kernel_table(fn) -> list[tuple[str, int, float]]:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(REPS):
            fn()
        torch.cuda.synchronize()
    agg: dict[str, list[float]] = defaultdict(list)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            agg[ev.name[:60]].append(ev.device_time)
    return sorted(((k, len(v) // REPS, sum(v) / REPS) for k, v in agg.items()),
                  key=lambda r: -r[2])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None)
    ap.add_argument("--tp", type=int, default=8, help="with --preset (default 8)")
    ap.add_argument("--ep", type=int, default=1, help="with --preset (default 1)")
    ap.add_argument("--shape", default=None, help="E,K,N,topk[,ep] instead of --preset")
    ap.add_argument("--scheme", default=None, help="with --shape (or to override the preset's)")
    ap.add_argument("--tokens", type=int, nargs="+", required=True)
    ap.add_argument("--variants", nargs="+", required=True)
    ap.add_argument("--no-stock", action="store_true")
    ap.add_argument("--plain-calls", type=int, default=0, metavar="K",
                    help="only run each variant K times, eagerly, without PDL and without the "
                         "torch profiler (for an outside profiler such as ncu)")
    args = ap.parse_args()
    try:
        shape, scheme, layer = resolve_layer(args)
    except ValueError as exc:
        ap.error(str(exc))
    moe = FusedMoE(shape, scheme, "cuda", max_tokens=max(args.tokens), pdl=False)
    if not args.plain_calls:  # what the timed mode compares with
        moe_pdl = FusedMoE(shape, scheme, "cuda", max_tokens=max(args.tokens))
        stock = None if args.no_stock else get_stock_provider("cuda")
    for M in args.tokens:
        p = make_problem(shape, scheme, M, "cuda", seed=M)
        out = torch.empty(M, shape.K, dtype=torch.bfloat16, device="cuda")
        def call(m, v, p=p, out=out):
            # run_kwargs carries the expert_map of an EP layer (its topk_ids are global ids)
            return lambda: m.run(v, *p.tensors(), out, **p.run_kwargs())

        if args.plain_calls:
            for v in args.variants:
                for _ in range(args.plain_calls):
                    call(moe, v)()
            torch.cuda.synchronize()
            continue
        runs = {v: (call(moe, v), call(moe_pdl, v)) for v in args.variants}
        if stock is not None:
            runs[f"stock ({stock.name})"] = (lambda p=p, out=out: stock(p, out=out), None)
        for name, (fn, fn_pdl) in runs.items():
            rows = kernel_table(fn)
            total = sum(r[2] for r in rows)
            graph = f"graph {time_graph([fn]).us:.1f} us"
            if fn_pdl is not None:
                graph += f" without PDL, {time_graph([fn_pdl]).us:.1f} us with PDL"
            print(f"\n{layer} ({shape}) M={M} {name}: {total:9.1f} us of kernels per call; "
                  f"{graph} (one input set, L2 warm)")
            for k, n, us in rows:
                print(f"  {us:9.1f} us  {100 * us / total:5.1f}%  x{n:<3d} {k}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
