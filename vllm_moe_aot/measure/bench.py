"""``vllm-moe-aot bench``: the AOT pipeline against the stock path and the machine's floors.

Per token count ``M`` (GPU): the pipeline's µs (the variant the dispatch table picks, or each
variant asked for), the stock path's µs when a provider exists, and the floor

    F(M) = max(bytes / BW, FLOPs / P)
    bytes = experts touched x 3*N*K (fp8 w13 + w2) + 2*M*K (bf16 x) + 2*M*K (bf16 out)
    FLOPs = 2 * M * topk * 3*N*K

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
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vllm_moe_aot.shapes import (
    PRESETS,
    TUNED_TOKEN_COUNTS,
    MoEShape,
    Scheme,
    unsupported_reason,
)

#: The CPU (interpreter) path's caps: a dimension of the layer above its cap runs at the cap (the
#: interpreter runs every Triton program in Python, some 10^4 times slower than a GPU); each cap
#: is a multiple of the supported granularity, so a supported shape stays supported.
CPU_LIMITS = dict(E=8, K=256, N=64, topk=4)
CPU_TOKENS = (1, 5, 33)


# ------------------------------------------------------------------------------ floors

@dataclass(frozen=True)
class Floors:
    experts: float
    bytes: float
    flops: float
    weight_floor_us: float  # touched experts' weights only
    byte_floor_us: float  # weights + x + out
    flop_floor_us: float
    floor_us: float  # max(byte_floor_us, flop_floor_us)


def floors(shape: MoEShape, M: int, experts: float, bw: float, peak_flops: float) -> Floors:
    """The floors at ``M`` tokens with ``experts`` distinct experts touched, for a machine
    copying ``bw`` bytes/s and doing ``peak_flops`` fp8 FLOP/s."""
    w_bytes = experts * 3.0 * shape.N * shape.K
    nbytes = w_bytes + 2.0 * M * shape.K + 2.0 * M * shape.K
    flops = 2.0 * M * shape.topk * 3.0 * shape.N * shape.K
    byte_us = nbytes / bw * 1e6
    flop_us = flops / peak_flops * 1e6
    return Floors(experts, nbytes, flops, w_bytes / bw * 1e6, byte_us, flop_us,
                  max(byte_us, flop_us))


# ------------------------------------------------------------------------------ results

@dataclass
class BenchRow:
    M: int
    variant: str  # variant name, or "stock" when the dispatch table picks stock
    label: str  # what the plot calls the line
    us: float | None = None
    stock_us: float | None = None
    speedup: float | None = None  # over stock
    torch_us: float | None = None  # the torch grouped-GEMM peer (measure.peers.torch_grouped)
    best_peer: str | None = None  # the faster of stock and torch at this M
    best_peer_us: float | None = None
    speedup_best: float | None = None  # over the best peer
    host_us: float | None = None  # host µs of one eager call (--host-tokens only)
    stock_host_us: float | None = None
    torch_host_us: float | None = None
    floor_us: float | None = None
    weight_floor_us: float | None = None
    flop_floor_us: float | None = None
    over_floor: float | None = None
    gbps: float | None = None
    tflops: float | None = None
    experts: float | None = None
    err: float | None = None
    gate: str = ""
    sets: int | None = None
    error: str = ""


@dataclass
class BenchReport:
    mode: str  # "gpu" | "cpu-interpreter"
    layer: dict
    rows: list[BenchRow] = field(default_factory=list)
    device: dict = field(default_factory=dict)
    bw_bytes_per_s: float | None = None
    fp8_flops_per_s: float | None = None
    stock_provider: str | None = None
    torch_peer: str | None = None
    dispatch: list = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        d = asdict(self)
        d["rows"] = [asdict(r) for r in self.rows]
        return d


def _f(v, spec=".2f", none="-") -> str:
    return none if v is None else format(v, spec)


def format_table(report: BenchReport) -> str:
    if report.mode == "gpu":
        head = (f"{'M':>7} {'variant':<24} {'us':>10} {'stock_us':>10} {'torch_us':>10} "
                f"{'vs_stock':>8} {'vs_best':>8} {'floor_us':>9} {'t/F':>6} {'GB/s':>8} "
                f"{'TFLOPS':>7} {'experts':>7} {'err':>9} gate")
        lines = [head, "-" * len(head)]
        for r in report.rows:
            lines.append(
                f"{r.M:>7} {r.variant[:24]:<24} {_f(r.us):>10} {_f(r.stock_us):>10} "
                f"{_f(r.torch_us):>10} "
                f"{_f(r.speedup, '.2f') + ('x' if r.speedup else ''):>8} "
                f"{_f(r.speedup_best, '.2f') + ('x' if r.speedup_best else ''):>8} "
                f"{_f(r.floor_us):>9} "
                f"{_f(r.over_floor):>6} {_f(r.gbps, '.0f'):>8} {_f(r.tflops, '.1f'):>7} "
                f"{_f(r.experts, '.1f'):>7} {_f(r.err, '.2e'):>9} {r.gate}"
                + (f"  {r.error}" if r.error else ""))
        hosts = [r for r in report.rows if r.host_us or r.stock_host_us or r.torch_host_us]
        if hosts:
            lines += ["", "host µs of one eager call (CPU time in the call, GPU idle at entry):",
                      f"{'M':>7} {'variant':<24} {'ours':>9} {'stock':>9} {'torch':>9}"]
            for r in hosts:
                lines.append(f"{r.M:>7} {r.variant[:24]:<24} {_f(r.host_us, '.1f'):>9} "
                             f"{_f(r.stock_host_us, '.1f'):>9} {_f(r.torch_host_us, '.1f'):>9}")
        return "\n".join(lines)
    head = f"{'M':>4} {'variant':<32} {'gate':<5} {'rel_fro':>10} {'wall_s':>8}"
    lines = [head, "-" * len(head)]
    for r in report.rows:
        lines.append(f"{r.M:>4} {r.variant[:32]:<32} {r.gate:<5} {_f(r.err, '.3e'):>10} "
                     f"{_f(r.us and r.us / 1e6, '.2f'):>8}" + (f"  {r.error}" if r.error else ""))
    return "\n".join(lines)


# ------------------------------------------------------------------------------ cli

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="model preset (per-rank shape at TP8, scheme)")
    p.add_argument("--tp", type=int, default=8, help="tensor parallel size (default 8)")
    p.add_argument("--tokens", type=int, nargs="+", default=None,
                   help="token counts (default: 1, 2, 4, ..., 131072; CPU: 1 5 33)")
    p.add_argument("--shape", default=None, help="E,K,N,topk (per rank) instead of --preset")
    p.add_argument("--scheme", default=None,
                   help="fp8_ptpc | fp8_per_tensor[_static|_dynamic] (with --shape, or to "
                        "override the preset's)")
    p.add_argument("--variant", nargs="+", default=["auto"],
                   help="'auto' (dispatch table), 'all' (every compiled variant) or names")
    p.add_argument("--config-dir", default=None, help="tuned configs (default: the package's)")
    p.add_argument("--stock", choices=["auto", "vllm", "vllm_stock", "none"], default="auto")
    p.add_argument("--torch-peer", choices=["auto", "none"], default="auto",
                   help="also time the torch grouped-GEMM pipeline (torch._scaled_grouped_mm; "
                        "'auto': where torch has it for this GPU)")
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
        shape = preset_shape(preset, args.tp)
        name, given = f"{preset.name} tp{args.tp}", f"--preset {preset.name} --tp {args.tp}"
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
    return run_gpu(args, shape, scheme, name)


def _write_outputs(report: BenchReport, args) -> None:
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report.to_json(), f, indent=2)
        print(f"wrote {args.json}")
    if args.plot:
        if report.mode != "gpu":
            print(f"plot skipped ({args.plot}): no GPU timings to plot")
        else:
            try:
                plot(report, args.plot)
                print(f"wrote {args.plot}")
            except ImportError as exc:
                print(f"plot skipped: matplotlib is not installed ({exc})")


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
                      ("--stock", args.stock), ("--torch-peer", args.torch_peer),
                      ("--gate-rows", args.gate_rows),
                      ("--json", args.json), ("--plot", args.plot)):
        if val is not None:
            argv += [flag, str(val)]
    if args.tokens:
        argv += ["--tokens", *map(str, args.tokens)]
    argv += ["--variant", *args.variant, "--cpu"]
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
        "stock path timing (runs on a GPU only)",
        "torch grouped-GEMM peer timing (torch._scaled_grouped_mm runs on sm_90 GPUs only)",
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
        _write_outputs(report, args)
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
        refs: dict[bool, torch.Tensor] = {}
        for v in variants:
            row = BenchRow(M=M, variant=v, label=v)
            qa = bool(moe.quantize_activations(v))
            out = problem.new_out().fill_(float("nan"))
            t0 = time.perf_counter()
            try:
                moe.run(v, *problem.tensors(), out, **problem.act_scales())
                row.us = (time.perf_counter() - t0) * 1e6
                if qa not in refs:
                    refs[qa] = problem.reference(qa)
                g = gate(out, refs[qa])
                row.err, row.gate = g.rel_fro, "pass" if g.passed else "FAIL"
                if not g.passed:
                    row.error = g.reason
            except Exception as exc:  # noqa: BLE001
                row.gate, row.error = "ERROR", f"{type(exc).__name__}: {exc}"
            failures += row.gate != "pass"
            report.rows.append(row)
            print(f"  M={M:<3} {v:<32} {row.gate:<5} rel_fro={_f(row.err, '.3e')}"
                  + (f"  {row.error}" if row.error else ""), flush=True)
    print()
    print(format_table(report))
    _print_skipped(skipped)
    _write_outputs(report, args)
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


# ------------------------------------------------------------------------------ GPU path

def run_gpu(args, shape: MoEShape, scheme: Scheme, name: str) -> int:
    import torch

    from vllm_moe_aot.dispatch.configs import DispatchTable
    from vllm_moe_aot.measure.timing import (
        device_info,
        measure_fp8_flops,
        measure_hbm_bandwidth,
        require_gpu,
    )

    dev = require_gpu("vllm-moe-aot bench")
    info = device_info(dev)
    tokens = tuple(args.tokens) if args.tokens else TUNED_TOKEN_COUNTS
    print(f"vllm-moe-aot bench: {name} {shape} {scheme.value} on {info.name} ({info.arch}, "
          f"{info.cu_num} CUs)")
    bw = measure_hbm_bandwidth()
    peak = measure_fp8_flops()
    print(f"measured: HBM copy {bw / 1e12:.2f} TB/s, fp8 GEMM {peak / 1e12:.0f} TFLOP/s")
    report = BenchReport(mode="gpu", layer={"name": name, "shape": asdict(shape),
                                            "scheme": scheme.value, "tp": args.tp},
                         device=asdict(info), bw_bytes_per_s=bw, fp8_flops_per_s=peak)
    moe = None
    try:
        from vllm_moe_aot.pipeline import FusedMoE

        moe = FusedMoE(shape, scheme, dev, max_tokens=max(tokens))
    except Exception as exc:  # noqa: BLE001
        report.notes.append(f"AOT pipeline unavailable: {type(exc).__name__}: {exc}")
        print(f"warning: {report.notes[-1]}")
    stock = None
    if args.stock != "none":
        from vllm_moe_aot.measure.peers.vllm_triton import describe_probe, get_stock_provider

        stock = get_stock_provider(dev, prefer=None if args.stock == "auto" else args.stock)
        if stock is None:
            report.skipped.append(f"stock timing: no provider ({describe_probe()})")
    report.stock_provider = stock.name if stock else None
    peer = None
    if args.torch_peer != "none":
        if hasattr(torch, "_scaled_grouped_mm") and info.arch.startswith("sm_90"):
            from vllm_moe_aot.measure.peers.torch_grouped import TorchGroupedMoE

            peer = TorchGroupedMoE(scheme)
        else:
            report.skipped.append(f"torch grouped-GEMM peer: torch._scaled_grouped_mm serves "
                                  f"sm_90 only (this GPU: {info.arch})")
    report.torch_peer = peer.name if peer else None
    host_tokens = set(args.host_tokens or ())
    table = DispatchTable.for_layer(shape, scheme, info.name, info.arch, args.config_dir)
    report.dispatch = table.describe()
    if "auto" in args.variant and table.is_empty:
        report.notes.append("no tuned config for this GPU and layer: 'auto' runs stock; "
                            "use --variant all or tune first")
        print(f"note: {report.notes[-1]}")
    avail = list(moe.variants) if moe is not None else []

    def variants_for(M: int) -> list[tuple[str, str]]:
        """(variant, plot label) pairs to run at M."""
        out: dict[str, str] = {}
        for v in args.variant:
            if v == "auto":
                out.setdefault(table.choose(M), "aot (dispatch)")
            elif v == "all":
                for a in avail:
                    out.setdefault(a, f"aot {a}")
            else:
                out.setdefault(v, f"aot {v}" if v != "stock" else "stock (asked)")
        return list(out.items())

    failures = 0
    for M in tokens:
        torch.cuda.empty_cache()
        rows = _gpu_rows_at(M, shape, scheme, dev, info, bw, peak, moe, stock, avail,
                            variants_for(M), args.gate_rows, peer=peer,
                            host=M in host_tokens)
        for row in rows:
            failures += row.gate == "FAIL" or bool(row.error)
            report.rows.append(row)
            print(f"  M={M:<7} {row.variant:<24} us={_f(row.us)} stock={_f(row.stock_us)} "
                  f"torch={_f(row.torch_us)} floor={_f(row.floor_us)} {row.gate}"
                  + (f" {row.error}" if row.error else ""), flush=True)
    print()
    print(format_table(report))
    for s in report.skipped:
        print(f"skipped: {s}")
    _write_outputs(report, args)
    return 1 if failures else 0


def _gpu_rows_at(M, shape, scheme, dev, info, bw, peak, moe, stock, avail, variants,
                 gate_rows, peer=None, host=False) -> list[BenchRow]:
    """Gate and time stock, the torch peer and each (variant, label) of ``variants`` at M
    tokens; with ``host``, also the host time of one eager call of each."""
    import torch

    from vllm_moe_aot.measure.reference import gate
    from vllm_moe_aot.measure.timing import host_time, time_graph
    from vllm_moe_aot.measure.workload import make_problems, rotation_count

    sets = rotation_count(shape, M, info.l2_bytes, torch.cuda.mem_get_info(dev)[0])
    problems = make_problems(shape, scheme, M, sets, dev, seed=4242 + M)
    outs = [p.new_out() for p in problems]
    experts = statistics.mean(p.experts_touched() for p in problems)
    fl = floors(shape, M, experts, bw, peak)
    rows_idx = None
    if gate_rows > 0:
        g = torch.Generator().manual_seed(M)
        rows_idx = torch.randperm(M, generator=g)[:gate_rows].sort().values
    refs: dict[bool, torch.Tensor] = {}

    def check(run_once, qa: bool, row: BenchRow) -> None:
        if rows_idx is None:
            return
        y = run_once(outs[0].fill_(float("nan")))
        torch.cuda.synchronize()
        if qa not in refs:
            refs[qa] = problems[0].reference(qa, rows=rows_idx)
        res = gate(y[rows_idx.to(dev)], refs[qa])
        row.err, row.gate = res.rel_fro, "pass" if res.passed else "FAIL"
        if not res.passed:
            row.error = res.reason

    stock_us = None
    stock_row = BenchRow(M=M, variant="stock", label="stock")
    if stock is not None:
        try:
            check(lambda o: stock(problems[0], out=o), True, stock_row)
            stock_us = time_graph([(lambda p=p: stock(p)) for p in problems]).us
        except Exception as exc:  # noqa: BLE001
            stock_row.error = f"stock: {type(exc).__name__}: {exc}"
    torch_us = torch_host = stock_host = None
    torch_row = BenchRow(M=M, variant="torch_grouped", label="torch grouped-GEMM")
    if peer is not None:
        try:
            calls = [peer.bind(p) for p in problems]
            check(lambda o: o.copy_(calls[0]()), True, torch_row)
            torch_us = time_graph(calls).us
            if host:
                torch_host = host_time(calls[0])
        except Exception as exc:  # noqa: BLE001
            torch_row.error = f"torch peer: {type(exc).__name__}: {exc}"
        finally:
            calls = []
            torch.cuda.empty_cache()
    if host and stock is not None and stock_us is not None:
        stock_host = host_time(lambda: stock(problems[0]))
    peers = {k: v for k, v in (("stock", stock_us), ("torch", torch_us)) if v}
    best = min(peers, key=peers.get) if peers else None
    rows = []
    for v, label in variants:
        row = BenchRow(M=M, variant=v, label=label)
        if v == "stock":
            row.us, row.err, row.gate, row.error = (stock_us, stock_row.err, stock_row.gate,
                                                    stock_row.error or
                                                    ("" if stock else "no stock provider"))
        elif moe is None or v not in avail:
            row.error = f"variant {v!r} not available"
        else:
            try:
                check(lambda o, v=v: moe.run(v, *problems[0].tensors(), o,
                                             **problems[0].act_scales()),
                      bool(moe.quantize_activations(v)), row)
                row.us = time_graph([
                    (lambda p=p, o=o, v=v: moe.run(v, *p.tensors(), o, **p.act_scales()))
                    for p, o in zip(problems, outs, strict=True)]).us
                if host:
                    row.host_us = host_time(
                        lambda v=v, p=problems[0], o=outs[0]: moe.run(v, *p.tensors(), o,
                                                                      **p.act_scales()))
            except Exception as exc:  # noqa: BLE001
                row.error = f"{type(exc).__name__}: {exc}"
        row.stock_us, row.sets, row.experts = stock_us, sets, experts
        row.torch_us, row.best_peer = torch_us, best
        row.best_peer_us = peers.get(best) if best else None
        if host:
            if v == "stock":
                row.host_us = stock_host
            row.stock_host_us, row.torch_host_us = stock_host, torch_host
        row.floor_us, row.weight_floor_us, row.flop_floor_us = (
            fl.floor_us, fl.weight_floor_us, fl.flop_floor_us)
        if row.us:
            row.over_floor = row.us / fl.floor_us
            row.gbps = fl.bytes / (row.us * 1e-6) / 1e9
            row.tflops = fl.flops / (row.us * 1e-6) / 1e12
            if stock_us:
                row.speedup = stock_us / row.us
            if row.best_peer_us:
                row.speedup_best = row.best_peer_us / row.us
        rows.append(row)
    if stock is not None and stock_row.error and not any(v == "stock" for v, _ in variants):
        rows.append(stock_row)  # keep the stock failure visible
    if peer is not None and (torch_row.error or torch_row.gate == "FAIL"):
        rows.append(torch_row)
    return rows


def plot(report: BenchReport, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    by_label: dict[str, list[tuple[int, float]]] = {}
    stock: dict[int, float] = {}
    peer: dict[int, float] = {}
    floor: dict[int, tuple[float, float, float]] = {}
    for r in report.rows:
        if r.us:
            by_label.setdefault(r.label, []).append((r.M, r.us))
        if r.stock_us:
            stock[r.M] = r.stock_us
        if r.torch_us:
            peer[r.M] = r.torch_us
        if r.floor_us:
            floor[r.M] = (r.floor_us, r.weight_floor_us, r.flop_floor_us)
    for label, pts in by_label.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
    if stock:
        ms = sorted(stock)
        ax.plot(ms, [stock[m] for m in ms], "s-", color="gray",
                label=f"stock ({report.stock_provider})")
    if peer:
        ms = sorted(peer)
        ax.plot(ms, [peer[m] for m in ms], "^-", color="tab:olive",
                label="torch grouped-GEMM (_scaled_grouped_mm)")
    if floor:
        ms = sorted(floor)
        ax.plot(ms, [floor[m][0] for m in ms], "k--", label="floor max(bytes/BW, FLOPs/P)")
        ax.plot(ms, [floor[m][1] for m in ms], ":", color="tab:blue", label="weight bytes / BW")
        ax.plot(ms, [floor[m][2] for m in ms], ":", color="tab:red", label="FLOPs / P")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens M")
    ax.set_ylabel("µs per layer")
    lay = report.layer
    dev = report.device.get("name", "")
    bw = report.bw_bytes_per_s or math.nan
    pk = report.fp8_flops_per_s or math.nan
    ax.set_title(f"{lay['name']} {lay['scheme']} on {dev}\n"
                 f"BW {bw / 1e12:.2f} TB/s, P {pk / 1e12:.0f} TFLOP/s")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
