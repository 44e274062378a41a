"""The stock path to compare against: vLLM's own Triton FP8 fused-MoE (``fused_experts_impl``).

:func:`get_stock_provider` returns, in order of preference:

- ``"vllm"``: the real vLLM is importable and its FP8 ``fused_experts`` path ran a tiny
  problem on this GPU (needs vLLM's compiled ops for this device);
- ``"vllm_stock"``: the ``vllm_stock`` tool package is importable (``.vllm_stock`` in the repo
  root, put on ``PYTHONPATH``; see ``shared/tools/vllm-stock/README.md``): vLLM 0.33's
  ``fused_experts_impl`` with Triton substitutes for its compiled ops, for machines without
  vLLM;
- None otherwise (and on a machine without a GPU).

A provider is called as ``provider(problem, out=None)`` or
``provider(x, w13, w2, w13_scale, w2_scale, topk_weights, topk_ids, scheme=..., ...)``;
it returns the ``[M, K]`` bf16 output (allocated by vLLM; copied into ``out`` when given, a
copy the timing callers avoid by not passing ``out``). Calls are CUDA-graph capturable after
one eager call.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from collections.abc import Callable

import torch

from vllm_moe_aot import caches
from vllm_moe_aot.measure.workload import MoEProblem
from vllm_moe_aot.shapes import Scheme

logger = logging.getLogger("vllm_moe_aot.measure.peers.vllm_triton")

#: why the last :func:`get_stock_provider` call returned what it did, per candidate
LAST_PROBE: dict[str, str] = {}
caches.register("stock.last_probe", LAST_PROBE.clear)


class StockProvider:
    """One way of running the stock fused-MoE path; ``name`` is recorded in tuned rows."""

    def __init__(self, name: str, impl: Callable[..., torch.Tensor], channel_scale_3d: bool):
        self.name = name
        self._impl = impl
        self._channel_scale_3d = channel_scale_3d

    def __repr__(self) -> str:
        return f"StockProvider({self.name!r})"

    def run(self, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, w13_scale: torch.Tensor,
            w2_scale: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
            scheme: Scheme | str, a13_scale: torch.Tensor | None = None,
            a2_scale: torch.Tensor | None = None,
            out: torch.Tensor | None = None,
            expert_map: torch.Tensor | None = None) -> torch.Tensor:
        """``expert_map`` (int32 [global experts], -1 = another rank): vLLM's expert
        parallelism; ``topk_ids`` are then global ids."""
        scheme = Scheme.parse(scheme) if isinstance(scheme, str) else scheme
        E = w13.shape[0]
        if scheme.block_weights:  # vLLM's weight_scale_inv, as they are
            s13, s2 = w13_scale, w2_scale
            a13 = a2 = None
        elif scheme.per_channel_weights:
            shape13, shape2 = (E, w13.shape[1]), (E, w2.shape[1])
            if self._channel_scale_3d:
                shape13, shape2 = (*shape13, 1), (*shape2, 1)
            s13, s2 = w13_scale.reshape(shape13), w2_scale.reshape(shape2)
            a13 = a2 = None
        else:
            s13, s2 = w13_scale.reshape(E), w2_scale.reshape(E)
            static = scheme.static_activations
            a13 = a13_scale.reshape(1) if static and a13_scale is not None else None
            a2 = a2_scale.reshape(1) if static and a2_scale is not None else None
        y = self._impl(x, w13, w2, topk_weights, topk_ids, scheme.family, s13, s2, a13, a2,
                       expert_map)
        if out is not None:
            out.copy_(y)
            return out
        return y

    def bind(self, problem: MoEProblem) -> Callable[[], torch.Tensor]:
        """A function of no arguments that runs ``problem`` (the peers' common face,
        :mod:`vllm_moe_aot.measure.peers.lineup`); vLLM allocates its output per call."""
        return lambda: self(problem)

    def __call__(self, problem: MoEProblem | torch.Tensor, *args,
                 out: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """``provider(problem, out=None)`` or ``provider(x, w13, ..., scheme=..., out=None)``
        (the arguments of :meth:`run`)."""
        if isinstance(problem, MoEProblem):
            if args or kwargs:
                raise TypeError("provider(problem) takes no other arguments than out=")
            return self.run(*problem.tensors(), scheme=problem.scheme,
                            a13_scale=problem.a13_scale, a2_scale=problem.a2_scale, out=out,
                            expert_map=problem.expert_map)
        return self.run(problem, *args, out=out, **kwargs)


def _vllm_impl() -> Callable[..., torch.Tensor]:
    from vllm.model_executor.layers.fused_moe.fused_moe import fused_experts_impl

    def impl(x, w13, w2, tw, ids, family, s13, s2, a13, a2, expert_map=None):
        return fused_experts_impl(
            x, w13, w2, tw, ids, activation="silu", apply_router_weight_on_input=False,
            use_fp8_w8a8=True, use_int8_w8a8=False, use_int8_w8a16=False,
            use_int4_w4a16=False, ocp_mx_scheme=None,
            per_channel_quant=family == "fp8_ptpc",
            block_shape=[128, 128] if family == "fp8_block" else None,
            global_num_experts=-1 if expert_map is None else expert_map.numel(),
            expert_map=expert_map,
            w1_scale=s13, w2_scale=s2, w1_zp=None, w2_zp=None, a1_scale=a13, a2_scale=a2,
            w1_bias=None, w2_bias=None)

    return impl


def _vllm_stock_impl() -> Callable[..., torch.Tensor]:
    vllm_stock = importlib.import_module("vllm_stock")

    def impl(x, w13, w2, tw, ids, family, s13, s2, a13, a2, expert_map=None):
        kw = {} if expert_map is None else {"expert_map": expert_map}
        return vllm_stock.fused_experts(x, w13, w2, tw, ids, scheme=family, w13_scale=s13,
                                        w2_scale=s2, a13_scale=a13, a2_scale=a2, **kw)

    return impl


def _smoke(provider: StockProvider, device: torch.device) -> None:
    """Run a tiny problem of each scheme family; raises if the path cannot run here."""
    from vllm_moe_aot.measure.reference import gate
    from vllm_moe_aot.measure.workload import make_problem
    from vllm_moe_aot.shapes import MoEShape

    for scheme in (Scheme.FP8_PTPC, Scheme.FP8_PER_TENSOR_STATIC):
        p = make_problem(MoEShape(E=8, K=256, N=128, topk=2), scheme, 4, device, seed=1)
        y = provider(p)
        torch.cuda.synchronize(device)
        g = gate(y, p.reference(True))
        if not g.passed:
            raise RuntimeError(f"{provider.name} {scheme.value} smoke test: {g}")


def _real_vllm_importable() -> bool:
    mod = sys.modules.get("vllm")
    if mod is not None:
        return not getattr(mod, "__vllm_stock_shim__", False)
    return importlib.util.find_spec("vllm") is not None


_CACHE: dict[str, StockProvider | None] = {}


def get_stock_provider(device: torch.device | str | None = None,
                       prefer: str | None = None) -> StockProvider | None:
    """The stock path for ``device`` (default: the current GPU), or None (see module doc).

    ``prefer`` ("vllm" or "vllm_stock") tries only that provider. The answer is cached per
    device; :data:`LAST_PROBE` says why each provider was or was not taken.
    """
    if device is None:
        if not torch.cuda.is_available():
            LAST_PROBE.clear()
            LAST_PROBE["all"] = "no GPU: the stock path runs on a GPU only"
            return None
        device = torch.device("cuda", torch.cuda.current_device())
    device = torch.device(device)
    if device.type != "cuda":
        LAST_PROBE.clear()
        LAST_PROBE["all"] = f"device {device} is not a GPU: the stock path runs on a GPU only"
        return None
    cache_key = f"{device}|{prefer}"
    if cache_key in _CACHE:
        return _CACHE[cache_key]
    LAST_PROBE.clear()
    provider = None
    order = [prefer] if prefer else ["vllm", "vllm_stock"]
    for name in order:
        try:
            if name == "vllm":
                if not _real_vllm_importable():
                    LAST_PROBE[name] = "vllm is not installed"
                    continue
                cand = StockProvider("vllm", _vllm_impl(), channel_scale_3d=True)
            elif name == "vllm_stock":
                if "vllm" in sys.modules and not getattr(sys.modules["vllm"],
                                                         "__vllm_stock_shim__", False):
                    LAST_PROBE[name] = "the real vllm is already imported in this process"
                    continue
                if importlib.util.find_spec("vllm_stock") is None:
                    LAST_PROBE[name] = ("vllm_stock is not importable (prepare .vllm_stock and "
                                        "put it on PYTHONPATH)")
                    continue
                cand = StockProvider("vllm_stock", _vllm_stock_impl(), channel_scale_3d=False)
            else:
                raise ValueError(f"unknown stock provider {name!r}")
            _smoke(cand, device)
        except Exception as exc:  # noqa: BLE001 - any failure means "cannot run here"
            LAST_PROBE[name] = f"{type(exc).__name__}: {exc}"
            logger.info("stock provider %s unavailable: %s", name, LAST_PROBE[name])
            continue
        LAST_PROBE[name] = "ok"
        provider = cand
        break
    _CACHE[cache_key] = provider
    return provider


def describe_probe() -> str:
    return "; ".join(f"{k}: {v}" for k, v in LAST_PROBE.items()) or "not probed"
