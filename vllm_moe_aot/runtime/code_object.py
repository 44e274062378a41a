"""``CodeObject``: a manifest entry plus its bytes, checked before any driver sees them."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from vllm_moe_aot.runtime.elf import (
    EM_AMDGPU,
    EM_CUDA,
    ElfReadError,
    kernel_params,
    read_info,
)
from vllm_moe_aot.runtime.errors import CodeObjectError
from vllm_moe_aot.runtime.manifest import ObjectEntry
from vllm_moe_aot.runtime.params import layout

#: target -> (ELF machine, arch as read from the ELF header)
TARGET_ELF: dict[str, tuple[int, str]] = {
    "sm_90a": (EM_CUDA, "sm_90"),
    "gfx942": (EM_AMDGPU, "gfx942"),
    "gfx950": (EM_AMDGPU, "gfx950"),
}
_MACHINE_NAMES = {EM_CUDA: "EM_CUDA (CUBIN)", EM_AMDGPU: "EM_AMDGPU (HSACO)"}


@dataclass(frozen=True)
class CodeObject:
    entry: ObjectEntry
    data: bytes
    path: Path

    @property
    def name(self) -> str:
        return self.entry.name

    @classmethod
    def load(cls, entry: ObjectEntry, artifacts_dir: str | Path) -> CodeObject:
        path = Path(artifacts_dir) / entry.file
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise CodeObjectError(
                f"kernel {entry.name!r} ({entry.target}): code object {path} is missing; the "
                f"manifest lists it. Reinstall vllm-moe-aot, or rebuild with "
                f"`vllm-moe-aot build`"
            ) from None
        except OSError as e:
            raise CodeObjectError(f"kernel {entry.name!r}: cannot read {path}: {e}") from e
        co = cls(entry, data, path)
        co.validate()
        return co

    def validate(self) -> None:
        """sha256, ELF machine and arch for the entry's target, symbol, parameter layout."""
        e, where = self.entry, f"kernel {self.entry.name!r} ({self.entry.target}, {self.path})"
        digest = hashlib.sha256(self.data).hexdigest()
        if digest != e.sha256:
            raise CodeObjectError(
                f"{where}: sha256 {digest[:16]}... does not match the manifest's "
                f"{e.sha256[:16]}...; the file is corrupt or from another build. Reinstall, or "
                f"rebuild with `vllm-moe-aot build --force`"
            )
        if e.target not in TARGET_ELF:
            raise CodeObjectError(f"{where}: unknown target {e.target!r} "
                                  f"(known: {sorted(TARGET_ELF)})")
        want_machine, want_arch = TARGET_ELF[e.target]
        try:
            info = read_info(self.data)
        except ElfReadError as err:
            raise CodeObjectError(f"{where}: {err}; rebuild with `vllm-moe-aot build`") from err
        if info.machine != want_machine or info.arch != want_arch:
            got = f"{_MACHINE_NAMES.get(info.machine, info.machine)} for {info.arch}"
            raise CodeObjectError(
                f"{where}: built for the wrong target: the ELF is {got}, the manifest says "
                f"{e.target} ({_MACHINE_NAMES[want_machine]} for {want_arch}). Rebuild with "
                f"`vllm-moe-aot build --force`"
            )
        if e.symbol not in info.functions:
            raise CodeObjectError(
                f"{where}: kernel symbol {e.symbol!r} not found in the code object (it has "
                f"{sorted(info.functions)}); rebuild with `vllm-moe-aot build --force`"
            )
        self._check_params(where)

    def _check_params(self, where: str) -> None:
        """The launcher's packing must match what the code object itself declares."""
        e = self.entry
        try:
            declared = kernel_params(self.data, e.symbol)
        except ElfReadError as err:
            raise CodeObjectError(f"{where}: cannot read its parameter list: {err}") from err
        ours = layout([p.type for p in e.params])
        theirs = [(p.offset, p.size) for p in declared]
        if ours != theirs:
            raise CodeObjectError(
                f"{where}: the manifest's parameters {[p.name for p in e.params]} pack as "
                f"(offset, size) {ours} but the code object declares {theirs}; the manifest is "
                f"out of date with the binary. Rebuild with `vllm-moe-aot build --force`"
            )
