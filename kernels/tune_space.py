"""The tune space: every fused-MoE kernel spec the AOT build compiles and the variants of them.

Two regimes (see the kernel modules for what each kernel does):

``gemv`` (single token and decode): :mod:`kernels.gemv` stage 1 and stage 2.
``grouped`` (prefill): :mod:`kernels.routing` (prep, align, scatter), :mod:`kernels.grouped`
(stage 1, stage 2 in three forms), :mod:`kernels.reduce`.

Every kernel and variant name is built from the fields of its tile (``*.part``); nothing is
derived by editing another name.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from kernels.spec import FP8_MAX, FP8_PTR, ON_CUDA, KernelSpec
from vllm_moe_aot.contract import DEFAULT_TOLERANCE, Regime, Role, Variant


@dataclass(frozen=True)
class SchemeFlags:
    """A scheme's kernel flags: PER_CHANNEL (ptpc weight scales), STATIC (checkpoint
    activation scales), BLOCK_SCALES (block FP8: 128 x 128 weight blocks, 128-column
    activation groups)."""

    per_channel: bool
    static: bool
    block: bool = False


#: flags per scheme value (vllm_moe_aot.shapes.Scheme)
SCHEME_FLAGS = {
    "fp8_ptpc": SchemeFlags(True, False),
    "fp8_per_tensor_static": SchemeFlags(False, True),
    "fp8_per_tensor_dynamic": SchemeFlags(False, False),
    "fp8_block": SchemeFlags(False, False, block=True),
}
_SHORT = {"fp8_ptpc": "ptpc", "fp8_per_tensor_static": "pts", "fp8_per_tensor_dynamic": "ptd",
          "fp8_block": "blk"}
#: the block-FP8 weight block and activation group (vllm_moe_aot.shapes.WEIGHT_BLOCK)
QBLOCK = 128

_ALIGN16 = ("N", "K")
#: gemv reads every (token, slot) pair's expert weights separately: past a few hundred tokens
#: the grouped regime always wins
GEMV_MAX_TOKENS = 512
#: top-k slots the routing prep kernel and the default gemv stage 2 hold in one tile
TOPK_PAD = 16
#: MAX_E in vllm_moe_aot.shapes
E_PAD = 1024
#: the product gate (vllm_moe_aot.measure.reference.GATE_REL_FRO): what unpromoted fp8 MMA
#: accumulation over K=4096 is held to, as vLLM's stock kernel is (measured 1.1e-2 to 1.6e-2)
GATE_TOLERANCE = 3e-2
#: block FP8's grouped variants are held to the product gate: on the H200 at K=4096 they
#: measure 1.4e-2 to 1.9e-2 against the float64 block reference, vLLM's own block kernel
#: 1.8e-2 to 1.9e-2 (2026-12-03, scripts/diagnose_block.py); at K=384 both are 2e-3 to 1.2e-2
BLOCK_TOLERANCE = {"fp8_block": GATE_TOLERANCE}


def _warps(nw: int) -> str:
    return "" if nw == 4 else f"_w{nw}"


# ------------------------------------------------------------------------------------- gemv
@dataclass(frozen=True)
class GemvStage1Tile:
    bn: int  # BLOCK_N
    bk: int  # BLOCK_K
    warps: int = 4

    @property
    def part(self) -> str:
        return f"n{self.bn}_k{self.bk}{_warps(self.warps)}"

    def kernel(self, tag: str) -> str:
        return f"gemv_s1_{tag}_{self.part}"


@dataclass(frozen=True)
class GemvStage2Tile:
    wide: bool  # moe_gemv_stage2_wide (VEC=16 in-thread sums)
    bk: int  # BLOCK_K output columns
    bn: int  # BLOCK_N reduction
    topk_pad: int = TOPK_PAD
    warps: int = 4

    @property
    def dims(self) -> str:
        return (f"k{self.bk}_n{self.bn}" + ("" if self.topk_pad == TOPK_PAD else
                                            f"_t{self.topk_pad}") + _warps(self.warps))

    @property
    def part(self) -> str:
        return ("w" if self.wide else "") + self.dims

    def kernel(self, tag: str) -> str:
        return f"gemv_s2{'w' if self.wide else ''}_{tag}_{self.dims}"


# Tiles (1, 4096), (2, 2048), (4, 2048, w8), (8, 1024, w8) and a "wide" stage 1 (VEC=16 bytes
# summed in-thread: 48-80 registers, 2-4x the bytes in flight per SM) never won a token count
# on the H100 (2026-11-25, docs/perf-notes.md) and are gone.
GEMV_S1_TILES = (GemvStage1Tile(4, 1024), GemvStage1Tile(8, 512))
# TOPK_PAD 8 serves topk <= 8 only (the variant says so) with half the registers: it wins
# every gemv token count of Hy3 (topk=8). One- and two-warp tiles reduce with warp shuffles
# and almost no block barriers (the 4-warp k8_n64 tile has 35 BAR.SYNC per program).
GEMV_S2_TILES = (GemvStage2Tile(False, 4, 128), GemvStage2Tile(False, 8, 64),
                 GemvStage2Tile(True, 16, 128, 8, 8), GemvStage2Tile(False, 2, 64, warps=1),
                 GemvStage2Tile(False, 4, 64, warps=2), GemvStage2Tile(False, 2, 128, 8, 1))


def _gemv_tag(flags: SchemeFlags) -> str:
    """gemv kernels differ only by the weight scales: per tensor, per channel or per block."""
    return "blk" if flags.block else "pc" if flags.per_channel else "pt"


def gemv_specs() -> list[KernelSpec]:
    specs: list[KernelSpec] = []
    for flags in {_gemv_tag(f): f for f in SCHEME_FLAGS.values()}.values():
        tag, pc = _gemv_tag(flags), flags.per_channel
        for t1 in GEMV_S1_TILES:
            specs.append(KernelSpec(
                name=t1.kernel(tag),
                source="kernels.gemv:moe_gemv_stage1",
                family="gemv_stage1",
                signature={"x_ptr": "*bf16", "w13_ptr": FP8_PTR, "w13_scale_ptr": "*fp32",
                           "topk_ids_ptr": "*i32", "act_ptr": "*fp32",
                           "N": "i32", "K": "i32", "topk": "i32"},
                constexprs={"BLOCK_N": t1.bn, "BLOCK_K": t1.bk, "PER_CHANNEL": pc,
                            "USE_GDC": ON_CUDA, "BLOCK_SCALES": flags.block},
                divisible_by_16=("x_ptr", "w13_ptr", "act_ptr", *_ALIGN16),
                num_warps=t1.warps, num_stages=2))
        for t2 in GEMV_S2_TILES:
            specs.append(KernelSpec(
                name=t2.kernel(tag),
                source=f"kernels.gemv:moe_gemv_stage2{'_wide' if t2.wide else ''}",
                family="gemv_stage2",
                signature={"act_ptr": "*fp32", "w2_ptr": FP8_PTR, "w2_scale_ptr": "*fp32",
                           "topk_ids_ptr": "*i32", "topk_weights_ptr": "*fp32",
                           "out_ptr": "*bf16", "N": "i32", "K": "i32", "topk": "i32"},
                constexprs={"BLOCK_K": t2.bk, "BLOCK_N": t2.bn, "TOPK_PAD": t2.topk_pad,
                            **({"VEC": 16} if t2.wide else {}), "PER_CHANNEL": pc,
                            "USE_GDC": ON_CUDA, "BLOCK_SCALES": flags.block},
                divisible_by_16=("act_ptr", "w2_ptr", "out_ptr", *_ALIGN16),
                num_warps=t2.warps, num_stages=2))
    return specs


def gemv_variants() -> list[Variant]:
    variants = []
    for t1 in GEMV_S1_TILES:
        for t2 in GEMV_S2_TILES:
            kernels = {}
            for scheme, flags in SCHEME_FLAGS.items():
                tag = _gemv_tag(flags)
                kernels[scheme] = {Role.STAGE1: t1.kernel(tag), Role.STAGE2: t2.kernel(tag)}
            variants.append(Variant(
                name=f"gemv_{t1.part}.{t2.part}", regime=Regime.GEMV, kernels=kernels,
                quantize_activations=False, max_topk=t2.topk_pad,
                max_tokens=GEMV_MAX_TOKENS))
    return variants


# ---------------------------------------------------------------------------------- grouped
@dataclass(frozen=True)
class GroupedStage1Tile:
    tag: str  # the variant name's tile part
    bm: int
    bn: int
    bk: int
    warps: int
    stages: int
    #: build targets (None: all)
    targets: tuple[str, ...] | None = None

    def kernel(self, scheme: str, promote: bool, swap_ab: bool = False) -> str:
        # the pipeline depth is named when it is not the default 3
        return (f"grp_s1_{_SHORT[scheme]}_m{self.bm}_n{self.bn}_k{self.bk}"
                + ("" if self.stages == 3 else f"_s{self.stages}")
                + ("" if promote else "_fa") + ("_sw" if swap_ab else ""))


@dataclass(frozen=True)
class GroupedStage2Tile:
    """A stage-2 tile. ``k_split`` 0: one output tile per program (moe_grouped_stage2); else
    the looped kernel (moe_grouped_stage2_loop) with that many programs per row block.
    ``bm`` overrides the stage-2 BLOCK_M (default: stage 1's, which rows are aligned to)."""

    bk: int  # BLOCK_K: output columns per tile
    bn: int  # BLOCK_N: reduction chunk
    warps: int
    stages: int
    atomic: bool = False
    k_split: int = 0
    bm: int | None = None
    resident: bool = False  # moe_grouped_stage2_resident: needs N <= bn
    #: the looped kernel with one activation scale per (row, stage-1 N tile): dynamic schemes
    #: at any N (stage 1's BLOCK_N need not cover N)
    tile_scales: bool = False
    #: the looped kernel's programs in (row block, K part) order (K_FIRST)
    k_first: bool = False
    #: the MMAs as W2 act^T (SWAP_AB; one output tile per program only)
    swap_ab: bool = False
    #: with tile_scales: each bn chunk is two stage-1 tiles of bn / 2 (HALVES; one output
    #: tile per program only)
    halves: bool = False

    def block_m(self, align_m: int) -> int:
        return self.bm or align_m

    def function(self) -> str:
        if not self.k_split:
            return "moe_grouped_stage2"
        return f"moe_grouped_stage2_{'resident' if self.resident else 'loop'}"

    def kernel(self, scheme: str, align_m: int, scale_n: int = 0) -> str:
        """``scale_n``: stage 1's BLOCK_N, the width of one activation scale (tile_scales)."""
        bm = self.block_m(align_m)
        # the pipeline depth is named when it is not the default 3
        dims = (f"{_SHORT[scheme]}_m{bm}_k{self.bk}_n{self.bn}"
                + ("" if self.stages == 3 else f"_s{self.stages}"))
        scales = f"_ts{scale_n}" if self.tile_scales else ""
        if not self.k_split:
            return (f"grp_s2_{dims}{'_atomic' if self.atomic else ''}{scales}"
                    + ("_h" if self.halves else "") + ("_sw" if self.swap_ab else ""))
        kind = "res" if self.resident else "loop"
        return (f"grp_s2{kind}_{dims}_split{self.k_split}"
                + (f"_align{align_m}" if align_m != bm else "") + scales
                + ("_kf" if self.k_first else ""))


S1_TILES = (
    GroupedStage1Tile("m16", 16, 128, 128, 4, 3),
    # N in 64-wide tiles for small batches of wide layers: 2x the stage-1 programs of m16
    GroupedStage1Tile("m16n64", 16, 64, 128, 4, 3),
    # ... 4 deep: decode batches are latency-bound on the weight stream (vLLM's Triton path
    # runs 4 stages up to M = 32). Not for gfx950: Triton 3.8's pipeliner fails there
    # (PassManager::run failed, 2026-12-03)
    GroupedStage1Tile("m16n64s4", 16, 64, 128, 4, 4, targets=("sm_90a", "gfx942")),
    # (64-deep K chunks, so that all of a decode batch's stage-1 programs fit on the card at
    # once, lost 1.7x: 311 against 180 us at DeepSeek-V3 EP8, M = 32; docs/perf-notes.md)
    GroupedStage1Tile("m64", 64, 128, 128, 4, 3),
    GroupedStage1Tile("m64n64", 64, 64, 128, 4, 3),
    GroupedStage1Tile("m64n256", 64, 256, 128, 8, 3),
    GroupedStage1Tile("m128", 128, 128, 128, 8, 3),
)
# (stage-1 BLOCK_M, stage-2 kind) -> stage-2 tile
S2_TILES = {
    (16, "std"): GroupedStage2Tile(128, 128, 4, 3),
    (64, "std"): GroupedStage2Tile(128, 128, 4, 3),
    (128, "std"): GroupedStage2Tile(128, 128, 8, 3),
    (64, "atomic"): GroupedStage2Tile(128, 128, 4, 3, atomic=True),
    (64, "k256"): GroupedStage2Tile(256, 128, 8, 3),  # half the programs, twice the work each
    (128, "k256"): GroupedStage2Tile(256, 128, 8, 3),
    (64, "n64"): GroupedStage2Tile(128, 64, 4, 3),  # no masked half-chunk when N = 192
    # K_SPLIT=1 measured within 1-2% of 4 (H100, 2026-11-25): only 4 is kept
    (64, "loop4"): GroupedStage2Tile(128, 64, 4, 3, k_split=4),
    # N = 128 in one MMA chunk (Qwen): no chunk loop, one epilogue per MMA
    (64, "loop4n128"): GroupedStage2Tile(128, 128, 4, 3, k_split=4),
    # the faster BLOCK_M=128 stage 1 feeding the faster BLOCK_M=64 looped stage 2
    (128, "loop4m64"): GroupedStage2Tile(128, 64, 4, 3, k_split=4, bm=64),
    # the intermediate tile loaded once per program (N <= 128: Qwen; N <= 256: Hy3)
    (64, "res4n128"): GroupedStage2Tile(128, 128, 4, 3, k_split=4, resident=True),
    # 2 stages: 2 CTAs/SM
    (64, "res4n256"): GroupedStage2Tile(128, 256, 4, 2, k_split=4, resident=True),
    (128, "res4m64n128"): GroupedStage2Tile(128, 128, 4, 3, k_split=4, bm=64, resident=True),
    # dynamic schemes at any N: the intermediate's scales per (row, stage-1 tile); the tiles
    # of loop4, loop4n128 and loop4m64 (issue 13; measured in docs/perf-notes.md)
    (16, "wloop4"): GroupedStage2Tile(128, 64, 4, 3, k_split=4, tile_scales=True),
    (64, "wloop4"): GroupedStage2Tile(128, 64, 4, 3, k_split=4, tile_scales=True),
    (64, "wloop4n128"): GroupedStage2Tile(128, 128, 4, 3, k_split=4, tile_scales=True),
    (128, "wloop4m64"): GroupedStage2Tile(128, 64, 4, 3, k_split=4, bm=64, tile_scales=True),
    (128, "wloop4m64n128"): GroupedStage2Tile(128, 128, 4, 3, k_split=4, bm=64,
                                              tile_scales=True),
    # the BLOCK_M=128 stage 1 feeding a BLOCK_M=128 looped stage 2 (8 warps): half the L2
    # reads of weight tiles per MMA of wloop4m64n128, for wide layers at large M (256 output
    # columns per tile spills: 255 registers and a 320-byte stack, 2026-12-03)
    (128, "wloop4n128"): GroupedStage2Tile(128, 128, 8, 3, k_split=4, tile_scales=True),
    # wide layers at large M (issue 13: ptpc N = 2048 spent 42% of the layer in stage 2 at
    # 466 TFLOP/s against stage 1's 762, 2026-12-03): 256 output columns per tile (half the
    # intermediate re-reads; best at M = 1024-4096) and one scale multiply per 256-wide chunk
    # (the m64n256 stage 1's tiles; 2 stages: 2 CTAs/SM; best at 16384). Both at once and a
    # 4-stage wloop4n128 lost at every M (docs/perf-notes.md)
    (64, "wloop4k256"): GroupedStage2Tile(256, 128, 8, 3, k_split=4, tile_scales=True),
    (64, "wloop4n256"): GroupedStage2Tile(128, 256, 4, 2, k_split=4, tile_scales=True),
    # ... in (row block, K part) order: the K parts of a row block share its intermediate
    # while it is in L2 (ncu at N = 2048, M = 2048: stage 2 read 755 MB from DRAM, 2x the
    # weights, intermediate and partials once; K-first cut it by 23%, the layer by 1-2%)
    (64, "wloop4n128kf"): GroupedStage2Tile(128, 128, 4, 3, k_split=4, tile_scales=True,
                                            k_first=True),
    (64, "wloop4k256kf"): GroupedStage2Tile(256, 128, 8, 3, k_split=4, tile_scales=True,
                                            k_first=True),
    # ... and one output tile per program: K / 128 programs per row block (small batches)
    (16, "wstd"): GroupedStage2Tile(128, 64, 4, 3, tile_scales=True),
    (64, "wstd"): GroupedStage2Tile(128, 64, 4, 3, tile_scales=True),
    # ... 64 output columns (one swapped MMA's rows): twice the programs, for decode batches
    # whose 128-column grid ran 1.1 waves (DeepSeek-V3 EP8 at M = 32: stage 2 streamed w2 at
    # 2.3 TB/s against stage 1's 3.5, H200, 2026-12-03)
    (16, "wstdk64"): GroupedStage2Tile(64, 64, 4, 3, tile_scales=True),
    # ... and 128-deep chunks (after 128-wide stage-1 tiles): 128 contiguous bytes of each
    # w2 row per load instead of 64
    (16, "wstdk64n128"): GroupedStage2Tile(64, 128, 4, 3, tile_scales=True),
    # ... the same loads after 64-wide stage-1 tiles, as two scale tiles per chunk
    (16, "wstdk64h128"): GroupedStage2Tile(64, 128, 4, 3, tile_scales=True, halves=True),
    # (the same 128-byte chunks for 64-row blocks, wstdn128 / wstdh128, took their stage 2
    # 19-25% faster but lost every row to m16n64s4_swab_wstdk64h128: removed, perf-notes.md)
}


@dataclass(frozen=True)
class Mode:
    """How a variant runs its stage 2 (``kind``, a key of :data:`S2_TILES`), whether its
    stage 1 promotes the fp8 MMA partials per K chunk (``fastacc``: it does not) and whether
    both stages run their MMAs with the weight tile as the 64-row operand (``swap_ab``: row
    blocks under 64, one output tile per stage-2 program)."""

    kind: str
    fastacc: bool
    swap_ab: bool = False

    @property
    def suffix(self) -> str:
        parts = ((["fastacc"] if self.fastacc else []) + (["swab"] if self.swap_ab else [])
                 + ([] if self.kind == "std" else [self.kind]))
        return "".join(f"_{p}" for p in parts)


MODES = (Mode("std", False), Mode("atomic", False), Mode("std", True), Mode("k256", True),
         Mode("n64", True), Mode("loop4", True), Mode("loop4", False), Mode("loop4n128", True),
         Mode("loop4m64", True), Mode("res4n128", True), Mode("res4n256", True),
         Mode("res4m64n128", True), Mode("wloop4", False), Mode("wloop4", True),
         Mode("wloop4n128", True), Mode("wloop4m64", True), Mode("wloop4m64n128", True),
         Mode("wstd", False), Mode("wstd", True), Mode("wloop4n128", False),
         Mode("wloop4m64", False), Mode("wloop4m64n128", False), Mode("wloop4k256", True),
         Mode("wloop4n256", True), Mode("wloop4n128kf", True), Mode("wloop4k256kf", True),
         # decode-sized batches of wide layers: vLLM's Triton path swaps A and B there and
         # led our m16n64_wstd by 7% (DeepSeek-V3 EP8 at M = 32, H200, 2026-12-03)
         Mode("std", False, swap_ab=True), Mode("wstd", False, swap_ab=True),
         Mode("wstdk64", False, swap_ab=True), Mode("wstdk64n128", False, swap_ab=True),
         Mode("wstdk64h128", False, swap_ab=True))
#: modes built for block FP8 only: its stage 1 always promotes, and these tiles (N = 128 in one
#: chunk, the BLOCK_M=128 stage 1) lost to their fastacc forms for every other scheme
BLOCK_ONLY_MODES = {Mode("wloop4n128", False), Mode("wloop4m64", False),
                    Mode("wloop4m64n128", False)}
#: stage-1 tiles also built without per-chunk promotion -> the fastacc modes built for the tile
#: (None: all). m64n256 covers Hy3's N=192 with one gate/up tile (A read once per row block
#: instead of 3x with m64n64)
FASTACC_TILES: dict[str, set[str] | None] = {
    "m64": None, "m64n64": None, "m128": None,
    "m64n256": {"loop4", "res4n256", "wloop4", "wloop4n128", "wloop4k256", "wloop4n256",
                "wloop4n128kf", "wloop4k256kf"}}


def _prep_name(static: bool, zero_acc: bool, group: bool = False) -> str:
    kind = "grp" if group else "static" if static else "dyn"
    return f"prep_{kind}{'_zacc' if zero_acc else ''}"


def _reduce_name(atomic: bool) -> str:
    return "acc_to_out" if atomic else "topk_reduce"


def _align_name(bm: int) -> str:
    return f"align_m{bm}"


SCATTER = "scatter"


def routing_specs() -> list[KernelSpec]:
    specs: list[KernelSpec] = []
    # (static, group): dynamic per row, static, dynamic per 128-column group (block FP8; no
    # atomic stage 2 for block, so no accumulator to zero)
    for static, group, zeros in ((False, False, (False, True)), (True, False, (False, True)),
                                 (False, True, (False,))):
        for zero in zeros:
            specs.append(KernelSpec(
                name=_prep_name(static, zero, group), source="kernels.routing:moe_prep",
                family="prep",
                signature={"x_ptr": "*bf16", "xq_ptr": FP8_PTR, "a_scale_ptr": "*fp32",
                           "static_scale_ptr": "*fp32", "topk_ids_ptr": "*i32",
                           "counts_ptr": "*i32", "acc_ptr": "*fp32", "K": "i32", "topk": "i32"},
                constexprs={"BLOCK_K": 1024, "TOPK_PAD": TOPK_PAD, "STATIC": static,
                            "ZERO_ACC": zero, "FP8_MAX": FP8_MAX, "EXACT_CAST": False,
                            "USE_GDC": ON_CUDA, "GROUP": QBLOCK if group else 0},
                divisible_by_16=("x_ptr", "xq_ptr", "acc_ptr", "K"), num_warps=4,
                num_stages=1))
    for bm in sorted({bm for bm, _ in S2_TILES}):
        specs.append(KernelSpec(
            name=_align_name(bm), source="kernels.routing:moe_align", family="align",
            signature={"counts_ptr": "*i32", "cursor_ptr": "*i32", "block_expert_ptr": "*i32",
                       "sorted_ids_ptr": "*i32", "total_ptr": "*i32", "E": "i32",
                       "num_pairs": "i32"},
            constexprs={"BLOCK_M": bm, "E_PAD": E_PAD, "FILL": 256, "USE_GDC": ON_CUDA},
            num_warps=4, num_stages=1))
    specs.append(KernelSpec(
        name=SCATTER, source="kernels.routing:moe_scatter", family="scatter",
        signature={"topk_ids_ptr": "*i32", "cursor_ptr": "*i32", "sorted_ids_ptr": "*i32",
                   "counts_ptr": "*i32", "num_pairs": "i32", "E": "i32"},
        constexprs={"BLOCK": 1024, "E_PAD": E_PAD, "USE_GDC": ON_CUDA}, num_warps=4,
        num_stages=1))
    return specs


def reduce_specs() -> list[KernelSpec]:
    return [KernelSpec(
        name=_reduce_name(atomic), source="kernels.reduce:moe_topk_reduce", family="reduce",
        signature={"partial_ptr": "*bf16", "acc_ptr": "*fp32", "topk_ids_ptr": "*i32",
                   "out_ptr": "*bf16", "K": "i32", "topk": "i32"},
        constexprs={"BLOCK_K": 1024, "ATOMIC": atomic, "USE_GDC": ON_CUDA},
        divisible_by_16=("partial_ptr", "acc_ptr", "out_ptr", "K"),
        num_warps=4, num_stages=1) for atomic in (False, True)]


def grouped_stage2_spec(t: GroupedStage2Tile, bm1: int, scheme: str,
                        scale_n: int = 0) -> KernelSpec:
    """Stage 2 ``t`` after a stage 1 of BLOCK_M ``bm1`` (and BLOCK_N ``scale_n``, the width
    of one activation scale, for a ``tile_scales`` tile)."""
    f = SCHEME_FLAGS[scheme]
    consts = {"BLOCK_M": t.block_m(bm1), "BLOCK_K": t.bk, "BLOCK_N": t.bn,
              "PER_CHANNEL": f.per_channel, "STATIC": f.static, "ATOMIC": t.atomic,
              "FP8_MAX": FP8_MAX, "EXACT_CAST": False, "USE_GDC": ON_CUDA,
              "SWAP_AB": t.swap_ab, "HALVES": t.halves}
    if t.k_split:
        del consts["ATOMIC"], consts["SWAP_AB"], consts["HALVES"]
        consts.update(K_SPLIT=t.k_split, ALIGN_M=bm1, NUM_STAGES=t.stages)
    if not t.resident:
        consts.update(TILE_SCALES=t.tile_scales, SCALE_N=scale_n or t.bn,
                      BLOCK_SCALES=f.block)
        if t.k_split:
            consts["K_FIRST"] = t.k_first
    return KernelSpec(
        name=t.kernel(scheme, bm1, scale_n), source=f"kernels.grouped:{t.function()}",
        family="grouped_stage2",
        signature={"actq_ptr": FP8_PTR, "act_scale_ptr": "*fp32",
                   "a2_static_ptr": "*fp32", "w2_ptr": FP8_PTR,
                   "w2_scale_ptr": "*fp32", "topk_weights_ptr": "*fp32",
                   "sorted_ids_ptr": "*i32", "block_expert_ptr": "*i32",
                   "total_ptr": "*i32", "partial_ptr": "*bf16", "acc_ptr": "*fp32",
                   "N": "i32", "K": "i32", "topk": "i32", "num_pairs": "i32"},
        constexprs=consts,
        divisible_by_16=("actq_ptr", "w2_ptr", "partial_ptr", "acc_ptr", *_ALIGN16),
        num_warps=t.warps, num_stages=t.stages)


def grouped_stage2_specs() -> list[KernelSpec]:
    """Every stage-2 tile whose scales are per row, for every scheme (the tile_scales ones
    are made per stage-1 tile in :func:`grouped_space`)."""
    return [grouped_stage2_spec(t, bm1, scheme) for (bm1, _kind), t in S2_TILES.items()
            if not t.tile_scales for scheme, f in SCHEME_FLAGS.items() if not f.block]


def grouped_stage1_spec(t: GroupedStage1Tile, scheme: str, promote: bool,
                        swap_ab: bool = False) -> KernelSpec:
    f = SCHEME_FLAGS[scheme]
    return KernelSpec(
        name=t.kernel(scheme, promote, swap_ab), source="kernels.grouped:moe_grouped_stage1",
        family="grouped_stage1",
        signature={"xq_ptr": FP8_PTR, "a_scale_ptr": "*fp32",
                   "a13_static_ptr": "*fp32", "w13_ptr": FP8_PTR,
                   "w13_scale_ptr": "*fp32", "a2_static_ptr": "*fp32",
                   "sorted_ids_ptr": "*i32", "block_expert_ptr": "*i32",
                   "total_ptr": "*i32", "actq_ptr": FP8_PTR, "act_scale_ptr": "*fp32",
                   "N": "i32", "K": "i32", "topk": "i32", "num_pairs": "i32"},
        constexprs={"BLOCK_M": t.bm, "BLOCK_N": t.bn, "BLOCK_K": t.bk,
                    "PER_CHANNEL": f.per_channel, "STATIC": f.static, "PROMOTE": promote,
                    "FP8_MAX": FP8_MAX, "EXACT_CAST": False, "USE_GDC": ON_CUDA,
                    "BLOCK_SCALES": f.block, "SWAP_AB": swap_ab},
        divisible_by_16=("xq_ptr", "w13_ptr", "actq_ptr", *_ALIGN16),
        num_warps=t.warps, num_stages=t.stages,
        **({} if t.targets is None else {"targets": t.targets}))


def _built(t: GroupedStage1Tile, mode: Mode) -> bool:
    if (t.bm, mode.kind) not in S2_TILES:
        return False
    if mode.swap_ab and (t.bm >= 64 or S2_TILES[(t.bm, mode.kind)].k_split):
        return False  # 64 rows already fill the MMA; the looped stage 2 does not swap
    if not mode.fastacc:
        return True
    if t.tag not in FASTACC_TILES:
        return False
    only = FASTACC_TILES[t.tag]
    return only is None or mode.kind in only


def grouped_space() -> tuple[list[KernelSpec], list[Variant]]:
    """Stage-1 specs and per-tile-scale stage-2 specs (those some variant uses) and the
    grouped variants."""
    variants = []
    s1_specs: dict[str, KernelSpec] = {}
    s2_specs: dict[str, KernelSpec] = {}
    for t in S1_TILES:
        for mode in MODES:
            if not _built(t, mode):
                continue
            s2 = replace(S2_TILES[(t.bm, mode.kind)], swap_ab=mode.swap_ab)
            promote = not mode.fastacc
            kernels: dict[str, dict[Role, str]] = {}
            max_n: dict[str, int] = {}
            act_group: dict[str, int] = {}
            for scheme, f in SCHEME_FLAGS.items():
                static = f.static
                if mode in BLOCK_ONLY_MODES and not f.block:
                    continue
                if not static and t.bn < 128 and not s2.tile_scales:
                    continue  # one scale per row wants the row in one tile
                if f.block and (not s2.tile_scales or QBLOCK % s2.bn or t.bk != QBLOCK
                                or mode.fastacc):
                    # block FP8: activation scales per tile and w2 block scales per N chunk
                    # (a chunk inside one block); its stage 1 always promotes per K block
                    continue
                if s2.tile_scales and (static or (t.bn * 2 != s2.bn if s2.halves
                                                  else t.bn % s2.bn)):
                    continue  # static scales are per tensor; a chunk may not straddle tiles
                    # (a halves chunk is exactly two)
                if s2.halves and f.block:
                    continue
                spec = s1_specs.setdefault(
                    t.kernel(scheme, promote, mode.swap_ab),
                    grouped_stage1_spec(t, scheme, promote, mode.swap_ab))
                if s2.tile_scales:
                    act_group[scheme] = t.bn
                    s2_name = s2_specs.setdefault(
                        s2.kernel(scheme, t.bm, t.bn),
                        grouped_stage2_spec(s2, t.bm, scheme, t.bn)).name
                elif s2.swap_ab:  # per-row scales, but not among the shared stage-2 specs
                    s2_name = s2_specs.setdefault(
                        s2.kernel(scheme, t.bm), grouped_stage2_spec(s2, t.bm, scheme)).name
                else:
                    s2_name = s2.kernel(scheme, t.bm)
                kernels[scheme] = {
                    Role.PREP: _prep_name(static, s2.atomic, f.block),
                    Role.ALIGN: _align_name(t.bm),
                    Role.SCATTER: SCATTER, Role.STAGE1: spec.name,
                    Role.STAGE2: s2_name, Role.REDUCE: _reduce_name(s2.atomic)}
                if not static and not s2.tile_scales:
                    max_n[scheme] = t.bn  # one scale per row: the whole row in one tile
                if s2.resident:
                    max_n[scheme] = min(max_n.get(scheme, 1 << 30), s2.bn)
            if not kernels:
                continue
            variants.append(Variant(
                name=f"grouped_{t.tag}{mode.suffix}", regime=Regime.GROUPED, kernels=kernels,
                quantize_activations=True, max_n=max_n, max_topk=TOPK_PAD,
                tolerance=DEFAULT_TOLERANCE if promote else GATE_TOLERANCE, block_m=t.bm,
                act_group=act_group,
                scheme_tolerance={sch: tol for sch, tol in BLOCK_TOLERANCE.items()
                                  if sch in kernels}))
    return list(s1_specs.values()) + list(s2_specs.values()), variants


def tune_space() -> tuple[list[KernelSpec], list[Variant]]:
    g_specs, g_vars = grouped_space()
    specs = gemv_specs() + routing_specs() + reduce_specs() + grouped_stage2_specs() + g_specs
    return specs, gemv_variants() + g_vars


SPECS, VARIANTS = tune_space()
