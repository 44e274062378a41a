"""The fused FP8 MoE pipeline: vLLM-free host side of the AOT kernels.

    moe = FusedMoE(shape, scheme, device, max_tokens=8192)
    moe.run(variant, x, w13, w2, w13_scale, w2_scale, topk_weights, topk_ids, out)

``run`` launches the variant's code objects on the current stream, allocates nothing, never
synchronises and is CUDA-graph capturable. Its buffers live in a :class:`Workspace` sized once
for ``max_tokens``; larger batches are processed in chunks of that many tokens. Workspaces are
cached per (device, shape, token budget) and shared by every layer of that shape: layers run
one after another on one stream, so one set of buffers serves them all.

Inputs (vLLM's layout): ``x`` bf16 ``[M, K]``; ``w13`` fp8 ``[E, 2N, K]`` (gate rows, then up);
``w2`` fp8 ``[E, K, N]``; scales fp32, ``[E]`` per tensor or ``[E, 2N]`` / ``[E, K]`` for ptpc;
``a13_scale`` / ``a2_scale`` one-element fp32 tensors for the static scheme; ``topk_weights``
fp32 ``[M, topk]``; ``topk_ids`` int32 ``[M, topk]`` with values in ``[0, E)``; ``out`` bf16
``[M, K]``. All contiguous.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any

import torch

from vllm_moe_aot.shapes import MoEShape, Scheme, unsupported_reason

#: Token chunk the workspace is sized for when a caller asks for more.
MAX_CHUNK_TOKENS = 16384


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _fp8_dtype(target: str) -> torch.dtype:
    return torch.float8_e4m3fnuz if target == "gfx942" else torch.float8_e4m3fn


@dataclass(frozen=True)
class _Stage:
    kernel: Any  # runtime kernel handle with .launch(grid, *args)
    consts: dict[str, Any]


class Workspace:
    """Every intermediate buffer of both regimes for up to ``tokens`` tokens.

    Invariant kept by the grouped regime: ``counts`` is all zeros between calls (it is zeroed
    here once, and the scatter kernel re-zeroes it after align has consumed it).
    """

    _cache: dict[tuple, Workspace] = {}
    _lock = threading.Lock()

    def __init__(self, shape: MoEShape, device: torch.device, tokens: int, max_block_m: int,
                 fp8: torch.dtype):
        E, K, N, topk = shape.E, shape.K, shape.N, shape.topk
        pairs = tokens * topk
        max_rows = pairs + min(pairs, E) * (max_block_m - 1)
        i32 = dict(dtype=torch.int32, device=device)
        f32 = dict(dtype=torch.float32, device=device)
        self.tokens = tokens
        self.act = torch.empty(pairs, N, **f32)  # gemv intermediate
        self.xq = torch.empty(tokens, K, dtype=fp8, device=device)
        self.a_scale = torch.empty(tokens, **f32)
        self.counts = torch.zeros(E, **i32)
        self.cursor = torch.empty(E, **i32)
        self.total = torch.empty(1, **i32)
        self.sorted_ids = torch.empty(max_rows, **i32)
        self.block_expert = torch.empty(_cdiv(max_rows, 16), **i32)
        self.actq = torch.empty(max_rows, N, dtype=fp8, device=device)
        self.act_scale = torch.empty(max_rows, **f32)
        self.partial = torch.empty(pairs, K, dtype=torch.bfloat16, device=device)
        self.acc = torch.empty(tokens, K, **f32)  # atomic stage 2's accumulator

    @classmethod
    def get(cls, shape: MoEShape, device: torch.device, tokens: int, max_block_m: int,
            fp8: torch.dtype) -> Workspace:
        key = (str(device), shape, tokens, max_block_m, fp8)
        with cls._lock:
            ws = cls._cache.get(key)
            if ws is None:
                ws = cls._cache[key] = cls(shape, device, tokens, max_block_m, fp8)
            return ws


class FusedMoE:
    """One MoE layer shape + scheme on one device; runs any of its compiled variants.

    ``runtime`` defaults to the process-wide :class:`vllm_moe_aot.runtime.Runtime` of
    ``device``; kernel-development tools pass their own (e.g. a Triton-JIT one). ``pdl=False``
    launches every kernel plainly (no programmatic dependent launch): the same results, for
    profiles that want each kernel's own duration and for measuring what PDL saves.
    """

    def __init__(self, shape: MoEShape, scheme: Scheme | str, device: torch.device | str,
                 max_tokens: int = 8192, runtime: Any = None, pdl: bool = True):
        scheme = Scheme.parse(scheme) if isinstance(scheme, str) else scheme
        reason = unsupported_reason(shape, scheme)
        if reason:
            raise ValueError(f"vllm-moe-aot cannot serve {shape} {scheme.value}: {reason}")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.shape, self.scheme = shape, scheme
        self.pdl = bool(pdl)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if runtime is None:
            from vllm_moe_aot.runtime import Runtime

            runtime = Runtime.get(self.device)
        self.runtime = runtime
        self.fp8 = _fp8_dtype(self.runtime.target)
        self._variants: dict[str, dict] = {}
        self._stages: dict[str, dict[str, _Stage]] = {}
        for v in self.runtime.manifest.variants:
            kernels = v["kernels"].get(scheme.value)
            if kernels is None or shape.N > v.get("max_n", {}).get(scheme.value, shape.N):
                continue
            # a kernel that holds top-k slots in a TOPK_PAD-wide tile serves topk <= TOPK_PAD
            pads = [self.runtime.manifest.constexprs(k).get("TOPK_PAD", shape.topk)
                    for k in kernels.values()]
            if shape.topk > min(pads):
                continue
            self._variants[v["name"]] = v
            self._stages[v["name"]] = {
                role: _Stage(self.runtime.kernel(k), self.runtime.manifest.constexprs(k))
                for role, k in kernels.items()}
        if not self._variants:
            raise ValueError(f"no compiled variant serves {shape} {scheme.value} on "
                             f"{self.runtime.target}")
        max_bm = max([st["stage1"].consts.get("BLOCK_M", 16)
                      for st in self._stages.values()] + [16])
        self.chunk = min(max_tokens, MAX_CHUNK_TOKENS)
        self.ws = Workspace.get(shape, self.device, self.chunk, max_bm, self.fp8)

    @property
    def variants(self) -> list[str]:
        return list(self._variants)

    def variants_for(self, tokens: int) -> list[str]:
        """Variants meant for a batch of ``tokens`` (every variant is correct at any size)."""
        return [n for n, v in self._variants.items() if tokens <= v.get("max_tokens", tokens)]

    def regime(self, variant: str) -> str:
        return self._variant(variant)["regime"]

    def quantize_activations(self, variant: str) -> bool:
        """Which reference semantics ``variant`` computes (False: W8A16)."""
        return bool(self._variant(variant)["quantize_activations"])

    def tolerance(self, variant: str) -> float:
        """Relative error vs the float64 reference ``variant`` is held to in tests."""
        return float(self._variant(variant).get("tolerance", 1e-2))

    def _variant(self, variant: str) -> dict:
        try:
            return self._variants[variant]
        except KeyError:
            raise ValueError(f"unknown variant {variant!r} for {self.shape} "
                             f"{self.scheme.value}; available: {', '.join(self._variants)}"
                             ) from None

    def run(self, variant: str, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
            w13_scale: torch.Tensor, w2_scale: torch.Tensor, topk_weights: torch.Tensor,
            topk_ids: torch.Tensor, out: torch.Tensor, a13_scale: torch.Tensor | None = None,
            a2_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Compute the layer into ``out`` (see the module docstring for the contract)."""
        v = self._variant(variant)
        stages = self._stages[variant]
        M = x.shape[0]
        self._check(x, w13, w2, w13_scale, w2_scale, topk_weights, topk_ids, out,
                    a13_scale, a2_scale)
        launch = self._run_gemv if v["regime"] == "gemv" else self._run_grouped
        for c0 in range(0, M, self.chunk):
            c1 = min(M, c0 + self.chunk)
            launch(stages, x[c0:c1], w13, w2, w13_scale, w2_scale, topk_weights[c0:c1],
                   topk_ids[c0:c1], out[c0:c1], a13_scale, a2_scale)
        return out

    def _run_gemv(self, st, x, w13, w2, w13_scale, w2_scale, tw, ids, out, a13, a2):
        M = x.shape[0]
        s = self.shape
        s1, s2 = st["stage1"], st["stage2"]
        act = self.ws.act
        s1.kernel.launch((M * s.topk, _cdiv(s.N, s1.consts["BLOCK_N"]), 1),
                         x, w13, w13_scale, ids, act, s.N, s.K, s.topk)
        # programmatic dependent launch where stage 2 waits on stage 1 in-kernel (USE_GDC);
        # without it the attribute would let stage 2 read the intermediate too early
        s2.kernel.launch((M, _cdiv(s.K, s2.consts["BLOCK_K"]), 1),
                         act, w2, w2_scale, ids, tw, out, s.N, s.K, s.topk,
                         pdl=self.pdl and bool(s2.consts.get("USE_GDC")))

    def _run_grouped(self, st, x, w13, w2, w13_scale, w2_scale, tw, ids, out, a13, a2):
        M = x.shape[0]
        s, ws = self.shape, self.ws
        pairs = M * s.topk
        bm = st["stage1"].consts["BLOCK_M"]
        blocks = _cdiv(pairs + min(pairs, s.E) * (bm - 1), bm)
        # kernels compiled with USE_GDC wait in-kernel for their predecessor, so each after
        # the first is launched with programmatic dependent launch (its launch overlaps the
        # predecessor's tail); prep, first of the chain, is launched plainly
        pdl = {role: self.pdl and bool(stage.consts.get("USE_GDC"))
               for role, stage in st.items()}
        st["prep"].kernel.launch((M, 1, 1), x, ws.xq, ws.a_scale, a13, ids, ws.counts,
                                 ws.acc, s.K, s.topk)
        try:
            st["align"].kernel.launch((s.E, 1, 1), ws.counts, ws.cursor, ws.block_expert,
                                      ws.sorted_ids, ws.total, s.E, pairs, pdl=pdl["align"])
            st["scatter"].kernel.launch((_cdiv(pairs, st["scatter"].consts["BLOCK"]), 1, 1),
                                        ids, ws.cursor, ws.sorted_ids, ws.counts, pairs, s.E,
                                        pdl=pdl["scatter"])
        except BaseException:
            # prep has counted this call's experts and scatter never cleared them: restore
            # the all-zero histogram the next call (of any layer sharing it) relies on
            with contextlib.suppress(Exception):
                ws.counts.zero_()
            raise
        s1 = st["stage1"]
        s1.kernel.launch((blocks, _cdiv(s.N, s1.consts["BLOCK_N"]), 1),
                         ws.xq, ws.a_scale, a13, w13, w13_scale, a2, ws.sorted_ids,
                         ws.block_expert, ws.total, ws.actq, ws.act_scale,
                         s.N, s.K, s.topk, pairs, pdl=pdl["stage1"])
        s2 = st["stage2"]
        # the looped stage 2 walks its K tiles itself: K_SPLIT programs per row block
        s2.kernel.launch((blocks * bm // s2.consts["BLOCK_M"],
                          s2.consts.get("K_SPLIT") or _cdiv(s.K, s2.consts["BLOCK_K"]), 1),
                         ws.actq, ws.act_scale, a2, w2, w2_scale, tw, ws.sorted_ids,
                         ws.block_expert, ws.total, ws.partial, ws.acc, s.N, s.K, s.topk,
                         pairs, pdl=pdl["stage2"])
        red = st["reduce"]
        red.kernel.launch((M, _cdiv(s.K, red.consts["BLOCK_K"]), 1),
                          ws.partial, ws.acc, out, s.K, s.topk, pdl=pdl["reduce"])

    def _check(self, x, w13, w2, w13_scale, w2_scale, tw, ids, out, a13, a2) -> None:
        """Host-only checks (attribute reads; no device work) that keep bad calls from
        reading or writing out of bounds."""
        s = self.shape
        M = x.shape[0]
        problems = []
        if x.dtype != torch.bfloat16 or tuple(x.shape) != (M, s.K) or not x.is_contiguous():
            problems.append(f"x must be contiguous bf16 [M, {s.K}], got {x.dtype} "
                            f"{tuple(x.shape)}")
        if out.dtype != torch.bfloat16 or tuple(out.shape) != (M, s.K) or \
                not out.is_contiguous():
            problems.append(f"out must be contiguous bf16 [{M}, {s.K}], got {out.dtype} "
                            f"{tuple(out.shape)}")
        if tuple(w13.shape) != (s.E, 2 * s.N, s.K) or w13.dtype != self.fp8 or \
                not w13.is_contiguous():
            problems.append(f"w13 must be contiguous {self.fp8} [{s.E}, {2 * s.N}, {s.K}], "
                            f"got {w13.dtype} {tuple(w13.shape)}")
        if tuple(w2.shape) != (s.E, s.K, s.N) or w2.dtype != self.fp8 or \
                not w2.is_contiguous():
            problems.append(f"w2 must be contiguous {self.fp8} [{s.E}, {s.K}, {s.N}], got "
                            f"{w2.dtype} {tuple(w2.shape)}")
        n13, n2 = (2 * s.N, s.K) if self.scheme.per_channel_weights else (1, 1)
        for name, t, per_e in (("w13_scale", w13_scale, n13), ("w2_scale", w2_scale, n2)):
            if t.dtype != torch.float32 or t.numel() != s.E * per_e or not t.is_contiguous():
                problems.append(f"{name} must be contiguous fp32 with {s.E}x{per_e} "
                                f"elements for {self.scheme.value}, got {t.dtype} "
                                f"{tuple(t.shape)}")
        if tuple(ids.shape) != (M, s.topk) or ids.dtype != torch.int32 or \
                not ids.is_contiguous():
            problems.append(f"topk_ids must be contiguous int32 [{M}, {s.topk}], got "
                            f"{ids.dtype} {tuple(ids.shape)}")
        if tuple(tw.shape) != (M, s.topk) or tw.dtype != torch.float32 or \
                not tw.is_contiguous():
            problems.append(f"topk_weights must be contiguous fp32 [{M}, {s.topk}], got "
                            f"{tw.dtype} {tuple(tw.shape)}")
        if self.scheme.static_activations:
            for name, t in (("a13_scale", a13), ("a2_scale", a2)):
                if t is None or t.numel() != 1 or t.dtype != torch.float32:
                    problems.append(f"{name} must be a one-element fp32 tensor for "
                                    f"{self.scheme.value}")
        for name, t in (("x", x), ("w13", w13), ("w2", w2), ("out", out), ("topk_ids", ids)):
            if t.device != self.device:
                problems.append(f"{name} is on {t.device}, expected {self.device}")
        if problems:
            raise ValueError("FusedMoE.run: " + "; ".join(problems))
