"""Measure a fixed candidate set on many public models' MoE layers (GPU): the data the default
dispatch policy (:mod:`vllm_moe_aot.dispatch.policy`) is built from and checked against.

    python3 scripts/policy_sweep.py --out DIR [--layers NAME ...] [--budget-s 420]

For each survey layer it writes ``DIR/<layer>.untuned.csv`` and runs ``vllm-moe-aot tune`` on
it with ``--variants`` = the policy's candidates + stock and ``--min-gain 0`` (the log holds every
candidate's time; the tuned CSV the plain fastest). Rows already in ``DIR/<layer>.tuned.csv`` are
kept, so a second call resumes where a first one ran out of ``--budget-s``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vllm_moe_aot.dispatch.configs import RowKey, write_untuned  # noqa: E402
from vllm_moe_aot.dispatch.policy import SURVEY_LAYERS, candidate_pool  # noqa: E402
from vllm_moe_aot.pipeline import FusedMoE  # noqa: E402
from vllm_moe_aot.shapes import TUNED_TOKEN_COUNTS  # noqa: E402

#: largest batch the gemv candidates are swept at
GEMV_SWEEP_MAX_M = 64


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--layers", nargs="*", default=None, help="survey layer names (default all)")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="stop starting new layers after this many seconds")
    p.add_argument("--tokens", type=int, nargs="+", default=list(TUNED_TOKEN_COUNTS))
    p.add_argument("--variants", nargs="+", default=None,
                   help="candidates instead of the policy's pool (stock is always added)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    rc = 0
    for layer in SURVEY_LAYERS:
        if args.layers and layer.name not in args.layers:
            continue
        left = args.budget_s - (time.monotonic() - t0)
        if left < 20:
            print(f"budget spent: {layer.name} not started", flush=True)
            continue
        served = set(FusedMoE(layer.shape, layer.scheme, "cuda", max_tokens=1).variants)
        pool = [v for v in (args.variants or candidate_pool(layer.shape, layer.scheme))
                if v in served]
        # gemv variants lose to the grouped regime from a few dozen tokens on (every tune so
        # far): time them up to GEMV_SWEEP_MAX_M only; with no grouped variant serving the
        # layer, larger batches are stock by construction and are not swept
        grouped = [v for v in pool if not v.startswith("gemv")]
        parts = [([m for m in args.tokens if m <= GEMV_SWEEP_MAX_M], pool),
                 ([m for m in args.tokens if m > GEMV_SWEEP_MAX_M], grouped)]
        print(f"== {layer.name} {layer.shape} {layer.scheme.value}: {len(pool)} candidates, "
              f"{left:.0f} s left", flush=True)
        log = []
        for tokens, cands in parts:
            left = args.budget_s - (time.monotonic() - t0)
            if not tokens or not cands or left < 5:
                continue
            inp = out / f"{layer.name}.untuned.csv"
            write_untuned(inp, [RowKey.of(layer.shape, layer.scheme, m) for m in args.tokens])
            cmd = [sys.executable, "-m", "vllm_moe_aot.cli", "tune", "-i", str(inp),
                   "-o", str(out / f"{layer.name}.tuned.csv"), "--timeout", "60",
                   "--no-progress", "--min-gain", "0", "--gate-rows", "64",
                   "--tokens", *map(str, tokens), "--variants", *cands, "stock"]
            try:
                r = subprocess.run(cmd, timeout=max(left, 1.0), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
                log.append(r.stdout)
                print("\n".join(r.stdout.splitlines()[-12:]), flush=True)
                rc |= r.returncode != 0
            except subprocess.TimeoutExpired:
                print(f"{layer.name}: budget ran out mid-layer (rows so far kept)", flush=True)
                rc = 1
        (out / f"{layer.name}.stdout.txt").write_text("\n".join(log))
    return rc


if __name__ == "__main__":
    sys.exit(main())
