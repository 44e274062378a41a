"""``vllm-moe-aot tune``: arguments, ``--model`` (a Hugging Face config -> untuned rows), and the
run over an untuned CSV; the selection logic is :mod:`vllm_moe_aot.measure.tuner`."""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from vllm_moe_aot.dispatch.configs import (
    ConfigIssue,
    RowKey,
    TunedRow,
    read_tuned,
    read_untuned,
    write_tuned,
)
from vllm_moe_aot.measure.tune_backend import LayerBackend, TuneBackend
from vllm_moe_aot.measure.tuner import MIN_GAIN, TuneLog, format_summary, tool_version, tune_keys
from vllm_moe_aot.shapes import Scheme

# ------------------------------------------------------------------------------ cli

def add_arguments(p: argparse.ArgumentParser) -> None:
    from vllm_moe_aot.integration import CONFIG_DIR_ENV  # vLLM-free constant

    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("-i", "--input", help="untuned CSV (shapes x token counts)")
    src.add_argument("--model", metavar="PATH",
                     help="a Hugging Face config.json, or a checkpoint folder holding one: "
                          "derive the per-rank MoE layer, write <config-dir>/<model>_<scheme>_"
                          "tp<T>[_ep<E>].untuned.csv (all tuned token counts) and tune it")
    p.add_argument("-o", "--output", default=None,
                   help="tuned CSV to write/update (required with -i; with --model default "
                        "<config-dir>/<model>_<scheme>_tp<T>[_ep<E>].tuned.csv)")
    p.add_argument("--tp", type=int, default=None,
                   help="with --model (required): the tensor-parallel size vLLM serves with; "
                        "without --ep each rank holds all experts, intermediate / T each")
    p.add_argument("--ep", type=int, default=1,
                   help="with --model: vLLM's expert-parallel size (--enable-expert-parallel: "
                        "EP = TP x DP); each rank then holds experts / EP experts at the full "
                        "intermediate size (vLLM's standard-format EP layers use these "
                        "rows)")
    p.add_argument("--scheme", choices=["fp8_ptpc", "fp8_per_tensor", "fp8_block"], default=None,
                   help="with --model: scheme family to tune (default: the checkpoint's "
                        "quantization_config when it names one of these, else fp8_ptpc)")
    p.add_argument("--config-dir", default=None, metavar="DIR",
                   help=f"with --model: user config folder to write into (default "
                        f"${CONFIG_DIR_ENV} if set, else ./{DEFAULT_USER_CONFIG_DIR}); "
                        f"serve with {CONFIG_DIR_ENV}=DIR so that vLLM dispatches from it")
    p.add_argument("--name", default=None,
                   help="with --model: model name in the file names (default: the config's "
                        "_name_or_path or the folder name, lower-cased)")
    p.add_argument("--e2e", action="store_true", default=True,
                   help="time each candidate as the whole layer (bf16 x + routing -> bf16 "
                        "out); always on, the only mode")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds per candidate and row, gate + timing (default 300)")
    p.add_argument("--tokens", type=int, nargs="+", default=None,
                   help="only tune these token counts")
    p.add_argument("--variants", nargs="+", default=None,
                   help="only these candidates (variant names; 'stock' for the stock path)")
    p.add_argument("--force", action="store_true",
                   help="retune rows already tuned for this GPU")
    p.add_argument("--gate-rows", type=int, default=256,
                   help="tokens compared with the float64 reference per gate (default 256)")
    p.add_argument("--stock", default="auto",
                   choices=["auto", "none", "vllm_triton", "vllm_cutlass", "torch_grouped"],
                   help="the peer a variant must beat to win a row, recorded in the row's "
                        "stock_provider (default auto: what vLLM itself would run for the "
                        "row's scheme on this machine, e.g. vllm_cutlass for ptpc on Hopper)")
    p.add_argument("--triton-source", choices=["auto", "vllm", "vllm_stock"], default="auto",
                   help="where vLLM's Triton path comes from (auto: the real vLLM, else the "
                        "carried vllm_stock copy)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--min-gain", type=float, default=MIN_GAIN,
                   help=f"lead over stock an AOT variant needs to win a row (fraction, default "
                        f"{MIN_GAIN}): smaller leads are within run-to-run spread")


def _stock_for(args, dev):
    """A function scheme -> the stock peer for rows of that scheme (None where it cannot run
    here: the row is tuned over AOT variants only, and a note says why)."""
    from vllm_moe_aot.measure.peers.lineup import lineup, vllm_would_run

    source = None if args.triton_source == "auto" else args.triton_source

    def stock_for(scheme):
        name, why = (args.stock, "--stock") if args.stock != "auto" else vllm_would_run(scheme)
        peers, skipped = lineup(dev, scheme, (name,), triton_source=source)
        if name not in peers and args.stock == "auto" and name != "vllm_triton":
            # what vLLM would run cannot run here (e.g. the CUTLASS library is not built):
            # its Triton path stands in, and the rows say so in stock_provider
            print(f"note: {name} would be stock for {scheme.value} but cannot run here "
                  f"({'; '.join(skipped)}); vllm_triton stands in", file=sys.stderr)
            name, why = "vllm_triton", f"standing in for {name}"
            peers, more = lineup(dev, scheme, (name,), triton_source=source)
            skipped += more
        if name not in peers:
            print(f"note: no stock peer for {scheme.value} ({'; '.join(skipped)}); tuning AOT "
                  "variants only", file=sys.stderr)
            return None
        print(f"stock for {scheme.value}: {name} ({peers[name].source}; {why})")
        return peers[name]

    return stock_for


def _print_issues(issues: Sequence[ConfigIssue]) -> None:
    for i in issues:
        print(f"warning: malformed row skipped: {i}", file=sys.stderr)


#: where ``tune --model`` writes without ``--config-dir`` or ``$VLLM_MOE_AOT_CONFIG_DIR``
DEFAULT_USER_CONFIG_DIR = "vllm-moe-aot-configs"


def _prepare_model(args: argparse.Namespace) -> tuple[Path, Path, str] | int:
    """``--model``: derive the layer, write its untuned CSV; ``(input, output, note)`` or an
    exit status. Nothing here needs a GPU."""
    import os

    from vllm_moe_aot.dispatch.configs import write_untuned
    from vllm_moe_aot.integration import CONFIG_DIR_ENV  # vLLM-free constant
    from vllm_moe_aot.measure.model_config import (
        ModelConfigError,
        config_stem,
        per_rank_shape,
        read_model,
    )
    from vllm_moe_aot.shapes import TUNED_TOKEN_COUNTS, unsupported_reason

    if args.tp is None:
        print("error: --model needs --tp T (the tensor-parallel size vLLM serves with)",
              file=sys.stderr)
        return 2
    try:
        moe = read_model(args.model, getattr(args, "name", None))
    except ModelConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ep = getattr(args, "ep", 1) or 1
    if args.scheme is not None:
        scheme = Scheme.parse(args.scheme)
    elif moe.scheme is not None:
        scheme = moe.scheme
    else:
        scheme = Scheme.FP8_PTPC
        print(f"note: the checkpoint is {moe.quant}; tuning fp8_ptpc (pass --scheme to "
              "choose; vLLM uses these rows only for an FP8 per-channel/per-token or "
              "per-tensor checkpoint of this shape)", file=sys.stderr)
    try:
        shape = per_rank_shape(moe, args.tp, ep)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    par = f"tp={args.tp}" + (f", ep={ep}" if ep > 1 else "")
    print(f"model {moe}; checkpoint: {moe.quant}")
    print(f"per-rank MoE layer at {par}: {shape} scheme {scheme.family}")
    why = unsupported_reason(shape, scheme)
    if why is not None:
        fits = [t for t in (1, 2, 4, 8, 16, 32) if ep == 1 and moe.intermediate % t == 0
                and unsupported_reason(per_rank_shape(moe, t), scheme) is None]
        hint = f" (tp values that fit: {', '.join(map(str, fits))})" if fits else ""
        print(f"error: the AOT pipeline cannot serve this layer: {why}{hint}", file=sys.stderr)
        return 2
    cdir = Path(args.config_dir or os.environ.get(CONFIG_DIR_ENV)
                or DEFAULT_USER_CONFIG_DIR).resolve()  # absolute: vLLM may start elsewhere
    stem = config_stem(moe.name, scheme, args.tp, ep)
    inp = cdir / f"{stem}.untuned.csv"
    out = Path(args.output) if args.output else cdir / f"{stem}.tuned.csv"
    write_untuned(inp, [RowKey.of(shape, scheme, m) for m in TUNED_TOKEN_COUNTS])
    print(f"wrote {inp} ({len(TUNED_TOKEN_COUNTS)} token counts)")
    note = (f"the untuned rows are in {inp}; run this command on the GPU you serve with to "
            f"tune them into {out}, then serve with {CONFIG_DIR_ENV}={cdir}")
    return inp, out, note


def run(args: argparse.Namespace, backend: TuneBackend | None = None) -> int:
    no_gpu_note = ""
    if getattr(args, "model", None):
        prepared = _prepare_model(args)
        if isinstance(prepared, int):
            return prepared
        inp, out, no_gpu_note = prepared
    else:
        if args.output is None:
            print("error: -i needs -o (the tuned CSV to write)", file=sys.stderr)
            return 2
        extra = [f for f, v in (("--tp", getattr(args, "tp", None)),
                                ("--scheme", getattr(args, "scheme", None)),
                                ("--config-dir", getattr(args, "config_dir", None)),
                                ("--name", getattr(args, "name", None)))
                 if v is not None] + (["--ep"] if (getattr(args, "ep", 1) or 1) > 1 else [])
        if extra:
            print(f"error: {', '.join(extra)} only go with --model", file=sys.stderr)
            return 2
        inp, out = Path(args.input), Path(args.output)
    if not inp.is_file():
        print(f"error: input {inp} does not exist", file=sys.stderr)
        return 2
    keys, issues = read_untuned(inp)
    _print_issues(issues)
    if args.tokens:
        want = set(args.tokens)
        keys = [k for k in keys if k.tokens in want]
    if not keys:
        print(f"error: no valid rows to tune in {inp}"
              + (f" for --tokens {' '.join(map(str, args.tokens))}" if args.tokens else ""),
              file=sys.stderr)
        return 2
    existing: list[TunedRow] = []
    if out.exists():
        existing, out_issues = read_tuned(out)
        _print_issues(out_issues)
        if out_issues:
            bak = out.with_name(out.name + ".bak")
            shutil.copyfile(out, bak)
            print(f"warning: {out} has {len(out_issues)} malformed row(s) that the rewrite "
                  f"drops; the original is saved as {bak}", file=sys.stderr)
    if backend is None:
        from vllm_moe_aot.measure.timing import NoGPUError, device_info, require_gpu

        try:
            dev = require_gpu("vllm-moe-aot tune")
        except NoGPUError as exc:
            print(f"error: {exc}" + (f"; {no_gpu_note}" if no_gpu_note else ""),
                  file=sys.stderr)
            return 2
        stock_for = None if args.stock == "none" else _stock_for(args, dev)
        backend = LayerBackend(dev, device_info(dev), stock_for=stock_for,
                               gate_rows=args.gate_rows)
    dev_info = backend.device
    print(f"tuning {len(keys)} row(s) of {inp} on {dev_info.name} ({dev_info.arch}, "
          f"{dev_info.cu_num} CUs); stock: {backend.stock_name or 'none'}; output {out}")
    log = TuneLog(out.with_name(out.name + ".log"))
    log.write(f"session: input={inp} output={out} gpu={dev_info.name} arch={dev_info.arch} "
              f"stock={backend.stock_name or 'none'} version={tool_version()} "
              f"force={args.force} timeout={args.timeout}")
    try:
        report = tune_keys(keys, backend, existing, force=args.force, variants=args.variants,
                           timeout=args.timeout, log=log, save=lambda rows: write_tuned(out, rows),
                           progress=not args.no_progress,
                           min_gain=getattr(args, "min_gain", MIN_GAIN))
    except KeyboardInterrupt:
        print(f"\ninterrupted; rows tuned so far are in {out}", file=sys.stderr)
        return 130
    finally:
        log.close()
    kept = sum(o.skipped for o in report.outcomes)
    if kept:
        print(f"{kept} row(s) already tuned for {dev_info.name} were kept (--force retunes)")
    if not out.exists():
        write_tuned(out, report.rows)
    print(format_summary(report))
    failed = report.failed
    if failed:
        print(f"error: {len(failed)} row(s) could not be tuned: "
              + ", ".join(str(o.key.tokens) for o in failed) + f" (details in {log.path})",
              file=sys.stderr)
        return 1
    print(f"wrote {out} ({len(report.rows)} row(s)); log {log.path}")
    return 0
