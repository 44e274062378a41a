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

import datetime as _dt
import hashlib
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import vllm_moe_aot
from vllm_moe_aot.dispatch.configs import (
    RowKey,
    TunedRow,
)
from vllm_moe_aot.measure.timing import DeadlineExceeded
from vllm_moe_aot.measure.tune_backend import (
    CandidateResult,
    TuneBackend,
    time_limit,
)
from vllm_moe_aot.shapes import MoEShape

# ------------------------------------------------------------------------------ results

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
    return shape.flops(M)


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
            with time_limit(left):
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
        stock_provider=(backend.stock_name_of(key) or "") if stock_us is not None else "",
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
