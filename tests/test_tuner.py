"""The tuner: winner selection, resume, timeouts, the correctness gate on the real gate path
(LayerBackend with a fake pipeline and a fake timer on the CPU), the CLI and its log."""

from __future__ import annotations

import argparse
import time

import pytest
import torch

from tests._moe_fakes import FakeFusedMoE, FakeStock, factory
from vllm_moe_aot.dispatch.configs import (
    TUNED_COLUMNS,
    RowKey,
    read_tuned,
    write_tuned,
    write_untuned,
)
from vllm_moe_aot.measure import tune_cli, tuner
from vllm_moe_aot.measure.reference import GateResult
from vllm_moe_aot.measure.timing import DeviceInfo
from vllm_moe_aot.measure.tune_backend import Candidate, CandidateResult, LayerBackend
from vllm_moe_aot.measure.tuner import select_winner
from vllm_moe_aot.shapes import MoEShape, Scheme

DEV = DeviceInfo(name="Fake GPU 80GB", arch="sm_90a", cu_num=132, l2_bytes=50 << 20,
                 total_bytes=80 << 30)
OTHER = DeviceInfo(name="Other GPU", arch="gfx942", cu_num=304, l2_bytes=4 << 20,
                   total_bytes=192 << 30)
SHAPE = MoEShape(E=8, K=256, N=64, topk=4)


def res(name, us, backend="aot", status="ok"):
    return CandidateResult(Candidate(name, backend), status=status, us=us, err=1e-2)


# ------------------------------------------------------------------------- selection

@pytest.mark.parametrize("results, want", [
    ([res("a", 10.0), res("b", 8.0), res("stock", 9.0, "stock")], "b"),      # fastest AOT
    ([res("a", 10.0), res("stock", 9.0, "stock")], "stock"),                  # stock faster
    ([res("a", 9.0), res("stock", 9.0, "stock")], "stock"),                   # tie -> stock
    ([res("a", 8.0), res("b", 8.0), res("stock", 9.0, "stock")], "a"),       # AOT tie: first
    ([res("a", 10.0), res("b", 12.0)], "a"),                                  # no stock
    ([res("stock", 9.0, "stock")], "stock"),                                  # stock only
    ([res("a", 1.0, status="rejected"), res("stock", 9.0, "stock")], "stock"),  # rejected
    ([res("a", 1.0, status="timeout"), res("b", 5.0), res("stock", 4.0, "stock",
                                                           status="error")], "b"),
    ([res("a", 1.0, status="rejected"), res("stock", 2.0, "stock", status="rejected")], None),
    ([], None),
])
def test_select_winner(results, want):
    w = select_winner(results, min_gain=0.0)
    assert (w.name if w else None) == want


@pytest.mark.parametrize("aot_us,want", [(10.0, "stock"), (9.8, "stock"), (9.75, "stock"),
                                         (9.7, "a"), (5.0, "a")])
def test_select_winner_needs_a_lead_over_stock(aot_us, want):
    """Default MIN_GAIN (3%): an AOT lead inside run-to-run spread keeps the stock path."""
    w = select_winner([res("a", aot_us), res("stock", 10.0, "stock")])
    assert w.name == want


# ------------------------------------------------------------------------- fake backend

class FakeBackend:
    """Scripted gate results and times: ``script[(M, name)] = us | 'reject' | 'raise' |
    ('sleep', s)``; a name missing for M defaults to ``default_us[name]``."""

    def __init__(self, device=DEV, names=("v_gemv", "v_grouped"), stock=True, script=None,
                 default_us=None):
        self.device = device
        self.stock_name = "fake_stock" if stock else None
        self.names = names
        self.has_stock = stock
        self.script = script or {}
        self.default_us = default_us or {"v_gemv": 10.0, "v_grouped": 20.0, "stock": 15.0}
        self.calls: list[tuple[str, int, str]] = []

    def stock_name_of(self, key):
        return self.stock_name

    def candidates(self, key):
        c = [Candidate(n, "aot", True) for n in self.names]
        if self.has_stock:
            c.append(Candidate("stock", "stock", True))
        return c, ([] if self.has_stock else ["no stock provider"])

    def begin(self, key):
        self.calls.append(("begin", key.tokens, ""))

    def _action(self, key, cand):
        return self.script.get((key.tokens, cand.name), self.default_us.get(cand.name, 1.0))

    def check(self, key, cand, deadline):
        self.calls.append(("check", key.tokens, cand.name))
        a = self._action(key, cand)
        if a == "reject":
            return GateResult(False, 0.5, 0.5, "rel_fro 5.0e-01 > 3.0e-02")
        if a == "raise":
            raise RuntimeError("launch failed: invalid argument")
        if isinstance(a, tuple) and a[0] == "sleep":
            time.sleep(a[1])
        return GateResult(True, 1e-2, 1e-2)

    def prepare_timing(self, key):
        self.calls.append(("prepare", key.tokens, ""))

    def time(self, key, cand, deadline):
        self.calls.append(("time", key.tokens, cand.name))
        a = self._action(key, cand)
        return float(a[2]) if isinstance(a, tuple) else float(a)

    def experts_touched(self, key):
        return float(min(key.experts, key.tokens * key.topk))

    def end(self, key):
        self.calls.append(("end", key.tokens, ""))


def keys(tokens=(1, 2, 4, 8)):
    return [RowKey.of(SHAPE, Scheme.FP8_PTPC, m) for m in tokens]


def test_tune_keys_rows_and_fields():
    b = FakeBackend(script={(2, "stock"): 5.0, (4, "v_gemv"): "reject", (4, "v_grouped"): 12.0,
                            (8, "v_gemv"): "raise"})
    saved = []
    rep = tuner.tune_keys(keys(), b, save=lambda rows: saved.append(len(rows)))
    assert saved == [1, 2, 3, 4]
    got = {r.key.tokens: r for r in rep.rows}
    assert got[1].backend == "aot" and got[1].variant == "v_gemv" and got[1].us == 10.0
    assert got[1].stock_us == 15.0 and got[1].speedup == pytest.approx(1.5)
    assert got[1].stock_provider == "fake_stock"
    assert got[2].backend == "stock" and got[2].variant == "" and got[2].speedup == 1.0
    assert got[4].variant == "v_grouped"
    assert got[8].backend == "stock"  # v_gemv raised, v_grouped (20) slower than stock (15)
    for r in rep.rows:
        assert (r.gpu, r.arch, r.cu_num) == (DEV.name, DEV.arch, DEV.cu_num)
        assert r.tflops > 0 and r.gbps > 0 and r.err == pytest.approx(1e-2)
        assert r.version.startswith("0.") and r.tuned_at.endswith("Z")
    out4 = next(o for o in rep.outcomes if o.key.tokens == 4)
    rej = {r.name: (r.status, r.error) for r in out4.results}
    assert rej["v_gemv"][0] == "rejected" and "rel_fro 5.0e-01" in rej["v_gemv"][1]
    out8 = next(o for o in rep.outcomes if o.key.tokens == 8)
    st = {r.name: (r.status, r.error) for r in out8.results}
    assert st["v_gemv"] == ("error", "gate: RuntimeError: launch failed: invalid argument")
    # a rejected candidate is never timed
    assert ("time", 4, "v_gemv") not in b.calls and ("time", 8, "v_gemv") not in b.calls
    assert rep.failed == []


def test_resume_keeps_rows_of_this_gpu_and_others():
    b = FakeBackend()
    first = tuner.tune_keys(keys((1, 2)), b).rows
    other = tuner.tune_keys(keys((1, 2, 4)), FakeBackend(device=OTHER)).rows
    b2 = FakeBackend(default_us={"v_gemv": 99.0, "v_grouped": 98.0, "stock": 97.0})
    rep = tuner.tune_keys(keys((1, 2, 4)), b2, existing=first + other)
    tuned_now = {c[1] for c in b2.calls if c[0] == "begin"}
    assert tuned_now == {4}
    mine = {r.key.tokens: r for r in rep.rows if r.gpu == DEV.name}
    assert mine[1].us == 10.0 and mine[2].us == 10.0  # kept
    assert mine[4].us == 97.0 and mine[4].backend == "stock"
    assert len([r for r in rep.rows if r.gpu == OTHER.name]) == 3
    assert [o.skipped for o in rep.outcomes] == [True, True, False]
    # --force retunes this GPU's rows, leaves the other GPU's alone
    b3 = FakeBackend(default_us={"v_gemv": 5.0, "v_grouped": 6.0, "stock": 7.0})
    rep = tuner.tune_keys(keys((1, 2, 4)), b3, existing=rep.rows, force=True)
    assert {c[1] for c in b3.calls if c[0] == "begin"} == {1, 2, 4}
    assert {r.key.tokens: r.us for r in rep.rows if r.gpu == DEV.name} == {1: 5.0, 2: 5.0,
                                                                           4: 5.0}
    assert len(rep.rows) == 6


def test_failed_rows_not_written():
    b = FakeBackend(stock=False, script={(2, "v_gemv"): "reject", (2, "v_grouped"): "raise"})
    rep = tuner.tune_keys(keys((1, 2)), b)
    assert [o.key.tokens for o in rep.failed] == [2]
    assert [r.key.tokens for r in rep.rows] == [1]
    r1 = rep.rows[0]
    assert r1.stock_us is None and r1.speedup is None and r1.stock_provider == ""
    assert "no stock provider" in rep.outcomes[0].notes


def test_variants_filter():
    b = FakeBackend()
    rep = tuner.tune_keys(keys((1,)), b, variants=["v_grouped", "stock", "nope"])
    assert {c[2] for c in b.calls if c[0] == "check"} == {"v_grouped", "stock"}
    assert rep.rows[0].backend == "stock"  # 15 < 20
    assert any("'nope' not available" in n for n in rep.outcomes[0].notes)


def test_candidate_timeout():
    b = FakeBackend(script={(1, "v_gemv"): ("sleep", 5.0, 1.0)})
    t0 = time.monotonic()
    rep = tuner.tune_keys(keys((1,)), b, timeout=0.3)
    assert time.monotonic() - t0 < 3.0
    r = {x.name: x for x in rep.outcomes[0].results}
    assert r["v_gemv"].status == "timeout" and "timeout" in r["v_gemv"].error
    assert rep.rows[0].choice == "stock"  # v_grouped (20) is slower than stock (15)


# ------------------------------------------------------------------ the real gate path

def test_layer_backend_gate_rejects_wrong_candidate():
    """make_problem -> candidate -> float64 reference -> gate, on the CPU."""
    timed = []

    def fake_timer(fns, *, deadline=None, name=""):
        for f in fns:  # the timing closures really run the candidate on every set
            f()
        timed.append((name, len(fns)))
        return {"fake_w8a8": 30.0, "fake_w8a16": 20.0, "stock": 25.0}[name]

    FakeFusedMoE.instances.clear()
    stock = FakeStock()
    backend = LayerBackend("cpu", DEV, moe_factory=factory(), stock=stock, timer=fake_timer,
                           gate_rows=16, max_sets=2)
    k = RowKey.of(SHAPE, Scheme.FP8_PER_TENSOR_STATIC, 40)
    backend.plan([k, RowKey.of(SHAPE, Scheme.FP8_PER_TENSOR_STATIC, 64)])
    out = tuner.tune_key(k, backend)
    by = {r.name: r for r in out.results}
    assert by["fake_wrong"].status == "rejected"
    assert "gate: FAIL" in by["fake_wrong"].error and by["fake_wrong"].err > 0.1
    assert by["fake_w8a8"].ok and by["fake_w8a8"].err < 1e-2
    assert by["fake_w8a16"].ok and by["stock"].ok
    assert out.row.variant == "fake_w8a16" and out.row.us == 20.0
    assert out.row.stock_us == 25.0 and out.row.stock_provider == "fake_stock"
    assert out.row.speedup == pytest.approx(1.25)
    assert ("fake_wrong", 2) not in timed and {n for n, _ in timed} == {"fake_w8a8",
                                                                         "fake_w8a16", "stock"}
    moe = FakeFusedMoE.instances[-1]
    assert moe.max_tokens == 64  # sized for the largest M of its layer
    assert moe.scheme is Scheme.FP8_PER_TENSOR_STATIC
    assert all(m == 40 for _, m in moe.calls)


def test_layer_backend_unsupported_layer_and_no_stock():
    def broken(shape, scheme, device, max_tokens):
        raise ValueError("no compiled variant serves this")

    backend = LayerBackend("cpu", DEV, moe_factory=broken, stock=None,
                           timer=lambda fns, **kw: 1.0)
    out = tuner.tune_key(RowKey.of(SHAPE, Scheme.FP8_PTPC, 3), backend)
    assert out.row is None
    assert any("no compiled variant" in n for n in out.notes)
    assert "no stock provider" in out.notes


# ------------------------------------------------------------------ CLI, files, log

def _args(tmp_path, **kw):
    a = dict(input=str(tmp_path / "m.untuned.csv"), output=str(tmp_path / "m.tuned.csv"),
             e2e=True, timeout=60.0, tokens=None, variants=None, force=False, gate_rows=256,
             stock="auto", no_progress=False)
    a.update(kw)
    return argparse.Namespace(**a)


def test_cli_run_writes_csv_and_log_and_resumes(tmp_path, capsys):
    write_untuned(tmp_path / "m.untuned.csv", keys((1, 2, 4)))
    b = FakeBackend(script={(4, "v_gemv"): "reject"})
    assert tune_cli.run(_args(tmp_path), backend=b) == 0
    out = tmp_path / "m.tuned.csv"
    assert out.read_text().splitlines()[0].split(",") == list(TUNED_COLUMNS)
    rows, issues = read_tuned(out)
    assert issues == [] and sorted(r.key.tokens for r in rows) == [1, 2, 4]
    log = (tmp_path / "m.tuned.csv.log").read_text()
    for m in (1, 2, 4):
        for name in ("v_gemv", "v_grouped", "stock"):
            assert f"M={m} " in log and f":{name} status=" in log
    assert "aot:v_gemv status=rejected" in log and "winner=" in log
    text = capsys.readouterr().out
    assert "winner" in text and "rejected aot:v_gemv" in text
    # second run: nothing to do, file unchanged
    before = out.read_text()
    b2 = FakeBackend()
    assert tune_cli.run(_args(tmp_path), backend=b2) == 0
    assert not [c for c in b2.calls if c[0] == "begin"]
    assert out.read_text() == before
    assert "3 row(s) already tuned" in capsys.readouterr().out


def test_cli_failure_exit_code_tokens_filter_and_backup(tmp_path, capsys):
    write_untuned(tmp_path / "m.untuned.csv", keys((1, 2, 4)))
    out = tmp_path / "m.tuned.csv"
    write_tuned(out, [])
    with open(out, "a") as f:
        f.write("garbage,row\n")
    b = FakeBackend(stock=False, script={(2, "v_gemv"): "reject", (2, "v_grouped"): "reject"})
    rc = tune_cli.run(_args(tmp_path, tokens=[1, 2]), backend=b)
    assert rc == 1
    err = capsys.readouterr().err
    assert f"{out}:2: too few fields" in err
    assert "1 row(s) could not be tuned: 2" in err
    assert (tmp_path / "m.tuned.csv.bak").read_text().endswith("garbage,row\n")
    rows, issues = read_tuned(out)
    assert issues == [] and [r.key.tokens for r in rows] == [1]


def test_cli_input_errors(tmp_path, capsys):
    assert tune_cli.run(_args(tmp_path), backend=FakeBackend()) == 2  # missing input
    write_untuned(tmp_path / "m.untuned.csv", keys((1,)))
    assert tune_cli.run(_args(tmp_path, tokens=[3]), backend=FakeBackend()) == 2
    assert "no valid rows" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_cli_without_gpu(tmp_path, capsys):
    from vllm_moe_aot.cli import main

    write_untuned(tmp_path / "m.untuned.csv", keys((1,)))
    rc = main(["tune", "-i", str(tmp_path / "m.untuned.csv"), "-o",
               str(tmp_path / "m.tuned.csv")])
    assert rc == 2 and "needs a CUDA or ROCm GPU" in capsys.readouterr().err


def test_layer_backend_asks_stock_for_once_per_scheme():
    """``stock_for``: the stock peer of each row's scheme (what vLLM would run), asked once
    per scheme and named in the row."""
    asked = []

    def stock_for(scheme):
        asked.append(scheme)
        stock = FakeStock()
        stock.name = f"stock_{scheme.family}"
        return stock

    backend = LayerBackend("cpu", DEV, moe_factory=factory(), stock_for=stock_for,
                           timer=lambda fns, **kw: {"stock": 5.0}.get(kw.get("name"), 9.0),
                           gate_rows=8, max_sets=1)
    keys = [RowKey.of(SHAPE, Scheme.FP8_PTPC, 3), RowKey.of(SHAPE, Scheme.FP8_PTPC, 5),
            RowKey.of(SHAPE, Scheme.FP8_PER_TENSOR_STATIC, 3)]
    backend.plan(keys)
    rows = [tuner.tune_key(k, backend).row for k in keys]
    assert [r.stock_provider for r in rows] == ["stock_fp8_ptpc", "stock_fp8_ptpc",
                                                "stock_fp8_per_tensor"]
    assert all(r.backend == "stock" and r.stock_us == 5.0 for r in rows)
    assert asked == [Scheme.FP8_PTPC, Scheme.FP8_PER_TENSOR_STATIC]
    with pytest.raises(ValueError, match="stock or stock_for"):
        LayerBackend("cpu", DEV, stock=FakeStock(), stock_for=stock_for)
