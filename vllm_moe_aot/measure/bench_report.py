"""What ``vllm-moe-aot bench`` reports: the floors, one row per (M, implementation), the table
and the plot. Pure data and formatting; no GPU work."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vllm_moe_aot.shapes import (
    MoEShape,
)

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
    flops = shape.flops(M)
    byte_us = nbytes / bw * 1e6
    flop_us = flops / peak_flops * 1e6
    return Floors(experts, nbytes, flops, w_bytes / bw * 1e6, byte_us, flop_us,
                  max(byte_us, flop_us))


# ------------------------------------------------------------------------------ results

@dataclass
class BenchRow:
    M: int
    variant: str  # variant name, "stock" when the dispatch table picks stock, or a peer's name
    label: str  # what the plot calls the line
    us: float | None = None
    #: µs of each peer timed at this M (measure.peers.lineup.PEER_NAMES), None where it failed
    peer_us: dict[str, float | None] = field(default_factory=dict)
    stock_us: float | None = None  # the stock peer's (what vLLM would run): peer_us[stock]
    speedup: float | None = None  # over stock
    best_peer: str | None = None  # the fastest whole-layer peer at this M
    best_peer_us: float | None = None
    speedup_best: float | None = None  # over the best peer
    host_us: float | None = None  # host µs of one eager call (--host-tokens only)
    peer_host_us: dict[str, float | None] = field(default_factory=dict)
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
    #: the peer that stands for what vLLM would run for this layer, and why that one
    stock_provider: str | None = None
    stock_why: str = ""
    #: peer name -> what runs it (e.g. vllm_triton: "vllm_stock")
    peers: dict[str, str] = field(default_factory=dict)
    dispatch: list = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        d = asdict(self)
        d["rows"] = [asdict(r) for r in self.rows]
        return d


def cell(v, spec=".2f", none="-") -> str:
    return none if v is None else format(v, spec)


#: short column heads of the peers (table order)
PEER_HEADS = {"vllm_triton": "triton", "vllm_cutlass": "cutlass", "torch_grouped": "torch",
              "gemm_bound": "bound", "deepgemm_bound": "dgbound"}


def _x(v) -> str:
    return cell(v, ".2f") + ("x" if v else "")


def format_table(report: BenchReport) -> str:
    if report.mode == "gpu":
        names = [n for n in PEER_HEADS if n in report.peers]
        peer_head = "".join(f" {PEER_HEADS[n] + '_us':>10}" for n in names)
        head = (f"{'M':>7} {'variant':<24} {'us':>10}{peer_head} {'vs_stock':>8} "
                f"{'vs_best':>8} {'best':>7} {'floor_us':>9} {'t/F':>6} {'GB/s':>8} "
                f"{'TFLOPS':>7} {'experts':>7} {'err':>9} gate")
        lines = [f"stock = {report.stock_provider} ({report.stock_why})" if
                 report.stock_provider else "stock: none", head, "-" * len(head)]
        for r in report.rows:
            peers = "".join(f" {cell(r.peer_us.get(n)):>10}" for n in names)
            lines.append(
                f"{r.M:>7} {r.variant[:24]:<24} {cell(r.us):>10}{peers} {_x(r.speedup):>8} "
                f"{_x(r.speedup_best):>8} {PEER_HEADS.get(r.best_peer or '', '-'):>7} "
                f"{cell(r.floor_us):>9} "
                f"{cell(r.over_floor):>6} {cell(r.gbps, '.0f'):>8} {cell(r.tflops, '.1f'):>7} "
                f"{cell(r.experts, '.1f'):>7} {cell(r.err, '.2e'):>9} {r.gate}"
                + (f"  {r.error}" if r.error else ""))
        hosts = [r for r in report.rows if r.host_us or any(r.peer_host_us.values())]
        if hosts:
            lines += ["", "host µs of one eager call (CPU time in the call, GPU idle at entry):",
                      f"{'M':>7} {'variant':<24} {'ours':>9}"
                      + "".join(f" {PEER_HEADS[n]:>9}" for n in names)]
            for r in hosts:
                lines.append(f"{r.M:>7} {r.variant[:24]:<24} {cell(r.host_us, '.1f'):>9}"
                             + "".join(f" {cell(r.peer_host_us.get(n), '.1f'):>9}"
                                       for n in names))
        return "\n".join(lines)
    head = f"{'M':>4} {'variant':<32} {'gate':<5} {'rel_fro':>10} {'wall_s':>8}"
    lines = [head, "-" * len(head)]
    for r in report.rows:
        lines.append(f"{r.M:>4} {r.variant[:32]:<32} {r.gate:<5} {cell(r.err, '.3e'):>10} "
                     f"{cell(r.us and r.us / 1e6, '.2f'):>8}" + (f"  {r.error}" if r.error else ""))
    return "\n".join(lines)


def plot(report: BenchReport, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    by_label: dict[str, list[tuple[int, float]]] = {}
    peers: dict[str, dict[int, float]] = {}
    floor: dict[int, tuple[float, float, float]] = {}
    for r in report.rows:
        if r.us:
            by_label.setdefault(r.label, []).append((r.M, r.us))
        for n, us in r.peer_us.items():
            if us:
                peers.setdefault(n, {})[r.M] = us
        if r.floor_us:
            floor[r.M] = (r.floor_us, r.weight_floor_us, r.flop_floor_us)
    for label, pts in by_label.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
    styles = {"vllm_triton": ("s-", "gray"), "vllm_cutlass": ("D-", "tab:brown"),
              "torch_grouped": ("^-", "tab:olive"), "gemm_bound": ("v:", "tab:purple"),
              "deepgemm_bound": ("v:", "tab:pink")}
    for n, pts in peers.items():
        ms = sorted(pts)
        marker, color = styles.get(n, ("x-", "black"))
        tag = " = stock" if n == report.stock_provider else ""
        ax.plot(ms, [pts[m] for m in ms], marker, color=color, label=f"{n}{tag}")
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


def write_outputs(report: BenchReport, args) -> None:
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
