"""Which device this is, in the names the build, the runtime and the tuned configs use.

:func:`identify` is the one place that asks torch about a GPU: its name, build-target arch
(``sm_90a``, ``gfx942``, ``gfx950``; ``interpreter`` for the CPU; the raw ``sm_XY`` / gfx name
of an unsupported GPU), SM/CU count and fp8 dtype. The arch naming rules (:func:`cuda_arch`,
:func:`rocm_arch`) are shared with the vLLM plugin, which asks vLLM's platform instead of
torch so that it does not initialise CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vllm_moe_aot.contract import INTERPRETER, TARGETS, Target, fp8_dtype_name


@dataclass(frozen=True)
class DeviceIdentity:
    """One device as the pipeline sees it."""

    device: torch.device
    #: ``torch.cuda.get_device_properties(...).name`` ("cpu" for the interpreter)
    name: str
    #: build-target name, or the raw arch of a GPU no code objects are built for
    arch: str
    #: streaming multiprocessors (CUDA) or compute units (ROCm); the CPU's cores
    sm_count: int
    fp8_dtype: torch.dtype

    @property
    def target(self) -> Target | None:
        """The build target, None for the interpreter and unsupported GPUs."""
        return TARGETS.get(self.arch)

    @property
    def is_interpreter(self) -> bool:
        return self.arch == INTERPRETER


def cuda_arch(major: int, minor: int) -> str:
    """Build-target name of a CUDA capability: 9.0 is ``sm_90a``, others ``sm_XY``."""
    return "sm_90a" if (major, minor) == (9, 0) else f"sm_{major}{minor}"


def rocm_arch(gcn_arch_name: str) -> str:
    """The gfx name without feature suffixes (``gfx942:sramecc+:xnack-`` -> ``gfx942``)."""
    return str(gcn_arch_name or "gfx").split(":")[0]


def fp8_dtype_for(arch: str) -> torch.dtype:
    """e4m3fnuz on gfx942 (MI300), e4m3fn everywhere else (the interpreter included)."""
    return getattr(torch, fp8_dtype_name(arch))


def as_device(device: Any = None) -> torch.device:
    """``device`` (torch.device, 'cuda:0', int index, 'cpu' or None: the current GPU) as a
    torch.device with its index filled in."""
    if device is None:
        return torch.device("cuda", torch.cuda.current_device())
    if isinstance(device, int):
        return torch.device("cuda", device)
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def identify(device: Any = None) -> DeviceIdentity:
    """The identity of ``device`` (default: the current GPU). Initialises CUDA for a GPU:
    call it where the GPU is in use already. A CPU device is the interpreter."""
    dev = as_device(device)
    if dev.type != "cuda":
        import os

        return DeviceIdentity(dev, "cpu", INTERPRETER, os.cpu_count() or 1,
                              fp8_dtype_for(INTERPRETER))
    props = torch.cuda.get_device_properties(dev)
    if getattr(torch.version, "hip", None):
        arch = rocm_arch(getattr(props, "gcnArchName", "gfx"))
    else:
        arch = cuda_arch(props.major, props.minor)
    return DeviceIdentity(dev, props.name, arch, int(getattr(props, "multi_processor_count", 0)),
                          fp8_dtype_for(arch))
