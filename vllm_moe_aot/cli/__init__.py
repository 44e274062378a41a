"""``vllm-moe-aot`` command line: build, info, bench, tune.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their subcommand runs so that
``vllm-moe-aot info`` never pays for Triton or vLLM imports it does not need.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# subcommand -> (module, help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "build": ("vllm_moe_aot.cli.build", "compile kernel variants into code objects + manifest"),
    "info": ("vllm_moe_aot.cli.info", "show platform, code objects, configs and dispatch"),
    "bench": ("vllm_moe_aot.measure.bench",
              "benchmark the AOT pipeline against stock and the floors"),
    "tune": ("vllm_moe_aot.measure.tune_cli",
             "tune per-batch-size dispatch end to end, write tuned CSV"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-moe-aot", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    argv = sys.argv[1:] if argv is None else argv
    # Only the chosen subcommand's module is imported; the others get a bare parser for --help.
    chosen = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == chosen:
            importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    try:
        status = int(importlib.import_module(SUBCOMMANDS[args.command][0]).run(args) or 0)
        sys.stdout.flush()
    except BrokenPipeError:
        # the reader went away (``vllm-moe-aot info | head``): stop quietly, as cat does.
        # Point stdout at devnull so the interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    return status

