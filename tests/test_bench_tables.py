"""docs/benchmarks.md must show exactly what the committed bench JSON says: its tables are
regenerated here from the raw files by scripts/bench_tables.py and compared."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests._scripts import load_script

ROOT = Path(__file__).resolve().parents[1]


def _bench_tables():
    return load_script("bench_tables")


def test_benchmarks_md_tables_come_from_the_raw_json():
    doc = (ROOT / "docs" / "benchmarks.md").read_text()
    raw_dirs = re.findall(r"Raw output, JSON and plots: \[`(bench-[^`]+)/`\]", doc)
    assert len(raw_dirs) >= 2, raw_dirs  # the H200 run and the H100 history
    tables = _bench_tables()
    for raw_dir in raw_dirs:
        files = sorted((ROOT / "docs" / raw_dir).glob("bench_*.json"))
        assert len(files) == 2, files
        for f in files:
            report = json.loads(f.read_text())
            assert report["mode"] == "gpu" and len({r["M"] for r in report["rows"]}) == 18
            assert tables.table(report) in doc, f"{raw_dir}/{f.name}: docs/benchmarks.md differs"


def test_targets_are_marked_from_the_numbers():
    tables = _bench_tables()
    row = {"M": 1, "variant": "v", "us": 8.0, "stock_us": 16.0, "torch_us": 90.0,
           "speedup_best": 2.0, "best_peer": "stock", "floor_us": 5.0, "over_floor": 1.6,
           "tflops": 1.0, "err": 1e-3, "host_us": 10.0, "stock_host_us": 9.0,
           "torch_host_us": 50.0}
    report = {"layer": {"name": "qwen3.5-397b-a17b tp8", "scheme": "fp8_ptpc",
                        "shape": {"E": 512, "K": 4096, "N": 128, "topk": 10}},
              "device": {"name": "card"}, "bw_bytes_per_s": 3e12, "fp8_flops_per_s": 1.4e15,
              "stock_provider": "vllm_stock", "torch_peer": "torch_grouped", "rows": [row]}
    out = tables.table(report)
    assert "| met | <= 1.35: **not met** | <= 7: **not met** |" in out
    assert "| 1 | 10.0 | 9.0 | 50.0 | **not met** |" in out  # host time above stock's


def test_issue15_targets_in_benchmarks_md_come_from_the_raw_json():
    doc = (ROOT / "docs" / "benchmarks.md").read_text()
    m = re.search(r"bench_tables\.py --targets docs/(bench-[^/]+)/bench_\*\.json", doc)
    assert m, "benchmarks.md names the run its issue-15 targets come from"
    tables = _bench_tables()
    for f in sorted((ROOT / "docs" / m.group(1)).glob("bench_*.json")):
        report = json.loads(f.read_text())
        assert tables.targets_table(report) in doc, f"{f.name}: the targets table differs"


def _peer_report(rows: list[dict]) -> dict:
    return {"layer": {"name": "qwen3.5-397b-a17b tp8", "scheme": "fp8_ptpc"},
            "peers": {"vllm_triton": "t", "vllm_cutlass": "c", "gemm_bound": "b"},
            "stock_provider": "vllm_cutlass", "rows": rows}


def _row(M: int, us: float, best: float, tf: float, bound: float | None = None, **kw) -> dict:
    return {"M": M, "variant": "v", "us": us, "speedup_best": best, "best_peer": "vllm_triton",
            "over_floor": tf, "peer_us": {"gemm_bound": bound} if bound else {}, **kw}


def test_issue15_targets_are_marked_from_the_numbers():
    tables = _bench_tables()
    rows = [_row(1, 5.0, 2.0, 1.4, host_us=10.0, peer_host_us={"vllm_cutlass": 20.0}),
            _row(64, 100.0, 1.1, 1.30),
            _row(1024, 300.0, 0.98, 1.40),
            _row(4096, 500.0, 1.2, 1.5, bound=450.0),
            _row(131072, 6000.0, 1.3, 1.9, bound=7000.0, host_us=30.0,
                 peer_host_us={"vllm_cutlass": 25.0})]
    out = tables.targets_table(_peer_report(rows))
    # target 1: M=1024 loses to the best peer; from 2048 on the bound counts too
    assert "**not met** at 2 of 5: M=1024 0.98x vllm_triton, M=4096 0.90x bound |" in out
    assert "| 2. M = 1 | met: 5.0 µs (<= 5.5), time/F 1.40 |" in out
    assert "| 3. time/F <= 1.33 for 2 <= M <= 1024 | **not met** at 1 of 2: M=1024 1.40 |" in out
    # target 4: t/F within bounds, but 131072 is over Qwen's 5.9 ms
    assert "**not met** at 1 of 2: M=131072 6.00 ms (<= 5.9) |" in out
    assert "| 5. host time of one eager call <= stock's (vllm_cutlass) | **not met**: " in out
    rows[2] = _row(1024, 300.0, 1.01, 1.30)
    rows[3] = _row(4096, 400.0, 1.2, 1.5, bound=450.0)
    rows[4] = _row(131072, 5800.0, 1.3, 1.9, bound=7000.0, host_us=20.0,
                   peer_host_us={"vllm_cutlass": 25.0})
    out = tables.targets_table(_peer_report(rows))
    assert out.count("| met") == 5, out


def test_issue15_target_1_counts_the_deepgemm_bound_of_block_layers():
    """A block-FP8 layer has no torch GEMM bound (torch takes no 128x128 block scales): its
    GEMMs-alone bound is DeepGEMM's, and target 1 counts it from M = 2048 on."""
    tables = _bench_tables()
    rows = [_row(1024, 300.0, 1.4, 1.30, peer_us={"deepgemm_bound": 250.0}),  # under 2048
            _row(4096, 650.0, 1.4, 1.5, peer_us={"deepgemm_bound": 500.0})]
    report = {**_peer_report(rows), "layer": {"name": "qwen3.5-397b-a17b-fp8 tp8",
                                              "scheme": "fp8_block"}}
    out = tables.targets_table(report)
    assert "**not met** at 1 of 2: M=4096 0.77x bound |" in out
