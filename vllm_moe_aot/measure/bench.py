"""``vllm-moe-aot bench``: the AOT pipeline against the stock path and the machine's floors.

Per token count ``M`` (GPU): the pipeline's µs (the variant the dispatch table picks, or each
variant asked for), the stock path's µs when a provider exists, and the floor

    F(M) = max(bytes / BW, FLOPs / P)
    bytes = experts touched x 3*N*K (fp8 w13 + w2) + 2*M*K (bf16 x) + 2*M*K (bf16 out)
    FLOPs = 2 * M * topk * 3*N*K  (x 1/ep under expert parallelism: the local share)

with BW (2 GiB device copy) and P (8192^3 fp8 ``_scaled_mm``) measured in the same run; then
time/F, achieved GB/s and TFLOPS, speedup over stock and the gate's error. Prints a table,
writes JSON (``--json``) and a log-log latency plot with the floors (``--plot``).

Without a GPU it still runs the pipeline, through the Triton interpreter on the layer's shape
with each dimension above the interpreter's caps cut to them (E<=8, K<=256, N<=64, topk<=4;
M in 1, 5, 33), checks each variant against the float64 reference with the gate, and says what
it scaled down and that GPU timing was skipped. (By default one
variant per regime; ``--variant all`` checks every compiled variant, which takes minutes.)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from vllm_moe_aot.measure.bench_report import (
    BenchReport,
    BenchRow,
    cell,
    format_table,
    write_outputs,
)
from vllm_moe_aot.shapes import (
    PRESETS,
    MoEShape,
    Scheme,
    unsupported_reason,
)

#: The CPU (interpreter) path's caps: a dimension of the layer above its cap runs at the cap (the
#: interpreter runs every Triton program in Python, some 10^4 times slower than a GPU); each cap
#: is a multiple of the supported granularity, so a supported shape stays supported.
CPU_LIMITS = dict(E=8, K=256, N=64, topk=4)
CPU_TOKENS = (1, 5, 33)


# ------------------------------------------------------------------------------ cli

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="model preset (per-rank shape at TP8, scheme)")
    p.add_argument("--tp", type=int, default=8, help="tensor parallel size (default 8)")
    p.add_argument("--ep", type=int, default=1,
                   help="expert-parallel ranks for --preset (vLLM's --enable-expert-parallel: "
                        "E/ep experts per rank at the full intermediate size; with --shape "
                        "give ep as its fifth number)")
    p.add_argument("--tokens", type=int, nargs="+", default=None,
                   help="token counts (default: 1, 2, 4, ..., 131072; CPU: 1 5 33)")
    p.add_argument("--shape", default=None,
                   help="E,K,N,topk[,ep] (per rank) instead of --preset")
    p.add_argument("--scheme", default=None,
                   help="fp8_ptpc | fp8_per_tensor[_static|_dynamic] (with --shape, or to "
                        "override the preset's)")
    p.add_argument("--variant", nargs="+", default=["auto"],
                   help="'auto' (dispatch table), 'all' (every compiled variant) or names")
    p.add_argument("--config-dir", default=None, help="tuned configs (default: the package's)")
    p.add_argument("--peers", nargs="+", default=["all"],
                   choices=["all", "none", "vllm_triton", "vllm_cutlass", "torch_grouped",
                            "gemm_bound", "deepgemm_bound"],
                   help="peers to time beside ours (default all: vLLM's Triton path, vLLM's "
                        "CUTLASS MoE, the torch grouped-GEMM pipeline, the two GEMMs alone on "
                        "torch or, for fp8_block, on DeepGEMM); "
                        "each one that cannot run here is listed as skipped with the reason")
    p.add_argument("--stock", default="auto",
                   choices=["auto", "none", "vllm_triton", "vllm_cutlass", "torch_grouped"],
                   help="the peer the speed-up over stock is measured against (default auto: "
                        "what vLLM itself would run for this layer)")
    p.add_argument("--triton-source", choices=["auto", "vllm", "vllm_stock"], default="auto",
                   help="where vLLM's Triton path comes from (auto: the real vLLM, else the "
                        "carried vllm_stock copy)")
    p.add_argument("--host-tokens", type=int, nargs="*", default=[1, 8192],
                   help="token counts at which to also measure the host time of one eager "
                        "call, ours and the peers' (default: 1 8192; none: skip)")
    p.add_argument("--gate-rows", type=int, default=256,
                   help="tokens checked against the float64 reference per M and variant "
                        "(0: no check)")
    p.add_argument("--json", default=None, help="write results as JSON here")
    p.add_argument("--plot", default=None, help="write a PNG latency plot here")
    p.add_argument("--cpu", action="store_true",
                   help="run the CPU (Triton interpreter) path even if a GPU is present")


def resolve_layer(args) -> tuple[MoEShape, Scheme, str]:
    """(shape, scheme, name) from --preset/--tp or --shape/--scheme; ValueError for a layer
    that :func:`~vllm_moe_aot.shapes.unsupported_reason` rejects."""
    from vllm_moe_aot.dispatch.configs import preset_shape

    if args.shape:
        if not args.scheme and not args.preset:
            raise ValueError("--shape needs --scheme")
        shape = MoEShape.parse(args.shape)
        scheme = Scheme.parse(args.scheme) if args.scheme else PRESETS[args.preset].scheme
        name, given = args.preset or "custom", f"--shape {args.shape}"
    else:
        if not args.preset:
            raise ValueError("give --preset or --shape E,K,N,topk with --scheme")
        preset = PRESETS[args.preset]
        scheme = Scheme.parse(args.scheme) if args.scheme else preset.scheme
        ep = getattr(args, "ep", 1) or 1
        shape = preset_shape(preset, args.tp, ep)
        par = f"tp{args.tp}" + (f" ep{ep}" if ep > 1 else "")
        name = f"{preset.name} {par}"
        given = f"--preset {preset.name} --tp {args.tp}" + (f" --ep {ep}" if ep > 1 else "")
    reason = unsupported_reason(shape, scheme)
    if reason:
        raise ValueError(f"{given} ({shape}, {scheme.value}) is not supported by the AOT "
                         f"pipeline: {reason}")
    return shape, scheme, name


def run(args: argparse.Namespace) -> int:
    try:
        shape, scheme, name = resolve_layer(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import torch

    if args.cpu or not torch.cuda.is_available():
        return run_cpu(args, shape, scheme, name)
    from vllm_moe_aot.measure.bench_gpu import run_gpu

    return run_gpu(args, shape, scheme, name)


# ------------------------------------------------------------------------------ CPU path

def _interpreter_ready() -> bool:
    """True if Triton kernels imported from now on (and any already imported) are
    interpreted; sets TRITON_INTERPRET=1 when nothing was decorated yet."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    compiled = []
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or not (mod_name == "kernels" or mod_name.startswith("kernels.")):
            continue
        for obj in vars(mod).values():
            cls = type(obj).__name__
            if cls in ("JITFunction", "Autotuner", "Heuristics"):
                compiled.append(f"{mod_name}.{getattr(obj, '__name__', '?')}")
    if compiled:
        return False
    os.environ["TRITON_INTERPRET"] = "1"
    return True


def _argv_from_args(args) -> list[str]:
    argv = ["bench"]
    for flag, val in (("--preset", args.preset), ("--tp", args.tp), ("--shape", args.shape),
                      ("--scheme", args.scheme), ("--config-dir", args.config_dir),
                      ("--stock", args.stock), ("--triton-source", args.triton_source),
                      ("--gate-rows", args.gate_rows),
                      ("--json", args.json), ("--plot", args.plot)):
        if val is not None:
            argv += [flag, str(val)]
    if args.tokens:
        argv += ["--tokens", *map(str, args.tokens)]
    argv += ["--peers", *args.peers, "--variant", *args.variant, "--cpu"]
    return argv


def cpu_shape(shape: MoEShape) -> MoEShape:
    """The shape the CPU path runs: ``shape`` with each dimension above its cap in
    :data:`CPU_LIMITS` cut to the cap (and topk to at most E); a shape within the caps runs
    unchanged."""
    E = min(shape.E, CPU_LIMITS["E"])
    return MoEShape(E=E, K=min(shape.K, CPU_LIMITS["K"]), N=min(shape.N, CPU_LIMITS["N"]),
                    topk=min(shape.topk, CPU_LIMITS["topk"], E))


def scaled_down(shape: MoEShape, small: MoEShape) -> list[str]:
    """``["E 512->8", ...]``: the dimensions :func:`cpu_shape` changed."""
    return [f"{d} {getattr(shape, d)}->{getattr(small, d)}" for d in ("E", "K", "N", "topk")
            if getattr(shape, d) != getattr(small, d)]


def _interpreter_missing() -> str | None:
    """What the CPU path lacks to run the kernels' Triton sources, or None: triton itself, and
    the ``kernels`` package (shipped in the wheel; in a checkout, its root)."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return ("the CPU path runs the kernels' Triton sources in Triton's interpreter and "
                "needs triton 3.8, which is not installed: pip install 'triton~=3.8.0' (or "
                "install vllm-moe-aot with its [cpu-demo] extra)")
    checkout = Path(__file__).resolve().parents[2] / "kernels" / "__init__.py"
    if importlib.util.find_spec("kernels") is None and not checkout.is_file():
        return ("the CPU path needs the kernels' Triton sources (the `kernels` package, which "
                "the wheel ships beside vllm_moe_aot) and cannot import them: reinstall from "
                "a wheel built from the repository (python -m build --wheel) or run from the "
                "checkout")
    return None


def representatives(moe) -> list[str]:
    """One variant per regime (the last listed of each), for the CPU path's default: the
    interpreter is slow, and variants of one regime share their kernels' code."""
    regime = getattr(moe, "regime", None)
    picked: dict[str, str] = {}
    for v in moe.variants:
        picked[regime(v) if regime else v] = v
    return list(picked.values())


def run_cpu(args, shape: MoEShape, scheme: Scheme, name: str, moe_factory=None) -> int:
    missing = _interpreter_missing() if moe_factory is None else None
    if missing:
        print(f"vllm-moe-aot bench: {name} {shape} {scheme.value}")
        print(f"error: {missing}")
        _print_skipped(["the CPU (interpreter) check of the pipeline (see the error above)",
                        "GPU timing (no GPU)" if not args.cpu else "GPU timing (--cpu)"])
        return 1
    if moe_factory is None and not _interpreter_ready():
        print("note: Triton kernels were imported before TRITON_INTERPRET=1 was set; "
              "re-running bench in a fresh process with it set", flush=True)
        env = dict(os.environ, TRITON_INTERPRET="1")
        return subprocess.call([sys.executable, "-m", "vllm_moe_aot.cli",
                                *_argv_from_args(args)], env=env)
    import torch

    from vllm_moe_aot.measure.reference import gate
    from vllm_moe_aot.measure.workload import make_problem

    small = cpu_shape(shape)
    tokens = tuple(args.tokens) if args.tokens else CPU_TOKENS
    reason = "--cpu was given" if args.cpu else "no GPU is present (torch.cuda.is_available() " \
                                                "is False)"
    scaled = scaled_down(shape, small)
    print(f"vllm-moe-aot bench: {name} {shape} {scheme.value}")
    print(f"CPU path ({reason}): running the pipeline through the Triton interpreter on "
          + (f"the scaled-down shape {small} ({', '.join(scaled)}: the interpreter's caps "
             f"are {', '.join(f'{k}<={v}' for k, v in CPU_LIMITS.items())})" if scaled else
             f"the given shape {small} (within the interpreter's caps, not scaled down)")
          + f", scheme {scheme.value}, M in {', '.join(map(str, tokens))}, against the float64 "
          "reference with the correctness gate")
    big = [m for m in tokens if m > 256]
    if big:
        print(f"warning: the interpreter is slow; M={big} may take a long time")
    report = BenchReport(mode="cpu-interpreter",
                         layer={"name": name, "shape": asdict(shape), "scheme": scheme.value,
                                "cpu_shape": asdict(small), "cpu_scaled_down": scaled,
                                "tp": args.tp})
    skipped = [
        "GPU timing of the AOT pipeline (no GPU)" if not args.cpu else "GPU timing (--cpu)",
        "peer timing (vllm_triton, vllm_cutlass, torch_grouped, gemm_bound, deepgemm_bound: "
        "GPU only)",
        "host time of one eager call (--host-tokens; needs the GPU path)",
        "HBM bandwidth and fp8 FLOP/s measurement, floors, GB/s, TFLOPS",
        "dispatch table (needs the GPU's name and arch); every compiled variant is checked",
    ]
    report.skipped = skipped
    if moe_factory is None:
        def moe_factory(shape_, scheme_, device_, max_tokens):
            from vllm_moe_aot.pipeline import FusedMoE

            return FusedMoE(shape_, scheme_, device_, max_tokens=max_tokens)
    device = torch.device("cpu")
    try:
        moe = moe_factory(small, scheme, device, max(tokens))
        all_variants = list(moe.variants)
    except Exception as exc:  # noqa: BLE001 - report, do not crash
        msg = f"cannot build the pipeline on CPU: {type(exc).__name__}: {exc}"
        print(f"error: {msg}")
        report.notes.append(msg)
        _print_skipped(skipped)
        write_outputs(report, args)
        return 1
    wanted = [v for v in args.variant if v not in ("auto", "all")]
    unknown = [v for v in wanted if v not in all_variants and v != "stock"]
    for v in unknown:
        print(f"warning: variant {v!r} is not compiled for this layer; available: "
              f"{', '.join(all_variants)}")
    if wanted:
        variants = [v for v in wanted if v in all_variants]
    elif "all" in args.variant:
        variants = all_variants
    else:
        variants = representatives(moe)
        print(f"checking one variant per regime ({', '.join(variants)}); --variant all checks "
              f"all {len(all_variants)}")
    failures = 0
    for M in tokens:
        problem = make_problem(small, scheme, M, device, seed=1000 + M)
        refs: dict[tuple[bool, int], torch.Tensor] = {}
        for v in variants:
            row = BenchRow(M=M, variant=v, label=v)
            sem = (bool(moe.quantize_activations(v)), moe.act_group(v))
            out = problem.new_out().fill_(float("nan"))
            t0 = time.perf_counter()
            try:
                moe.run(v, *problem.tensors(), out, **problem.run_kwargs())
                row.us = (time.perf_counter() - t0) * 1e6
                if sem not in refs:
                    refs[sem] = problem.reference(sem[0], act_group=sem[1])
                g = gate(out, refs[sem])
                row.err, row.gate = g.rel_fro, "pass" if g.passed else "FAIL"
                if not g.passed:
                    row.error = g.reason
            except Exception as exc:  # noqa: BLE001
                row.gate, row.error = "ERROR", f"{type(exc).__name__}: {exc}"
            failures += row.gate != "pass"
            report.rows.append(row)
            print(f"  M={M:<3} {v:<32} {row.gate:<5} rel_fro={cell(row.err, '.3e')}"
                  + (f"  {row.error}" if row.error else ""), flush=True)
    print()
    print(format_table(report))
    _print_skipped(skipped)
    write_outputs(report, args)
    if not variants:
        print("error: no variant to run")
        return 1
    if failures:
        print(f"error: {failures} variant run(s) failed the gate")
        return 1
    print(f"all {len(report.rows)} variant run(s) passed the gate")
    return 0


def _print_skipped(skipped: Sequence[str]) -> None:
    print("SKIPPED (no GPU timing was done):")
    for s in skipped:
        print(f"  - {s}")
