"""The scratch buffers behind the pointer parameters Triton appends to every kernel.

Triton 3.6-3.8 append ``global_scratch`` and ``profile_scratch`` pointers. When the compiled
metadata's sizes are 0 (every kernel we ship so far) both are passed as null. A kernel that
needs scratch gets ``size x programs`` bytes per buffer, allocated once when it is loaded for at
most ``max_programs`` programs (``Runtime.kernel(name, max_programs=...)``) and reused by every
launch; launches never allocate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from vllm_moe_aot.runtime.errors import CodeObjectError
from vllm_moe_aot.runtime.manifest import ObjectEntry

#: appended parameter names the build writes into the manifest
GLOBAL_SCRATCH = "global_scratch"
PROFILE_SCRATCH = "profile_scratch"


@dataclass
class Scratch:
    max_programs: int
    global_addr: int
    profile_addr: int
    keepalive: tuple

    @classmethod
    def for_entry(cls, e: ObjectEntry, max_programs: int | None,
                  alloc: Callable[[int], tuple[int, object]] | None,
                  device_index: int) -> Scratch | None:
        if not (e.global_scratch_size or e.profile_scratch_size):
            return None
        if not max_programs or max_programs <= 0:
            raise CodeObjectError(
                f"kernel {e.name!r} ({e.target}) needs {e.global_scratch_size} bytes of global "
                f"and {e.profile_scratch_size} of profile scratch per program; load it with "
                f"Runtime.kernel({e.name!r}, max_programs=N) so the buffer is allocated once"
            )
        alloc = alloc or _torch_alloc(device_index)
        keep = []
        addrs = []
        for size, align in ((e.global_scratch_size, e.global_scratch_align),
                            (e.profile_scratch_size, e.profile_scratch_align)):
            if size:
                addr, obj = alloc(size * e.num_ctas * max_programs)
                if align and addr % align:
                    raise CodeObjectError(f"kernel {e.name!r}: scratch not {align}-aligned")
                addrs.append(addr)
                keep.append(obj)
            else:
                addrs.append(0)
        return cls(max_programs, addrs[0], addrs[1], tuple(keep))


def _torch_alloc(device_index: int) -> Callable[[int], tuple[int, object]]:
    def alloc(nbytes: int) -> tuple[int, object]:
        import torch

        buf = torch.empty(nbytes, dtype=torch.uint8, device=torch.device("cuda", device_index))
        return buf.data_ptr(), buf

    return alloc


def scratch_values(e: ObjectEntry, scratch: Scratch | None) -> list[int]:
    """Values for the entry's appended parameters, in order."""
    out = []
    for p in e.params:
        if not p.appended:
            continue
        if not p.type.startswith("*"):
            raise CodeObjectError(f"kernel {e.name!r}: appended parameter {p.name!r} is "
                                  f"{p.type}, the launcher only fills pointers")
        if p.name == GLOBAL_SCRATCH:
            out.append(scratch.global_addr if scratch else 0)
        elif p.name == PROFILE_SCRATCH:
            out.append(scratch.profile_addr if scratch else 0)
        else:
            raise CodeObjectError(
                f"kernel {e.name!r}: unknown appended parameter {p.name!r}; this runtime fills "
                f"{GLOBAL_SCRATCH!r} and {PROFILE_SCRATCH!r}. Upgrade vllm-moe-aot"
            )
    return out
