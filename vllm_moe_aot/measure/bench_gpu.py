"""The GPU path of ``vllm-moe-aot bench``: every implementation of the layer timed in one run
(CUDA-graph replay medians), beside the floors measured in the same run."""

from __future__ import annotations

import statistics
from dataclasses import asdict

from vllm_moe_aot.measure.bench_report import (
    BenchReport,
    BenchRow,
    cell,
    floors,
    format_table,
    write_outputs,
)
from vllm_moe_aot.shapes import (
    TUNED_TOKEN_COUNTS,
    MoEShape,
    Scheme,
)

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
    peers, skipped = _lineup(args, dev, scheme, shape)
    report.skipped += skipped
    report.peers = {n: p.source for n, p in peers.items()}
    stock, report.stock_why = _stock_peer(args, scheme, peers)
    report.stock_provider = stock
    if stock is None and report.stock_why:
        report.notes.append(report.stock_why)
    print(f"peers: {', '.join(f'{n} ({p.source})' for n, p in peers.items()) or 'none'}; "
          f"stock = {stock or 'none'} ({report.stock_why})")
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
        rows = _gpu_rows_at(M, shape, scheme, dev, info, bw, peak, moe, peers, stock, avail,
                            variants_for(M), args.gate_rows, host=M in host_tokens)
        for row in rows:
            failures += row.gate == "FAIL" or bool(row.error)
            report.rows.append(row)
            print(f"  M={M:<7} {row.variant:<24} us={cell(row.us)} "
                  + " ".join(f"{n}={cell(u)}" for n, u in row.peer_us.items())
                  + f" floor={cell(row.floor_us)} {row.gate}"
                  + (f" {row.error}" if row.error else ""), flush=True)
    print()
    print(format_table(report))
    for s in report.skipped:
        print(f"skipped: {s}")
    write_outputs(report, args)
    return 1 if failures else 0


def _lineup(args, dev, scheme, shape=None):
    from vllm_moe_aot.measure.peers.lineup import PEER_NAMES, lineup

    names = tuple(PEER_NAMES) if "all" in args.peers else tuple(
        n for n in args.peers if n != "none")
    if args.stock not in ("auto", "none") and args.stock not in names:
        names += (args.stock,)
    if args.stock == "auto" and "vllm_triton" not in names:
        names += ("vllm_triton",)  # stands in where what vLLM would run cannot
    source = None if args.triton_source == "auto" else args.triton_source
    return lineup(dev, scheme, names, triton_source=source, shape=shape)


def _stock_peer(args, scheme, peers) -> tuple[str | None, str]:
    """(the peer that plays stock, why); stock is what vLLM would run unless --stock names
    another."""
    from vllm_moe_aot.measure.peers.lineup import vllm_would_run

    if args.stock == "none":
        return None, "--stock none"
    if args.stock != "auto":
        name, why = args.stock, "--stock"
    else:
        name, why = vllm_would_run(scheme)
    if name not in peers:
        if args.stock == "auto" and "vllm_triton" in peers:
            return "vllm_triton", (f"{name} would be stock ({why}) but does not run here; "
                                   "vllm_triton stands in")
        return None, f"{name} would be stock ({why}) but does not run here"
    return name, why


def _gpu_rows_at(M, shape, scheme, dev, info, bw, peak, moe, peers, stock, avail, variants,
                 gate_rows, host=False) -> list[BenchRow]:
    """Gate and time each peer and each (variant, label) of ``variants`` at M tokens; with
    ``host``, also the host time of one eager call of each."""
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
    refs: dict[tuple[bool, int], torch.Tensor] = {}

    def check(run_once, qa: bool, row: BenchRow, act_group: int = 0) -> None:
        if rows_idx is None:
            return
        y = run_once(outs[0].fill_(float("nan")))
        torch.cuda.synchronize()
        if (qa, act_group) not in refs:
            refs[(qa, act_group)] = problems[0].reference(qa, rows=rows_idx,
                                                          act_group=act_group)
        res = gate(y[rows_idx.to(dev)], refs[(qa, act_group)])
        row.err, row.gate = res.rel_fro, "pass" if res.passed else "FAIL"
        if not res.passed:
            row.error = res.reason

    peer_us: dict[str, float | None] = {}
    peer_host: dict[str, float | None] = {}
    peer_rows: dict[str, BenchRow] = {}
    for name, peer in peers.items():
        prow = peer_rows[name] = BenchRow(M=M, variant=name, label=name)
        peer_us[name] = None
        calls = []
        try:
            calls = [peer.bind(p) for p in problems]
            if peer.gated:  # peers quantise activations as vLLM does
                check(lambda o, c=calls[0]: o.copy_(c()), True, prow)
            if prow.gate != "FAIL":
                peer_us[name] = prow.us = time_graph(calls).us
            if host:
                peer_host[name] = host_time(calls[0])
        except Exception as exc:  # noqa: BLE001 - a failing peer is reported, not fatal
            prow.error = f"{name}: {type(exc).__name__}: {exc}"
        finally:
            del calls
            torch.cuda.empty_cache()
    whole = {n: u for n, u in peer_us.items() if u and peers[n].complete}
    best = min(whole, key=whole.get) if whole else None
    stock_us = peer_us.get(stock) if stock else None
    rows = []
    for v, label in variants:
        row = BenchRow(M=M, variant=v, label=label)
        if v == "stock":
            srow = peer_rows.get(stock) if stock else None
            if srow is None:
                row.error = "no stock peer"
            else:
                row.us, row.err, row.gate, row.error = srow.us, srow.err, srow.gate, srow.error
                row.host_us = peer_host.get(stock)
        elif moe is None or v not in avail:
            row.error = f"variant {v!r} not available"
        else:
            try:
                check(lambda o, v=v: moe.run(v, *problems[0].tensors(), o,
                                             **problems[0].run_kwargs()),
                      bool(moe.quantize_activations(v)), row, moe.act_group(v))
                row.us = time_graph([
                    (lambda p=p, o=o, v=v: moe.run(v, *p.tensors(), o, **p.run_kwargs()))
                    for p, o in zip(problems, outs, strict=True)]).us
                if host:
                    row.host_us = host_time(
                        lambda v=v, p=problems[0], o=outs[0]: moe.run(v, *p.tensors(), o,
                                                                      **p.run_kwargs()))
            except Exception as exc:  # noqa: BLE001
                row.error = f"{type(exc).__name__}: {exc}"
        row.peer_us, row.peer_host_us = dict(peer_us), dict(peer_host)
        row.stock_us, row.sets, row.experts = stock_us, sets, experts
        row.best_peer, row.best_peer_us = best, whole.get(best) if best else None
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
    for name, prow in peer_rows.items():  # keep a peer's failure visible
        if (prow.error or prow.gate == "FAIL") and not (name == stock and any(
                v == "stock" for v, _ in variants)):
            prow.peer_us = dict(peer_us)
            rows.append(prow)
    return rows
