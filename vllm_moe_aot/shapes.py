"""MoE layer shapes, quantisation schemes and the one place that states what we support.

Everything that must decide "can the AOT pipeline take this layer?" (the vLLM hook, the tuner,
the benchmark) asks :func:`unsupported_reason`; nothing else re-states these limits.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Scheme(str, enum.Enum):
    """FP8 quantisation schemes the pipeline implements."""

    #: one fp32 weight scale per expert; activation scale static (checkpoint scalar)
    FP8_PER_TENSOR_STATIC = "fp8_per_tensor_static"
    #: one fp32 weight scale per expert; activation scale computed at run time
    FP8_PER_TENSOR_DYNAMIC = "fp8_per_tensor_dynamic"
    #: per-output-channel weight scales, dynamic per-token activation scales
    FP8_PTPC = "fp8_ptpc"
    #: one weight scale per 128 x 128 block (vLLM's ``weight_scale_inv``), activations
    #: quantised dynamically per token in groups of 128 columns (the official FP8 checkpoints)
    FP8_BLOCK = "fp8_block"

    @property
    def per_channel_weights(self) -> bool:
        return self is Scheme.FP8_PTPC

    @property
    def block_weights(self) -> bool:
        return self is Scheme.FP8_BLOCK

    @property
    def static_activations(self) -> bool:
        return self is Scheme.FP8_PER_TENSOR_STATIC

    @property
    def family(self) -> str:
        """The names configs and users speak of: ``fp8_per_tensor``, ``fp8_ptpc`` or
        ``fp8_block``."""
        if self in (Scheme.FP8_PTPC, Scheme.FP8_BLOCK):
            return self.value
        return "fp8_per_tensor"

    @classmethod
    def parse(cls, name: str) -> Scheme:
        """Accept the enum value or the family name (``fp8_per_tensor`` means static)."""
        aliases = {"fp8_per_tensor": cls.FP8_PER_TENSOR_STATIC, "ptpc": cls.FP8_PTPC,
                   "block": cls.FP8_BLOCK}
        if name in aliases:
            return aliases[name]
        try:
            return cls(name)
        except ValueError:
            valid = sorted({s.value for s in cls} | set(aliases))
            raise ValueError(f"unknown quant scheme {name!r}; valid: {', '.join(valid)}") from None


@dataclass(frozen=True)
class MoEShape:
    """Per-rank MoE layer shape: ``E`` experts, hidden ``K``, intermediate ``N``, ``topk``.

    ``ep``: expert-parallel ranks (1: none). Under expert parallelism ``E`` is this rank's
    share of the ``E * ep`` experts tokens are routed over, and only the pairs routed to those
    cost work here (vLLM's ``expert_map``); the routing statistics, and so the tuned choice,
    differ from a layer of ``E`` experts without EP.
    """

    E: int
    K: int
    N: int
    topk: int
    ep: int = 1

    def __str__(self) -> str:
        return (f"E={self.E},K={self.K},N={self.N},topk={self.topk}"
                + (f",ep={self.ep}" if self.ep != 1 else ""))

    @property
    def global_experts(self) -> int:
        """Experts tokens are routed over (all ranks')."""
        return self.E * self.ep

    @classmethod
    def parse(cls, text: str) -> MoEShape:
        """Parse ``"E,K,N,topk"`` or ``"E,K,N,topk,ep"`` (the bench/tune ``--shape``
        argument; E is the experts per rank)."""
        try:
            vals = [int(v) for v in text.split(",")]
            if len(vals) not in (4, 5):
                raise ValueError
        except ValueError:
            raise ValueError(f"shape must be 'E,K,N,topk[,ep]' integers, got {text!r}"
                             ) from None
        return cls(*vals)

    def flops(self, M: int) -> float:
        """fp8 FLOPs of the layer's two GEMMs at ``M`` tokens; under EP, of the expected
        local share (``topk / ep`` pairs per token with uniform routing)."""
        return 2.0 * M * self.topk / self.ep * 3.0 * self.N * self.K

    def weight_bytes_per_expert(self) -> int:
        """fp8 bytes of one expert's w13 and w2."""
        return 3 * self.N * self.K


@dataclass(frozen=True)
class Preset:
    name: str
    shape: MoEShape
    scheme: Scheme
    model: str


PRESETS: dict[str, Preset] = {
    "qwen3.5-397b-a17b": Preset(
        "qwen3.5-397b-a17b", MoEShape(E=512, K=4096, N=128, topk=10), Scheme.FP8_PTPC,
        "Qwen/Qwen3.5-397B-A17B",
    ),
    "hy3": Preset(
        "hy3", MoEShape(E=192, K=4096, N=192, topk=8), Scheme.FP8_PER_TENSOR_STATIC,
        "tencent/Hunyuan3 (Hy3-FP8)",
    ),
    # the official FP8 checkpoint: weight_block_size [128, 128], dynamic 1x128 activations
    "qwen3.5-397b-a17b-fp8": Preset(
        "qwen3.5-397b-a17b-fp8", MoEShape(E=512, K=4096, N=128, topk=10), Scheme.FP8_BLOCK,
        "Qwen/Qwen3.5-397B-A17B-FP8",
    ),
}

#: Token counts the shipped configs are tuned for: 1, 2, 4, ..., 131072.
TUNED_TOKEN_COUNTS: tuple[int, ...] = tuple(2**i for i in range(18))

# The supported set, stated once.  K and N granularity follow the kernel tiles (K is read in
# 128-wide chunks, N in 32-wide chunks); the upper bounds are what the kernels are tested at
# (every N: the grouped stage 2 with per-tile activation scales, issue 13) and keep the
# routing workspace inside what the kernels were built for.
MAX_K = 8192
K_MULTIPLE = 128
MAX_N = 16384
N_MULTIPLE = 32
MAX_E = 1024
MAX_TOPK = 16
#: the weight block (rows x columns) and activation group of ``fp8_block``: the one built
WEIGHT_BLOCK = (128, 128)


def weight_scale_shapes(shape: MoEShape, scheme: Scheme
                        ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """w13's and w2's weight-scale shapes under ``scheme``: ``[E]`` per tensor, ``[E, 2N]`` /
    ``[E, K]`` per channel, vLLM's ``weight_scale_inv`` ``[E, 2N/128, K/128]`` /
    ``[E, K/128, N/128]`` per block (N and K in whole blocks, as :func:`unsupported_reason`
    requires)."""
    E, K, N = shape.E, shape.K, shape.N
    bn, bk = WEIGHT_BLOCK
    if scheme.block_weights:
        return (E, 2 * N // bn, K // bk), (E, K // bn, N // bk)
    if scheme.per_channel_weights:
        return (E, 2 * N), (E, K)
    return (E,), (E,)


def unsupported_reason(shape: MoEShape, scheme: Scheme | str | None = None) -> str | None:
    """Return why the AOT pipeline cannot serve ``shape``/``scheme``, or None if it can."""
    if scheme is not None and not isinstance(scheme, Scheme):
        try:
            scheme = Scheme.parse(scheme)
        except ValueError as exc:
            return str(exc)
    if not (K_MULTIPLE <= shape.K <= MAX_K and shape.K % K_MULTIPLE == 0):
        return f"hidden size K={shape.K} must be a multiple of {K_MULTIPLE} up to {MAX_K}"
    if not (N_MULTIPLE <= shape.N <= MAX_N and shape.N % N_MULTIPLE == 0):
        return f"intermediate size N={shape.N} must be a multiple of {N_MULTIPLE} up to {MAX_N}"
    if scheme is not None and scheme.block_weights and shape.N % WEIGHT_BLOCK[0]:
        return (f"intermediate size N={shape.N} must be a multiple of the {WEIGHT_BLOCK[0]}-row "
                "weight block for block FP8")
    if not 1 <= shape.E <= MAX_E:
        return f"expert count E={shape.E} must be between 1 and {MAX_E}"
    if shape.ep < 1:
        return f"expert-parallel ranks ep={shape.ep} must be >= 1"
    if not 1 <= shape.topk <= min(MAX_TOPK, shape.global_experts):
        routed = (f"E={shape.E}" if shape.ep == 1 else
                  f"{shape.global_experts} experts over {shape.ep} ranks")
        return f"topk={shape.topk} must be between 1 and min({MAX_TOPK}, {routed})"
    return None
