"""GPU timing: CUDA-graph replays over rotated input sets, and the machine's floors.

- :func:`time_graph` captures one CUDA graph that calls every function of ``fns`` (one per
  rotated input set) ``loops`` times, replays it many times, times each replay with CUDA events
  and returns the median time of one call. Rotating over sets whose bytes exceed the L2 keeps
  weights and activations from being L2-resident, as they are not in a real model's forward.
- :func:`measure_hbm_bandwidth`: a 2 GiB device-to-device copy, read + write bytes counted.
- :func:`measure_fp8_flops`: ``torch._scaled_mm`` on 8192^3 fp8 with row-wise scales.
- :func:`device_info`: name, arch, SM/CU count and L2 size, as the tuned CSVs record them.

Everything here needs a GPU (CUDA or ROCm through torch.cuda); on a machine without one the
functions raise :class:`NoGPUError` with a message that says so.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch


class NoGPUError(RuntimeError):
    """Raised by every GPU-only function when torch sees no GPU."""


class DeadlineExceeded(TimeoutError):
    """A timing run passed its deadline (see ``deadline`` arguments)."""


def gpu_available() -> bool:
    return torch.cuda.is_available()


def require_gpu(what: str = "GPU timing") -> torch.device:
    """The current CUDA/ROCm device, or :class:`NoGPUError` naming ``what`` needs it."""
    if not torch.cuda.is_available():
        raise NoGPUError(f"{what} needs a CUDA or ROCm GPU, and torch sees none "
                         "(torch.cuda.is_available() is False)")
    return torch.device("cuda", torch.cuda.current_device())


def _check_deadline(deadline: float | None, what: str) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise DeadlineExceeded(f"timed out during {what}")


@dataclass(frozen=True)
class DeviceInfo:
    """What a tuned row records about the GPU (``arch`` as the AOT build names targets)."""

    name: str
    arch: str
    cu_num: int
    l2_bytes: int
    total_bytes: int


def device_info(device: torch.device | None = None) -> DeviceInfo:
    """Name and arch as :func:`vllm_moe_aot.device.identify` gives them (the names tuned
    configs are keyed by), plus SM/CU count, L2 and memory size."""
    device = device if device is not None else require_gpu("device_info")
    if device.type != "cuda":
        raise NoGPUError(f"device_info needs a GPU device, got {device}")
    from vllm_moe_aot.device import identify

    ident = identify(device)
    name, arch = ident.name, ident.arch
    props = torch.cuda.get_device_properties(device)
    return DeviceInfo(name=name, arch=arch, cu_num=int(props.multi_processor_count),
                      l2_bytes=int(getattr(props, "L2_cache_size", 50 << 20)),
                      total_bytes=int(props.total_memory))


def free_bytes(device: torch.device | None = None) -> int:
    device = device if device is not None else require_gpu("free_bytes")
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


@dataclass(frozen=True)
class Timing:
    """Median microseconds of one call, and how it was measured."""

    us: float
    sets: int
    loops: int
    replays: int
    samples_us: list[float] = field(default_factory=list, repr=False)

    @property
    def spread(self) -> float:
        """(p90 - p10) / median of the per-call samples."""
        if len(self.samples_us) < 3:
            return 0.0
        q = statistics.quantiles(self.samples_us, n=10)
        return (q[-1] - q[0]) / self.us if self.us > 0 else 0.0


def _events_ms(run: Callable[[], object], n: int) -> list[float]:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for s, e in zip(starts, ends, strict=True):
        s.record()
        run()
        e.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]


def time_graph(fns: Sequence[Callable[[], object]], *, warmup: int = 2,
               min_graph_us: float = 200.0, max_loops: int = 64, target_s: float = 0.3,
               min_replays: int = 10, max_replays: int = 200,
               deadline: float | None = None) -> Timing:
    """Median µs of one call of ``fns[i]()`` under CUDA-graph replay.

    ``fns`` are the same operation on different input sets (rotation). They must be
    graph-capturable (no host sync, no CPU-side state that changes between calls). The eager
    warm-up runs them first (Triton JIT compiles, config files load outside the capture).
    ``deadline`` (a ``time.monotonic()`` value) is checked between phases.
    """
    if not fns:
        raise ValueError("time_graph needs at least one function")
    require_gpu("time_graph")
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(max(1, warmup)):
            for f in fns:
                f()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    _check_deadline(deadline, "warm-up")

    def one_pass() -> None:
        for f in fns:
            f()

    eager_ms = statistics.median(_events_ms(one_pass, 3))
    per_call_us = max(eager_ms * 1e3 / len(fns), 1e-3)
    loops = max(1, min(max_loops, math.ceil(min_graph_us / (per_call_us * len(fns)))))
    _check_deadline(deadline, "eager estimate")

    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(loops):
                one_pass()
        graph.replay()
        torch.cuda.synchronize()
        _check_deadline(deadline, "graph capture")
        graph_ms = statistics.median(_events_ms(graph.replay, 3))
        replays = int(min(max_replays, max(min_replays, target_s * 1e3 / max(graph_ms, 1e-3))))
        if deadline is not None:
            left_ms = (deadline - time.monotonic()) * 1e3
            replays = max(3, min(replays, int(left_ms / max(graph_ms, 1e-3) / 2)))
        samples = _events_ms(graph.replay, replays)
    finally:
        graph.reset()
    calls = loops * len(fns)
    per_call = [ms * 1e3 / calls for ms in samples]
    return Timing(us=statistics.median(per_call), sets=len(fns), loops=loops,
                  replays=len(samples), samples_us=per_call)


def measure_hbm_bandwidth(nbytes: int = 2 << 30, iters: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted): median of ``iters``
    copies of ``nbytes`` (2 GiB by default)."""
    dev = require_gpu("the HBM bandwidth measurement")
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    src.fill_(1)
    for _ in range(2):
        dst.copy_(src)
    torch.cuda.synchronize()
    ms = statistics.median(_events_ms(lambda: dst.copy_(src), iters))
    return 2.0 * nbytes / (ms * 1e-3)


def measure_fp8_flops(n: int = 8192, iters: int = 20,
                      fp8_dtype: torch.dtype | None = None) -> float:
    """FLOP/s of an ``n x n x n`` fp8 GEMM with row-wise scales (``torch._scaled_mm``,
    bf16 out): median of ``iters`` runs."""
    dev = require_gpu("the fp8 FLOP/s measurement")
    if fp8_dtype is None:
        from vllm_moe_aot.measure.workload import default_fp8_dtype

        fp8_dtype = default_fp8_dtype(dev)
    a = torch.randn(n, n, device=dev).to(fp8_dtype)
    b = torch.randn(n, n, device=dev).to(fp8_dtype)  # [N, K], used as column-major [K, N]
    sa = torch.rand(n, 1, device=dev, dtype=torch.float32) + 0.5
    sb = torch.rand(1, n, device=dev, dtype=torch.float32) + 0.5
    bt = b.t()

    def gemm():
        return torch._scaled_mm(a, bt, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)

    for _ in range(3):
        gemm()
    torch.cuda.synchronize()
    ms = statistics.median(_events_ms(gemm, iters))
    return 2.0 * n * n * n / (ms * 1e-3)


def host_time(fn: Callable[[], object], *, iters: int = 30, warmup: int = 3) -> float:
    """Median host (CPU) µs of one eager call of ``fn``: the time the caller's thread spends
    in it, with the GPU idle at each call's start (a sync before, none inside the timed span),
    as vLLM pays it for batches it runs outside CUDA graphs."""
    require_gpu("host_time")
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    return statistics.median(samples)
