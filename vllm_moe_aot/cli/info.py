"""``vllm-moe-aot info``: platform, code objects, tuned configs and the dispatch they give.

The command only; what it reports comes from :mod:`vllm_moe_aot.info`. Imports neither vLLM
nor Triton.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import sys
from pathlib import Path

import torch

from vllm_moe_aot import BACKEND_NAME, __version__
from vllm_moe_aot.info import (
    LAYERS_LEFT_TO_VLLM,
    LAYERS_TAKEN,
    config_dir,
    config_dir_arg,
    describe_dispatch,
    detect_platform,
    devices_in_configs,
    layers_in_configs,
    manifest_path,
    read_code_objects,
    tuned_config_files,
)
from vllm_moe_aot.integration import CONFIG_DIR_ENV, ENV_VAR
from vllm_moe_aot.shapes import PRESETS, MoEShape, Preset, Scheme


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", action="append", choices=sorted(PRESETS),
                        help="only this preset (repeatable; default: all)")
    parser.add_argument("--config-dir", default=None,
                        help=f"tuned CSV directory (default: ${CONFIG_DIR_ENV} or the shipped "
                             "configs)")
    parser.add_argument("--manifest", default=None, help="manifest.json to read "
                        "(default: the installed package's)")


def run(args: argparse.Namespace) -> int:
    out = sys.stdout
    torch_build = (f"CUDA {torch.version.cuda}" if torch.version.cuda else
                   f"HIP {torch.version.hip}" if torch.version.hip else "CPU")
    print(f"vllm-moe-aot {__version__}", file=out)
    print(f"platform: {platform.system()} {platform.machine()}, python "
          f"{platform.python_version()}, torch {torch.__version__} ({torch_build}), triton "
          f"{_version('triton')}, vllm {_version('vllm')}", file=out)
    env_value = os.environ.get(ENV_VAR)
    state = ("on" if env_value == BACKEND_NAME else
             "off (unset)" if not env_value else f"off (unknown value {env_value!r})")
    print(f"vLLM backend: {ENV_VAR}={env_value or ''} -> {state}"
          + ("" if env_value == BACKEND_NAME else f"; set {ENV_VAR}={BACKEND_NAME} to use it"),
          file=out)

    print("layers taken (vLLM 0.33 FP8 MoE, where vLLM's own pick is its Triton or CUTLASS "
          "MoE):", file=out)
    for scheme, layers in LAYERS_TAKEN.items():
        print(f"  {scheme.value:<24} {layers}", file=out)
    print(f"  left to vLLM: {LAYERS_LEFT_TO_VLLM}", file=out)

    manifest = Path(args.manifest) if args.manifest else manifest_path()
    counts, problem = read_code_objects(manifest)
    info = detect_platform()
    if info.has_gpu:
        verdict = "supported" if counts.get(info.arch) else "not supported (no code objects)"
        print(f"GPU: {info.gpu_name}, arch {info.arch}: {verdict}", file=out)
    else:
        print("GPU: no GPU: showing every GPU the tuned configs hold rows for", file=out)

    print(f"code objects ({manifest}):", file=out)
    for target, n in sorted(counts.items()):
        mark = "  <- this GPU" if info.has_gpu and target == info.arch else ""
        print(f"  {target:<8} {n}{mark}", file=out)
    if not counts:
        print(f"  none: {problem or 'the manifest lists no code objects'}", file=out)

    directory = config_dir(args.config_dir)
    files = tuned_config_files(directory)
    print(f"tuned configs ({directory}):", file=out)
    for path in files:
        print(f"  {path.name}", file=out)
    if not files:
        print("  none", file=out)

    preset_layers = set()
    status = 0
    for name in args.preset or sorted(PRESETS):
        preset: Preset = PRESETS[name]
        preset_layers.add((preset.shape, preset.scheme.family))
        print(f"preset {preset.name} ({preset.model}): {preset.shape} {preset.scheme.value}",
              file=out)
        status |= _print_dispatch(preset.shape, preset.scheme, info, files, args.config_dir)
    if not args.preset:
        # layers of the tuned configs that are not a preset's (another TP size, expert
        # parallelism: the shape then ends in ",ep=<ranks>", a model tuned with --model)
        for shape, scheme in layers_in_configs(files):
            if (shape, scheme.family) in preset_layers:
                continue
            print(f"layer {shape} {scheme.family} (from the tuned configs)", file=out)
            status |= _print_dispatch(shape, scheme, info, files, args.config_dir)
    return status


def _print_dispatch(shape: MoEShape, scheme: Scheme, info, files: list[Path],
                    config_dir_override: str | None) -> int:
    """The layer's M buckets on this GPU, or on every GPU the configs hold rows for; 1 when
    its dispatch table could not be built."""
    out = sys.stdout
    if info.has_gpu:
        devices = [(info.gpu_name, info.arch)]
    else:
        devices = devices_in_configs(files, shape, scheme)
        if not devices:
            print("  no tuned rows for any GPU: every M runs stock", file=out)
    status = 0
    for gpu_name, arch in devices:
        print(f"  {gpu_name} ({arch}):", file=out)
        try:
            lines = describe_dispatch(shape, scheme, gpu_name, arch,
                                      config_dir_arg(config_dir_override))
        except Exception as exc:  # report it and go on with the other layers
            lines = [f"cannot build the dispatch table: {type(exc).__name__}: {exc}"]
            status = 1
        for line in lines:
            print(f"    {line}", file=out)
    return status
