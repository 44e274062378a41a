"""The routed-MoE layer of a Hugging Face model, read from its ``config.json``.

``vllm-moe-aot tune --model`` uses this to write and tune the rows for a model without the
user working out ``E, K, N, topk`` by hand. No vLLM, torch or transformers import: the file is
read as JSON.

Only the *routed* experts form the fused MoE layer the pipeline replaces. Shared experts
(DeepSeek-V3's and GLM-4.5's ``n_shared_experts``, Qwen3-Next's ``shared_expert_intermediate_size``,
Hunyuan's ``num_shared_expert``) run as a separate dense MLP in vLLM and are ignored here, as are
dense layers before the first MoE layer (``first_k_dense_replace``).

Field names per family (the values quoted are the models' own configs)::

    family                      experts              top-k                 expert intermediate
    Qwen3-MoE, Qwen3.5-MoE,     num_experts          num_experts_per_tok   moe_intermediate_size
      Qwen3-Next, Qwen2-MoE
    DeepSeek-V2/V3, GLM-4-MoE,  n_routed_experts     num_experts_per_tok   moe_intermediate_size
      Kimi-K2
    Mixtral, MiniMax(-M2)       num_local_experts    num_experts_per_tok   intermediate_size
    Hunyuan MoE (Hy3)           num_experts          moe_topk              moe_intermediate_size

plus ``hidden_size`` for all. Hunyuan may give ``num_experts``, ``moe_topk`` and
``moe_intermediate_size`` as per-layer lists; they must then agree across layers. Multimodal
configs (Qwen3.5) keep these fields under ``text_config``; it is searched too.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from vllm_moe_aot.shapes import MoEShape, Scheme


class ModelConfigError(ValueError):
    """A config.json that does not describe a routed MoE layer we can read."""


@dataclass(frozen=True)
class _Family:
    name: str
    experts: str
    topk: str
    inter: str


_QWEN = _Family("Qwen-MoE", "num_experts", "num_experts_per_tok", "moe_intermediate_size")
_DEEPSEEK = _Family("DeepSeek/GLM-MoE", "n_routed_experts", "num_experts_per_tok",
                    "moe_intermediate_size")
_MIXTRAL = _Family("Mixtral/MiniMax", "num_local_experts", "num_experts_per_tok",
                   "intermediate_size")
_HUNYUAN = _Family("Hunyuan-MoE", "num_experts", "moe_topk", "moe_intermediate_size")

#: model_type -> family; unknown model types are matched by which fields exist
FAMILIES: dict[str, _Family] = {
    "qwen2_moe": _QWEN, "qwen3_moe": _QWEN, "qwen3_next": _QWEN, "qwen3_vl_moe": _QWEN,
    "qwen3_vl_moe_text": _QWEN, "qwen3_5_moe": _QWEN, "qwen3_5_moe_text": _QWEN,
    "deepseek_v2": _DEEPSEEK, "deepseek_v3": _DEEPSEEK, "kimi_k2": _DEEPSEEK,
    "glm4_moe": _DEEPSEEK,
    "mixtral": _MIXTRAL, "minimax": _MIXTRAL, "minimax_m2": _MIXTRAL,
    "hunyuan_v1_moe": _HUNYUAN, "hunyuan": _HUNYUAN,
}

_EXPERT_FIELDS = ("n_routed_experts", "num_local_experts", "num_experts")


@dataclass(frozen=True)
class ModelMoE:
    """The full (unsharded) routed-MoE layer of one model.

    ``intermediate`` is one expert's intermediate size (``N`` before TP sharding).
    ``scheme`` is what the checkpoint's ``quantization_config`` names when it is a scheme the
    pipeline implements, else None; ``quant`` says in words what the checkpoint holds.
    """

    name: str
    model_type: str
    experts: int
    hidden: int
    intermediate: int
    topk: int
    scheme: Scheme | None = None
    quant: str = "unquantised (no quantization_config)"

    def __str__(self) -> str:
        return (f"{self.name} ({self.model_type or 'no model_type'}): E={self.experts}, "
                f"K={self.hidden}, intermediate={self.intermediate}, topk={self.topk}")


def _config_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        cand = p / "config.json"
        if not cand.is_file():
            raise ModelConfigError(f"{p} is a folder without a config.json")
        return cand
    if not p.is_file():
        raise ModelConfigError(f"{p} does not exist (give a config.json or a checkpoint "
                               "folder holding one)")
    return p


def _model_name(cfg: dict, path: Path) -> str:
    raw = cfg.get("_name_or_path") or ""
    base = Path(str(raw).rstrip("/")).name if raw else ""
    if not base:
        base = path.parent.name or path.stem
    name = re.sub(r"[^a-z0-9._-]+", "-", base.lower()).strip("-.")
    return name or "model"


def _scalar(value, field: str, where: str) -> int:
    """An int, or a per-layer list whose values agree (Hunyuan)."""
    if isinstance(value, list):
        vals = {v for v in value if v is not None}
        if not vals:
            raise ModelConfigError(f"{where}: {field} is an empty list")
        if len(vals) > 1:
            raise ModelConfigError(
                f"{where}: {field} differs between layers ({sorted(vals)}); the layers would "
                "need tables of their own, which --model does not derive (tune each shape "
                "with -i)")
        value = vals.pop()
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelConfigError(f"{where}: {field}={value!r} is not a positive integer")
    return value


def quant_hint(cfg: dict) -> tuple[Scheme | None, str]:
    """``(scheme or None, description)`` of a config's ``quantization_config``."""
    qc = cfg.get("quantization_config")
    if not isinstance(qc, dict):
        return None, "unquantised (no quantization_config)"
    method = str(qc.get("quant_method", "")).lower()
    if method == "fp8":
        block = qc.get("weight_block_size")
        if block:
            if list(block) == [128, 128]:
                return Scheme.FP8_BLOCK, "block FP8 (weight_block_size [128, 128])"
            return None, (f"block FP8 (weight_block_size {block}): block sizes other than "
                          "128x128 are not built, the AOT backend leaves them to vLLM")
        act = str(qc.get("activation_scheme", "dynamic")).lower()
        if act == "static":
            return Scheme.FP8_PER_TENSOR_STATIC, "FP8 per-tensor, static activation scales"
        return Scheme.FP8_PER_TENSOR_DYNAMIC, "FP8 per-tensor, dynamic activation scales"
    if method == "fbgemm_fp8":
        return Scheme.FP8_PTPC, "FP8 per-channel weights, per-token activations (fbgemm_fp8)"
    if method == "compressed-tensors":
        groups = qc.get("config_groups") or {}
        for group in groups.values() if isinstance(groups, dict) else []:
            w = group.get("weights") or {}
            a = group.get("input_activations") or {}
            if w.get("type", "float") != "float" or w.get("num_bits") != 8:
                continue
            ws, as_ = w.get("strategy"), a.get("strategy")
            if ws == "channel" and as_ == "token":
                return Scheme.FP8_PTPC, ("FP8 per-channel weights, per-token activations "
                                         "(compressed-tensors)")
            if ws == "tensor" and as_ == "tensor":
                if a.get("dynamic"):
                    return Scheme.FP8_PER_TENSOR_DYNAMIC, ("FP8 per-tensor, dynamic activations "
                                                           "(compressed-tensors)")
                return Scheme.FP8_PER_TENSOR_STATIC, ("FP8 per-tensor, static activations "
                                                      "(compressed-tensors)")
            return None, (f"compressed-tensors FP8 with {ws} weights and {as_} activations, "
                          "not a scheme the AOT backend implements")
        return None, "compressed-tensors without an FP8 weight group we recognise"
    return None, f"quant_method {method or '?'!r}, not an FP8 scheme the AOT backend implements"


def _moe_section(cfg: dict) -> dict:
    """The dict holding the MoE fields: the config, or its ``text_config`` (multimodal)."""
    text = cfg.get("text_config")
    if isinstance(text, dict) and not any(f in cfg for f in _EXPERT_FIELDS) \
            and any(f in text for f in _EXPERT_FIELDS):
        return text
    return cfg


def parse_config(cfg: dict, source: str = "config.json", name: str = "model") -> ModelMoE:
    """The routed-MoE layer a parsed config describes; :class:`ModelConfigError` if none."""
    sec = _moe_section(cfg)
    model_type = str(sec.get("model_type") or cfg.get("model_type") or "")
    where = f"{source} (model_type {model_type!r})" if model_type else source
    fam = FAMILIES.get(model_type) or FAMILIES.get(str(cfg.get("model_type") or ""))
    if fam is None:
        if model_type.startswith("hunyuan"):
            fam = _HUNYUAN
        elif "n_routed_experts" in sec:
            fam = _DEEPSEEK
        elif "num_local_experts" in sec:
            fam = _MIXTRAL
        elif "num_experts" in sec:
            fam = _HUNYUAN if "moe_topk" in sec else _QWEN
        else:
            raise ModelConfigError(
                f"{where}: no routed-expert count (none of {', '.join(_EXPERT_FIELDS)}); not a "
                "MoE config of a family --model knows (Qwen3/Qwen3.5-MoE, DeepSeek-V3, "
                "GLM-4-MoE, Mixtral, MiniMax, Hunyuan)")
    values = {}
    for role, field in (("experts", fam.experts), ("topk", fam.topk),
                        ("intermediate", fam.inter), ("hidden", "hidden_size")):
        if field not in sec:
            raise ModelConfigError(f"{where}: missing field {field!r} ({role}; read as a "
                                   f"{fam.name} config)")
        values[role] = _scalar(sec[field], field, where)
    scheme, quant = quant_hint(cfg if "quantization_config" in cfg else sec)
    return ModelMoE(name=name, model_type=model_type, scheme=scheme, quant=quant, **values)


def read_model(path: str | os.PathLike, name: str | None = None) -> ModelMoE:
    """Read ``path`` (a config.json, or a folder holding one)."""
    p = _config_path(path)
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelConfigError(f"cannot read {p}: {exc}") from None
    if not isinstance(cfg, dict):
        raise ModelConfigError(f"{p}: not a JSON object")
    return parse_config(cfg, str(p), name or _model_name(cfg, p))


def per_rank_shape(moe: ModelMoE, tp: int = 1, ep: int = 1) -> MoEShape:
    """The layer one rank runs, following vLLM's sharding.

    Without expert parallelism (``ep == 1``) every rank holds all experts and tensor
    parallelism splits each expert's intermediate size: ``E``, ``N = I / tp``. With vLLM's
    ``--enable-expert-parallel`` the MoE layers are spread over ``ep = TP x DP`` ranks instead
    and not TP-sharded: ``E / ep`` experts per rank at the full ``N = I``; ``tp`` must then
    divide ``ep``.
    """
    if tp < 1 or ep < 1:
        raise ValueError(f"tp and ep must be >= 1, got tp={tp}, ep={ep}")
    if ep > 1:
        if ep % tp:
            raise ValueError(f"ep={ep} is not a multiple of tp={tp} (vLLM's expert-parallel "
                             "size is TP x DP)")
        if moe.experts % ep:
            raise ValueError(f"{moe.name}: {moe.experts} experts do not divide evenly over "
                             f"ep={ep} ranks")
        return MoEShape(E=moe.experts // ep, K=moe.hidden, N=moe.intermediate, topk=moe.topk,
                        ep=ep)
    if moe.intermediate % tp:
        raise ValueError(f"{moe.name}: intermediate size {moe.intermediate} is not divisible "
                         f"by tp={tp}")
    return MoEShape(E=moe.experts, K=moe.hidden, N=moe.intermediate // tp, topk=moe.topk)


def config_stem(name: str, scheme: Scheme | str, tp: int, ep: int = 1) -> str:
    """``<model>_<scheme family>_tp<T>[_ep<E>]``, the configs' file-name stem (see
    :func:`vllm_moe_aot.dispatch.configs.untuned_name`)."""
    family = scheme.family if isinstance(scheme, Scheme) else Scheme.parse(scheme).family
    return f"{name}_{family}_tp{tp}" + (f"_ep{ep}" if ep > 1 else "")
