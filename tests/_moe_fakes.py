"""Stand-ins for the AOT pipeline and the stock provider, for CPU tests of the tuner and the
bench: they compute the float64 reference (so they pass the gate) or deliberately do not."""

from __future__ import annotations

import torch

from vllm_moe_aot.measure.reference import reference_moe
from vllm_moe_aot.pipeline import FusedMoE
from vllm_moe_aot.shapes import MoEShape, Scheme

#: variant -> (quantize_activations, output multiplier; 1.0 is correct)
DEFAULT_VARIANTS: dict[str, tuple[bool, float]] = {
    "fake_w8a8": (True, 1.0),
    "fake_w8a16": (False, 1.0),
    "fake_wrong": (True, 1.3),  # 30% off: the gate must reject it
}


def _cpu(t):
    return None if t is None else t.detach().cpu()


class FakeFusedMoE:
    """Same constructor and methods as ``vllm_moe_aot.pipeline.FusedMoE``."""

    instances: list[FakeFusedMoE] = []
    #: the real sharing logic (one pipeline per layer, failures remembered), building fakes
    shared = classmethod(FusedMoE.shared.__func__)

    def __init__(self, shape: MoEShape, scheme: Scheme | str, device, max_tokens: int = 8192,
                 variants: dict[str, tuple[bool, float]] | None = None):
        self.shape = shape
        self.scheme = Scheme.parse(scheme) if isinstance(scheme, str) else scheme
        self.device = torch.device(device)
        self.max_tokens = max_tokens
        self._variants = dict(DEFAULT_VARIANTS if variants is None else variants)
        self.calls: list[tuple[str, int]] = []
        FakeFusedMoE.instances.append(self)

    @property
    def variants(self) -> list[str]:
        return list(self._variants)

    def variants_for(self, tokens: int) -> list[str]:
        return list(self._variants)

    def quantize_activations(self, variant: str) -> bool:
        return self._variants[variant][0]

    def act_group(self, variant: str) -> int:
        return 0  # one intermediate scale per row, as the reference's default

    def run(self, variant, x, w13, w2, w13_scale, w2_scale, topk_weights, topk_ids, out,
            a13_scale=None, a2_scale=None, expert_map=None):
        qa, mult = self._variants[variant]
        self.calls.append((variant, x.shape[0]))
        ref = reference_moe(x, w13, w2, w13_scale, w2_scale, topk_weights, topk_ids,
                            self.scheme, a13_scale=_cpu(a13_scale), a2_scale=_cpu(a2_scale),
                            quantize_activations=qa, expert_map=expert_map)
        out.copy_((ref * mult).to(out.dtype))
        return out


def factory(variants: dict[str, tuple[bool, float]] | None = None):
    """A ``moe_factory(shape, scheme, device, max_tokens)`` building :class:`FakeFusedMoE`."""
    def make(shape, scheme, device, max_tokens):
        return FakeFusedMoE(shape, scheme, device, max_tokens, variants=variants)
    return make


class FakeStock:
    """A stock provider computing the W8A8 reference."""

    name = "fake_stock"

    def __init__(self):
        self.calls = 0

    def __call__(self, problem, out=None):
        self.calls += 1
        y = problem.reference(True).to(torch.bfloat16)
        if out is not None:
            out.copy_(y)
            return out
        return y
