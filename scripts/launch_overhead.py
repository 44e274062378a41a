#!/usr/bin/env python3
"""Host cost of one kernel launch: the AOT runtime vs a Triton JIT launch of the same kernel.

Launches the ``smoke_axpy`` kernel (one 1024-element block) in batches small enough that the
GPU's launch queue never fills, times only the host side of each batch, and prints the median
per-launch cost in microseconds for:

* ``aot``       ``Runtime.kernel("smoke_axpy").launch(grid, ...)`` (cuLaunchKernel)
* ``aot pdl``   the same with ``pdl=True`` (cuLaunchKernelEx)
* ``triton``    ``axpy_kernel[grid](...)`` through Triton's JIT launcher (after warm-up)
* ``torch``     ``torch.add(x, y, alpha=a, out=out)``, for scale

GPU only. Exit status 1 when the AOT launch is slower than the Triton JIT launch.
Usage: ``python scripts/launch_overhead.py [--batch 100] [--batches 200]`` from the repo root.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def per_launch_us(fns: dict, batch: int, batches: int, sync) -> dict[str, tuple[float, float]]:
    """Median and min host µs per call of each fn; the paths take turns batch by batch so that
    clock or load drift affects them alike."""
    for fn in fns.values():  # warm-up
        for _ in range(batch):
            fn()
    sync()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(batches):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(batch):
                fn()
            t1 = time.perf_counter()
            sync()  # not timed: keeps the launch queue short
            samples[name].append((t1 - t0) / batch * 1e6)
    return {n: (statistics.median(v), min(v)) for n, v in samples.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=100, help="launches per timed batch")
    ap.add_argument("--batches", type=int, default=200, help="timed batches")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time the pieces of the AOT launch")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: this measures GPU launches", file=sys.stderr)
        return 2

    import torch

    if not torch.cuda.is_available():
        print("launch_overhead: needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    from kernels.smoke import axpy_kernel
    from vllm_moe_aot.runtime import Runtime

    dev = torch.device("cuda", torch.cuda.current_device())
    rt = Runtime.get(dev)
    k = rt.kernel("smoke_axpy")
    consts = rt.manifest.constexprs("smoke_axpy")
    entry = k.entry
    n = consts["BLOCK"]
    x = torch.randn(n, device=dev)
    y = torch.randn(n, device=dev)
    out = torch.empty(n, device=dev)
    grid = (1,)

    def aot():
        k.launch(grid, x, y, out, n, 0.5)

    def aot_pdl():
        k.launch(grid, x, y, out, n, 0.5, pdl=True)

    def jit():
        axpy_kernel[grid](x, y, out, n, 0.5, **consts, num_warps=entry.num_warps,
                          num_stages=1)

    def torch_add():
        torch.add(y, x, alpha=0.5, out=out)

    sync = torch.cuda.synchronize
    for fn in (aot, jit):  # same result both ways
        out.zero_()
        fn()
        sync()
        torch.testing.assert_close(out, x * 0.5 + y)

    paths = {"aot": aot, "aot pdl": aot_pdl, "triton": jit, "torch": torch_add}
    if args.breakdown:  # where the AOT launch's host time goes
        drv, func, addr, stream = k._drv, k.func, k._addr, k._stream()
        cu_stream = drv.CUstream(stream)
        args5 = (x, y, out, n, 0.5)
        paths.update({
            "  write args": lambda: k._write(*args5),
            "  get stream": k._stream,
            "  cuLaunchKernel, int stream": lambda: drv.cuLaunchKernel(
                func, 1, 1, 1, 128, 1, 1, 0, stream, addr, 0),
            "  cuLaunchKernel, CUstream": lambda: drv.cuLaunchKernel(
                func, 1, 1, 1, 128, 1, 1, 0, cu_stream, addr, 0),
        })
    rows = [(name, *t) for name, t in per_launch_us(paths, args.batch, args.batches,
                                                      sync).items()]
    print(f"device: {torch.cuda.get_device_name(dev)}; torch {torch.__version__}; "
          f"triton {triton.__version__} (JIT); code objects built with {rt.manifest.compiler}")
    print(f"host cost of one launch, {args.batches} batches of {args.batch}:")
    print(f"  {'path':30s} {'median µs':>10s} {'min µs':>8s}")
    for name, med, best in rows:
        print(f"  {name:30s} {med:10.2f} {best:8.2f}")
    ours, theirs = rows[0][1], rows[2][1]
    verdict = "OK" if ours <= theirs else "SLOWER"
    print(f"aot / triton = {ours / theirs:.2f} -> {verdict}")
    return 0 if ours <= theirs else 1


if __name__ == "__main__":
    sys.exit(main())
