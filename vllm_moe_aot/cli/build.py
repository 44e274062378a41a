"""``vllm-moe-aot build``: compile the kernel variants into code objects + ``manifest.json``.

The Triton sources and the build live in the source checkout's ``kernels/`` package, next to
``vllm_moe_aot/``; wheels ship only the prebuilt code objects, so building needs a checkout.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

_NO_SOURCES = (
    "vllm-moe-aot build needs a source checkout: the Triton kernel sources (the kernels/ "
    "package beside vllm_moe_aot/) are not part of the installed package. The code objects "
    "ship prebuilt in the wheel under vllm_moe_aot/artifacts/, so running needs no build. To "
    "rebuild, clone the repository and run `pip install -e .` then `vllm-moe-aot build` from it."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", action="append", metavar="T",
                   help="target(s) to build: sm_90a, gfx942, gfx950 (repeatable or comma list; "
                        "default: every spec's targets)")
    p.add_argument("--kernels", action="append", metavar="NAME",
                   help="only these kernel specs (repeatable or comma list)")
    p.add_argument("--family", action="append", metavar="FAM",
                   help="only specs of these families (repeatable or comma list)")
    p.add_argument("--jobs", "-j", type=int, default=os.cpu_count() or 1,
                   help="parallel compile processes (default: CPU count, %(default)s)")
    p.add_argument("--force", action="store_true", help="recompile even unchanged objects")
    p.add_argument("--list", action="store_true",
                   help="list variants, kernels and targets; compile nothing")
    p.add_argument("--check", action="store_true",
                   help="exit 1 listing missing/stale objects, compile nothing (CI)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: the package's vllm_moe_aot/artifacts/)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _import_build():
    """``kernels.build`` from the checkout that holds this ``vllm_moe_aot`` package."""
    import vllm_moe_aot

    root = Path(vllm_moe_aot.__file__).resolve().parent.parent
    kdir = root / "kernels"
    if not ((kdir / "build.py").is_file() and (kdir / "spec.py").is_file()):
        return None, root
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    loaded = sys.modules.get("kernels")
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve().parent != kdir:
        raise SystemExit(f"another package named 'kernels' ({loaded.__file__}) is already "
                         f"imported; run the build in a fresh process from {root}")
    from kernels import build

    return build, root


def run(args: argparse.Namespace) -> int:
    build, root = _import_build()
    if build is None:
        print(_NO_SOURCES, file=sys.stderr)
        return 2
    out = args.out if args.out is not None else root / "vllm_moe_aot" / "artifacts"
    sel = {"targets": args.target, "kernels": args.kernels, "families": args.family}
    try:
        if args.list:
            print(build.listing(**sel))
            return 0
        if args.check:
            problems = build.check(out, **sel)
            if problems:
                print(f"{len(problems)} problem(s) in {out}:", file=sys.stderr)
                for p in problems:
                    print(f"  {p}", file=sys.stderr)
                print("run `vllm-moe-aot build` and commit vllm_moe_aot/artifacts/",
                      file=sys.stderr)
                return 1
            print(f"code objects in {out} are current")
            return 0
        report = build.build(out, jobs=args.jobs, force=args.force,
                             progress=not args.no_progress, **sel)
    except build.BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    if not report.ok:
        print(f"build failed: {len(report.failures)} object(s) did not compile"
              + (f", {len(report.problems)} manifest problem(s)" if report.problems else ""),
              file=sys.stderr)
        return 1
    return 0
