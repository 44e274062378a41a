"""What ``vllm-moe-aot info`` reports: platform, code objects, tuned configs and dispatch.

The library the command (:mod:`vllm_moe_aot.cli.info`) and the vLLM plugin read.

Also the one place that says which GPU this is in the names the build and the configs use
(:func:`detect_platform`, from :func:`vllm_moe_aot.device.identify`); the vLLM plugin logs
:func:`summary_line`.
Imports neither vLLM nor Triton: it works on a machine with neither, and without a GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from vllm_moe_aot import BACKEND_NAME, __version__, caches
from vllm_moe_aot.contract import INTERPRETER as INTERPRETER_ARCH
from vllm_moe_aot.device import cuda_arch, identify
from vllm_moe_aot.dispatch.configs import DEFAULT_CONFIG_DIR
from vllm_moe_aot.integration import CONFIG_DIR_ENV  # vLLM-free constants
from vllm_moe_aot.shapes import MoEShape, Scheme

__all__ = ["INTERPRETER_ARCH", "LAYERS_LEFT_TO_VLLM", "LAYERS_TAKEN", "PlatformInfo",
           "code_objects_per_target", "config_dir", "config_dir_arg", "cuda_arch",
           "describe_dispatch", "detect_platform", "devices_in_configs", "layers_in_configs",
           "manifest_path", "platform_info", "read_code_objects", "summary_line",
           "tuned_config_files"]

#: the vLLM 0.33 FP8 MoE layers the plugin takes, per scheme (docs/vllm-integration.md, "Which
#: layers it takes"; the quant methods' oracle keys are ``integration.providers.LAYER_KINDS``)
LAYERS_TAKEN: dict[Scheme, str] = {
    Scheme.FP8_PER_TENSOR_STATIC: "Fp8MoEMethod activation_scheme static; compressed-tensors "
                                  "tensor x tensor, static",
    Scheme.FP8_PER_TENSOR_DYNAMIC: "Fp8MoEMethod activation_scheme dynamic; compressed-tensors "
                                   "tensor x tensor, dynamic; --quantization fp8_per_tensor",
    Scheme.FP8_PTPC: "compressed-tensors channel x token; --quantization fp8_per_channel",
    Scheme.FP8_BLOCK: "Fp8MoEMethod weight_block_size [128, 128]; compressed-tensors "
                      "strategy block, 128x128 (dynamic activations, per token per 128 columns)",
}
#: what stays with vLLM whatever the shape
LAYERS_LEFT_TO_VLLM = ("other block sizes (64x64, refined TP shards), E8M0 block scales, "
                       "MXFP8/MXFP4/NVFP4, INT8/INT4, ModelOpt, Quark, and any layer whose vLLM "
                       "pick converts the weights (FlashInfer, DeepGEMM, Humming, Marlin, AITER: "
                       "e.g. block FP8 under EP)")


@dataclass(frozen=True)
class PlatformInfo:
    """Where the pipeline would run in this process.

    ``device`` is the current GPU, the CPU when Triton runs in its interpreter
    (``TRITON_INTERPRET=1``, no GPU), or None. ``arch`` is the build-target name
    (``sm_90a``, ``gfx942``, ``gfx950``; ``interpreter`` on the CPU; otherwise the raw arch).
    ``supported`` says whether the AOT pipeline can run there; ``note`` says why or why not.
    """

    device: torch.device | None
    gpu_name: str | None
    arch: str | None
    supported: bool
    note: str

    @property
    def has_gpu(self) -> bool:
        return self.device is not None and self.device.type == "cuda"


def platform_info(device: torch.device, gpu_name: str, arch: str) -> PlatformInfo:
    """A GPU is supported when the manifest holds code objects for its arch."""
    if device.type != "cuda":
        return PlatformInfo(device, "cpu", INTERPRETER_ARCH, True,
                            "no GPU: kernels run in the Triton interpreter on the CPU")
    counts = code_objects_per_target()
    if counts.get(arch, 0) > 0:
        return PlatformInfo(device, gpu_name, arch, True, f"{counts[arch]} code objects for {arch}")
    built = ", ".join(sorted(counts)) or "none"
    return PlatformInfo(device, gpu_name, arch, False,
                        f"no code objects for {arch} (built for: {built})")


def detect_platform(device: torch.device | None = None) -> PlatformInfo:
    """Describe ``device`` (default: the current GPU, else the CPU interpreter if enabled).

    Asks torch, which initialises CUDA; inside vLLM the plugin asks vLLM's platform instead.
    """
    if device is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    if device is not None and device.type == "cuda":
        ident = identify(device)
        return platform_info(device, ident.name, ident.arch)
    if os.environ.get("TRITON_INTERPRET") == "1":
        return platform_info(torch.device("cpu"), "cpu", INTERPRETER_ARCH)
    return PlatformInfo(None, None, None, False, "no GPU")


@lru_cache(maxsize=8)
def _manifest_counts(path: str, mtime_ns: int) -> tuple[tuple[tuple[str, int], ...], str]:
    from vllm_moe_aot.runtime.manifest import Manifest

    try:
        manifest = Manifest.load(path)
    except Exception as exc:  # ManifestError, or a runtime that cannot be imported
        return (), str(exc)
    counts: dict[str, int] = {}
    for entry in manifest.objects:
        counts[entry.target] = counts.get(entry.target, 0) + 1
    return tuple(sorted(counts.items())), ""


caches.register("info.manifest_counts", _manifest_counts.cache_clear)


def manifest_path() -> Path:
    """The manifest the runtime loads (``$VLLM_MOE_AOT_ARTIFACTS`` or the installed one)."""
    from vllm_moe_aot.runtime.manifest import MANIFEST_NAME, default_artifacts_dir

    return default_artifacts_dir() / MANIFEST_NAME


def read_code_objects(manifest: Path | None = None) -> tuple[dict[str, int], str]:
    """``(code objects per build target, problem)``; the problem is "" when the manifest
    loaded. Cached per file modification time: the oracle asks once per layer."""
    path = Path(manifest) if manifest is not None else manifest_path()
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        mtime = -1
    counts, problem = _manifest_counts(str(path), mtime)
    return dict(counts), problem


def code_objects_per_target(manifest: Path | None = None) -> dict[str, int]:
    """Number of code objects per build target in the manifest ({} when there is none)."""
    return read_code_objects(manifest)[0]


def config_dir(override: str | os.PathLike | None = None) -> Path:
    """Directory holding the tuned CSVs: ``override``, ``$VLLM_MOE_AOT_CONFIG_DIR`` or shipped."""
    chosen = override or os.environ.get(CONFIG_DIR_ENV)
    return Path(chosen) if chosen else DEFAULT_CONFIG_DIR


def config_dir_arg(override: str | os.PathLike | None = None) -> Path | None:
    """What to pass as ``config_dir`` to ``DispatchTable.for_layer``: None means shipped."""
    chosen = override or os.environ.get(CONFIG_DIR_ENV)
    return Path(chosen) if chosen else None


def tuned_config_files(directory: Path | None = None) -> list[Path]:
    directory = config_dir() if directory is None else directory
    return sorted(directory.glob("*.tuned.csv")) if directory.is_dir() else []


def summary_line(info: PlatformInfo | None = None) -> str:
    """The plugin's one start-up line: version, GPU arch, code objects, configs found."""
    info = detect_platform() if info is None else info
    counts = code_objects_per_target()
    if info.has_gpu:
        where = f"GPU {info.gpu_name} ({info.arch}{'' if info.supported else ': ' + info.note})"
    else:
        where = info.note
    objects = ", ".join(f"{t}={n}" for t, n in sorted(counts.items())) or "none (no manifest)"
    directory = config_dir()
    files = tuned_config_files(directory)
    configs = ", ".join(p.name for p in files) if files else "none"
    return (f"vllm-moe-aot {__version__} ({BACKEND_NAME}) on: {where}; "
            f"code objects per target: {objects}; tuned configs in {directory}: {configs}")


def devices_in_configs(files: list[Path], shape: MoEShape | None = None,
                       scheme: Scheme | None = None) -> list[tuple[str, str]]:
    """Distinct ``(device name, arch)`` pairs the tuned CSVs hold rows for (for ``shape`` and
    ``scheme`` when given). Malformed rows are skipped here; the dispatch table reports them."""
    from vllm_moe_aot.dispatch.configs import RowKey, read_tuned

    layer = RowKey.of(shape, scheme, 1).layer() if shape is not None else None
    seen: set[tuple[str, str]] = set()
    for path in files:
        try:
            rows, _issues = read_tuned(path)
        except Exception:
            continue
        seen.update(r.device_key() for r in rows if layer is None or r.key.layer() == layer)
    return sorted(seen)


def layers_in_configs(files: list[Path]) -> list[tuple[MoEShape, Scheme]]:
    """Distinct layers the tuned CSVs hold rows for, as ``(shape, scheme)`` (the scheme a
    family is tuned with), in the order first seen; an expert-parallel layer's shape has its
    ``ep`` (``E=..,topk=..,ep=8``). Malformed rows are skipped here."""
    from vllm_moe_aot.dispatch.configs import read_tuned, scheme_of_family

    seen: dict[tuple, tuple[MoEShape, Scheme]] = {}
    for path in files:
        try:
            rows, _issues = read_tuned(path)
        except Exception:
            continue
        for r in rows:
            seen.setdefault(r.key.layer(), (r.key.shape, scheme_of_family(r.key.scheme)))
    return list(seen.values())


def describe_dispatch(shape: MoEShape, scheme: Scheme, gpu_name: str, arch: str,
                      directory: Path | None, sm_count: int | None = None) -> list[str]:
    """Lines saying which M buckets go to the AOT pipeline and which to stock."""
    from vllm_moe_aot.dispatch.configs import DispatchTable

    table = DispatchTable.for_layer(shape, scheme, gpu_name, arch, config_dir=directory,
                                    sm_count=sm_count)
    if table.is_empty:
        return [f"no tuned rows and no default ({table.source or 'none'}): every M runs stock "
                "(vLLM's TritonExperts)"]
    rows = table.describe()
    lines = []
    for i, (m, choice) in enumerate(rows):
        bound = f"M <= {m}" if i < len(rows) - 1 else f"M <= {m} (and above)"
        kind = "stock" if choice == "stock" else "aot  "
        detail = "" if choice == "stock" else f"  {choice}"
        lines.append(f"{bound:<24} {kind}{detail}")
    n_aot = sum(1 for _, c in rows if c != "stock")
    origin = {"tuned": "tuned", "default": "default-policy",
              "other-gpu": "other-GPU"}.get(table.origin, table.origin)
    lines.append(f"{n_aot} of {len(rows)} {origin} M buckets go to the AOT pipeline"
                 + ("" if table.origin == "tuned" else f" ({table.source})"))
    return lines
