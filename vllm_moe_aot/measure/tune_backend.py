"""What the tuner measures through: the :class:`TuneBackend` protocol and :class:`LayerBackend`,
the real one (gate, then CUDA-graph timing of each candidate, with per-candidate time limits).

Its pipeline factory, stock provider and timer are injectable so the tuner runs on the CPU in
tests."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from vllm_moe_aot.contract import STOCK
from vllm_moe_aot.dispatch.configs import (
    RowKey,
    scheme_of_family,
)
from vllm_moe_aot.measure.reference import GateResult, gate
from vllm_moe_aot.measure.timing import DeadlineExceeded, DeviceInfo
from vllm_moe_aot.shapes import MoEShape, Scheme

# ------------------------------------------------------------------------------ candidates

@dataclass(frozen=True)
class Candidate:
    name: str  # the variant name, or "stock"
    backend: str  # "aot" | "stock"
    quantize_activations: bool = True
    act_group: int = 0  # columns per dynamic scale of the intermediate (0: the whole row)


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


# ------------------------------------------------------------------------------ backend

class TuneBackend(Protocol):
    """What the tuning loop needs from the machine."""

    device: DeviceInfo
    stock_name: str | None  # for the session line; rows use stock_name_of

    def stock_name_of(self, key: RowKey) -> str | None: ...

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
                 moe_factory: Callable | None = None, stock=None,
                 stock_for: Callable[[Scheme], object] | None = None,
                 timer: Timer | None = None, gate_rows: int = 256, seed: int = 20261125,
                 max_sets: int = 16, fp8_dtype: torch.dtype | None = None):
        self.dev = torch.device(device)
        self.device = info
        self.moe_factory = moe_factory or _default_moe_factory
        #: one stock provider for every row, or ``stock_for(scheme)``: the stock peer for the
        #: row's scheme (what vLLM would run for it), asked once per scheme
        if stock is not None and stock_for is not None:
            raise ValueError("pass stock or stock_for, not both")
        self.stock = stock
        self._stock_for = stock_for
        self._stocks: dict[str, object] = {}
        self.stock_name = (getattr(stock, "name", None) if stock is not None
                           else "per scheme" if stock_for is not None else None)
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

    def stock_of(self, key: RowKey):
        """The stock peer for this row (what vLLM would run for its scheme), or None."""
        if self._stock_for is None:
            return self.stock
        if key.scheme not in self._stocks:
            self._stocks[key.scheme] = self._stock_for(scheme_of_family(key.scheme))
        return self._stocks[key.scheme]

    def stock_name_of(self, key: RowKey) -> str | None:
        stock = self.stock_of(key)
        return getattr(stock, "name", None) if stock is not None else None

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
                cands.append(Candidate(v, "aot", bool(moe.quantize_activations(v)),
                                       moe.act_group(v)))
        if self.stock_of(key) is not None:
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
            return self.stock_of(key)(problem, out=out)
        moe = self._moe(key)
        return moe.run(cand.name, *problem.tensors(), out, **problem.run_kwargs())

    def check(self, key: RowKey, cand: Candidate, deadline: float | None) -> GateResult:
        p = self._gate
        out = p.new_out()
        out.fill_(float("nan"))  # rows a candidate forgets to write fail the gate
        self._run(cand, p, out, key)
        _sync(self.dev)
        sem = (cand.quantize_activations, cand.act_group)
        if sem not in self._refs:
            self._refs[sem] = p.reference(sem[0], rows=self._rows, act_group=sem[1])
        return gate(out[self._rows.to(out.device)], self._refs[sem])

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
            stock = self.stock_of(key)
            if hasattr(stock, "bind"):  # bound once: nothing is set up inside the capture
                fns = [stock.bind(p) for p in self._timing]
            else:
                fns = [(lambda p=p: stock(p)) for p in self._timing]
        else:
            moe = self._moe(key)
            fns = [(lambda p=p, o=o: moe.run(cand.name, *p.tensors(), o, **p.run_kwargs()))
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
def time_limit(seconds: float | None):
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
