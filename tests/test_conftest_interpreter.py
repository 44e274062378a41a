"""The test session's Triton mode (tests/conftest.py): the interpreter for CPU sessions, off for
``-m gpu`` on a machine with a CUDA device (vLLM's Triton peer must compile for real)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import tests.conftest as conftest


def _configure(markexpr: str) -> str | None:
    conftest.pytest_configure(SimpleNamespace(option=SimpleNamespace(markexpr=markexpr)))
    return os.environ.get("TRITON_INTERPRET")


def test_gpu_session_on_a_cuda_machine_leaves_the_interpreter_off(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(conftest, "_cuda_device", lambda: True)
    assert _configure("gpu") is None
    assert _configure("not gpu") == "1"


def test_cpu_sessions_use_the_interpreter(monkeypatch):
    monkeypatch.setattr(conftest, "_cuda_device", lambda: False)
    for mark in ("gpu", "", "slow"):
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        assert _configure(mark) == "1"
