"""Loading a peer's torch-free library (built by one of ``scripts/build_*.py``) with ctypes: the
part :mod:`.deepgemm_bound` and :mod:`.vllm_cutlass` share. No torch here: the DeepGEMM bound's
build script imports its module without it."""

from __future__ import annotations

import ctypes
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar, TypeVar

ROOT = Path(__file__).resolve().parents[3]

#: entry point -> (argtypes, restype)
Signatures = Mapping[str, tuple[Sequence[type], type | None]]
_L = TypeVar("_L", bound="CtypesLibrary")
#: (class, path) -> the instance, see CtypesLibrary.loaded
_LOADED: dict[tuple[type, Path], CtypesLibrary] = {}


def library_path(env: str, default: Path) -> Path:
    """``$<env>``, else ``default``; a relative path is taken from the repository root."""
    p = Path(os.environ.get(env) or default)
    return p if p.is_absolute() else ROOT / p


def open_library(path: Path, signatures: Signatures, *, abi_function: str, abi_version: int,
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


class CtypesLibrary:
    """A loaded peer library of the C ABI both build scripts give theirs: ``<prefix>abi_version()``,
    ``<prefix>build_info()`` (a JSON string), ``<prefix>last_error()`` and functions returning a
    status (0: ok). Subclasses name the prefix, where the library is (``$<env_lib>``, else
    ``default_lib``) and what to say when it is not there (``not_found``, ``{path}`` standing
    for the path), the ABI version they are written against, the entry points' types, the status
    names and their two error classes."""

    prefix: ClassVar[str]
    env_lib: ClassVar[str]
    default_lib: ClassVar[Path]
    not_found: ClassVar[str]
    abi_version: ClassVar[int]
    build_script: ClassVar[str]
    signatures: ClassVar[Signatures]
    status: ClassVar[Mapping[int, str]]
    library_error: ClassVar[type[Exception]]
    call_error: ClassVar[type[Exception]]

    def __init__(self, path: Path | str | None = None) -> None:
        """``path`` (default: :func:`library_path`) loaded as :func:`open_library` does, and its
        build info read."""
        self.path = (Path(path) if path is not None
                     else library_path(self.env_lib, self.default_lib))
        self._lib = open_library(self.path, self.signatures,
                                 abi_function=f"{self.prefix}abi_version",
                                 abi_version=self.abi_version, error=self.library_error,
                                 not_found=self.not_found.format(path=self.path),
                                 build_script=self.build_script)
        self._last_error = getattr(self._lib, f"{self.prefix}last_error")
        self.build_info = json.loads(getattr(self._lib, f"{self.prefix}build_info")().decode()
                                     or "{}")

    @classmethod
    def loaded(cls: type[_L], path: Path | str | None = None) -> _L:
        """The library at ``path`` (default: :func:`library_path`), loaded once per process:
        every caller shares one instance."""
        p = Path(path) if path is not None else library_path(cls.env_lib, cls.default_lib)
        if (cls, p) not in _LOADED:
            _LOADED[cls, p] = cls(p)
        return _LOADED[cls, p]

    def call(self, name: str, *args) -> None:
        """``<name>(*args)``; a nonzero status raises :attr:`call_error` with the status's name
        and the library's own message."""
        rc = getattr(self._lib, name)(*args)
        if rc != 0:
            msg = (self._last_error() or b"").decode(errors="replace")
            raise self.call_error(f"{name}: {self.status.get(rc, rc)}: {msg}")
