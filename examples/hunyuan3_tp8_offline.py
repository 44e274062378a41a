#!/usr/bin/env python3
"""Offline generation with a Hunyuan 3 (Hy3) FP8 checkpoint on 8 GPUs through the AOT MoE backend.

A Hy3 FP8 checkpoint with static per-tensor scales (``activation_scheme: static``) loads into
vLLM's ``Fp8MoEMethod``; its MoE layers are the ``hy3`` preset (E=192, K=4096, N=192 per rank
at TP8, top-8, ``fp8_per_tensor_static``), which the shipped configs are tuned for.

    python examples/hunyuan3_tp8_offline.py --model /path/to/Hy3-FP8
    python examples/hunyuan3_tp8_offline.py --model /path/to/Hy3-FP8 --compare

``--compare`` runs the same greedy prompts a second time without the backend (each run in its
own process: the plugin registers per process) and prints both timings and how closely the
outputs agree (FP8 kernels round differently, so long greedy continuations may part ways).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

PROMPTS = [
    "Explain mixture-of-experts models to a new engineer in three sentences.",
    "Write a Python function that merges two sorted lists.",
    "What limits the decode speed of a large language model on a GPU?",
    "Summarise the plot of Journey to the West in one paragraph.",
    "List five uses of FP8 arithmetic in deep learning.",
    "Translate to French: The experts are chosen per token by a router.",
    "Why does tensor parallelism need all-reduce operations?",
    "Give three tips for writing fast GPU kernels.",
]


def generate(args: argparse.Namespace, backend: bool, out_path: str) -> None:
    """One run, in this process: set the switch before vLLM starts, generate, dump JSON."""
    if backend:
        os.environ["VLLM_MOE_BACKEND"] = "asmjit_aot"
    else:
        os.environ.pop("VLLM_MOE_BACKEND", None)
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.model, tensor_parallel_size=args.tp, max_model_len=args.max_model_len,
              trust_remote_code=args.trust_remote_code, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    prompts = PROMPTS * args.repeat
    llm.generate(prompts[:2], params)  # warm-up (CUDA graphs, autotuning caches)
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - t0
    result = {
        "backend": "asmjit_aot" if backend else "stock",
        "seconds": elapsed,
        "output_tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
        "texts": [o.outputs[0].text for o in outputs],
        "token_ids": [list(o.outputs[0].token_ids) for o in outputs],
    }
    with open(out_path, "w") as f:
        json.dump(result, f)


def run_in_subprocess(args: argparse.Namespace, backend: bool, out_path: str) -> dict:
    cmd = [sys.executable, __file__, "--model", args.model, "--tp", str(args.tp),
           "--max-tokens", str(args.max_tokens), "--max-model-len", str(args.max_model_len),
           "--repeat", str(args.repeat), "--_run", "aot" if backend else "stock",
           "--_out", out_path]
    if args.trust_remote_code:
        cmd.append("--trust-remote-code")
    subprocess.run(cmd, check=True)
    with open(out_path) as f:
        return json.load(f)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True,
                   help="path or Hub id of a Hunyuan 3 FP8 checkpoint (static per-tensor scales)")
    p.add_argument("--tp", type=int, default=8, help="tensor parallel size (default 8)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--repeat", type=int, default=4, help="prompt list repetitions (batch size)")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--compare", action="store_true",
                   help="also run without the backend and compare")
    p.add_argument("--_run", choices=["aot", "stock"], help=argparse.SUPPRESS)
    p.add_argument("--_out", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args._run:
        generate(args, args._run == "aot", args._out)
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        runs = [run_in_subprocess(args, True, os.path.join(tmp, "aot.json"))]
        if args.compare:
            runs.append(run_in_subprocess(args, False, os.path.join(tmp, "stock.json")))

    for r in runs:
        print(f"{r['backend']:>10}: {r['output_tokens']} tokens in {r['seconds']:.2f} s "
              f"({r['output_tokens'] / r['seconds']:.1f} tok/s)")
    print("\n--- first output (asmjit_aot) ---\n" + runs[0]["texts"][0])
    if args.compare:
        aot, stock = runs
        same = sum(a == b for a, b in zip(aot["token_ids"], stock["token_ids"], strict=True))
        prefix = [common_prefix(a, b) for a, b in
                  zip(aot["token_ids"], stock["token_ids"], strict=True)]
        speedup = (aot["output_tokens"] / aot["seconds"]) / (
            stock["output_tokens"] / stock["seconds"])
        print(f"\nidentical greedy outputs: {same}/{len(prefix)}; mean common prefix "
              f"{sum(prefix) / len(prefix):.1f} tokens; speed-up x{speedup:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
