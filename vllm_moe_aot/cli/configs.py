"""``python -m vllm_moe_aot.cli.configs``: regenerate the shipped untuned CSVs (``--generate``)
or validate config files."""

from __future__ import annotations

import argparse
import sys

from vllm_moe_aot.dispatch.configs import generate_untuned, read_tuned, read_untuned


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m vllm_moe_aot.cli.configs",
        description="Regenerate the shipped untuned CSVs, or check config files.")
    p.add_argument("--generate", action="store_true",
                   help="rewrite <config-dir>/<preset>_<scheme>_tp<T>.untuned.csv")
    p.add_argument("--config-dir", default=None)
    p.add_argument("--tp", type=int, default=None,
                   help="only this tensor-parallel size (default: every shipped layout)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel ranks with --tp")
    p.add_argument("check", nargs="*", help="CSV files to validate")
    args = p.parse_args(argv)
    rc = 0
    if args.generate:
        for path in generate_untuned(args.config_dir, args.tp, ep=args.ep):
            print(f"wrote {path}")
    for f in args.check:
        reader = read_tuned if str(f).endswith(".tuned.csv") else read_untuned
        rows, issues = reader(f)
        for issue in issues:
            print(issue)
        print(f"{f}: {len(rows)} valid row(s), {len(issues)} issue(s)")
        rc |= bool(issues)
    return rc



if __name__ == "__main__":
    sys.exit(main())
