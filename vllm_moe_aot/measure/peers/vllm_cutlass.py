"""vLLM 0.33's CUTLASS FP8 MoE (``CutlassExpertsFp8``) as a peer, without vLLM, through ctypes.

On Hopper vLLM serves ptpc FP8 MoE layers (online ``fp8_per_channel``, compressed-tensors
channel x token) and compressed-tensors per-tensor layers with ``VLLM_CUTLASS``, whose experts
are ``TritonOrCutlassExperts`` -> ``CutlassExpertsFp8`` on sm90 (the Triton fallback is for sm100
at M <= 8 only). :class:`VllmCutlassMoE` runs the same steps as vLLM's modular kernel does
there (``MoEPrepareAndFinalizeNoEP.prepare`` then ``run_cutlass_moe_fp8`` in
``vllm/model_executor/layers/fused_moe/experts/cutlass_moe.py``), each step on vLLM's own CUDA
kernel, compiled from vLLM 0.33.0's sources by ``scripts/build_vllm_cutlass.py`` into
``build/vllm_cutlass/libvllm_cutlass_moe.so`` (``$VLLM_MOE_AOT_CUTLASS_LIB`` overrides the path;
``docs/vllm-cutlass-peer.md``):

=====================================  ===================================  ======================
step (vLLM 0.33 call)                  here                                 kernel
=====================================  ===================================  ======================
``scaled_fp8_quant(x, a1_scale,        ``vllm_cutlass_dynamic_per_token_    vLLM's (common.cu)
use_per_token_if_dynamic)``            scaled_fp8_quant`` / ``static_`` /
                                       ``dynamic_scaled_fp8_quant``
``moe_permute`` (scratch path)         ``vllm_cutlass_moe_permute``         vLLM's (cub sort,
                                                                            expandInputRows)
``a1q_scale[permuted_idx.clamp(..)     the same torch ops, into             torch (as in vLLM)
// topk]`` (per-token scales only)     preallocated buffers
``get_cutlass_moe_mm_problem_sizes_    ``vllm_cutlass_problem_sizes_from_   vLLM's (moe_data.cu)
from_expert_offsets``                  expert_offsets``
``mm1_out.fill_(0)`` (per tensor)      ``Tensor.zero_()``                   torch (as in vLLM)
``cutlass_moe_mm`` (w13)               ``vllm_cutlass_moe_mm``              vLLM's CUTLASS sm90
``apply_moe_activation`` ->            ``vllm_cutlass_silu_and_mul``        vLLM's
``torch.ops._C.silu_and_mul``                                               (activation_kernels)
``scaled_fp8_quant(act_out,            as for the input                     vLLM's (common.cu)
a2_scale, ...)``
``cutlass_moe_mm`` (w2)                ``vllm_cutlass_moe_mm``              vLLM's CUTLASS sm90
``moe_unpermute`` (weights + top-k     ``vllm_cutlass_moe_unpermute``       vLLM's
sum)                                                                        (finalizeMoeRouting)
=====================================  ===================================  ======================

**Stand-ins: none** of vLLM's kernels is replaced; the two torch steps are torch in vLLM too.
What is ours: the host code that launches them (``csrc/vllm_cutlass_moe/``; vLLM's is
written against ``torch::stable::Tensor``), this module's buffer management (one preallocated
workspace per (device, M) shared by all bound problems, laid out as vLLM's ``workspace13`` /
``workspace2``), and CUTLASS v4.7.0 where vLLM pins v4.7.1 if that tag is unavailable at build
time (BUILD_INFO.json says which). ``get_cutlass_moe_mm_data`` and ``shuffle_rows``, which 0.33's
standard path no longer calls, are exported too (:meth:`CutlassLibrary.moe_mm_data`,
:meth:`CutlassLibrary.shuffle_rows`).

Weights go in as the checkpoint has them, as vLLM passes them: ``w13`` ``[E, 2N, K]`` is
CUTLASS's column-major B (``K x 2N``, leading dimension ``ab_strides1 = K``), ``w2``
``[E, K, N]`` likewise (``ab_strides2 = N``); outputs row-major with ``c_strides1 = 2N``,
``c_strides2 = K``. Activations follow vLLM's semantics: ``fp8_ptpc`` per-token dynamic,
``fp8_per_tensor_static`` the checkpoint scalars, ``fp8_per_tensor_dynamic`` one tensor-wide
dynamic scale (vLLM's; coarser than our reference's per-token one). No host synchronisation,
nothing allocated per call after :meth:`VllmCutlassMoE.bind` except the output: CUDA-graph
capturable after one eager call.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_moe_aot.measure.peers import _ctypes_lib
from vllm_moe_aot.measure.workload import MoEProblem
from vllm_moe_aot.shapes import Scheme

ENV_LIB = "VLLM_MOE_AOT_CUTLASS_LIB"
DEFAULT_LIB = Path("build") / "vllm_cutlass" / "libvllm_cutlass_moe.so"
BUILD_SCRIPT = "scripts/build_vllm_cutlass.py"
ABI_VERSION = 2  # 2: vllm_cutlass_moe_permute takes the expert map
#: get_group_gemm_starts runs one thread per expert (as in vLLM)
MAX_EXPERTS = 1024
#: status codes of csrc/vllm_cutlass_moe/common.cuh
STATUS = {0: "ok", 1: "bad argument", 2: "CUDA error", 3: "CUTLASS error",
          4: "config not built", 5: "scratch too small", 6: "C++ exception"}

_P, _I64, _I32, _SZ = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_size_t
#: the entry points that return a status (int) -> their argtypes
_SIGNATURES: dict[str, list] = {
    "vllm_cutlass_init": [_P],
    "vllm_cutlass_moe_mm_config": [_I64, _I64, _I64, _P, _P],
    "vllm_cutlass_moe_mm_workspace_size": [_I64, _I64, _I64, _I64, _P],
    "vllm_cutlass_moe_mm": [_P] * 10 + [_I64] * 6 + [_I32, _I32, _P, _SZ, _P, _SZ, _P],
    "vllm_cutlass_get_moe_mm_data": [_P, _I64, _I64, _P, _P, _P, _P, _P, _P, _I64, _I64, _I64,
                                     _I32, _P],
    "vllm_cutlass_problem_sizes_from_expert_offsets": [_P, _P, _P, _I64, _I64, _I64, _I32, _P],
    "vllm_cutlass_shuffle_rows": [_P, _P, _P, _I64, _I64, _I64, _I64, _P],
    "vllm_cutlass_moe_permute_sort_workspace_size": [_I64, _I64, _P],
    "vllm_cutlass_moe_permute": [_P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _I64, _P, _P,
                                 _P, _P, _P, _SZ, _P, _P, _P, _P],
    "vllm_cutlass_moe_unpermute": [_P, _P, _P, _P, _I64, _I64, _I64, _I64, _P, _P],
    "vllm_cutlass_silu_and_mul": [_P, _P, _I64, _I64, _P],
    "vllm_cutlass_static_scaled_fp8_quant": [_P, _P, _P, _I64, _I64, _I64, _I64, _P],
    "vllm_cutlass_dynamic_scaled_fp8_quant": [_P, _P, _P, _I64, _I64, _I64, _I64, _P],
    "vllm_cutlass_dynamic_per_token_scaled_fp8_quant": [_P, _P, _P, _P, _I64, _I64, _I64, _I64,
                                                        _P],
}
#: every entry point -> (argtypes, restype)
_ENTRY_POINTS: dict[str, tuple[list, object]] = {
    "vllm_cutlass_abi_version": ([], ctypes.c_int),
    "vllm_cutlass_build_info": ([], ctypes.c_char_p),
    "vllm_cutlass_last_error": ([], ctypes.c_char_p),
    **{name: (argtypes, ctypes.c_int) for name, argtypes in _SIGNATURES.items()},
}


class CutlassLibraryError(RuntimeError):
    """The library is missing, does not load, or is of another ABI version."""


class CutlassCallError(RuntimeError):
    """A library function returned an error status."""


def library_path() -> Path:
    """``$VLLM_MOE_AOT_CUTLASS_LIB``, else ``build/vllm_cutlass/libvllm_cutlass_moe.so`` under
    the repository root (a relative ``$VLLM_MOE_AOT_CUTLASS_LIB`` is taken from there too)."""
    return _ctypes_lib.library_path(ENV_LIB, DEFAULT_LIB)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class CutlassLibrary(_ctypes_lib.CtypesLibrary):
    """The loaded ``libvllm_cutlass_moe.so``: typed ctypes entry points that raise
    :class:`CutlassCallError` (with the library's message) on a nonzero status."""

    prefix, env_lib, default_lib = "vllm_cutlass_", ENV_LIB, DEFAULT_LIB
    not_found = (f"vLLM CUTLASS MoE library not found at {{path}}: build it with `python3 "
                 f"{BUILD_SCRIPT}` (needs nvcc >= 12.3 and network access for vLLM's sources, "
                 f"or set {ENV_LIB} to a built libvllm_cutlass_moe.so)")
    abi_version, build_script, signatures = ABI_VERSION, BUILD_SCRIPT, _ENTRY_POINTS
    status, library_error, call_error = STATUS, CutlassLibraryError, CutlassCallError

    def __repr__(self) -> str:
        return f"CutlassLibrary({str(self.path)!r})"

    def init(self) -> int:
        """Initialise the CUDA runtime on the current device (eagerly, before any capture);
        returns the compute capability major."""
        major = ctypes.c_int(0)
        self.call("vllm_cutlass_init", ctypes.byref(major))
        return major.value

    def config_for(self, m: int, n: int, k: int) -> tuple[str, bool]:
        """The sm90 tile config vLLM picks for a grouped GEMM of m rows, and whether this
        library has it."""
        name, built = ctypes.c_char_p(), ctypes.c_int(0)
        self._lib.vllm_cutlass_moe_mm_config(m, n, k, ctypes.byref(name), ctypes.byref(built))
        return name.value.decode(), bool(built.value)

    def moe_mm_workspace_size(self, m: int, n: int, k: int, num_experts: int) -> int:
        b = ctypes.c_size_t(0)
        self.call("vllm_cutlass_moe_mm_workspace_size", m, n, k, num_experts, ctypes.byref(b))
        return b.value

    def sort_workspace_size(self, rows: int, num_experts: int) -> int:
        b = ctypes.c_size_t(0)
        self.call("vllm_cutlass_moe_permute_sort_workspace_size", rows, num_experts,
                  ctypes.byref(b))
        return b.value

    def moe_mm_data(self, topk_ids: torch.Tensor, num_experts: int, n: int, k: int,
                    stream: int | None = None) -> dict[str, torch.Tensor]:
        """vLLM's ``get_cutlass_moe_mm_data`` (allocates; for tests and inspection)."""
        dev = topk_ids.device
        E = num_experts
        i32 = dict(dtype=torch.int32, device=dev)
        out = {"expert_offsets": torch.empty(E + 1, **i32),
               "problem_sizes1": torch.empty(E, 3, **i32),
               "problem_sizes2": torch.empty(E, 3, **i32),
               "input_permutation": torch.empty(topk_ids.numel(), **i32),
               "output_permutation": torch.empty(topk_ids.numel(), **i32)}
        atomic = torch.empty(E + 1, **i32)
        ids = topk_ids.to(torch.int32).contiguous()
        self.call("vllm_cutlass_get_moe_mm_data", ids.data_ptr(), ids.numel(), ids.shape[1],
                  *(out[k_].data_ptr() for k_ in out), atomic.data_ptr(), E, n, k, 1,
                  _stream(stream))
        return out

    def shuffle_rows(self, x: torch.Tensor, dst2src: torch.Tensor,
                     out: torch.Tensor | None = None, stream: int | None = None
                     ) -> torch.Tensor:
        """vLLM's ``shuffle_rows``: ``out[r] = x[dst2src[r]]`` (zero rows where out of range)."""
        if out is None:
            out = torch.empty(dst2src.numel(), x.shape[1], dtype=x.dtype, device=x.device)
        self.call("vllm_cutlass_shuffle_rows", x.data_ptr(), dst2src.data_ptr(), out.data_ptr(),
                  x.shape[0], out.shape[0], x.shape[1], x.element_size(), _stream(stream))
        return out


def _stream(stream: int | None) -> int:
    return torch.cuda.current_stream().cuda_stream if stream is None else stream


def load_library(path: Path | str | None = None) -> CutlassLibrary:
    """The library at ``path`` (default :func:`library_path`), loaded once per process."""
    return CutlassLibrary.loaded(path)


def unavailable_reason(path: Path | str | None = None) -> str | None:
    """Why the peer cannot run here (no library, no CUDA GPU, not sm_90), or None."""
    try:
        load_library(path)
    except CutlassLibraryError as exc:
        return str(exc)
    if not torch.cuda.is_available():
        return "vLLM CUTLASS peer needs a CUDA GPU (torch.cuda.is_available() is False)"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) != (9, 0):
        return f"vLLM CUTLASS peer is built for sm_90a only (this GPU: sm_{major}{minor})"
    return None


def check_problem(problem: MoEProblem, scheme: Scheme) -> None:
    """Raise ``ValueError`` naming what this peer cannot take (before anything runs)."""
    x, w13, w2, s13, s2, tw, ids = problem.tensors()
    if problem.scheme is not scheme:
        raise ValueError(f"problem is {problem.scheme.value}, peer is {scheme.value}")
    if w13.dim() != 3 or w2.dim() != 3 or x.dim() != 2:
        raise ValueError("want x [M, K], w13 [E, 2N, K], w2 [E, K, N]")
    E, N2, K = w13.shape
    N = N2 // 2
    M = x.shape[0]
    if N2 % 2 or tuple(w2.shape) != (E, K, N) or x.shape[1] != K:
        raise ValueError(f"inconsistent shapes: x {tuple(x.shape)}, w13 {tuple(w13.shape)}, "
                         f"w2 {tuple(w2.shape)}")
    if w13.dtype != torch.float8_e4m3fn or w2.dtype != torch.float8_e4m3fn:
        raise ValueError(f"vLLM's CUTLASS MoE takes float8_e4m3fn weights, got {w13.dtype}")
    if x.dtype != torch.bfloat16:
        raise ValueError(f"x must be bfloat16 (the library's output type), got {x.dtype}")
    if not 1 <= E <= MAX_EXPERTS:
        raise ValueError(f"E={E} must be between 1 and {MAX_EXPERTS} (one thread per expert)")
    if K % 16 or N % 16:
        raise ValueError(f"K={K} and N={N} must be multiples of 16 (CUTLASS 128-bit alignment)")
    if ids.dtype != torch.int32 or ids.dim() != 2 or ids.shape[0] != M:
        raise ValueError(f"topk_ids must be int32 [M={M}, topk], got {ids.dtype} "
                         f"{tuple(ids.shape)}")
    if tw.dtype != torch.float32 or tuple(tw.shape) != tuple(ids.shape):
        raise ValueError(f"topk_weights must be float32 {tuple(ids.shape)}")
    want13, want2 = ((E, N2), (E, K)) if scheme.per_channel_weights else ((E,), (E,))
    if s13.numel() != want13[0] * (want13[1] if len(want13) > 1 else 1) or \
            s2.numel() != want2[0] * (want2[1] if len(want2) > 1 else 1):
        raise ValueError(f"{scheme.value} wants weight scales {want13} / {want2}, got "
                         f"{tuple(s13.shape)} / {tuple(s2.shape)}")
    if s13.dtype != torch.float32 or s2.dtype != torch.float32:
        raise ValueError("weight scales must be float32")
    if scheme.static_activations and (problem.a13_scale is None or problem.a2_scale is None):
        raise ValueError(f"{scheme.value} needs static a13_scale and a2_scale")
    emap = problem.expert_map
    if emap is not None and (emap.dtype != torch.int32 or emap.dim() != 1 or
                             not MAX_EXPERTS >= emap.numel() >= E):
        raise ValueError(f"expert_map must be int32 [global experts <= {MAX_EXPERTS}], got "
                         f"{emap.dtype} {tuple(emap.shape)}")
    devs = {t.device for t in (x, w13, w2, s13, s2, tw, ids, *([emap] if emap is not None
                                                               else []))}
    if len(devs) != 1 or next(iter(devs)).type != "cuda":
        raise ValueError(f"the vLLM CUTLASS peer runs on one CUDA device; tensors are on "
                         f"{sorted(map(str, devs))}")


@dataclass
class _Workspace:
    """Per-call scratch for M tokens, shared by every problem bound at this (device, M)."""

    ws13: torch.Tensor  # bf16, vLLM's workspace13
    ws2: torch.Tensor  # bf16, vLLM's workspace2
    a1q: torch.Tensor  # fp8 [M, K]
    a1q_scale: torch.Tensor  # fp32 [M, 1] (per token) or [1]
    a1s_perm: torch.Tensor  # fp32 [R, 1]
    idx_tmp: torch.Tensor  # int32 [R]
    a2q_scale: torch.Tensor  # fp32 [R, 1] or [1]
    token_expert_indices: torch.Tensor  # int32 arange(R)
    efto: torch.Tensor  # int64 [E + 1]
    permuted_idx: torch.Tensor
    inv_permuted_idx: torch.Tensor
    permuted_experts_id: torch.Tensor
    sorted_row_idx: torch.Tensor
    topk_ids_for_sort: torch.Tensor
    sort_ws: torch.Tensor
    ps1: torch.Tensor  # int32 [E, 3]
    ps2: torch.Tensor
    ptrs1: torch.Tensor  # int64 [5E]
    ptrs2: torch.Tensor
    gemm_ws1: torch.Tensor  # uint8
    gemm_ws2: torch.Tensor


class VllmCutlassMoE:
    """vLLM 0.33's ``CutlassExpertsFp8`` path for one layer (see the module docstring); the
    interface of :class:`~vllm_moe_aot.measure.peers.torch_grouped.TorchGroupedMoE`:
    :meth:`bind` a problem, then call the returned function (no arguments) for the bf16
    ``[M, K]`` output."""

    name = "vllm_cutlass"

    def __init__(self, scheme: Scheme | str, library: CutlassLibrary | Path | str | None = None):
        self.scheme = Scheme.parse(scheme) if isinstance(scheme, str) else scheme
        self.lib = library if isinstance(library, CutlassLibrary) else load_library(library)
        self._workspaces: dict[tuple, _Workspace] = {}
        self._strides: dict[tuple, tuple[torch.Tensor, ...]] = {}
        self._ready: set[torch.device] = set()

    def _workspace(self, dev: torch.device, M: int, E: int, K: int, N: int, topk: int,
                   G: int) -> _Workspace:
        """``G``: the experts tokens are routed over (E local ones of them under EP)."""
        key = (dev, M, E, K, N, topk, G)
        if key in self._workspaces:
            return self._workspaces[key]
        R = M * topk
        per_token = self.scheme.per_channel_weights
        f32 = dict(dtype=torch.float32, device=dev)
        i32 = dict(dtype=torch.int32, device=dev)
        rows = lambda: torch.empty(R, **i32)  # noqa: E731
        sort_bytes = self.lib.sort_workspace_size(R, G)
        ws1 = self.lib.moe_mm_workspace_size(R, 2 * N, K, E)
        ws2 = self.lib.moe_mm_workspace_size(R, K, N, E)
        w = _Workspace(
            ws13=torch.empty(R * max(2 * N, K), dtype=torch.bfloat16, device=dev),
            ws2=torch.empty(R * max(N, K), dtype=torch.bfloat16, device=dev),
            a1q=torch.empty(M, K, dtype=torch.float8_e4m3fn, device=dev),
            a1q_scale=torch.empty((M, 1) if per_token else (1,), **f32),
            a1s_perm=torch.empty(R, 1, **f32), idx_tmp=rows(),
            a2q_scale=torch.empty((R, 1) if per_token else (1,), **f32),
            token_expert_indices=torch.arange(R, **i32),
            efto=torch.empty(E + 1, dtype=torch.int64, device=dev),
            permuted_idx=rows(), inv_permuted_idx=rows(), permuted_experts_id=rows(),
            sorted_row_idx=rows(), topk_ids_for_sort=rows(),
            sort_ws=torch.empty(max(sort_bytes, 1), dtype=torch.int8, device=dev),
            ps1=torch.empty(E, 3, **i32), ps2=torch.empty(E, 3, **i32),
            ptrs1=torch.empty(5 * E, dtype=torch.int64, device=dev),
            ptrs2=torch.empty(5 * E, dtype=torch.int64, device=dev),
            gemm_ws1=torch.empty(max(ws1, 1), dtype=torch.uint8, device=dev),
            gemm_ws2=torch.empty(max(ws2, 1), dtype=torch.uint8, device=dev))
        self._workspaces[key] = w
        return w

    def _stride_tensors(self, dev: torch.device, E: int, K: int, N: int):
        """CutlassExpertsFp8Base.__init__'s ab_strides1 (= c_strides2), ab_strides2,
        c_strides1."""
        key = (dev, E, K, N)
        if key not in self._strides:
            full = lambda v: torch.full((E,), v, dtype=torch.int64, device=dev)  # noqa: E731
            self._strides[key] = (full(K), full(N), full(2 * N))
        return self._strides[key]

    def bind(self, problem: MoEProblem) -> Callable[[], torch.Tensor]:
        check_problem(problem, self.scheme)
        x, w13, w2, s13, s2, _tw, ids = problem.tensors()
        dev = x.device
        E, N2, K = w13.shape
        N = N2 // 2
        M, topk = ids.shape
        R = M * topk
        for m, n, k in ((R, N2, K), (R, K, N)):
            cfg, built = self.lib.config_for(m, n, k)
            if not built:
                raise CutlassCallError(
                    f"vLLM picks sm90 config {cfg} for the grouped GEMM m={m} n={n} k={k}; "
                    f"the library was built without it (`python3 {BUILD_SCRIPT} --configs all`)")
        with torch.cuda.device(dev):
            if dev not in self._ready:
                self.lib.init()
                self._ready.add(dev)
            G = E if problem.expert_map is None else problem.expert_map.numel()
            ws = self._workspace(dev, M, E, K, N, topk, G)
            ab1, ab2, c1 = self._stride_tensors(dev, E, K, N)
        s13 = s13.float().contiguous()
        s2 = s2.float().contiguous()
        a13 = problem.a13_scale.float().reshape(1).contiguous() \
            if self.scheme.static_activations else None
        a2 = problem.a2_scale.float().reshape(1).contiguous() \
            if self.scheme.static_activations else None
        out = torch.empty(M, K, dtype=torch.bfloat16, device=dev)

        def call(p: MoEProblem = problem) -> torch.Tensor:
            xx, _w13, _w2, _s13, _s2, tw, tids = p.tensors()
            self.forward(xx, w13, w2, s13, s2, tw, tids, a13, a2, out=out, ws=ws,
                         strides=(ab1, ab2, c1), expert_map=p.expert_map)
            return out

        return call

    def __call__(self, problem: MoEProblem, out: torch.Tensor | None = None) -> torch.Tensor:
        from vllm_moe_aot.measure.peers.lineup import run_bound

        return run_bound(self.bind, problem, out)

    def _quant(self, src: torch.Tensor, dst: torch.Tensor, scale_out: torch.Tensor,
               static_scale: torch.Tensor | None, stream: int) -> torch.Tensor:
        """vLLM's ops.scaled_fp8_quant(src, static_scale, use_per_token_if_dynamic=ptpc):
        returns the scale tensor the next GEMM takes."""
        rows, cols = src.shape
        if static_scale is not None:
            self.lib.call("vllm_cutlass_static_scaled_fp8_quant", dst.data_ptr(),
                          src.data_ptr(), static_scale.data_ptr(), rows, cols, src.stride(0),
                          dst.stride(0), stream)
            return static_scale
        if self.scheme.per_channel_weights:
            self.lib.call("vllm_cutlass_dynamic_per_token_scaled_fp8_quant", dst.data_ptr(),
                          scale_out.data_ptr(), src.data_ptr(), None, rows, cols,
                          src.stride(0), dst.stride(0), stream)
        else:
            self.lib.call("vllm_cutlass_dynamic_scaled_fp8_quant", dst.data_ptr(),
                          scale_out.data_ptr(), src.data_ptr(), rows, cols, src.stride(0),
                          dst.stride(0), stream)
        return scale_out

    def _mm(self, out, a, b, a_scales, b_scales, ws: _Workspace, ps, ab, c, ptrs, gws,
            per_act_token: bool, per_out_ch: bool, stream: int) -> None:
        m, k = a.shape
        E, n, _ = b.shape
        self.lib.call("vllm_cutlass_moe_mm", out.data_ptr(), a.data_ptr(), b.data_ptr(),
                      a_scales.data_ptr(), b_scales.data_ptr(), ws.efto.data_ptr(),
                      ps.data_ptr(), ab.data_ptr(), ab.data_ptr(), c.data_ptr(), m, n, k, E,
                      a_scales.numel(), b_scales.numel(), int(per_act_token), int(per_out_ch),
                      ptrs.data_ptr(), ptrs.numel() * 8, gws.data_ptr(), gws.numel(), stream)

    def forward(self, x, w13, w2, s13, s2, topk_weights, topk_ids, a13_scale, a2_scale, *,
                out: torch.Tensor, ws: _Workspace, strides,
                expert_map: torch.Tensor | None = None) -> torch.Tensor:
        """The layer into ``out`` (bf16 [M, K]) on the current stream; ``ws`` from
        :meth:`_workspace` for this M; ``expert_map`` (int32 [global experts], -1 = another
        rank) as vLLM passes it under expert parallelism (topk_ids are then global ids)."""
        lib = self.lib
        stream = torch.cuda.current_stream().cuda_stream
        E, N2, K = w13.shape
        N = N2 // 2
        M, topk = topk_ids.shape
        R = M * topk
        per_act_token = per_out_ch = self.scheme.per_channel_weights
        ab1, ab2, c1 = strides
        # prepare (MoEPrepareAndFinalizeNoEP -> moe_kernel_quantize_input)
        a1q_scale = self._quant(x, ws.a1q, ws.a1q_scale, a13_scale, stream)
        # run_cutlass_moe_fp8, standard format; vLLM's workspace views (_resize_cache)
        a1q_perm = ws.ws2.view(torch.float8_e4m3fn)[:R * K].view(R, K)
        mm1_out = ws.ws13[:R * N2].view(R, N2)
        act_out = ws.ws2[:R * N].view(R, N)
        quant_out = ws.ws13.view(torch.float8_e4m3fn)[:R * N].view(R, N)
        mm2_out = ws.ws2[:R * K].view(R, K)
        # moe_permute with scratch
        ws.permuted_idx.fill_(R)
        G = E if expert_map is None else expert_map.numel()
        lib.call("vllm_cutlass_moe_permute", ws.a1q.data_ptr(), topk_ids.data_ptr(),
                 ws.token_expert_indices.data_ptr(), _ptr(expert_map), M, topk, K, G, E, 1,
                 a1q_perm.data_ptr(),
                 ws.efto.data_ptr(), ws.inv_permuted_idx.data_ptr(), ws.permuted_idx.data_ptr(),
                 ws.sort_ws.data_ptr(), ws.sort_ws.numel(), ws.permuted_experts_id.data_ptr(),
                 ws.sorted_row_idx.data_ptr(), ws.topk_ids_for_sort.data_ptr(), stream)
        if a1q_scale.dim() > 1:  # a1q_scale[permuted_idx.clamp(max=R - 1) // topk]
            torch.clamp(ws.permuted_idx, max=R - 1, out=ws.idx_tmp)
            ws.idx_tmp.floor_divide_(topk)
            torch.index_select(a1q_scale, 0, ws.idx_tmp, out=ws.a1s_perm)
            a1q_scale = ws.a1s_perm
        swap_ab = R <= 64
        lib.call("vllm_cutlass_problem_sizes_from_expert_offsets", ws.efto.data_ptr(),
                 ws.ps1.data_ptr(), ws.ps2.data_ptr(), E, N, K, int(swap_ab), stream)
        if not per_act_token:
            mm1_out.zero_()
        self._mm(mm1_out, a1q_perm, w13, a1q_scale, s13, ws, ws.ps1, ab1, c1, ws.ptrs1,
                 ws.gemm_ws1, per_act_token, per_out_ch, stream)
        lib.call("vllm_cutlass_silu_and_mul", act_out.data_ptr(), mm1_out.data_ptr(), R, N,
                 stream)
        a2q_scale = self._quant(act_out, quant_out, ws.a2q_scale, a2_scale, stream)
        # c_strides2 is ab_strides1 (K), as CutlassExpertsFp8Base shares them
        self._mm(mm2_out, quant_out, w2, a2q_scale, s2, ws, ws.ps2, ab2, ab1, ws.ptrs2,
                 ws.gemm_ws2, per_act_token, per_out_ch, stream)
        lib.call("vllm_cutlass_moe_unpermute", mm2_out.data_ptr(), topk_weights.data_ptr(),
                 ws.inv_permuted_idx.data_ptr(), ws.efto.data_ptr(), E, M, K, topk,
                 out.data_ptr(), stream)
        return out
