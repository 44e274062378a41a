"""Loading a peer's torch-free library (built by one of ``scripts/build_*.py``) with ctypes: the
part :mod:`.deepgemm_bound` and :mod:`.vllm_cutlass` share. No torch here: the DeepGEMM bound's
build script imports its module without it."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

#: entry point -> (argtypes, restype)
Signatures = Mapping[str, tuple[Sequence[type], type | None]]


def library_path(env: str, default: Path) -> Path:
    """``$<env>``, else ``default``; a relative path is taken from the repository root."""
    p = Path(os.environ.get(env) or default)
    return p if p.is_absolute() else ROOT / p


def load_library(path: Path, signatures: Signatures, *, abi_function: str, abi_version: int,
                 error: type[Exception], not_found: str, build_script: str) -> ctypes.CDLL:
    """``path`` loaded with every entry point of ``signatures`` typed, and its ABI version
    (``abi_function()``, one of them) checked; else ``error``: ``not_found`` when the file is
    missing, otherwise a message saying what failed and to rebuild with ``build_script``."""
    if not path.is_file():
        raise error(not_found)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise error(f"cannot load {path}: {exc}; rebuild it with `python3 {build_script}`"
                    ) from exc
    try:
        for name, (argtypes, restype) in signatures.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, restype
    except AttributeError as exc:
        raise error(f"{path} lacks an entry point ({exc}); rebuild it with "
                    f"`python3 {build_script}`") from exc
    abi = getattr(lib, abi_function)()
    if abi != abi_version:
        raise error(f"{path} has ABI version {abi}, this module wants {abi_version}; rebuild "
                    f"it with `python3 {build_script}`")
    return lib


def status_error(lib: ctypes.CDLL, name: str, rc: int, *, last_error: str,
                 status: Mapping[int, str], error: type[Exception]) -> Exception:
    """The ``error`` to raise for ``lib.<name>`` returning status ``rc`` != 0: the status's name
    and the library's own message (``last_error()``). The classes' ``call`` keep the call and
    the status test themselves: they run per launch, where a further Python frame would add to
    the eager host time."""
    msg = (getattr(lib, last_error)() or b"").decode(errors="replace")
    return error(f"{name}: {status.get(rc, rc)}: {msg}")
