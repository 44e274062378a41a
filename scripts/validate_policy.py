"""Time the default dispatch policy against vLLM's stock path (GPU), in one run per layer.

    python3 scripts/validate_policy.py --out DIR [--budget-s 200] [--layers survey|held-out]

``--layers held-out-1`` / ``held-out-2`` time layers the policy was not derived from (other
public models' per-rank layers inside the classes' ranges): the out-of-sample checks of a
committed table. The first set's timings were then folded into the table (see
docs/default-dispatch.md); the second set checks the table that resulted. ``survey``
(default): the presets and the survey layers.

For every survey layer and both presets (their tuned rows hidden: the policy alone decides) at
the 18 token counts: the policy's choice and stock, each gated against the float64 reference
and timed (CUDA-graph medians) in the same process; for the presets also the choice of the
rows tuned on the H100 (another GPU of the arch). Rows where the policy says stock are not
timed: the layer then runs stock, 1.00x by construction. Writes ``DIR/validation.csv``.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vllm_moe_aot.device import identify  # noqa: E402
from vllm_moe_aot.dispatch.configs import DispatchTable, RowKey, read_tuned  # noqa: E402
from vllm_moe_aot.dispatch.policy import SURVEY_LAYERS, SurveyLayer, both_schemes  # noqa: E402
from vllm_moe_aot.measure.peers.vllm_triton import get_stock_provider  # noqa: E402
from vllm_moe_aot.measure.timing import device_info, require_gpu  # noqa: E402
from vllm_moe_aot.measure.tune_backend import LayerBackend  # noqa: E402
from vllm_moe_aot.measure.tuner import tune_key  # noqa: E402
from vllm_moe_aot.shapes import PRESETS, TUNED_TOKEN_COUNTS, MoEShape  # noqa: E402

H100 = "NVIDIA H100 80GB HBM3"

#: per-rank layers the first policy was not derived from, each as ptpc and static per-tensor
HELD_OUT_1: tuple[SurveyLayer, ...] = tuple(
    both_schemes("qwen3-30b-a3b_tp4", MoEShape(E=128, K=2048, N=192, topk=8))
    + both_schemes("deepseek-v3_tp8", MoEShape(E=256, K=7168, N=256, topk=8))
    + both_schemes("glm-4.5-air_tp4", MoEShape(E=128, K=4096, N=352, topk=8))
    + both_schemes("qwen3-next-80b-a3b_tp8", MoEShape(E=512, K=2048, N=64, topk=10))
)

#: layers neither policy was derived from (checks the table re-derived with HELD_OUT_1)
HELD_OUT_2: tuple[SurveyLayer, ...] = tuple(
    both_schemes("kimi-k2_tp8", MoEShape(E=384, K=7168, N=256, topk=8))
    + both_schemes("glm-4.5_tp4", MoEShape(E=160, K=5120, N=384, topk=8))
    + both_schemes("minimax-m2_tp4", MoEShape(E=256, K=3072, N=384, topk=8))
    + both_schemes("qwen3-coder-480b-a35b_tp8", MoEShape(E=160, K=6144, N=320, topk=8))
)
HELD_OUT = {"held-out-1": HELD_OUT_1, "held-out-2": HELD_OUT_2}


def markdown_table(csv_path: str) -> str:
    """A validation.csv as docs/default-dispatch.md shows it: policy / stock per (layer, M)
    ("stock" where the policy says stock, "-" where the run's budget ended), then the minimum
    over the AOT buckets."""
    import csv

    rows = list(csv.DictReader(open(csv_path)))
    layers: dict[str, dict[int, str]] = {}
    worst = None
    for r in rows:
        cells = layers.setdefault(f"{r['layer']} ({r['E']},{r['K']},{r['N']},{r['topk']})", {})
        if r["policy"] == "stock":
            cells[int(r["M"])] = "stock"
        elif r["policy_us"] and r["stock_us"]:
            ratio = float(r["stock_us"]) / float(r["policy_us"])
            cells[int(r["M"])] = f"{ratio:.2f}"
            if worst is None or ratio < worst[0]:
                worst = (ratio, r["layer"], r["M"])
    ms = sorted({m for c in layers.values() for m in c})
    out = ["| layer (E,K,N,topk) | " + " | ".join(map(str, ms)) + " |",
           "|---|" + "---|" * len(ms)]
    out += [f"| {name} | " + " | ".join(c.get(m, "-") for m in ms) + " |"
            for name, c in layers.items()]
    if worst is not None:
        out += ["", f"**Minimum over the policy's AOT buckets, measured: {worst[0]:.3f}x stock "
                    f"({worst[1]}, M={worst[2]}) (>= 0.97 required).**"]
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out")
    p.add_argument("--budget-s", type=float, default=200.0)
    p.add_argument("--layers", choices=("survey", *HELD_OUT), default="survey")
    p.add_argument("--table", metavar="CSV",
                   help="print a validation.csv as the markdown table of "
                        "docs/default-dispatch.md and stop (no GPU)")
    args = p.parse_args()
    if args.table:
        print(markdown_table(args.table))
        return 0
    if not args.out:
        p.error("--out is required (unless --table)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = require_gpu("validate_policy")
    ident = identify(dev)
    backend = LayerBackend(dev, device_info(dev), stock=get_stock_provider(dev), gate_rows=64)
    shipped = Path(__file__).resolve().parent.parent / "vllm_moe_aot" / "configs"
    h100_rows = [r for f in sorted(shipped.glob("*.tuned.csv")) for r in read_tuned(f)[0]
                 if r.gpu == H100]
    if args.layers in HELD_OUT:
        layers = list(HELD_OUT[args.layers])
    else:
        layers = [SurveyLayer(n, pr.shape, pr.scheme) for n, pr in PRESETS.items()]
        layers += list(SURVEY_LAYERS)
    empty = Path(tempfile.mkdtemp())  # no tuned rows: the policy decides
    t0 = time.monotonic()
    fields = ["layer", "E", "K", "N", "topk", "scheme", "M", "policy", "policy_us", "stock_us",
              "policy_speedup", "h100_rows", "h100_rows_us", "h100_rows_speedup"]
    with open(out / "validation.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, lineterminator="\n")
        w.writeheader()
        for layer in layers:
            table = DispatchTable.for_layer(layer.shape, layer.scheme, ident.name, ident.arch,
                                            config_dir=empty, sm_count=ident.sm_count)
            h100 = DispatchTable.from_rows(h100_rows, layer.shape, layer.scheme, H100,
                                           ident.arch)
            keys = [RowKey.of(layer.shape, layer.scheme, m) for m in TUNED_TOKEN_COUNTS]
            backend.plan(keys)
            print(f"== {layer.name}: {table.origin} ({table.source})", flush=True)
            for key in keys:
                if time.monotonic() - t0 > args.budget_s:
                    print("budget spent", flush=True)
                    return 1
                choice = table.choose(key.tokens)
                other = h100.choose(key.tokens) if not h100.is_empty else ""
                wanted = [c for c in {choice, other} - {"", "stock"}]
                rec = dict(layer=layer.name, E=layer.shape.E, K=layer.shape.K, N=layer.shape.N,
                           topk=layer.shape.topk, scheme=layer.scheme.family, M=key.tokens,
                           policy=choice, h100_rows=other)
                if wanted:
                    res = {r.name: r.us for r in tune_key(key, backend, variants=wanted +
                                                          ["stock"], timeout=60,
                                                          min_gain=0.0).results if r.ok}
                    s = res.get("stock")
                    for col, c in (("policy", choice), ("h100_rows", other)):
                        us = s if c == "stock" else res.get(c)
                        if us is not None and s:
                            rec[f"{col}_us"] = f"{us:.2f}"
                            rec[f"{col}_speedup"] = f"{s / us:.3f}"
                    rec["stock_us"] = f"{s:.2f}" if s else ""
                else:
                    rec["policy_speedup"] = "1.000"  # stock: the layer runs vLLM's path
                w.writerow(rec)
                f.flush()
                print(f"{key.tokens:>7} {choice:34s} {rec.get('policy_speedup', '-'):>6} "
                      f"{other:34s} {rec.get('h100_rows_speedup', '-'):>6}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
