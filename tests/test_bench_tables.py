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
