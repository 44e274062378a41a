"""The fused FP8 MoE pipeline: vLLM-free host side of the AOT kernels.

    moe = FusedMoE(shape, scheme, device, max_tokens=8192)
    moe.run(variant, x, w13, w2, w13_scale, w2_scale, topk_weights, topk_ids, out)

``run`` launches the variant's code objects on the current stream, allocates nothing, never
synchronises and is CUDA-graph capturable. Its buffers live in a :class:`Workspace` sized once
for ``max_tokens``; larger batches are processed in chunks of that many tokens.
:meth:`FusedMoE.shared` is the one place layers share: every layer of one (shape, scheme,
device, token budget) gets the same pipeline and so the same buffers, since layers run one
after another on one stream.

Inputs (vLLM's layout): ``x`` bf16 ``[M, K]``; ``w13`` fp8 ``[E, 2N, K]`` (gate rows, then up);
``w2`` fp8 ``[E, K, N]``; scales fp32, ``[E]`` per tensor, ``[E, 2N]`` / ``[E, K]`` for ptpc,
``[E, 2N/128, K/128]`` / ``[E, K/128, N/128]`` for block FP8 (``FusedMoE.scale_shapes``);
``a13_scale`` / ``a2_scale`` one-element fp32 tensors for the static scheme; ``topk_weights``
fp32 ``[M, topk]``; ``topk_ids`` int32 ``[M, topk]`` with values in ``[0, E)``; ``out`` bf16
``[M, K]``. All contiguous.

Expert parallelism (vLLM's convention): ``E`` is the rank's local experts, ``topk_ids`` hold
global ids and ``expert_map`` (int32 ``[global experts]``) gives each global id's local slot, or
-1 for an expert on another rank. The ids are mapped into the workspace first (one gather);
pairs of other ranks then cost no work and contribute nothing, and a token with no local
expert gets a zero row (the reduce-scatter across ranks adds the other ranks' shares).
"""

from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass
from typing import Any

import torch

from vllm_moe_aot import caches
from vllm_moe_aot.contract import Regime, Role, Variant, fp8_dtype_name
from vllm_moe_aot.shapes import (
    WEIGHT_BLOCK,
    MoEShape,
    Scheme,
    unsupported_reason,
    weight_scale_shapes,
)

#: Token chunk the workspace is sized for when a caller asks for more.
MAX_CHUNK_TOKENS = 16384
#: Bytes a workspace may take: wide layers get a smaller token chunk (a power of two, at
#: least MIN_CHUNK_TOKENS) instead of gigabytes of buffers.
WORKSPACE_BUDGET_BYTES = 2 << 30
MIN_CHUNK_TOKENS = 256


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _fp8_dtype(target: str) -> torch.dtype:
    return getattr(torch, fp8_dtype_name(target))


@dataclass(frozen=True)
class _Stage:
    kernel: Any  # runtime kernel handle with .launch(grid, *args)
    consts: dict[str, Any]


class Workspace:
    """Every intermediate buffer of both regimes for up to ``tokens`` tokens.

    Invariant kept by the grouped regime: ``counts`` is all zeros between calls (it is zeroed
    here once, and the scatter kernel re-zeroes it after align has consumed it).
    """

    def __init__(self, shape: MoEShape, device: torch.device, tokens: int, max_block_m: int,
                 fp8: torch.dtype, scale_tiles: int = 1, x_groups: int = 1):
        self.tokens = tokens
        for name, (dims, dtype) in self.buffers(shape, tokens, max_block_m, fp8, scale_tiles,
                                                x_groups).items():
            alloc = torch.zeros if name == "counts" else torch.empty
            setattr(self, name, alloc(dims, dtype=dtype, device=device))

    @staticmethod
    def buffers(shape: MoEShape, tokens: int, max_block_m: int, fp8: torch.dtype,
                scale_tiles: int = 1, x_groups: int = 1
                ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of every buffer: the one statement of what a workspace holds
        (``__init__`` allocates it, :meth:`nbytes` sums it)."""
        E, K, N = shape.E, shape.K, shape.N
        pairs = tokens * shape.topk
        # sorted rows of the grouped regime: every pair, plus each used expert's padding
        rows = pairs + min(pairs, E) * (max_block_m - 1)
        i32, f32 = torch.int32, torch.float32
        return {
            "act": ((pairs, N), f32),  # gemv intermediate
            "xq": ((tokens, K), fp8),
            "a_scale": ((tokens * x_groups,), f32),  # per row (block FP8: per 128 columns)
            "local_ids": ((pairs,), i32),  # topk_ids mapped through an expert_map
            "counts": ((E,), i32),
            "cursor": ((E,), i32),
            "total": ((1,), i32),
            "sorted_ids": ((rows,), i32),
            "block_expert": ((_cdiv(rows, 16),), i32),
            "actq": ((rows, N), fp8),
            # one scale per (row, stage-1 N tile) under the dynamic schemes
            "act_scale": ((rows * scale_tiles,), f32),
            "partial": ((pairs, K), torch.bfloat16),
            "acc": ((tokens, K), f32),  # the atomic stage 2's accumulator
        }

    @classmethod
    def nbytes(cls, shape: MoEShape, tokens: int, max_block_m: int, scale_tiles: int = 1,
               x_groups: int = 1) -> int:
        """What :class:`Workspace` allocates for ``tokens``."""
        return sum(math.prod(dims) * dtype.itemsize for dims, dtype in cls.buffers(
            shape, tokens, max_block_m, torch.float8_e4m3fn, scale_tiles, x_groups).values())

    @classmethod
    def chunk_tokens(cls, shape: MoEShape, max_tokens: int, max_block_m: int,
                     scale_tiles: int = 1, x_groups: int = 1,
                     budget: int = WORKSPACE_BUDGET_BYTES) -> int:
        """The token chunk for a pipeline asked for ``max_tokens``: at most MAX_CHUNK_TOKENS,
        halved (not below MIN_CHUNK_TOKENS) while the workspace would pass ``budget``."""
        tokens = min(max_tokens, MAX_CHUNK_TOKENS)
        while tokens > MIN_CHUNK_TOKENS and \
                cls.nbytes(shape, tokens, max_block_m, scale_tiles, x_groups) > budget:
            tokens = max(MIN_CHUNK_TOKENS, 1 << ((tokens - 1).bit_length() - 1))
        return tokens

#: FusedMoE.shared's pipelines (or the error building one raised), by layer
_shared: dict[tuple, Any] = {}
_shared_lock = threading.Lock()


def _clear_shared() -> None:
    with _shared_lock:
        _shared.clear()


caches.register("pipeline.FusedMoE.shared", _clear_shared)


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
        #: the variants that serve this layer, and why each other one does not
        self._variants: dict[str, Variant] = {}
        self.skipped: dict[str, str] = {}
        self._stages: dict[str, dict[Role, _Stage]] = {}
        built = set(self.runtime.manifest.names())
        for v in self.runtime.manifest.variants:
            why = v.serves(shape, scheme)
            if why is None:
                missing = sorted(set(v.chain(scheme).values()) - built)
                if missing:
                    why = f"not built for {self.runtime.target}: {', '.join(missing)}"
            if why is not None:
                self.skipped[v.name] = why
                continue
            self._variants[v.name] = v
            self._stages[v.name] = {
                role: _Stage(self.runtime.kernel(k), self.runtime.manifest.constexprs(k))
                for role, k in v.chain(scheme).items()}
        if not self._variants:
            raise ValueError(f"no compiled variant serves {shape} {scheme.value} on "
                             f"{self.runtime.target}")
        max_bm = max([v.block_m for v in self._variants.values()] + [16])
        # dynamic stage 1 writes one scale per (row, N tile): room for its narrowest tiles
        s1_bn = [st[Role.STAGE1].consts["BLOCK_N"] for name, st in self._stages.items()
                 if self._variants[name].regime is Regime.GROUPED]
        tiles = _cdiv(shape.N, min(s1_bn)) if s1_bn and not scheme.static_activations else 1
        # block FP8 quantises x per 128-column group
        groups = shape.K // WEIGHT_BLOCK[1] if scheme.block_weights else 1
        self.chunk = Workspace.chunk_tokens(shape, max_tokens, max_bm, tiles, groups)
        self.ws = Workspace(shape, self.device, self.chunk, max_bm, self.fp8, tiles, groups)
        #: the weight scales ``run`` takes (their element counts are checked)
        self.scale_shapes = weight_scale_shapes(shape, scheme)

    @classmethod
    def shared(cls, shape: MoEShape, scheme: Scheme, device: torch.device | str,
               max_tokens: int) -> FusedMoE:
        """The process's one pipeline for this layer, built on first use with the default
        runtime; a failure to build it is remembered and raised again (the layers that share
        it fall back together, and nothing is retried per layer)."""
        key = (shape, Scheme.parse(scheme) if isinstance(scheme, str) else scheme,
               str(device), max_tokens)
        with _shared_lock:
            cached = _shared.get(key)
        if isinstance(cached, BaseException):
            raise cached
        if cached is not None:
            return cached
        try:
            moe = cls(shape, key[1], device, max_tokens=max_tokens)
        except Exception as exc:
            with _shared_lock:
                _shared[key] = exc
            raise
        with _shared_lock:
            return _shared.setdefault(key, moe)

    @property
    def variants(self) -> list[str]:
        return list(self._variants)

    def variants_for(self, tokens: int) -> list[str]:
        """Variants meant for a batch of ``tokens`` (every variant is correct at any size)."""
        return [n for n, v in self._variants.items() if v.means_tokens(tokens)]

    def variant(self, name: str) -> Variant:
        """The typed variant ``name`` (ValueError if it does not serve this layer)."""
        try:
            return self._variants[name]
        except KeyError:
            raise ValueError(f"unknown variant {name!r} for {self.shape} "
                             f"{self.scheme.value}; available: {', '.join(self._variants)}"
                             ) from None

    def regime(self, variant: str) -> str:
        return self.variant(variant).regime.value

    def quantize_activations(self, variant: str) -> bool:
        """Which reference semantics ``variant`` computes (False: W8A16)."""
        return self.variant(variant).quantize_activations

    def act_group(self, variant: str) -> int:
        """Columns per dynamic scale of the re-quantised intermediate (0: the whole row); the
        reference's ``act_group``."""
        return self.variant(variant).act_group_for(self.scheme)

    def tolerance(self, variant: str) -> float:
        """Relative error vs the float64 reference ``variant`` is held to in tests."""
        return self.variant(variant).tolerance_for(self.scheme)

    def run(self, variant: str, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
            w13_scale: torch.Tensor, w2_scale: torch.Tensor, topk_weights: torch.Tensor,
            topk_ids: torch.Tensor, out: torch.Tensor, a13_scale: torch.Tensor | None = None,
            a2_scale: torch.Tensor | None = None,
            expert_map: torch.Tensor | None = None) -> torch.Tensor:
        """Compute the layer into ``out`` (see the module docstring for the contract)."""
        v = self.variant(variant)
        stages = self._stages[variant]
        M = x.shape[0]
        self._check(x, w13, w2, w13_scale, w2_scale, topk_weights, topk_ids, out,
                    a13_scale, a2_scale, expert_map)
        launch = self._run_gemv if v.regime is Regime.GEMV else self._run_grouped
        for c0 in range(0, M, self.chunk):
            c1 = min(M, c0 + self.chunk)
            ids = topk_ids[c0:c1]
            if expert_map is not None:
                local = self.ws.local_ids[:ids.numel()].view(ids.shape)
                torch.index_select(expert_map, 0, ids.view(-1), out=local.view(-1))
                ids = local
            launch(stages, x[c0:c1], w13, w2, w13_scale, w2_scale, topk_weights[c0:c1],
                   ids, out[c0:c1], a13_scale, a2_scale)
        return out

    def _run_gemv(self, st, x, w13, w2, w13_scale, w2_scale, tw, ids, out, a13, a2):
        M = x.shape[0]
        s = self.shape
        s1, s2 = st[Role.STAGE1], st[Role.STAGE2]
        act = self.ws.act
        s1.kernel.launch((M * s.topk, _cdiv(s.N, s1.consts["BLOCK_N"]), 1),
                         x_ptr=x, w13_ptr=w13, w13_scale_ptr=w13_scale, topk_ids_ptr=ids,
                         act_ptr=act, N=s.N, K=s.K, topk=s.topk)
        # programmatic dependent launch where stage 2 waits on stage 1 in-kernel (USE_GDC);
        # without it the attribute would let stage 2 read the intermediate too early
        s2.kernel.launch((M, _cdiv(s.K, s2.consts["BLOCK_K"]), 1),
                         act_ptr=act, w2_ptr=w2, w2_scale_ptr=w2_scale, topk_ids_ptr=ids,
                         topk_weights_ptr=tw, out_ptr=out, N=s.N, K=s.K, topk=s.topk,
                         pdl=self.pdl and bool(s2.consts.get("USE_GDC")))

    def _run_grouped(self, st, x, w13, w2, w13_scale, w2_scale, tw, ids, out, a13, a2):
        M = x.shape[0]
        s, ws = self.shape, self.ws
        pairs = M * s.topk
        bm = st[Role.STAGE1].consts["BLOCK_M"]
        blocks = _cdiv(pairs + min(pairs, s.E) * (bm - 1), bm)
        # kernels compiled with USE_GDC wait in-kernel for their predecessor, so each after
        # the first is launched with programmatic dependent launch (its launch overlaps the
        # predecessor's tail); prep, first of the chain, is launched plainly
        pdl = {role: self.pdl and bool(stage.consts.get("USE_GDC"))
               for role, stage in st.items()}
        rows = dict(sorted_ids_ptr=ws.sorted_ids, block_expert_ptr=ws.block_expert,
                    total_ptr=ws.total)
        st[Role.PREP].kernel.launch((M, 1, 1), x_ptr=x, xq_ptr=ws.xq, a_scale_ptr=ws.a_scale,
                                    static_scale_ptr=a13, topk_ids_ptr=ids,
                                    counts_ptr=ws.counts, acc_ptr=ws.acc, K=s.K, topk=s.topk)
        try:
            st[Role.ALIGN].kernel.launch((s.E, 1, 1), counts_ptr=ws.counts,
                                         cursor_ptr=ws.cursor, **rows, E=s.E,
                                         num_pairs=pairs, pdl=pdl[Role.ALIGN])
            sc = st[Role.SCATTER]
            sc.kernel.launch((_cdiv(pairs, sc.consts["BLOCK"]), 1, 1), topk_ids_ptr=ids,
                             cursor_ptr=ws.cursor, sorted_ids_ptr=ws.sorted_ids,
                             counts_ptr=ws.counts, num_pairs=pairs, E=s.E,
                             pdl=pdl[Role.SCATTER])
        except BaseException:
            # prep has counted this call's experts and scatter never cleared them: restore
            # the all-zero histogram the next call (of any layer sharing it) relies on
            with contextlib.suppress(Exception):
                ws.counts.zero_()
            raise
        dims = dict(N=s.N, K=s.K, topk=s.topk, num_pairs=pairs)
        s1 = st[Role.STAGE1]
        s1.kernel.launch((blocks, _cdiv(s.N, s1.consts["BLOCK_N"]), 1),
                         xq_ptr=ws.xq, a_scale_ptr=ws.a_scale, a13_static_ptr=a13,
                         w13_ptr=w13, w13_scale_ptr=w13_scale, a2_static_ptr=a2, **rows,
                         actq_ptr=ws.actq, act_scale_ptr=ws.act_scale, **dims,
                         pdl=pdl[Role.STAGE1])
        s2 = st[Role.STAGE2]
        # the looped stage 2 walks its K tiles itself: K_SPLIT programs per row block
        s2.kernel.launch((blocks * bm // s2.consts["BLOCK_M"],
                          s2.consts.get("K_SPLIT") or _cdiv(s.K, s2.consts["BLOCK_K"]), 1),
                         actq_ptr=ws.actq, act_scale_ptr=ws.act_scale, a2_static_ptr=a2,
                         w2_ptr=w2, w2_scale_ptr=w2_scale, topk_weights_ptr=tw, **rows,
                         partial_ptr=ws.partial, acc_ptr=ws.acc, **dims, pdl=pdl[Role.STAGE2])
        red = st[Role.REDUCE]
        red.kernel.launch((M, _cdiv(s.K, red.consts["BLOCK_K"]), 1), partial_ptr=ws.partial,
                          acc_ptr=ws.acc, topk_ids_ptr=ids, out_ptr=out, K=s.K, topk=s.topk,
                          pdl=pdl[Role.REDUCE])

    def _check(self, x, w13, w2, w13_scale, w2_scale, tw, ids, out, a13, a2,
               expert_map=None) -> None:
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
        for name, t, want in zip(("w13_scale", "w2_scale"), (w13_scale, w2_scale),
                                 self.scale_shapes, strict=True):
            if t.dtype != torch.float32 or t.numel() != math.prod(want) or \
                    not t.is_contiguous():
                problems.append(f"{name} must be contiguous fp32 {list(want)} for "
                                f"{self.scheme.value}, got {t.dtype} {tuple(t.shape)}")
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
        if expert_map is None and s.ep > 1:
            # the kernels index counts, cursors and weights by id: global ids up to E * ep
            # would write past this layer's E slots
            problems.append(f"topk_ids of an expert-parallel layer (ep={s.ep}) are global ids "
                            f"over {s.global_experts} experts: pass its expert_map")
        if expert_map is not None and (expert_map.dtype != torch.int32 or
                                       expert_map.dim() != 1 or
                                       expert_map.numel() < s.E or
                                       not expert_map.is_contiguous()):
            problems.append(f"expert_map must be contiguous 1-D int32 over the global experts "
                            f"(at least the {s.E} local ones), got {expert_map.dtype} "
                            f"{tuple(expert_map.shape)}")
        named = [("x", x), ("w13", w13), ("w2", w2), ("out", out), ("topk_ids", ids)]
        if expert_map is not None:
            named.append(("expert_map", expert_map))
        for name, t in named:
            if t.device != self.device:
                problems.append(f"{name} is on {t.device}, expected {self.device}")
        if problems:
            raise ValueError("FusedMoE.run: " + "; ".join(problems))
