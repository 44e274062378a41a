"""Read what the runtime needs from a code object's ELF: machine, GPU arch, symbols, parameters.

CUBIN (``EM_CUDA``): the SM version is in ``e_flags`` (low byte up to ELF ABI version 7, the
second byte from version 8 on); each kernel's parameters are ``EIATTR_KPARAM_INFO`` records in
its ``.nv.info.<kernel>`` section (ordinal, offset, size).

HSACO (``EM_AMDGPU``): the GPU is ``EF_AMDGPU_MACH`` in ``e_flags``; parameters are the
``.args`` of the kernel in the ``NT_AMDGPU_METADATA`` note (MessagePack, decoded here with a
minimal reader so that the runtime needs nothing but pyelftools). ``hidden_*`` arguments are
filled by the HIP runtime and are not part of the launch parameters.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

EM_CUDA = 190
EM_AMDGPU = 224

#: EF_AMDGPU_MACH values (llvm/BinaryFormat/ELF.h) for the GPUs we may meet
AMDGPU_MACH = {
    0x03F: "gfx90a",
    0x040: "gfx940",
    0x04B: "gfx941",
    0x04C: "gfx942",
    0x04F: "gfx950",
    0x041: "gfx1100",
    0x030: "gfx908",
}
EF_AMDGPU_MACH_MASK = 0x0FF

# .nv.info record formats and attributes
_EIFMT_NVAL, _EIFMT_BVAL, _EIFMT_HVAL, _EIFMT_SVAL = 1, 2, 3, 4
_EIATTR_KPARAM_INFO = 0x17
_NT_AMDGPU_METADATA = 32


class ElfReadError(ValueError):
    """The bytes are not an ELF code object this module understands."""


@dataclass(frozen=True)
class KernelParam:
    """One launch parameter as the code object declares it."""

    offset: int
    size: int


@dataclass(frozen=True)
class ElfInfo:
    machine: int  # e_machine
    arch: str | None  # "sm_90" | "gfx942" | ... | None when unknown
    functions: frozenset[str]  # global/weak STT_FUNC symbols (kernel entry points)


def _open(data: bytes) -> ELFFile:
    try:
        return ELFFile(io.BytesIO(data))
    except (ELFError, struct.error, ValueError) as e:
        raise ElfReadError(f"not an ELF file: {e}") from e


def _machine(elf: ELFFile) -> int:
    m = elf.header["e_machine"]
    if isinstance(m, str):  # pyelftools names the machines it knows
        return {"EM_CUDA": EM_CUDA, "EM_AMDGPU": EM_AMDGPU}.get(m, -1)
    return int(m)


def cuda_sm(e_flags: int, abi_version: int) -> int:
    """SM version of a CUBIN from its ELF header (90 for sm_90 / sm_90a)."""
    return (e_flags >> 8) & 0xFF if abi_version >= 8 else e_flags & 0xFF


def read_info(data: bytes) -> ElfInfo:
    elf = _open(data)
    machine = _machine(elf)
    flags = int(elf.header["e_flags"])
    arch: str | None = None
    if machine == EM_CUDA:
        abi = elf.header["e_ident"]["EI_ABIVERSION"]
        arch = f"sm_{cuda_sm(flags, int(abi))}"
    elif machine == EM_AMDGPU:
        arch = AMDGPU_MACH.get(flags & EF_AMDGPU_MACH_MASK)
    funcs: set[str] = set()
    symtab = elf.get_section_by_name(".symtab") or elf.get_section_by_name(".dynsym")
    if symtab is not None:
        for sym in symtab.iter_symbols():
            info = sym["st_info"]
            if info["type"] == "STT_FUNC" and info["bind"] in ("STB_GLOBAL", "STB_WEAK"):
                funcs.add(sym.name)
    return ElfInfo(machine=machine, arch=arch, functions=frozenset(funcs))


def kernel_params(data: bytes, symbol: str) -> list[KernelParam]:
    """The kernel's explicit launch parameters in order, from the code object itself."""
    elf = _open(data)
    machine = _machine(elf)
    if machine == EM_CUDA:
        return _cuda_params(elf, symbol)
    if machine == EM_AMDGPU:
        return _amdgpu_params(elf, symbol)
    raise ElfReadError(f"unknown ELF machine {machine}")


def _cuda_params(elf: ELFFile, symbol: str) -> list[KernelParam]:
    sec = elf.get_section_by_name(f".nv.info.{symbol}")
    if sec is None:
        raise ElfReadError(f"no .nv.info.{symbol} section")
    d = sec.data()
    by_ordinal: dict[int, KernelParam] = {}
    i = 0
    while i + 4 <= len(d):
        fmt, attr = d[i], d[i + 1]
        if fmt == _EIFMT_SVAL:
            (size,) = struct.unpack_from("<H", d, i + 2)
            body = d[i + 4 : i + 4 + size]
            if attr == _EIATTR_KPARAM_INFO and len(body) >= 12:
                _index, ordinal, offset, bits = struct.unpack_from("<IHHI", body)
                # bits: log2 align [0:8), space [8:12), cbank [12:18), size in bytes [18:32)
                by_ordinal[ordinal] = KernelParam(offset=offset, size=bits >> 18)
            i += 4 + size
        elif fmt in (_EIFMT_NVAL, _EIFMT_BVAL, _EIFMT_HVAL):
            i += 4
        else:
            raise ElfReadError(f".nv.info.{symbol}: unknown record format {fmt:#x} at {i}")
    if sorted(by_ordinal) != list(range(len(by_ordinal))):
        raise ElfReadError(f".nv.info.{symbol}: parameter ordinals {sorted(by_ordinal)}")
    return [by_ordinal[k] for k in range(len(by_ordinal))]


def _amdgpu_params(elf: ELFFile, symbol: str) -> list[KernelParam]:
    meta = amdgpu_metadata(elf)
    for k in meta.get("amdhsa.kernels", []):
        if k.get(".name") == symbol or k.get(".symbol") == symbol + ".kd":
            return [
                KernelParam(offset=int(a[".offset"]), size=int(a[".size"]))
                for a in k.get(".args", [])
                if not str(a.get(".value_kind", "")).startswith("hidden_")
            ]
    raise ElfReadError(f"kernel {symbol!r} not in the AMDGPU metadata note")


def amdgpu_metadata(elf: ELFFile | bytes) -> dict:
    if isinstance(elf, (bytes, bytearray)):
        elf = _open(bytes(elf))
    for sec in elf.iter_sections():
        if sec["sh_type"] != "SHT_NOTE":
            continue
        for note in sec.iter_notes():
            if note["n_name"] == "AMDGPU" and note["n_type"] in (_NT_AMDGPU_METADATA,
                                                                 "NT_AMDGPU_METADATA"):
                desc = note["n_desc"]
                if isinstance(desc, str):
                    desc = desc.encode("latin-1")
                value, _ = msgpack_decode(bytes(desc))
                return value
    raise ElfReadError("no NT_AMDGPU_METADATA note")


def msgpack_decode(b: bytes, i: int = 0):
    """Decode one MessagePack value at ``b[i:]``; returns (value, next index). No ext types."""
    t = b[i]
    i += 1
    if t <= 0x7F:
        return t, i
    if t >= 0xE0:
        return t - 0x100, i
    if 0x80 <= t <= 0x8F:
        return _map(b, i, t & 0x0F)
    if 0x90 <= t <= 0x9F:
        return _array(b, i, t & 0x0F)
    if 0xA0 <= t <= 0xBF:
        n = t & 0x1F
        return b[i : i + n].decode("utf-8"), i + n
    if t == 0xC0:
        return None, i
    if t == 0xC2:
        return False, i
    if t == 0xC3:
        return True, i
    fixed = {0xCA: ">f", 0xCB: ">d", 0xCC: ">B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q",
             0xD0: ">b", 0xD1: ">h", 0xD2: ">i", 0xD3: ">q"}
    if t in fixed:
        fmt = fixed[t]
        return struct.unpack_from(fmt, b, i)[0], i + struct.calcsize(fmt)
    lens = {0xC4: ">B", 0xC5: ">H", 0xC6: ">I", 0xD9: ">B", 0xDA: ">H", 0xDB: ">I"}
    if t in lens:
        fmt = lens[t]
        (n,) = struct.unpack_from(fmt, b, i)
        i += struct.calcsize(fmt)
        raw = b[i : i + n]
        return (raw.decode("utf-8") if t >= 0xD9 else bytes(raw)), i + n
    if t in (0xDC, 0xDD, 0xDE, 0xDF):
        fmt = ">H" if t in (0xDC, 0xDE) else ">I"
        (n,) = struct.unpack_from(fmt, b, i)
        i += struct.calcsize(fmt)
        return (_array if t in (0xDC, 0xDD) else _map)(b, i, n)
    raise ElfReadError(f"unsupported MessagePack type byte {t:#x}")


def _array(b: bytes, i: int, n: int):
    out = []
    for _ in range(n):
        v, i = msgpack_decode(b, i)
        out.append(v)
    return out, i


def _map(b: bytes, i: int, n: int):
    out = {}
    for _ in range(n):
        k, i = msgpack_decode(b, i)
        v, i = msgpack_decode(b, i)
        out[k] = v
    return out, i
