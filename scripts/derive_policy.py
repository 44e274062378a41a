"""Turn a policy sweep's tune logs into the default dispatch policy table.

    python3 scripts/derive_policy.py docs/default-dispatch-2026-12-02/sweep \
        [-o vllm_moe_aot/dispatch/default_policy.csv]

For every layer class (:func:`vllm_moe_aot.dispatch.policy.layer_class`) and each of the 18
token counts: among the candidates measured (status ok) on *every* surveyed layer of the class
at that count, the one with the largest worst-case speedup over stock; it is the choice if that
worst case is >= 1 + POLICY_MARGIN, else stock. A token count the sweep did not reach is stock.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vllm_moe_aot.dispatch.policy import (  # noqa: E402
    POLICY_COLUMNS,
    POLICY_FILE,
    POLICY_MARGIN,
    STOCK,
    PolicyRow,
    layer_class,
)
from vllm_moe_aot.shapes import TUNED_TOKEN_COUNTS, MoEShape  # noqa: E402

_LINE = re.compile(r"\[(?P<gpu>[^\]]+?) (?P<arch>sm_\w+|gfx\w+)\] M=(?P<m>\d+) "
                   r"E=(?P<E>\d+),K=(?P<K>\d+),N=(?P<N>\d+),topk=(?P<t>\d+) (?P<fam>\S+) silu "
                   r"(?:aot|stock):(?P<cand>\S+) status=ok us=(?P<us>[\d.]+)")
_SESSION_CUS = re.compile(r"\((?P<arch>\S+), (?P<cus>\d+) CUs\)")


def read_sweep(folder: Path):
    """``{(layer, M): {candidate: us}}``, ``{layer: (shape, family)}``, arch, SM count."""
    times: dict[tuple[str, int], dict[str, float]] = defaultdict(dict)
    layers: dict[str, tuple[MoEShape, str]] = {}
    arch, cus = "", 0
    for log in sorted(folder.glob("*.tuned.csv.log")):
        name = log.name.removesuffix(".tuned.csv.log")
        for line in log.read_text().splitlines():
            m = _LINE.search(line)
            if m:
                arch = m["arch"]
                layers[name] = (MoEShape(int(m["E"]), int(m["K"]), int(m["N"]), int(m["t"])),
                                m["fam"])
                times[(name, int(m["m"]))][m["cand"]] = float(m["us"])
    for out in sorted(folder.glob("*.stdout.txt")):
        m = _SESSION_CUS.search(out.read_text())
        if m:
            cus = int(m["cus"])
            break
    return times, layers, arch, cus


def add_validation(path: Path, times, layers) -> None:
    """Fold a validation run's timings (``scripts/validate_policy.py``: the policy's choice and
    stock per layer and M) into the sweep data: a layer it timed joins its class."""
    import csv as _csv

    with open(path, newline="") as f:
        for r in _csv.DictReader(f):
            if not (r["policy_us"] and r["stock_us"]) or r["policy"] == STOCK:
                continue
            name = r["layer"]
            layers.setdefault(name, (MoEShape(int(r["E"]), int(r["K"]), int(r["N"]),
                                              int(r["topk"])), r["scheme"]))
            times[(name, int(r["M"]))].update({r["policy"]: float(r["policy_us"]),
                                               STOCK: float(r["stock_us"])})


def derive(folder: Path, margin: float = POLICY_MARGIN,
           validations: tuple[Path, ...] = ()) -> list[PolicyRow]:
    times, layers, arch, cus = read_sweep(folder)
    for v in validations:
        add_validation(v, times, layers)
    classes: dict[tuple, list[str]] = defaultdict(list)
    for name, (shape, family) in layers.items():
        classes[layer_class(shape, family)].append(name)
    rows = []
    for (family, n_max, topk_max), names in sorted(classes.items()):
        shapes = [layers[n][0] for n in names]
        ranges = dict(e_min=min(s.E for s in shapes), e_max=max(s.E for s in shapes),
                      k_min=min(s.K for s in shapes), k_max=max(s.K for s in shapes),
                      n_min=min(s.N for s in shapes), n_seen_max=max(s.N for s in shapes))
        for M in TUNED_TOKEN_COUNTS:
            runs = [times[(n, M)] for n in names if STOCK in times.get((n, M), {})]
            choice, worst = STOCK, 0.0
            if len(runs) == len(names):
                common = set.intersection(*(set(r) - {STOCK} for r in runs))
                for cand in sorted(common):
                    w = min(r[STOCK] / r[cand] for r in runs)
                    if w > worst:
                        choice, worst = cand, w
                if worst < 1.0 + margin:
                    choice = STOCK
            measured = ";".join(sorted(names)) if len(runs) == len(names) else "not measured"
            rows.append(PolicyRow(arch=arch, sm_count=cus, scheme=family, n_max=n_max,
                                  topk_max=topk_max, tokens=M, choice=choice,
                                  worst_speedup=worst, layers=measured, **ranges))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweep", help="folder of a policy sweep (tune logs)")
    p.add_argument("-o", "--output", default=str(POLICY_FILE))
    p.add_argument("--validation", nargs="*", default=[],
                   help="validation.csv files whose layers join their classes")
    args = p.parse_args()
    rows = derive(Path(args.sweep), validations=tuple(Path(v) for v in args.validation))
    with open(args.output, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(POLICY_COLUMNS), lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow(r.to_record())
    print(f"wrote {args.output}: {len(rows)} rows, "
          f"{sum(r.choice != STOCK for r in rows)} choose a variant")
    return 0


if __name__ == "__main__":
    sys.exit(main())
