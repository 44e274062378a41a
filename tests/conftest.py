"""Shared test setup. Runs before any test module imports triton or the kernels.

CPU tests run kernels through Triton's interpreter, which must be chosen before triton is
first imported; tests that compile for real do so in a subprocess without TRITON_INTERPRET.
A GPU session (``-m gpu`` on a machine with a CUDA device, as scripts/gpu_check.sh runs it)
leaves the interpreter off: its Triton peers (vLLM's Triton path) must compile for real, the
interpreter's fp32 -> fp8 conversion mis-rounds (-126.7 -> -64) and put vLLM's block path
1e-1 away from the reference on the H200 (2026-12-03).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

#: what a session's ``-m`` must be for the interpreter to stay off on a GPU machine
GPU_MARK = "gpu"


def _cuda_device() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - no usable torch/CUDA: a CPU session
        return False


def pytest_configure(config: pytest.Config) -> None:
    if config.option.markexpr.strip() != GPU_MARK or not _cuda_device():
        os.environ.setdefault("TRITON_INTERPRET", "1")


ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
