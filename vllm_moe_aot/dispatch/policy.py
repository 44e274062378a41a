"""The default dispatch policy: what runs a layer at each batch size when no tuned row does.

Built from measurements (``docs/default-dispatch.md``): the survey layers below, every candidate
of :func:`candidate_pool` and vLLM's stock path timed on the device at 18 token counts.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm_moe_aot.shapes import MoEShape, Scheme


@dataclass(frozen=True)
class SurveyLayer:
    """A public model's per-rank MoE layer the default policy is measured on."""

    name: str
    shape: MoEShape
    scheme: Scheme


def _both(name: str, shape: MoEShape) -> list[SurveyLayer]:
    return [SurveyLayer(f"{name}_ptpc", shape, Scheme.FP8_PTPC),
            SurveyLayer(f"{name}_per_tensor", shape, Scheme.FP8_PER_TENSOR_STATIC)]


#: per-rank layers of public models (TP degree in the name), each as ptpc and static per-tensor
SURVEY_LAYERS: tuple[SurveyLayer, ...] = tuple(
    _both("qwen3-235b-a22b_tp8", MoEShape(E=128, K=4096, N=192, topk=8))
    + _both("glm-4.5_tp8", MoEShape(E=160, K=5120, N=192, topk=8))
    + _both("minimax-m2_tp8", MoEShape(E=256, K=3072, N=192, topk=8))
    + _both("qwen3-next-80b-a3b_tp4", MoEShape(E=512, K=2048, N=128, topk=10))
    + _both("qwen3-235b-a22b_tp4", MoEShape(E=128, K=4096, N=384, topk=8))
    + _both("deepseek-v3_tp4", MoEShape(E=256, K=7168, N=512, topk=8))
)

#: the variants the policy chooses among, in the order it prefers them on a tie
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
