"""The CUTLASS-class bound for block-FP8 layers: DeepGEMM's FP8 grouped-contiguous GEMM, twice.

``gemm_bound`` (:class:`~vllm_moe_aot.measure.peers.torch_grouped.GroupedGemmBound`) times a
layer's two grouped GEMMs through ``torch._scaled_grouped_mm``, which takes row-wise scales
only. For ``fp8_block`` layers (128 x 128 weight blocks, activations per token in groups of 128
columns) the same bound comes from DeepGEMM's ``m_grouped_gemm_fp8_fp8_bf16_nt_contiguous``
(now ``m_grouped_fp8_gemm_nt_contiguous``), the grouped GEMM vLLM's DeepGEMM MoE path runs:

    stage 1: out1 [m, 2N] = lhs1 [m, K]  (1 x 128 scales)  x  w13 [E, 2N, K]  (128 x 128 scales)
    stage 2: out2 [m, K]  = lhs2 [m, N]  (1 x 128 scales)  x  w2  [E, K, N]   (128 x 128 scales)

with the (token, slot) pairs sorted by expert, each expert's rows padded to DeepGEMM's M
alignment (128) and ``m_indices`` giving each row's expert (-1 for padding rows, which DeepGEMM
skips). The weights and their scales go in exactly as the checkpoint has them (vLLM's
``weight_scale_inv``, ``[E, n/128, k/128]`` fp32). Everything else is prepared once in
:meth:`DeepGemmBound.bind`, as for ``gemm_bound``: routing, the padded layout, quantisation of
the input (vLLM's ``per_token_group_quant_fp8``), the SiLU-and-mul intermediate (from one eager
stage-1 call) and its quantisation, and the LHS scales in DeepGEMM's TMA-aligned MN-major form
(``[ceil(k/128), align4(m)]`` fp32, what its ``get_col_major_tma_aligned_tensor`` returns). The
bound function launches the two GEMMs only: no allocation, no host synchronisation, CUDA-graph
capturable after the eager call in ``bind``. Its output is the down projection per padded
sorted row, so there is nothing to gate (``gated=False``).

The kernels are DeepGEMM's own (``deep_gemm/include/deep_gemm/fp8_gemm.cuh`` at
:data:`DEEPGEMM_COMMIT`), instantiated ahead of time by ``scripts/build_deepgemm.py`` into
``build/deepgemm/libdeepgemm_bound.so`` (``$VLLM_MOE_AOT_DEEPGEMM_LIB`` overrides the path), a
torch-free library called through ctypes. Which instantiation runs for a GEMM of ``m`` rows is
DeepGEMM's heuristic (:func:`best_config`, ported from that commit's
``jit_kernels/gemm.py:get_best_configs``); the build evaluates the same function for every
``m`` the benched layers can produce and compiles the union, so no JIT happens at bench time.
This module imports torch only where it runs kernels: the build script imports the heuristic.
"""

from __future__ import annotations

import ctypes
import math
import weakref
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vllm_moe_aot.measure.peers import _ctypes_lib
from vllm_moe_aot.shapes import WEIGHT_BLOCK, MoEShape, Scheme, weight_scale_shapes

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from vllm_moe_aot.measure.workload import MoEProblem

ENV_LIB = "VLLM_MOE_AOT_DEEPGEMM_LIB"
DEFAULT_LIB = Path("build") / "deepgemm" / "libdeepgemm_bound.so"
BUILD_SCRIPT = "scripts/build_deepgemm.py"
ABI_VERSION = 1
#: the DeepGEMM commit whose kernel and heuristic are used (the last one of its pure-Python JIT,
#: 2025-07-02; see scripts/build_deepgemm.py for why)
DEEPGEMM_COMMIT = "03d0be3d2d03b6eed3c99d683c0620949a13a826"
#: get_m_alignment_for_contiguous_layout(): each expert's rows start on a multiple of this
M_ALIGNMENT = 128
#: DeepGEMM's K block (the 1 x 128 / 128 x 128 scale granularity)
BLOCK_K = 128
#: get_best_configs' sm90_capacity (bytes of shared memory per block)
SM90_SMEM_CAPACITY = 232448
#: TMA threads and math threads per warp group (m_grouped_gemm_fp8_fp8_bf16_nt_contiguous)
NUM_TMA_THREADS = 128
NUM_MATH_THREADS_PER_GROUP = 128
#: vLLM's per_token_group_quant_fp8 floor on a group's amax (reference.GROUP_EPS)
GROUP_EPS = 1e-10
#: status codes of csrc/deepgemm_bound/host.cu
STATUS = {0: "ok", 1: "bad argument", 2: "CUDA error", 3: "no such kernel",
          4: "driver error", 5: "C++ exception"}
#: the fields of deepgemm_bound_kernel_desc, in its order
_DESC_FIELDS = ("n", "k", "num_groups", "block_m", "block_n", "block_k", "block_n_padding",
                "swizzle_d", "num_stages", "num_tma_multicast", "multicast_on_a", "smem_size",
                "num_threads")


def ceil_div(a: int, b: int) -> int:
    return (a + b - 1) // b


# ----------------------------------------------------------------------------------------------
# DeepGEMM's heuristic (03d0be3 jit_kernels/gemm.py), contiguous grouped BF16-output case


@dataclass(frozen=True)
class KernelConfig:
    """One instantiation of ``deep_gemm::fp8_gemm_kernel`` (GroupedContiguous): the template
    arguments DeepGEMM's JIT fills in, and the shared memory the launch needs."""

    n: int
    k: int
    num_groups: int
    block_m: int
    block_n: int
    num_stages: int
    num_tma_multicast: int
    multicast_on_a: bool
    swizzle_d: int
    block_n_padding: int
    smem_size: int
    block_k: int = BLOCK_K

    @property
    def num_threads(self) -> int:
        """get_num_threads_per_sm: one math warp group for block_m 64, else two, plus TMA."""
        groups = 1 if self.block_m == 64 else 2
        return groups * NUM_MATH_THREADS_PER_GROUP + NUM_TMA_THREADS

    def template_args(self) -> str:
        """``fp8_gemm_kernel``'s template arguments, as FP8GemmRuntime.generate writes them."""
        return (f"{self.n}, {self.k}, {self.block_m}, {self.block_n}, {self.block_k}, "
                f"{self.block_n_padding}, {self.swizzle_d}, {self.num_groups}, "
                f"{self.num_stages}, {NUM_TMA_THREADS}, {NUM_MATH_THREADS_PER_GROUP}, "
                f"{self.num_tma_multicast}, {'true' if self.multicast_on_a else 'false'}, "
                "deep_gemm::GemmType::GroupedContiguous")

    def to_json(self) -> dict:
        return {**asdict(self), "num_threads": self.num_threads}


def _is_tma_multicast_legal(shape_dim: int, block_dim: int, num_tma_multicast: int,
                            num_sms: int, require_divisible: bool = False) -> bool:
    divisible = ceil_div(shape_dim, block_dim) % num_tma_multicast == 0 or not require_divisible
    return divisible and num_sms % num_tma_multicast == 0


def _swizzle_mode(block_n: int) -> int:
    elem_size = 2
    for mode_bytes in (128, 64, 32):
        if (block_n * elem_size) % mode_bytes == 0:
            return mode_bytes
    return 0


def _block_n_padding_for_smem_d(block_n: int) -> int:
    elem_size, requirement = 2, (4, 8)
    bank_stride = (block_n * elem_size) // 4
    padding = (requirement[0] - bank_stride) % requirement[1]
    return (((padding + requirement[1]) if padding < 0 else padding) * 4) // elem_size


def smem_config(num_stages: int, k: int, block_m: int, block_n: int,
                block_k: int = BLOCK_K) -> tuple[int, int, int]:
    """get_smem_config (BF16 output, not wgrad): (bytes, D swizzle mode, D padding)."""
    swizzle_mode = _swizzle_mode(block_n)
    padding = _block_n_padding_for_smem_d(block_n) if swizzle_mode == 0 else 0
    smem_d = block_m * (block_n + padding) * 2
    smem_a_per_stage = block_m * block_k
    smem_scales_a_per_stage = block_m * 4
    smem_b_per_stage = block_n * block_k
    smem_scales_b = ceil_div(k, block_k) * 4
    smem_barrier = num_stages * 8 * 2
    size = (smem_d + num_stages * (smem_a_per_stage + smem_scales_a_per_stage + smem_b_per_stage)
            + ceil_div(smem_scales_b * (1 if block_k % block_n == 0 else 2), 8) * 8
            + smem_barrier)
    assert int(swizzle_mode > 0) + int(padding > 0) <= 1
    return size, swizzle_mode, padding


def best_config(m: int, n: int, k: int, num_groups: int, num_sms: int
                ) -> tuple[KernelConfig, int]:
    """DeepGEMM's ``get_best_configs(m, n, k, 1, num_sms, is_grouped_contiguous=True)`` for
    ``m_grouped_gemm_fp8_fp8_bf16_nt_contiguous``: (the kernel, the SMs to launch on).

    ``m`` is the padded row count of the contiguous layout, ``num_groups`` the experts (a
    template argument of the kernel; the heuristic itself is called with 1, as DeepGEMM does)."""
    if m < 1:
        raise ValueError(f"m must be >= 1, got {m}")
    groups_in_heuristic = 1
    block_ms = (M_ALIGNMENT,)
    block_ns = tuple(range(16, 129, 8)) + (144, 160)

    def num_waves(bm, bn):
        return ceil_div(ceil_div(m, bm) * ceil_div(n, bn) * groups_in_heuristic, num_sms)

    def last_wave_util(bm, bn):
        x = (ceil_div(m, bm) * ceil_div(n, bn) * groups_in_heuristic) % num_sms
        return num_sms if x == 0 else x

    best_m = best_n = None
    for bm in block_ms:
        for bn in (b for b in block_ns if bm <= 128 or b <= 128):
            if best_m is None:
                success = True
            else:
                waves, best_waves = num_waves(bm, bn), num_waves(best_m, best_n)
                success = waves < best_waves
                if waves == best_waves:
                    util, best_util = last_wave_util(bm, bn), last_wave_util(best_m, best_n)
                    success = util > best_util
                    if util == best_util:
                        success |= bm == best_m and bn < best_n
                        success |= bn == best_n and bm < best_m
                        success |= bm != best_m and bn > best_n
            if success:
                best_m, best_n = bm, bn

    stages = tuple(s for s in (8, 7, 6, 5, 4, 3, 2, 1) if s <= max(k // 128, 1))
    if 128 % best_n != 0 and 128 // math.gcd(128, best_n) <= 4:
        stages = tuple(s for s in (4, 3, 2, 1) if s <= max(k // 128, 1))
    best_stages = best_smem = None
    for s in stages:
        best_smem = smem_config(s, k, best_m, best_n)
        if best_smem[0] <= SM90_SMEM_CAPACITY:
            best_stages = s
            break
    if best_stages is None or best_smem is None:
        raise ValueError(f"no pipeline depth fits shared memory for n={n} k={k}")

    multicast = (1, True)
    legal = {"A": _is_tma_multicast_legal(n, best_n, 2, num_sms, False),
             "B": _is_tma_multicast_legal(m, best_m, 2, num_sms)}
    for side in ("A", "B") if best_m > best_n else ("B", "A"):
        if m >= 512 and legal[side]:
            multicast = (2, side == "A")
            break

    waves = num_waves(best_m, best_n)
    min_sms = ceil_div(ceil_div(m, best_m) * ceil_div(n, best_n) * groups_in_heuristic, waves)
    min_sms = ceil_div(min_sms, multicast[0]) * multicast[0]
    assert min_sms <= num_sms
    cfg = KernelConfig(n=n, k=k, num_groups=num_groups, block_m=best_m, block_n=best_n,
                       num_stages=best_stages, num_tma_multicast=multicast[0],
                       multicast_on_a=multicast[1], swizzle_d=best_smem[1],
                       block_n_padding=best_smem[2], smem_size=best_smem[0])
    return cfg, min_sms


def layer_gemms(E: int, K: int, N: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """The layer's two grouped GEMMs as (n, k, num_groups): gate/up [E, 2N, K], down [E, K, N]."""
    return (2 * N, K, E), (K, N, E)


def max_rows(E: int, topk: int, max_tokens: int) -> int:
    """The largest padded row count ``max_tokens`` tokens can produce: every pair local, each of
    the E experts' groups padded by up to M_ALIGNMENT - 1 rows."""
    pairs = max_tokens * min(topk, E)
    return ceil_div(pairs, M_ALIGNMENT) * M_ALIGNMENT + E * M_ALIGNMENT


def configs_for(n: int, k: int, num_groups: int, rows: int, num_sms: Iterable[int]
                ) -> dict[KernelConfig, list[int]]:
    """Every kernel DeepGEMM's heuristic picks for a GEMM of m = 128, 256, ..., ``rows`` padded
    rows (the layout's m is always a multiple of M_ALIGNMENT) on GPUs of ``num_sms`` SMs, with
    the first and last m that picks it (a build's record)."""
    out: dict[KernelConfig, list[int]] = {}
    for sms in num_sms:
        for m in range(M_ALIGNMENT, rows + 1, M_ALIGNMENT):
            cfg, _ = best_config(m, n, k, num_groups, sms)
            span = out.setdefault(cfg, [m, m])
            span[0], span[1] = min(span[0], m), max(span[1], m)
    return out


# ----------------------------------------------------------------------------------------------
# The library


class DeepGemmLibraryError(RuntimeError):
    """The library is missing, does not load, or is of another ABI version."""


class DeepGemmCallError(RuntimeError):
    """A library function returned an error status, or the kernel a GEMM needs is not built."""


def library_path() -> Path:
    """``$VLLM_MOE_AOT_DEEPGEMM_LIB``, else ``build/deepgemm/libdeepgemm_bound.so`` under the
    repository root (a relative ``$VLLM_MOE_AOT_DEEPGEMM_LIB`` is taken from there too)."""
    return _ctypes_lib.library_path(ENV_LIB, DEFAULT_LIB)


_P, _I32, _U32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32
_SIGNATURES: dict[str, tuple[list, object]] = {
    "deepgemm_bound_abi_version": ([], ctypes.c_int),
    "deepgemm_bound_build_info": ([], ctypes.c_char_p),
    "deepgemm_bound_last_error": ([], ctypes.c_char_p),
    "deepgemm_bound_kernel_count": ([], ctypes.c_int),
    "deepgemm_bound_kernel_desc": ([_I32, ctypes.POINTER(ctypes.c_int64), _I32], ctypes.c_int),
    "deepgemm_bound_init": ([ctypes.POINTER(ctypes.c_int)] * 3, ctypes.c_int),
    "deepgemm_bound_plan_create": ([_I32, _P, _P, _P, _P, _P, _P, _U32, _I32,
                                    ctypes.POINTER(_P)], ctypes.c_int),
    "deepgemm_bound_plan_run": ([_P, _P], ctypes.c_int),
    "deepgemm_bound_plan_destroy": ([_P], None),
    "deepgemm_bound_gemm": ([_I32, _P, _P, _P, _P, _P, _P, _U32, _I32, _P], ctypes.c_int),
}


class DeepGemmLibrary(_ctypes_lib.CtypesLibrary):
    """The loaded ``libdeepgemm_bound.so``: its kernel table and typed entry points that raise
    :class:`DeepGemmCallError` (with the library's message) on a nonzero status."""

    prefix, env_lib, default_lib = "deepgemm_bound_", ENV_LIB, DEFAULT_LIB
    not_found = (f"DeepGEMM bound library not found at {{path}}: build it with `python3 "
                 f"{BUILD_SCRIPT}` (nvcc >= 12.3; DeepGEMM and CUTLASS sources from their git "
                 f"mirrors), or set {ENV_LIB} to a built libdeepgemm_bound.so")
    abi_version, build_script, signatures, status = ABI_VERSION, BUILD_SCRIPT, _SIGNATURES, STATUS
    library_error, call_error = DeepGemmLibraryError, DeepGemmCallError

    def __init__(self, path: Path | str | None = None):
        super().__init__(path)
        #: kernel config -> index in the library's table
        self.kernels: dict[KernelConfig, int] = {}
        buf = (ctypes.c_int64 * len(_DESC_FIELDS))()
        for i in range(self._lib.deepgemm_bound_kernel_count()):
            self.call("deepgemm_bound_kernel_desc", i, buf, len(_DESC_FIELDS))
            d = dict(zip(_DESC_FIELDS, (int(v) for v in buf), strict=True))
            threads = d.pop("num_threads")
            d["multicast_on_a"] = bool(d["multicast_on_a"])
            cfg = KernelConfig(**d)
            if cfg.num_threads != threads:
                raise DeepGemmLibraryError(f"{self.path}: kernel {i} launches {threads} threads, "
                                           f"its config wants {cfg.num_threads}")
            self.kernels[cfg] = i
        #: (n, k, num_groups) GEMMs the library has kernels for
        self.gemms = {(c.n, c.k, c.num_groups) for c in self.kernels}
        self._ready: set[int] = set()
        self._device_props: dict[int, tuple[int, int, int]] = {}

    def __repr__(self) -> str:
        return f"DeepGemmLibrary({str(self.path)!r}, {len(self.kernels)} kernels)"

    @property
    def num_sms_built(self) -> list[int]:
        return list(self.build_info.get("num_sms", []))

    def init(self) -> tuple[int, int, int]:
        """Initialise the CUDA runtime on the current device: (SM count, major, minor)."""
        sms, major, minor = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
        self.call("deepgemm_bound_init", ctypes.byref(sms), ctypes.byref(major),
                  ctypes.byref(minor))
        return sms.value, major.value, minor.value

    def missing_gemms(self, shape: MoEShape) -> list[tuple[int, int, int]]:
        return [g for g in layer_gemms(shape.E, shape.K, shape.N) if g not in self.gemms]

    def kernel_for(self, m: int, n: int, k: int, num_groups: int, num_sms: int
                   ) -> tuple[int, KernelConfig, int]:
        """(library index, config, SMs to launch on) of DeepGEMM's choice for this GEMM."""
        cfg, sms = best_config(m, n, k, num_groups, num_sms)
        idx = self.kernels.get(cfg)
        if idx is None:
            raise DeepGemmCallError(
                f"DeepGEMM's heuristic picks {cfg} for m={m} n={n} k={k} on {num_sms} SMs; "
                f"{self.path.name} was built without it (built for SM counts "
                f"{self.num_sms_built}, up to {self.build_info.get('max_tokens')} tokens): "
                f"rebuild with `python3 {BUILD_SCRIPT} --num-sms {num_sms}` or a larger "
                "--max-tokens")
        return idx, cfg, sms

    def plan(self, idx: int, lhs, lhs_scales_t, rhs, rhs_scales, out, m_indices, m: int,
             num_sms: int) -> int:
        """A launch plan (opaque pointer) for one GEMM on the current device; freed with
        :meth:`destroy`."""
        h = _P()
        self.call("deepgemm_bound_plan_create", idx, lhs.data_ptr(), lhs_scales_t.data_ptr(),
                  rhs.data_ptr(), rhs_scales.data_ptr(), out.data_ptr(), m_indices.data_ptr(),
                  m, num_sms, ctypes.byref(h))
        return int(h.value)

    def run(self, plan: int, stream: int) -> None:
        self.call("deepgemm_bound_plan_run", plan, stream)

    def destroy(self, plan: int) -> None:
        self._lib.deepgemm_bound_plan_destroy(plan)


def load_library(path: Path | str | None = None) -> DeepGemmLibrary:
    """The library at ``path`` (default :func:`library_path`), loaded once per process."""
    return DeepGemmLibrary.loaded(path)


def unavailable_reason(scheme: Scheme | str | None = None, shape: MoEShape | None = None,
                       path: Path | str | None = None, device=None) -> str | None:
    """Why the bound cannot run (a scheme other than fp8_block, no library, no CUDA GPU, not
    sm_90, a layer or this GPU's SM count not built), or None."""
    if scheme is not None:
        scheme = Scheme.parse(scheme) if isinstance(scheme, str) else scheme
        if not scheme.block_weights:
            return (f"DeepGEMM's grouped GEMM takes 128x128 block weight scales and 1x128 "
                    f"activation scales (fp8_block), not {scheme.value}'s")
    try:
        lib = load_library(path)
    except DeepGemmLibraryError as exc:
        return str(exc)
    import torch

    if not torch.cuda.is_available():
        return "the DeepGEMM bound needs a CUDA GPU (torch.cuda.is_available() is False)"
    dev = torch.device("cuda") if device is None else torch.device(device)
    if dev.type != "cuda":
        return f"the DeepGEMM bound runs on CUDA devices, not {dev}"
    major, minor = torch.cuda.get_device_capability(dev)
    if (major, minor) != (9, 0):
        return f"the DeepGEMM bound is built for sm_90a only (this GPU: sm_{major}{minor})"
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    if lib.num_sms_built and sms not in lib.num_sms_built:
        return (f"{lib.path.name} holds DeepGEMM's picks for {lib.num_sms_built} SMs, this GPU "
                f"has {sms}: rebuild with `python3 {BUILD_SCRIPT} --num-sms {sms}`")
    if shape is not None:
        missing = lib.missing_gemms(shape)
        if missing:
            return (f"layer E={shape.E} K={shape.K} N={shape.N} is not built into "
                    f"{lib.path.name} (missing GEMMs (n, k, experts) {missing}; built "
                    f"{sorted(lib.gemms)}): rebuild with `python3 {BUILD_SCRIPT} --shape "
                    f"{shape.E},{shape.K},{shape.N},{shape.topk}`")
    return None


# ----------------------------------------------------------------------------------------------
# Inputs in DeepGEMM's layout (device-agnostic torch; CPU for the tests)


@dataclass
class ContiguousLayout:
    """The (token, slot) pairs of the local experts, sorted by expert, each expert's group
    padded to M_ALIGNMENT rows: per padded row its token (``rows``), its flat pair index
    ``token * topk + slot`` (``pairs``) and its expert (``m_indices``, int32), all -1 on
    padding rows; ``m`` rows in all."""

    rows: torch.Tensor
    pairs: torch.Tensor
    m_indices: torch.Tensor
    m: int
    counts: torch.Tensor  # pairs per local expert, int64 [E]


def contiguous_layout(local_ids: torch.Tensor, E: int, align: int = M_ALIGNMENT
                      ) -> ContiguousLayout:
    """``local_ids`` [M, topk] (local expert slot, -1 = another rank's expert): DeepGEMM's
    contiguous layout (one host synchronisation: the padded row count)."""
    import torch

    dev = local_ids.device
    topk = local_ids.shape[1]
    flat = local_ids.reshape(-1).long()
    valid = flat >= 0
    order = torch.argsort(torch.where(valid, flat, E), stable=True)
    n_valid = int(valid.sum())
    order = order[:n_valid]
    experts = flat[order]
    counts = torch.bincount(experts, minlength=E)[:E]
    padded = (counts + align - 1) // align * align
    starts = torch.cumsum(padded, 0) - padded
    first = torch.cumsum(counts, 0) - counts  # first sorted pair of each expert
    rank = torch.arange(n_valid, device=dev) - first[experts]
    dest = starts[experts] + rank
    m = int(padded.sum())
    rows = torch.full((m,), -1, dtype=torch.long, device=dev)
    pairs = torch.full((m,), -1, dtype=torch.long, device=dev)
    m_indices = torch.full((m,), -1, dtype=torch.int32, device=dev)
    rows[dest] = torch.div(order, topk, rounding_mode="floor")
    pairs[dest] = order
    m_indices[dest] = experts.to(torch.int32)
    return ContiguousLayout(rows, pairs, m_indices, m, counts)


def group_quant(t: torch.Tensor, fp8: torch.dtype, group: int = BLOCK_K
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's ``per_token_group_quant_fp8``: ``t`` [R, C] -> fp8 [R, C] and fp32 scales
    [R, ceil(C/group)], scale = max(amax(group), 1e-10) / FP8_MAX."""
    import torch

    fmax = float(torch.finfo(fp8).max)
    R, C = t.shape
    G = ceil_div(C, group)
    tf = t.float()
    if C % group:
        tf = torch.nn.functional.pad(tf, (0, G * group - C))
    g = tf.reshape(R, G, group)
    scale = torch.clamp(g.abs().amax(dim=-1), min=GROUP_EPS) / fmax
    q = (g / scale[..., None]).clamp(-fmax, fmax).reshape(R, G * group)[:, :C].to(fp8)
    return q.contiguous(), scale.contiguous()


def gather_rows(q: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``q[rows]`` with zero rows where ``rows`` is -1 (fp8 gathered as bytes: +0.0 is 0x00)."""
    import torch

    b = q.view(torch.uint8) if q.element_size() == 1 else q
    out = b[rows.clamp(min=0)]
    out = torch.where((rows >= 0)[:, None], out, torch.zeros((), dtype=out.dtype,
                                                             device=out.device))
    return out.view(q.dtype).contiguous() if q.element_size() == 1 else out.contiguous()


def mn_major_scales(s: torch.Tensor) -> torch.Tensor:
    """Row scales [m, kb] -> DeepGEMM's TMA-aligned MN-major form: a contiguous
    [kb, align4(m)] tensor (get_col_major_tma_aligned_tensor's storage, transposed)."""
    import torch

    m, kb = s.shape
    am = ceil_div(m, 4) * 4
    out = torch.zeros(kb, am, dtype=torch.float32, device=s.device)
    out[:, :m] = s.float().T
    return out


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up of the stage-1 output [m, 2N] (float32)."""
    import torch

    N = h.shape[1] // 2
    return torch.nn.functional.silu(h[:, :N].float()) * h[:, N:].float()


def reference_gemm(lhs: torch.Tensor, lhs_scales: torch.Tensor, rhs: torch.Tensor,
                   rhs_scales: torch.Tensor, m_indices: torch.Tensor) -> torch.Tensor:
    """Float64 CPU reference of the grouped GEMM: per row r with expert e = m_indices[r] >= 0,
    (lhs[r] * its 1 x 128 scales) . (rhs[e] block-dequantised)^T; padding rows 0.
    ``lhs_scales`` are the row-major [m, ceil(k/128)] scales."""
    import torch

    from vllm_moe_aot.measure.reference import block_dequant

    lhs, lhs_scales = lhs.detach().cpu(), lhs_scales.detach().cpu()
    ids = m_indices.detach().cpu().long()
    m, k = lhs.shape
    out = torch.zeros(m, rhs.shape[1], dtype=torch.float64)
    a = lhs.double() * lhs_scales.double().repeat_interleave(BLOCK_K, 1)[:, :k]
    for e in torch.unique(ids[ids >= 0]).tolist():
        sel = (ids == e).nonzero(as_tuple=True)[0]
        w = block_dequant(rhs[e].detach().cpu(), rhs_scales[e].detach().cpu(), WEIGHT_BLOCK)
        out[sel] = a[sel] @ w.T
    return out


@dataclass
class BoundInputs:
    """One problem's two GEMMs in DeepGEMM's layout (see the module docstring): fp8 LHS with
    row-major ``*_scales`` [m, kb] (for references) and MN-major ``*_scales_t`` (for the
    kernel), the weights as the checkpoint has them, bf16 outputs."""

    layout: ContiguousLayout
    lhs1: torch.Tensor
    lhs1_scales: torch.Tensor
    lhs1_scales_t: torch.Tensor
    w13: torch.Tensor
    s13: torch.Tensor
    out1: torch.Tensor
    lhs2: torch.Tensor | None = None
    lhs2_scales: torch.Tensor | None = None
    lhs2_scales_t: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    s2: torch.Tensor | None = None
    out2: torch.Tensor | None = None

    @property
    def m(self) -> int:
        return self.layout.m

    def stage1(self) -> tuple:
        return (self.lhs1, self.lhs1_scales_t, self.w13, self.s13, self.out1,
                self.layout.m_indices)

    def stage2(self) -> tuple:
        return (self.lhs2, self.lhs2_scales_t, self.w2, self.s2, self.out2,
                self.layout.m_indices)


def stage1_inputs(problem: MoEProblem) -> BoundInputs:
    """Stage 1's inputs (no kernel runs): the layout of the problem's local pairs, the input
    quantised as vLLM does for block FP8 and gathered into it, its scales in both forms, the
    checkpoint's w13 and scales, an output buffer."""
    import torch

    x, w13, _w2, s13, _s2, _tw, _ids = problem.tensors()
    layout = contiguous_layout(problem.local_ids(), w13.shape[0])
    xq, xs = group_quant(x, w13.dtype)
    lhs1 = gather_rows(xq, layout.rows)
    s1 = torch.where((layout.rows >= 0)[:, None], xs[layout.rows.clamp(min=0)], 0.0)
    del xq, xs
    out1 = torch.empty(layout.m, w13.shape[1], dtype=torch.bfloat16, device=x.device)
    return BoundInputs(layout, lhs1, s1.contiguous(), mn_major_scales(s1), w13,
                       s13.float().contiguous(), out1)


def stage2_inputs(inp: BoundInputs, h: torch.Tensor, problem: MoEProblem) -> None:
    """Stage 2's inputs into ``inp`` from a stage-1 output ``h`` [m, 2N]: SiLU-and-mul, padding
    rows zeroed, vLLM's per-token-group quantisation; the checkpoint's w2 and scales."""
    import torch

    w2, s2 = problem.w2, problem.w2_scale
    act = torch.where((inp.layout.rows >= 0)[:, None], swiglu(h), 0.0)
    inp.lhs2, inp.lhs2_scales = group_quant(act, w2.dtype)
    del act
    inp.lhs2_scales_t = mn_major_scales(inp.lhs2_scales)
    inp.w2, inp.s2 = w2, s2.float().contiguous()
    inp.out2 = torch.empty(inp.m, w2.shape[1], dtype=torch.bfloat16, device=h.device)


def check_problem(problem: MoEProblem, scheme: Scheme) -> None:
    """Raise ``ValueError`` naming what DeepGEMM cannot take (before anything runs)."""
    import torch

    x, w13, w2, s13, s2, _tw, ids = problem.tensors()
    if problem.scheme is not scheme:
        raise ValueError(f"problem is {problem.scheme.value}, peer is {scheme.value}")
    if not scheme.block_weights:
        raise ValueError(f"the DeepGEMM bound takes fp8_block layers, not {scheme.value}")
    E, N2, K = w13.shape
    N = N2 // 2
    if tuple(w2.shape) != (E, K, N) or x.shape[1] != K or N2 % 2:
        raise ValueError(f"inconsistent shapes: x {tuple(x.shape)}, w13 {tuple(w13.shape)}, "
                         f"w2 {tuple(w2.shape)}")
    if w13.dtype != torch.float8_e4m3fn or w2.dtype != torch.float8_e4m3fn:
        raise ValueError(f"DeepGEMM takes float8_e4m3fn weights, got {w13.dtype}")
    if not (w13.is_contiguous() and w2.is_contiguous()):
        raise ValueError("DeepGEMM reads the weights [E, n, k] through TMA: they must be "
                         "contiguous")
    bn, bk = WEIGHT_BLOCK
    if (bn, bk) != (128, 128) or K % 128 or N % 128:
        raise ValueError(f"DeepGEMM's scales are 128 x 128 blocks; K={K} and N={N} must be "
                         "multiples of 128")
    want13, want2 = weight_scale_shapes(MoEShape(E, K, N, ids.shape[-1]), scheme)
    if tuple(s13.shape) != want13 or tuple(s2.shape) != want2:
        raise ValueError(f"block scales must be {want13} / {want2}, got {tuple(s13.shape)} / "
                         f"{tuple(s2.shape)}")
    if ids.dim() != 2 or ids.shape[0] != x.shape[0]:
        raise ValueError(f"topk_ids must be [M, topk], got {tuple(ids.shape)}")


class DeepGemmBound:
    """The bound for one block-FP8 layer scheme: :meth:`bind` a problem, then call the returned
    function (no arguments) for the stage-2 output, bf16 [m, K] (m padded sorted rows)."""

    name = "deepgemm_bound"

    def __init__(self, scheme: Scheme | str = Scheme.FP8_BLOCK,
                 library: DeepGemmLibrary | Path | str | None = None):
        self.scheme = Scheme.parse(scheme) if isinstance(scheme, str) else scheme
        if not self.scheme.block_weights:
            raise ValueError(f"the DeepGEMM bound takes fp8_block layers, not "
                             f"{self.scheme.value}")
        self.lib = library if isinstance(library, DeepGemmLibrary) else load_library(library)

    def _plan(self, args: tuple, sms: int) -> int:
        lhs, lhs_st, w, s, out, m_indices = args
        E, n, k = w.shape
        idx, _cfg, launch_sms = self.lib.kernel_for(lhs.shape[0], n, k, E, sms)
        return self.lib.plan(idx, lhs, lhs_st, w, s, out, m_indices, lhs.shape[0], launch_sms)

    def prepare(self, problem: MoEProblem) -> tuple[BoundInputs, tuple[int, int] | None]:
        """Both stages' inputs, stage 1 run once eagerly (its output feeds stage 2's input),
        and the two launch plans (None when no pair is local: m = 0, nothing to launch)."""
        import torch

        check_problem(problem, self.scheme)
        dev = problem.device
        if dev.type != "cuda":
            raise ValueError(f"the DeepGEMM bound runs on CUDA devices, not {dev}")
        missing = self.lib.missing_gemms(problem.shape)
        if missing:
            raise DeepGemmCallError(unavailable_reason(self.scheme, problem.shape,
                                                       self.lib.path, dev) or str(missing))
        with torch.cuda.device(dev):
            sms = self.lib.init()[0]
            inp = stage1_inputs(problem)
            if inp.m == 0:
                stage2_inputs(inp, inp.out1, problem)
                return inp, None
            stream = torch.cuda.current_stream().cuda_stream
            p1 = self._plan(inp.stage1(), sms)
            try:
                self.lib.run(p1, stream)
                stage2_inputs(inp, inp.out1, problem)
                p2 = self._plan(inp.stage2(), sms)
            except Exception:
                self.lib.destroy(p1)
                raise
        return inp, (p1, p2)

    def bind(self, problem: MoEProblem) -> Callable[[], torch.Tensor]:
        import torch

        inp, plans = self.prepare(problem)
        lib = self.lib
        if plans is None:
            def empty() -> torch.Tensor:
                return inp.out2

            empty.inputs = inp
            return empty
        p1, p2 = plans

        def call() -> torch.Tensor:
            stream = torch.cuda.current_stream().cuda_stream
            lib.run(p1, stream)
            lib.run(p2, stream)
            return inp.out2

        call.inputs = inp  # for tests and inspection
        weakref.finalize(call, _destroy_plans, lib, p1, p2)
        call()  # the one eager call before any capture
        return call

    def __call__(self, problem: MoEProblem, out: torch.Tensor | None = None) -> torch.Tensor:
        from vllm_moe_aot.measure.peers.lineup import run_bound

        return run_bound(self.bind, problem, out)


def _destroy_plans(lib: DeepGemmLibrary, *plans: int) -> None:
    for p in plans:
        lib.destroy(p)
