"""``vllm-moe-aot tune``: pick the fastest correct implementation per layer shape and batch size.

For every row of an untuned CSV (a layer shape, scheme family and token count ``M``) the
candidates are every pipeline variant the build compiled for that layer
(``FusedMoE(...).variants``) plus the stock path when a provider exists (see
:mod:`vllm_moe_aot.measure.peers.vllm_triton`). Each candidate

1. passes the correctness gate first: it runs on fresh random inputs at ``M`` tokens and its
   output (a sample of up to ``--gate-rows`` tokens) is compared with the float64 reference of
   the semantics it implements (``quantize_activations``); failures are listed with their error;
2. is then timed end to end (bf16 ``x`` + routing -> bf16 out, every launch included) under
   CUDA-graph replay over rotated input sets (:func:`vllm_moe_aot.measure.timing.time_graph`).

The winner is the AOT variant with the smallest time if it beats stock by at least
``--min-gain`` (default :data:`MIN_GAIN`, 3%), else stock: run-to-run spread of the medians is
up to ~4% at some token counts on our H100, so a smaller lead is not a measured win and the
layer keeps vLLM's own path there. Rows already tuned for this GPU in the output file are kept
unless ``--force``; the file is rewritten after every row, so an interrupted run resumes.
Every candidate's outcome goes to ``<out>.log``. The exit status is non-zero when a row could
not be tuned (no candidate passed).

``--model <config.json or checkpoint folder> --tp T [--ep E]`` derives the rows instead of
reading ``-i``: :mod:`vllm_moe_aot.measure.model_config` reads the routed-MoE fields, the
per-rank layer is checked with :func:`~vllm_moe_aot.shapes.unsupported_reason`, and
``<config-dir>/<model>_<scheme>_tp<T>[_ep<E>].untuned.csv`` (every tuned token count) is written
before anything needs a GPU; the tuned CSV goes next to it, where ``VLLM_MOE_AOT_CONFIG_DIR``
points vLLM.

The selection and resume logic (:func:`select_winner`, :func:`tune_keys`) only talks to a
:class:`TuneBackend`; :class:`LayerBackend` is the real one, with an injectable pipeline
factory, stock provider and timer so that it runs on the CPU in tests.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import hashlib
import math
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

import vllm_moe_aot
from vllm_moe_aot.contract import STOCK
from vllm_moe_aot.dispatch.configs import (
    ConfigIssue,
    RowKey,
    TunedRow,
    read_tuned,
    read_untuned,
    scheme_of_family,
    write_tuned,
)
from vllm_moe_aot.measure.reference import GateResult, gate
from vllm_moe_aot.measure.timing import DeadlineExceeded, DeviceInfo
from vllm_moe_aot.shapes import MoEShape, Scheme

# ------------------------------------------------------------------------------ results

@dataclass(frozen=True)
class Candidate:
    name: str  # the variant name, or "stock"
    backend: str  # "aot" | "stock"
    quantize_activations: bool = True


@dataclass
class CandidateResult:
    candidate: Candidate
    status: str = "pending"  # ok | rejected | timeout | error
    us: float | None = None
    err: float | None = None  # gate relative Frobenius error
    gate: GateResult | None = None
    error: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.us is not None

    @property
    def name(self) -> str:
        return self.candidate.name

    @property
    def backend(self) -> str:
        return self.candidate.backend


#: the smallest lead over stock (fraction) that makes an AOT variant the winner
MIN_GAIN = 0.03


def select_winner(results: Iterable[CandidateResult],
                  min_gain: float = MIN_GAIN) -> CandidateResult | None:
    """The fastest gate-passing AOT candidate if it beats a passing stock by at least
    ``min_gain`` (``aot * (1 + min_gain) < stock``), otherwise stock; None when nothing
    passed. Equal AOT times keep the earlier candidate."""
    ok = [r for r in results if r.ok]
    aot = [r for r in ok if r.backend == "aot"]
    stock = next((r for r in ok if r.backend == "stock"), None)
    best = min(aot, key=lambda r: r.us) if aot else None
    if best is None:
        return stock
    if stock is None or best.us * (1.0 + min_gain) < stock.us:
        return best
    return stock


@dataclass
class RowOutcome:
    key: RowKey
    results: list[CandidateResult] = field(default_factory=list)
    row: TunedRow | None = None
    notes: list[str] = field(default_factory=list)
    skipped: bool = False  # already tuned


# ------------------------------------------------------------------------------ backend

class TuneBackend(Protocol):
    """What the tuning loop needs from the machine."""

    device: DeviceInfo
    stock_name: str | None

    def candidates(self, key: RowKey) -> tuple[list[Candidate], list[str]]: ...

    def begin(self, key: RowKey) -> None: ...

    def check(self, key: RowKey, cand: Candidate, deadline: float | None) -> GateResult: ...

    def prepare_timing(self, key: RowKey) -> None: ...

    def time(self, key: RowKey, cand: Candidate, deadline: float | None) -> float: ...

    def experts_touched(self, key: RowKey) -> float: ...

    def end(self, key: RowKey) -> None: ...


Timer = Callable[..., float]  # timer(fns, *, deadline, name) -> µs of one call


def graph_timer(fns, *, deadline=None, name="") -> float:
    from vllm_moe_aot.measure.timing import time_graph

    return time_graph(fns, deadline=deadline).us


def _default_moe_factory(shape: MoEShape, scheme: Scheme, device: torch.device,
                         max_tokens: int):
    from vllm_moe_aot.pipeline import FusedMoE

    return FusedMoE(shape, scheme, device, max_tokens=max_tokens)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class LayerBackend:
    """The real backend: ``FusedMoE`` variants + a stock provider, gate on random problems,
    time with ``timer`` (CUDA graphs by default)."""

    def __init__(self, device: torch.device | str, info: DeviceInfo, *,
                 moe_factory: Callable | None = None, stock=None, timer: Timer | None = None,
                 gate_rows: int = 256, seed: int = 20261125, max_sets: int = 16,
                 fp8_dtype: torch.dtype | None = None):
        self.dev = torch.device(device)
        self.device = info
        self.moe_factory = moe_factory or _default_moe_factory
        self.stock = stock
        self.stock_name = getattr(stock, "name", None) if stock is not None else None
        self.timer = timer or graph_timer
        self.gate_rows = gate_rows
        self.seed = seed
        self.max_sets = max_sets
        self.fp8_dtype = fp8_dtype
        self._max_tokens: dict[tuple, int] = {}
        self._moes: dict[tuple, object] = {}
        self._gate = None
        self._rows: torch.Tensor | None = None
        self._refs: dict[bool, torch.Tensor] = {}
        self._timing: list = []
        self._outs: list[torch.Tensor] = []

    # -- planning
    def plan(self, keys: Sequence[RowKey]) -> None:
        """Size each layer's pipeline for the largest M it will be tuned at."""
        for k in keys:
            lk = k.layer()
            self._max_tokens[lk] = max(self._max_tokens.get(lk, 1), k.tokens)

    def _moe(self, key: RowKey):
        lk = key.layer()
        if lk not in self._moes:
            try:
                self._moes[lk] = self.moe_factory(key.shape, scheme_of_family(key.scheme),
                                                  self.dev, self._max_tokens.get(lk, key.tokens))
            except Exception as exc:  # noqa: BLE001 - unsupported shape, no build, ...
                self._moes[lk] = exc
        return self._moes[lk]

    def candidates(self, key: RowKey) -> tuple[list[Candidate], list[str]]:
        notes = []
        cands = []
        moe = self._moe(key)
        if isinstance(moe, Exception):
            notes.append(f"no AOT candidates: {type(moe).__name__}: {moe}")
        else:
            for v in moe.variants_for(key.tokens):
                cands.append(Candidate(v, "aot", bool(moe.quantize_activations(v))))
        if self.stock is not None:
            cands.append(Candidate(STOCK, "stock", True))
        else:
            notes.append("no stock provider")
        return cands, notes

    # -- gate
    def begin(self, key: RowKey) -> None:
        from vllm_moe_aot.measure.workload import make_problem

        self._gate = make_problem(key.shape, scheme_of_family(key.scheme), key.tokens,
                                  self.dev, seed=self.seed + 2 * key.tokens,
                                  fp8_dtype=self.fp8_dtype)
        M = key.tokens
        if M <= self.gate_rows:
            rows = torch.arange(M)
        else:
            g = torch.Generator().manual_seed(self.seed + M)
            rows = torch.randperm(M, generator=g)[: self.gate_rows - 2]
            rows = torch.cat([rows, torch.tensor([0, M - 1])]).unique()  # sorted
        self._rows = rows
        self._refs = {}

    def _run(self, cand: Candidate, problem, out: torch.Tensor, key: RowKey):
        if cand.backend == "stock":
            return self.stock(problem, out=out)
        moe = self._moe(key)
        return moe.run(cand.name, *problem.tensors(), out, **problem.act_scales())

    def check(self, key: RowKey, cand: Candidate, deadline: float | None) -> GateResult:
        p = self._gate
        out = p.new_out()
        out.fill_(float("nan"))  # rows a candidate forgets to write fail the gate
        self._run(cand, p, out, key)
        _sync(self.dev)
        qa = cand.quantize_activations
        if qa not in self._refs:
            self._refs[qa] = p.reference(qa, rows=self._rows)
        return gate(out[self._rows.to(out.device)], self._refs[qa])

    # -- timing
    def prepare_timing(self, key: RowKey) -> None:
        from vllm_moe_aot.measure.workload import make_problems, rotation_count

        self._gate = None
        self._refs = {}
        free = None
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()
            free = torch.cuda.mem_get_info(self.dev)[0]
        sets = rotation_count(key.shape, key.tokens, self.device.l2_bytes, free,
                              max_sets=self.max_sets)
        self._timing = make_problems(key.shape, scheme_of_family(key.scheme), key.tokens,
                                     sets, self.dev, seed=self.seed + 2 * key.tokens + 1,
                                     fp8_dtype=self.fp8_dtype)
        self._outs = [p.new_out() for p in self._timing]

    def time(self, key: RowKey, cand: Candidate, deadline: float | None) -> float:
        if cand.backend == "stock":
            fns = [(lambda p=p: self.stock(p)) for p in self._timing]
        else:
            moe = self._moe(key)
            fns = [(lambda p=p, o=o: moe.run(cand.name, *p.tensors(), o, **p.act_scales()))
                   for p, o in zip(self._timing, self._outs, strict=True)]
        return float(self.timer(fns, deadline=deadline, name=cand.name))

    def experts_touched(self, key: RowKey) -> float:
        if self._timing:
            return sum(p.experts_touched() for p in self._timing) / len(self._timing)
        from vllm_moe_aot.measure.workload import expected_experts_touched

        return expected_experts_touched(key.shape, key.tokens)

    def end(self, key: RowKey) -> None:
        self._gate = None
        self._refs = {}
        self._timing = []
        self._outs = []
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------ timeouts

class CandidateTimeout(DeadlineExceeded):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float | None):
    """Raise :class:`CandidateTimeout` in the main thread after ``seconds`` (SIGALRM); a
    no-op elsewhere. Work stuck inside a GPU driver call cannot be interrupted."""
    usable = (seconds is not None and seconds > 0 and hasattr(signal, "setitimer")
              and threading.current_thread() is threading.main_thread())
    if not usable:
        yield
        return

    def on_alarm(signum, frame):
        raise CandidateTimeout(f"exceeded the {seconds:g} s candidate timeout")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ------------------------------------------------------------------------------ the loop

def tool_version() -> str:
    """Package version plus a short hash of the build manifest the runtime loads (the
    package's, or ``$VLLM_MOE_AOT_ARTIFACTS``'s)."""
    v = vllm_moe_aot.__version__
    try:
        from vllm_moe_aot.runtime.manifest import default_artifacts_dir

        man = default_artifacts_dir() / "manifest.json"
    except ImportError:
        man = Path(vllm_moe_aot.__file__).resolve().parent / "artifacts" / "manifest.json"
    if man.is_file():
        v += "+" + hashlib.sha256(man.read_bytes()).hexdigest()[:10]
    return v


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def layer_flops(shape: MoEShape, M: int) -> float:
    return 2.0 * M * shape.topk * 3 * shape.N * shape.K


def layer_bytes(shape: MoEShape, M: int, experts: float) -> float:
    """Minimum bytes moved: touched experts' fp8 weights + bf16 x in + bf16 out."""
    return experts * 3.0 * shape.N * shape.K + 4.0 * M * shape.K


class TuneLog:
    """``<out>.log``: one line per candidate outcome, appended."""

    def __init__(self, path: Path | None):
        self.path = path
        self._f = open(path, "a") if path is not None else None  # noqa: SIM115

    def write(self, line: str) -> None:
        if self._f is not None:
            self._f.write(f"{_now()} {line}\n")
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def _fmt_us(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def tune_key(key: RowKey, backend: TuneBackend, *, variants: Sequence[str] | None = None,
             timeout: float | None = None, log: TuneLog | None = None,
             on_candidate: Callable[[str], None] | None = None,
             min_gain: float = MIN_GAIN) -> RowOutcome:
    """Gate, time and select for one row; returns the outcome (``row`` None if failed)."""
    log = log or TuneLog(None)
    outcome = RowOutcome(key)
    cands, notes = backend.candidates(key)
    outcome.notes.extend(notes)
    if variants:
        wanted = set(variants)
        missing = wanted - {c.name for c in cands}
        for m in sorted(missing):
            outcome.notes.append(f"requested candidate {m!r} not available for this row")
        cands = [c for c in cands if c.name in wanted]
    dev = backend.device
    tag = f"[{dev.name} {dev.arch}] {key}"
    for n in outcome.notes:
        log.write(f"{tag} note: {n}")
    if not cands:
        log.write(f"{tag} FAILED: no candidates")
        return outcome
    results = [CandidateResult(c) for c in cands]
    outcome.results = results
    spent: dict[str, float] = {}

    def guarded(res: CandidateResult, phase: str, fn: Callable[[float | None], object]):
        left = None if timeout is None else timeout - spent.get(res.name, 0.0)
        if left is not None and left <= 0:
            res.status, res.error = "timeout", f"exceeded the {timeout:g} s candidate timeout"
            return None
        t0 = time.monotonic()
        deadline = None if left is None else t0 + left
        try:
            with _time_limit(left):
                return fn(deadline)
        except DeadlineExceeded as exc:
            res.status, res.error = "timeout", f"{phase}: {exc}"
        except Exception as exc:  # noqa: BLE001 - a failing candidate must not stop tuning
            res.status, res.error = "error", f"{phase}: {type(exc).__name__}: {exc}"
        finally:
            spent[res.name] = spent.get(res.name, 0.0) + time.monotonic() - t0
            res.seconds = spent[res.name]
        return None

    try:
        backend.begin(key)
        for res in results:
            if on_candidate:
                on_candidate(f"gate {res.name}")
            g = guarded(res, "gate", lambda d, c=res.candidate: backend.check(key, c, d))
            if g is None:
                continue
            res.gate, res.err = g, g.rel_fro if math.isfinite(g.rel_fro) else None
            if g.passed:
                res.status = "gated"
            else:
                res.status, res.error = "rejected", f"gate: {g}"
        passing = [r for r in results if r.status == "gated"]
        if passing:
            backend.prepare_timing(key)
        for res in passing:
            if on_candidate:
                on_candidate(f"time {res.name}")
            us = guarded(res, "timing", lambda d, c=res.candidate: backend.time(key, c, d))
            if us is None:
                continue
            if not (isinstance(us, float | int) and math.isfinite(us) and us > 0):
                res.status, res.error = "error", f"timing: invalid time {us!r}"
                continue
            res.status, res.us = "ok", float(us)
        experts = backend.experts_touched(key)
    finally:
        backend.end(key)

    for res in results:
        err = "-" if res.err is None else f"{res.err:.3e}"
        log.write(f"{tag} {res.backend}:{res.name} status={res.status} us={_fmt_us(res.us)} "
                  f"err={err} t={res.seconds:.1f}s" + (f" error={res.error}" if res.error else ""))
    win = select_winner(results, min_gain)
    if win is None:
        log.write(f"{tag} FAILED: no candidate passed")
        return outcome
    stock = next((r for r in results if r.backend == "stock" and r.ok), None)
    stock_us = stock.us if stock else None
    flops = layer_flops(key.shape, key.tokens)
    nbytes = layer_bytes(key.shape, key.tokens, experts)
    outcome.row = TunedRow(
        key=key, gpu=dev.name, arch=dev.arch, cu_num=dev.cu_num, backend=win.backend,
        variant="" if win.backend == "stock" else win.name, us=win.us, stock_us=stock_us,
        stock_provider=(backend.stock_name or "") if stock_us is not None else "",
        speedup=(stock_us / win.us) if stock_us is not None else None,
        tflops=flops / (win.us * 1e-6) / 1e12, gbps=nbytes / (win.us * 1e-6) / 1e9,
        err=win.err, version=tool_version(), tuned_at=_now())
    log.write(f"{tag} winner={win.backend}:{win.name} us={win.us:.2f} "
              f"stock_us={_fmt_us(stock_us)}")
    return outcome


@dataclass
class TuneReport:
    outcomes: list[RowOutcome]
    rows: list[TunedRow]  # everything the output file now holds

    @property
    def failed(self) -> list[RowOutcome]:
        return [o for o in self.outcomes if not o.skipped and o.row is None]


def tune_keys(keys: Sequence[RowKey], backend: TuneBackend, existing: Sequence[TunedRow] = (),
              *, force: bool = False, variants: Sequence[str] | None = None,
              timeout: float | None = None, log: TuneLog | None = None,
              save: Callable[[list[TunedRow]], None] | None = None,
              progress: bool = False, min_gain: float = MIN_GAIN) -> TuneReport:
    """Tune every key not already tuned for ``backend.device`` (all of them with ``force``),
    calling ``save(rows)`` with the complete row set after each tuned row."""
    dev = backend.device
    rows: dict[tuple, TunedRow] = {(r.gpu, r.arch, r.key): r for r in existing}
    outcomes: list[RowOutcome] = []
    todo = []
    for k in keys:
        if not force and (dev.name, dev.arch, k) in rows:
            outcomes.append(RowOutcome(k, row=rows[(dev.name, dev.arch, k)], skipped=True))
        else:
            todo.append(k)
    if hasattr(backend, "plan"):
        backend.plan(todo)
    bar = None
    if progress:
        try:
            from tqdm import tqdm
        except ImportError:
            print("note: tqdm is not installed; no progress bar", file=sys.stderr)
        else:
            # disable=None: no bar when stderr is not a terminal (logs stay readable)
            bar = tqdm(total=len(todo), unit="row", desc="tune", file=sys.stderr,
                       disable=None)
    try:
        for k in todo:
            if bar is not None:
                bar.set_description(f"tune M={k.tokens}")
            cb = (lambda s: bar.set_postfix_str(s)) if bar is not None else None
            out = tune_key(k, backend, variants=variants, timeout=timeout, log=log,
                           on_candidate=cb, min_gain=min_gain)
            outcomes.append(out)
            if out.row is not None:
                rows[(dev.name, dev.arch, k)] = out.row
                if save is not None:
                    save(list(rows.values()))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    order = {k: i for i, k in enumerate(keys)}
    outcomes.sort(key=lambda o: order.get(o.key, len(order)))
    return TuneReport(outcomes, list(rows.values()))


def format_summary(report: TuneReport) -> str:
    head = f"{'M':>7} {'layer':<34} {'winner':<28} {'us':>10} {'stock_us':>10} {'speedup':>8} " \
           f"{'ok':>3} {'rej':>3}"
    lines = [head, "-" * len(head)]
    for o in report.outcomes:
        layer = f"{o.key.shape} {o.key.scheme}"
        nok = sum(r.ok for r in o.results)
        nrej = sum(1 for r in o.results if not r.ok)
        if o.row is None:
            win, us, sus, sp = "FAILED", "-", "-", "-"
        else:
            r = o.row
            win = (r.choice + (" (kept)" if o.skipped else ""))[:28]
            us, sus = f"{r.us:.2f}", _fmt_us(r.stock_us)
            sp = "-" if r.speedup is None else f"{r.speedup:.2f}x"
        lines.append(f"{o.key.tokens:>7} {layer:<34} {win:<28} {us:>10} {sus:>10} {sp:>8} "
                     f"{'' if o.skipped else nok:>3} {'' if o.skipped else nrej:>3}")
        for r in o.results:
            if not r.ok:
                lines.append(f"{'':>7}   rejected {r.backend}:{r.name}: {r.error}")
        for n in o.notes:
            lines.append(f"{'':>7}   note: {n}")
    return "\n".join(lines)


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
                        "intermediate size. Note: the vLLM backend currently leaves "
                        "expert-parallel layers to vLLM")
    p.add_argument("--scheme", choices=["fp8_ptpc", "fp8_per_tensor"], default=None,
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
    p.add_argument("--stock", choices=["auto", "vllm", "vllm_stock", "none"], default="auto",
                   help="stock provider (default: vllm, else vllm_stock)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--min-gain", type=float, default=MIN_GAIN,
                   help=f"lead over stock an AOT variant needs to win a row (fraction, default "
                        f"{MIN_GAIN}): smaller leads are within run-to-run spread")


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
    if ep > 1:
        print("note: the vLLM backend currently leaves expert-parallel MoE layers to vLLM; "
              "rows tuned with --ep are for bench/info until it takes them", file=sys.stderr)
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
        stock = None
        if args.stock != "none":
            from vllm_moe_aot.measure.peers.vllm_triton import describe_probe, get_stock_provider

            stock = get_stock_provider(dev, prefer=None if args.stock == "auto" else args.stock)
            if stock is None:
                print(f"note: no stock provider ({describe_probe()}); tuning AOT variants "
                      "only", file=sys.stderr)
        backend = LayerBackend(dev, device_info(dev), stock=stock, gate_rows=args.gate_rows)
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
