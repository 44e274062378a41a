"""The peers a run times beside ours, and which of them vLLM itself would run for the layer.

Every peer has the same face (:class:`Peer`): ``bind(problem)`` fixes one problem's weights and
scales and returns a function of no arguments that runs the layer (CUDA-graph capturable after
one eager call); ``peer(problem, out=None)`` runs it once. ``bench`` and ``tune`` build the
line-up once per run with :func:`lineup` and say, for each peer left out, why.

``stock`` is not a fifth implementation but a role: the peer that runs what vLLM 0.33 would run
for this layer without the plugin (:func:`vllm_would_run`: vLLM's oracle, stated as the rule in
:mod:`vllm_moe_aot.integration.providers`). Tuned rows say "aot" only where a variant beat that
peer, and name it in their ``stock_provider`` column.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from vllm_moe_aot.measure.workload import MoEProblem
from vllm_moe_aot.shapes import Scheme

#: the peers, in table order
PEER_NAMES = ("vllm_triton", "vllm_cutlass", "torch_grouped", "gemm_bound", "deepgemm_bound")
#: peers that are a whole layer (the best peer is the fastest of these); ``gemm_bound`` is the
#: two grouped GEMMs alone, a bound and not something a server could run
COMPLETE = ("vllm_triton", "vllm_cutlass", "torch_grouped")
#: what each peer is, for tables and docs
DESCRIBE = {
    "vllm_triton": "vLLM 0.33's Triton fused-MoE path (fused_experts_impl)",
    "vllm_cutlass": "vLLM 0.33's CUTLASS MoE (CutlassExpertsFp8's kernels, built from its "
                    "sources)",
    "torch_grouped": "torch pipeline around torch._scaled_grouped_mm",
    "gemm_bound": "the two torch._scaled_grouped_mm GEMMs alone (no routing, quantisation, "
                  "activation or reduce)",
    "deepgemm_bound": "the two GEMMs alone on DeepGEMM's block-FP8 grouped-contiguous kernel "
                      "(the bound of fp8_block layers, built by scripts/build_deepgemm.py)",
}


@dataclass
class Peer:
    """One peer: ``name`` (one of :data:`PEER_NAMES`), ``source`` (what actually runs: "vllm",
    "vllm_stock", the library path, ...), ``gated`` (its output is the layer's output and is
    checked against the float64 reference)."""

    name: str
    source: str
    bind: Callable[[MoEProblem], Callable[[], torch.Tensor]]
    gated: bool = True

    @property
    def complete(self) -> bool:
        return self.name in COMPLETE

    def __call__(self, problem: MoEProblem, out: torch.Tensor | None = None) -> torch.Tensor:
        return run_bound(self.bind, problem, out)


def run_bound(bind: Callable[[MoEProblem], Callable[[], torch.Tensor]], problem: MoEProblem,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """One eager call of a peer given by its ``bind``; the output copied into ``out`` if
    given (the gate's path; timing calls the bound function itself)."""
    y = bind(problem)()
    if out is not None:
        out.copy_(y)
        return out
    return y


def vllm_would_run(scheme: Scheme) -> tuple[str, str]:
    """(peer name, why) for what vLLM 0.33 runs for a ``scheme`` layer on this machine without
    the plugin. With vLLM importable its platform is asked; without it (the GPU machine) the
    machine is taken as vLLM's CUDA wheel would see it on sm_90: its CUTLASS grouped GEMM
    compiled in, FlashInfer's CUTLASS MoE not usable (no flashinfer here)."""
    from vllm_moe_aot.integration.providers import PlatformFlags, stock_provider
    from vllm_moe_aot.measure.peers.vllm_triton import _real_vllm_importable

    if _real_vllm_importable():
        try:
            flags = PlatformFlags.from_vllm()
            where = "the installed vLLM's platform"
        except Exception as exc:  # noqa: BLE001 - no GPU for NVML, ...
            flags, where = PlatformFlags(arch="sm_90a"), f"sm_90a defaults ({exc})"
    else:
        flags = PlatformFlags(arch="sm_90a", flashinfer_cutlass_moe=False)
        where = "sm_90a without vLLM: CUTLASS compiled in, no FlashInfer"
    name = stock_provider(scheme, flags=flags)
    if name == "flashinfer_cutlass":
        # not a peer we can run: say so and measure vLLM's next choice on the same machine
        return "vllm_triton", (f"vLLM would run flashinfer_cutlass ({where}); no FlashInfer "
                               "peer exists here, vllm_triton stands in")
    if name not in COMPLETE:
        return "vllm_triton", f"vLLM would run {name} ({where}); vllm_triton stands in"
    return name, f"vLLM's oracle rule for {scheme.value} on {where}"


def _vllm_triton(dev: torch.device, prefer: str | None) -> tuple[Peer | None, str]:
    from vllm_moe_aot.measure.peers.vllm_triton import describe_probe, get_stock_provider

    provider = get_stock_provider(dev, prefer=prefer)
    if provider is None:
        return None, describe_probe()
    return Peer("vllm_triton", provider.name, provider.bind), ""


def _vllm_cutlass(dev: torch.device, scheme: Scheme) -> tuple[Peer | None, str]:
    from vllm_moe_aot.measure.peers import vllm_cutlass

    if scheme.block_weights:
        return None, "vLLM's CUTLASS MoE takes per-tensor or per-channel scales, not 128x128 blocks"
    why = vllm_cutlass.unavailable_reason()
    if why is not None:
        return None, why
    impl = vllm_cutlass.VllmCutlassMoE(scheme)
    return Peer("vllm_cutlass", impl.lib.path.name, impl.bind), ""


def _torch(dev: torch.device, scheme: Scheme, name: str) -> tuple[Peer | None, str]:
    from vllm_moe_aot import library_gemm
    from vllm_moe_aot.measure.peers.torch_grouped import GroupedGemmBound, TorchGroupedMoE

    if scheme.block_weights:
        return None, "torch._scaled_grouped_mm takes row-wise scales, not 128x128 blocks"
    why = library_gemm.unavailable_reason(dev)
    if why is not None:
        return None, why
    if name == "torch_grouped":
        return Peer(name, "torch", TorchGroupedMoE(scheme).bind), ""
    return Peer(name, "torch", GroupedGemmBound(scheme).bind, gated=False), ""


def _deepgemm(dev: torch.device, scheme: Scheme, shape) -> tuple[Peer | None, str]:
    from vllm_moe_aot.measure.peers import deepgemm_bound

    why = deepgemm_bound.unavailable_reason(scheme, shape, device=dev)
    if why is not None:
        return None, why
    impl = deepgemm_bound.DeepGemmBound(scheme)
    return Peer("deepgemm_bound", impl.lib.path.name, impl.bind, gated=False), ""


def lineup(dev: torch.device, scheme: Scheme, names: tuple[str, ...] = PEER_NAMES, *,
           triton_source: str | None = None, shape=None) -> tuple[dict[str, Peer], list[str]]:
    """The peers of ``names`` that run on ``dev`` (by name, in table order) and, for each
    one left out, ``"<name>: why"``. ``triton_source`` ("vllm" or "vllm_stock") pins where
    vLLM's Triton path comes from (default: the real vLLM, else the carried copy); ``shape``
    (the layer's MoEShape, if known) lets a peer built for some layers only say so here."""
    peers: dict[str, Peer] = {}
    skipped: list[str] = []
    for name in names:
        if name not in PEER_NAMES:
            raise ValueError(f"unknown peer {name!r}; valid: {', '.join(PEER_NAMES)}")
        try:
            if name == "vllm_triton":
                peer, why = _vllm_triton(dev, triton_source)
            elif name == "vllm_cutlass":
                peer, why = _vllm_cutlass(dev, scheme)
            elif name == "deepgemm_bound":
                peer, why = _deepgemm(dev, scheme, shape)
            else:
                peer, why = _torch(dev, scheme, name)
        except Exception as exc:  # noqa: BLE001 - a peer that cannot start is left out
            peer, why = None, f"{type(exc).__name__}: {exc}"
        if peer is None:
            skipped.append(f"{name}: {why}")
        else:
            peers[name] = peer
    return peers, skipped
