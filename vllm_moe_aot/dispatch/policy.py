"""The default dispatch policy: what runs a layer at each batch size when no tuned row does.

It is a measured table, not a guess. ``scripts/policy_sweep.py`` timed every candidate of
:data:`GEMV_POOL` + :data:`GROUPED_POOL` and vLLM's stock path on the :data:`SURVEY_LAYERS`
at 18 token counts on the device; ``scripts/derive_policy.py`` turned those logs into
``default_policy.csv`` beside this file. Layers fall into classes by scheme family, N
(<= 128, <= 256, <= 1024) and topk (<= 8, > 8); for each class and measured token count the
table holds the candidate whose *worst* speedup over stock across the class's surveyed layers
is largest, if that worst speedup is at least ``1 + POLICY_MARGIN``, else ``stock``.

A layer gets the policy's choices only where it resembles what was measured: same target arch,
a class that was surveyed, E, K and N within a factor of two of the class's surveyed range, and
no expert parallelism (the survey ran every layer with all its experts local; an EP layer
needs tuned rows, which its tuning hint names).
Everything else is stock: where no variant was shown to beat stock, none is assumed to.
Between measured token counts a batch takes the choice of the next larger one (as tuned rows
do); a chosen variant that does not serve the layer (the build's ``serves`` check, applied by
the caller) falls back to stock for that bucket.
"""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from pathlib import Path

from vllm_moe_aot.shapes import MoEShape, Scheme

#: the smallest worst-case lead over stock the sweep must show for the policy to pick a
#: variant. Larger than the tuner's 3 %: the choice is made in one run and must hold in others
#: (run-to-run spread of medians reaches ~4 %) and on layers of the class nobody measured.
POLICY_MARGIN = 0.05

POLICY_FILE = Path(__file__).resolve().parent / "default_policy.csv"
POLICY_COLUMNS = ("arch", "sm_count", "scheme", "n_max", "topk_max", "tokens", "choice",
                  "worst_speedup", "e_min", "e_max", "k_min", "k_max", "n_min", "n_seen_max",
                  "layers")
from vllm_moe_aot.contract import STOCK  # noqa: E402  (re-exported)

#: how far outside a class's surveyed E, K and N range the policy still applies
RANGE_FACTOR = 2.0


@dataclass(frozen=True)
class SurveyLayer:
    """A public model's per-rank MoE layer the default policy is measured on."""

    name: str
    shape: MoEShape
    scheme: Scheme


def both_schemes(name: str, shape: MoEShape) -> list[SurveyLayer]:
    return [SurveyLayer(f"{name}_ptpc", shape, Scheme.FP8_PTPC),
            SurveyLayer(f"{name}_per_tensor", shape, Scheme.FP8_PER_TENSOR_STATIC)]


#: per-rank layers of public models (TP degree in the name), each as ptpc and static per-tensor
SURVEY_LAYERS: tuple[SurveyLayer, ...] = tuple(
    both_schemes("qwen3-235b-a22b_tp8", MoEShape(E=128, K=4096, N=192, topk=8))
    + both_schemes("glm-4.5_tp8", MoEShape(E=160, K=5120, N=192, topk=8))
    + both_schemes("minimax-m2_tp8", MoEShape(E=256, K=3072, N=192, topk=8))
    + both_schemes("qwen3-next-80b-a3b_tp4", MoEShape(E=512, K=2048, N=128, topk=10))
    + both_schemes("qwen3-235b-a22b_tp4", MoEShape(E=128, K=4096, N=384, topk=8))
    + both_schemes("deepseek-v3_tp4", MoEShape(E=256, K=7168, N=512, topk=8))
)

#: the variants the policy chooses among
GEMV_POOL: tuple[str, ...] = (
    "gemv_n4_k1024.k8_n64", "gemv_n8_k512.k8_n64", "gemv_n4_k1024.k4_n64_w2",
    "gemv_n4_k1024.wk16_n128_t8_w8", "gemv_n4_k1024.k2_n128_t8_w1",
)
GROUPED_POOL: tuple[str, ...] = (
    "grouped_m16", "grouped_m64_fastacc_res4n128", "grouped_m128_fastacc_res4m64n128",
    "grouped_m64n256_fastacc_res4n256", "grouped_m64n256_fastacc_loop4",
    "grouped_m64n64_fastacc_loop4n128", "grouped_m64n64_fastacc_loop4",
    "grouped_m128_fastacc_loop4m64",
)


def candidate_pool(shape: MoEShape, scheme: Scheme) -> list[str]:
    """Every variant the policy may pick (the build decides which of them serve the layer)."""
    return list(GEMV_POOL + GROUPED_POOL)


def layer_class(shape: MoEShape, scheme: Scheme | str) -> tuple[str, int, int]:
    """``(scheme family, N bound, topk bound)``: the layers one policy row speaks for."""
    family = scheme.family if isinstance(scheme, Scheme) else Scheme.parse(scheme).family
    n_max = 128 if shape.N <= 128 else 256 if shape.N <= 256 else 1024
    return family, n_max, 8 if shape.topk <= 8 else 16


@dataclass(frozen=True)
class PolicyRow:
    arch: str
    sm_count: int
    scheme: str
    n_max: int
    topk_max: int
    tokens: int
    choice: str
    worst_speedup: float
    e_min: int
    e_max: int
    k_min: int
    k_max: int
    n_min: int
    n_seen_max: int
    layers: str

    def covers(self, shape: MoEShape) -> bool:
        """Whether ``shape`` lies within RANGE_FACTOR of what this row's class measured."""
        def near(v: int, lo: int, hi: int) -> bool:
            return lo / RANGE_FACTOR <= v <= hi * RANGE_FACTOR
        return (near(shape.E, self.e_min, self.e_max) and near(shape.K, self.k_min, self.k_max)
                and near(shape.N, self.n_min, self.n_seen_max))

    def to_record(self) -> dict[str, str]:
        return {c: (f"{getattr(self, c):.3f}" if c == "worst_speedup" else str(getattr(self, c)))
                for c in POLICY_COLUMNS}


@functools.lru_cache(maxsize=4)
def load_policy(path: str = str(POLICY_FILE)) -> tuple[PolicyRow, ...]:
    """The policy table (empty when the file is missing: every layer then runs stock)."""
    p = Path(path)
    if not p.is_file():
        return ()
    ints = {"sm_count", "n_max", "topk_max", "tokens", "e_min", "e_max", "k_min", "k_max",
            "n_min", "n_seen_max"}
    with open(p, newline="") as f:
        return tuple(
            PolicyRow(**{k: (int(v) if k in ints else float(v) if k == "worst_speedup" else v)
                         for k, v in rec.items()})
            for rec in csv.DictReader(f))


@dataclass(frozen=True)
class PolicyDecision:
    """The policy's answer for one layer: ``entries`` (M, choice) and why, in words."""

    entries: tuple[tuple[int, str], ...]
    reason: str

    @property
    def uses_aot(self) -> bool:
        return any(choice != STOCK for _, choice in self.entries)


def default_dispatch(shape: MoEShape, scheme: Scheme | str, arch: str,
                     sm_count: int | None = None,
                     rows: tuple[PolicyRow, ...] | None = None) -> PolicyDecision:
    """The default choices for ``shape``/``scheme`` on a GPU of ``arch`` with ``sm_count`` SMs.

    Empty ``entries`` mean stock at every batch size; ``reason`` says why in either case.
    """
    if shape.ep > 1:
        # every surveyed layer held all its experts: under EP a rank runs only the pairs
        # routed to its E local experts (about topk / ep per token), a workload nobody measured
        return PolicyDecision((), f"the default policy was measured without expert "
                                  f"parallelism (this layer: ep={shape.ep}), so it is not "
                                  "assumed for EP layers")
    rows = load_policy() if rows is None else rows
    family, n_max, topk_max = layer_class(shape, scheme)
    on_arch = [r for r in rows if r.arch == arch]
    if not on_arch:
        return PolicyDecision((), f"the default policy was not measured on {arch}")
    mine = [r for r in on_arch
            if (r.scheme, r.n_max, r.topk_max) == (family, n_max, topk_max)]
    if not mine:
        return PolicyDecision((), f"no surveyed layer like it ({family}, N<={n_max}, "
                                  f"topk<={topk_max})")
    if not mine[0].covers(shape):
        r = mine[0]
        return PolicyDecision((), f"outside the surveyed range of its class (E {r.e_min}-"
                                  f"{r.e_max}, K {r.k_min}-{r.k_max}, N {r.n_min}-"
                                  f"{r.n_seen_max}, x{RANGE_FACTOR:g})")
    measured_on = mine[0].sm_count
    note = "" if sm_count in (None, measured_on) else \
        f"; measured with {measured_on} SMs, this GPU has {sm_count}"
    entries = tuple(sorted((r.tokens, r.choice) for r in mine))
    return PolicyDecision(entries, f"default policy for {family}, N<={n_max}, "
                                   f"topk<={topk_max} (surveyed: {mine[0].layers}){note}")
