#!/usr/bin/env python3
"""Per-kernel GPU time of the vLLM CUTLASS peer for one preset at some token counts (torch
profiler, CUDA activity; the sum of kernels of one call, median over replays), to show where
its time goes beside the whole-layer number the bench reports.

    python3 scripts/profile_vllm_cutlass.py --preset qwen3.5-397b-a17b --tokens 1 4096 131072
"""

from __future__ import annotations

import argparse
import collections

import torch
from torch.profiler import ProfilerActivity, profile

from vllm_moe_aot.measure.peers.vllm_cutlass import VllmCutlassMoE
from vllm_moe_aot.measure.workload import make_problem
from vllm_moe_aot.shapes import PRESETS


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="qwen3.5-397b-a17b")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4096, 131072])
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    pr = PRESETS[args.preset]
    peer = VllmCutlassMoE(pr.scheme)
    for M in args.tokens:
        p = make_problem(pr.shape, pr.scheme, M, torch.device("cuda"), seed=M)
        call = peer.bind(p)
        for _ in range(3):
            call()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.reps):
                call()
            torch.cuda.synchronize()
        per = collections.defaultdict(float)
        for ev in prof.events():
            if ev.device_type == torch.autograd.DeviceType.CUDA:
                per[ev.name[:90]] += ev.device_time / args.reps
        total = sum(per.values())
        print(f"{args.preset} M={M}: {total:.1f} µs of kernels per call, "
              f"{len(per)} kernel kinds")
        for name, us in sorted(per.items(), key=lambda kv: -kv[1]):
            print(f"  {us:10.1f} µs  {100 * us / total:5.1f}%  {name}")
        del call, p
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
