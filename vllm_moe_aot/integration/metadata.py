"""``ExpertMetadata``: everything one MoE layer needs to run the AOT pipeline, built once.

vLLM-free: it takes the scale tensors and the layer shape, so the tuner, tests and other
front ends can build the same thing. Pipelines and dispatch tables are shared between layers
of the same shape, scheme and device (a model has dozens of identical MoE layers; one
pipeline workspace serves them all, since layers run one after another on one stream).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vllm_moe_aot import caches
from vllm_moe_aot.contract import STOCK
from vllm_moe_aot.device import identify
from vllm_moe_aot.info import config_dir
from vllm_moe_aot.integration import get_logger, log_once
from vllm_moe_aot.shapes import PRESETS, WEIGHT_BLOCK, MoEShape, Scheme, unsupported_reason

logger = get_logger("metadata")

#: tokens the pipeline's workspace is sized for (it chunks larger batches itself)
DEFAULT_MAX_TOKENS = 8192

_lock = threading.Lock()
_tables: dict[tuple, Any] = {}


def clear_caches() -> None:
    """Forget the dispatch tables (tests; a process never needs it)."""
    with _lock:
        _tables.clear()


caches.register("integration.metadata", clear_caches)


def normalize_weight_scale(scale: torch.Tensor, E: int, channels: int | None,
                           name: str) -> torch.Tensor:
    """``[E]`` (``channels`` None) or ``[E, channels]`` contiguous fp32.

    Accepts vLLM's layouts: ``[E]`` / ``[E, 1]`` per tensor, ``[E, C]`` / ``[E, C, 1]`` per
    channel. A contiguous fp32 input comes back as a view of the same storage (an in-place
    weight reload stays visible); anything else is copied once, here.
    """
    expected = (E,) if channels is None else (E, channels)
    if tuple(scale.shape) not in (expected, (*expected, 1)):
        raise ValueError(f"{name} has shape {tuple(scale.shape)}, expected {expected} "
                         "(a trailing 1 is accepted)")
    return scale.detach().to(torch.float32).reshape(expected).contiguous()


#: block-scale dtypes taken (converted to fp32 once); E8M0 / packed UE8M0 scales are not
_BLOCK_SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def block_scale_shape(E: int, rows: int, cols: int,
                      block: tuple[int, int] = WEIGHT_BLOCK) -> tuple[int, int, int]:
    """vLLM's ``weight_scale_inv`` shape for ``E`` weights of ``rows x cols``: ``[E,
    ceil(rows/bn), ceil(cols/bk)]`` (``w13``: rows 2N, cols K; ``w2``: rows K, cols N)."""
    bn, bk = block
    return (E, -(-rows // bn), -(-cols // bk))


def normalize_block_scale(scale: torch.Tensor, expected: tuple[int, int, int],
                          name: str) -> torch.Tensor:
    """A block FP8 weight scale (vLLM's ``weight_scale_inv``) as ``expected`` contiguous fp32,
    unchanged: a contiguous fp32 input comes back as a view of the same storage (an in-place
    weight reload stays visible). E8M0 / packed UE8M0 scales (DeepGEMM's) are refused."""
    if scale.dtype not in _BLOCK_SCALE_DTYPES:
        raise ValueError(f"{name} is {scale.dtype}: E8M0 or packed UE8M0 block scales are not "
                         "taken (the pipeline takes fp32 weight_scale_inv)")
    if tuple(scale.shape) != tuple(expected):
        raise ValueError(f"{name} has shape {tuple(scale.shape)}, expected {tuple(expected)} "
                         f"(one scale per {WEIGHT_BLOCK[0]}x{WEIGHT_BLOCK[1]} block)")
    return scale.detach().to(torch.float32).contiguous()


def normalize_activation_scale(scale: torch.Tensor | None, name: str) -> torch.Tensor:
    """A static activation scale as a 1-element contiguous fp32 tensor."""
    if scale is None:
        raise ValueError(f"static activation scheme but the layer has no {name}")
    if scale.numel() != 1:
        raise ValueError(f"{name} has shape {tuple(scale.shape)}: the pipeline takes one static "
                         "activation scale per layer")
    return scale.detach().to(torch.float32).reshape(1).contiguous()


def tune_hint(shape: MoEShape, scheme: Scheme, tp_size: int | None,
              directory: Path | None = None) -> str:
    """The command(s) that would produce tuned rows for this layer shape.

    A preset's layer (at some TP size, or under EP at ``shape.ep`` ranks) is tuned from its
    untuned CSV: the one in ``directory`` if there is one (first for ``tp_size``), else after
    generating it. Any other layer from the model's ``config.json`` (``--tp``, and ``--ep``
    under expert parallelism, where ``tp`` only names the file)."""
    from vllm_moe_aot.dispatch.configs import preset_shape, untuned_name

    directory = config_dir() if directory is None else directory
    ep = shape.ep
    candidates = []  # (tp, untuned file name) of the presets with this layer
    for preset in PRESETS.values():
        if preset.scheme.family != scheme.family:
            continue
        for tp in dict.fromkeys(([tp_size] if tp_size else []) + [1, 2, 4, 8, 16]):
            try:
                if preset_shape(preset, tp, ep) == shape:
                    candidates.append((tp, untuned_name(preset, tp, ep)))
            except ValueError:
                continue

    def step(untuned: str) -> str:
        tuned = untuned.replace(".untuned.csv", ".tuned.csv")
        return f"vllm-moe-aot tune -i {directory / untuned} -o {directory / tuned}"

    for _, untuned in candidates:
        if (directory / untuned).is_file():
            return step(untuned)
    if candidates:
        tp, untuned = candidates[0]
        return (f"python -m vllm_moe_aot.cli.configs --generate --tp {tp}"
                + (f" --ep {ep}" if ep > 1 else "")
                + f" --config-dir {directory}, then {step(untuned)}")
    tp = tp_size or "<T>"
    return (f"vllm-moe-aot tune --model <checkpoint or config.json> --tp {tp}"
            + (f" --ep {ep}" if ep > 1 else "") + f" --scheme {scheme.family} --config-dir "
            "<dir>, then serve with VLLM_MOE_AOT_CONFIG_DIR=<dir>")


def dispatch_table(shape: MoEShape, scheme: Scheme, gpu_name: str, arch: str,
                   directory: Path | None = None, sm_count: int | None = None) -> Any:
    """The shared ``DispatchTable`` for this shape/scheme/GPU (``directory`` None: shipped)."""
    key = (shape, scheme, gpu_name, arch, str(directory) if directory else None, sm_count)
    with _lock:
        if key in _tables:
            return _tables[key]
    from vllm_moe_aot.dispatch.configs import DispatchTable

    table = DispatchTable.for_layer(shape, scheme, gpu_name, arch, config_dir=directory,
                                    sm_count=sm_count)
    with _lock:
        return _tables.setdefault(key, table)


def pipeline_for(shape: MoEShape, scheme: Scheme, device: torch.device, max_tokens: int) -> Any:
    """The shared ``FusedMoE`` pipeline (:meth:`FusedMoE.shared`: one per layer shape)."""
    from vllm_moe_aot.pipeline import FusedMoE

    return FusedMoE.shared(shape, scheme, device, max_tokens)


@dataclass(frozen=True, eq=False)
class ExpertMetadata:
    """One layer's AOT state.

    ``w13_scale``/``w2_scale`` are ``[E]`` (per tensor), ``[E, 2N]``/``[E, K]`` (ptpc) or
    ``[E, 2N/128, K/128]``/``[E, K/128, N/128]`` (block FP8: vLLM's ``weight_scale_inv``);
    ``a13_scale``/``a2_scale`` are 1-element tensors for the static scheme, else None.
    ``pipeline`` is None when the dispatch table sends every M to stock (nothing to load).
    """

    shape: MoEShape
    scheme: Scheme
    device: torch.device
    gpu_name: str
    arch: str
    w13_scale: torch.Tensor
    w2_scale: torch.Tensor
    a13_scale: torch.Tensor | None
    a2_scale: torch.Tensor | None
    table: Any
    pipeline: Any | None

    @property
    def uses_pipeline(self) -> bool:
        return self.pipeline is not None

    def choose(self, m: int) -> str:
        """``"stock"`` or the pipeline variant for a batch of ``m`` tokens."""
        return STOCK if self.pipeline is None else self.table.choose(m)

    def describe(self) -> str:
        buckets = ", ".join(f"M<={m}:{'stock' if c == STOCK else 'aot'}"
                            for m, c in self.table.describe()) or "stock everywhere"
        return f"{self.shape} {self.scheme.value} on {self.gpu_name} ({self.arch}): {buckets}"

    @classmethod
    def build(
        cls,
        shape: MoEShape,
        scheme: Scheme,
        w13_scale: torch.Tensor,
        w2_scale: torch.Tensor,
        a13_scale: torch.Tensor | None = None,
        a2_scale: torch.Tensor | None = None,
        *,
        device: torch.device | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        config_directory: Path | None = None,
        tp_size: int | None = None,
    ) -> ExpertMetadata:
        """Validate, normalise scales, resolve the dispatch table and load the pipeline.

        Raises (ValueError, the runtime's AotRuntimeError, ...) with a message that names the
        cause; the caller runs the layer stock. With no tuned rows for this GPU and shape it
        succeeds with ``pipeline`` None and logs, once per shape, how to tune.
        """
        reason = unsupported_reason(shape, scheme)
        if reason is not None:
            raise ValueError(f"unsupported shape {shape}: {reason}")
        device = w13_scale.device if device is None else device
        for name, t in (("w13_scale", w13_scale), ("w2_scale", w2_scale),
                        ("a13_scale", a13_scale), ("a2_scale", a2_scale)):
            if t is not None and t.device != device:
                raise ValueError(f"{name} is on {t.device}, the layer on {device}")
        if scheme.block_weights:
            s13 = normalize_block_scale(w13_scale, block_scale_shape(shape.E, 2 * shape.N,
                                                                     shape.K),
                                        "w13_scale (w13_weight_scale_inv)")
            s2 = normalize_block_scale(w2_scale, block_scale_shape(shape.E, shape.K, shape.N),
                                       "w2_scale (w2_weight_scale_inv)")
        else:
            per_channel = scheme.per_channel_weights
            s13 = normalize_weight_scale(w13_scale, shape.E,
                                         2 * shape.N if per_channel else None, "w13_scale")
            s2 = normalize_weight_scale(w2_scale, shape.E, shape.K if per_channel else None,
                                        "w2_scale")
        if scheme.static_activations:
            a13 = normalize_activation_scale(a13_scale, "a13_scale (w13_input_scale)")
            a2 = normalize_activation_scale(a2_scale, "a2_scale (w2_input_scale)")
        else:
            a13 = a2 = None

        ident = identify(device)
        gpu_name, arch = ident.name, ident.arch
        table = dispatch_table(shape, scheme, gpu_name, arch, config_directory,
                               ident.sm_count)
        pipeline = None
        hint = (f"To tune this layer: {tune_hint(shape, scheme, tp_size, config_directory)}")
        if table.origin == "default":
            pipeline = pipeline_for(shape, scheme, device, max_tokens)
            # the policy speaks for a class of layers: a choice this layer's build does not
            # serve runs stock for its bucket
            table = table.restricted_to(pipeline.variants)
            log_once(logger, logging.INFO,
                     f"vllm-moe-aot: no tuned rows for {shape} {scheme.value} on {gpu_name} "
                     f"({arch}) in {config_directory or config_dir()}: using the measured "
                     f"default dispatch ({table.source}). {hint}")
        if table.is_empty or all(c == STOCK for _, c in table.describe()):
            pipeline = None
            log_once(logger, logging.INFO,
                     f"vllm-moe-aot: no tuned configs for {shape} {scheme.value} on {gpu_name} "
                     f"({arch}) in {config_directory or config_dir()} and no default for it "
                     f"({table.source or 'none'}): these MoE layers run vLLM's TritonExperts at "
                     f"every batch size. {hint}")
        elif table.origin != "default":
            pipeline = pipeline_for(shape, scheme, device, max_tokens)
            named = {choice for _, choice in table.describe() if choice != STOCK}
            missing = sorted(named - set(pipeline.variants))
            if missing:
                raise ValueError(
                    f"tuned configs for {shape} {scheme.value} on {gpu_name} ({arch}) name "
                    f"variants this build has no code objects for: {', '.join(missing)} "
                    f"(available: {', '.join(sorted(pipeline.variants)) or 'none'}); re-tune "
                    "with this version")
        return cls(shape, scheme, device, gpu_name, arch, s13, s2, a13, a2, table, pipeline)
