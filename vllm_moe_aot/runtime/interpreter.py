"""CPU launcher for tests: runs each kernel's Triton source under Triton's interpreter.

It stands in for a GPU launcher with the same contract: the manifest entry (the sm_90a one)
gives the source function, constexprs and ``num_warps``; ``launch`` takes exactly the same
positional arguments as the real launchers, checked the same way, with torch CPU tensors.
``TRITON_INTERPRET=1`` must be set before triton or any kernel module is imported (tests do it in
``conftest.py``). A constexpr named ``EXACT_CAST`` is forced to True: the kernels use it to route
fp32 -> fp8 casts through an exact conversion because the interpreter rounds them wrongly.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from vllm_moe_aot.contract import INTERPRETER
from vllm_moe_aot.contract import REFERENCE_TARGET as REFERENCE_TARGET  # re-exported
from vllm_moe_aot.runtime.errors import AotRuntimeError, CodeObjectError
from vllm_moe_aot.runtime.kernel import Kernel
from vllm_moe_aot.runtime.manifest import ObjectEntry

EXACT_CAST = "EXACT_CAST"
#: constexpr of kernels that use programmatic dependent launch (PTX griddepcontrol)
USE_GDC = "USE_GDC"


def decode_constexpr(v: Any) -> Any:
    """Inverse of the build's JSON encoding of constexpr values (``{"dtype": "bf16"}``)."""
    if isinstance(v, dict) and set(v) == {"dtype"}:
        import triton.language as tl

        return tl.dtype(v["dtype"])
    return v


def _with_checkout_on_path(mod_name: str) -> str:
    """Kernel sources live in the source checkout beside the package (``kernels/``), which an
    editable install does not put on sys.path: add the checkout root when it holds them."""
    top = mod_name.partition(".")[0]
    if importlib.util.find_spec(top) is None:
        root = Path(__file__).resolve().parents[2]
        if (root / top / "__init__.py").is_file() and str(root) not in sys.path:
            sys.path.append(str(root))
    return mod_name


def import_source(source: str, kernel: str) -> Any:
    mod_name, _, fn_name = source.partition(":")
    if not mod_name or not fn_name:
        raise CodeObjectError(f"kernel {kernel!r}: source {source!r} is not 'module:function'")
    try:
        mod = importlib.import_module(_with_checkout_on_path(mod_name))
    except ImportError as e:
        raise CodeObjectError(
            f"kernel {kernel!r}: cannot import {mod_name!r} for the interpreter ({e}); the "
            f"interpreter needs the source checkout's root on sys.path"
        ) from e
    try:
        return getattr(mod, fn_name)
    except AttributeError:
        raise CodeObjectError(f"kernel {kernel!r}: {mod_name} has no {fn_name!r}") from None


class InterpreterLauncher:
    target = INTERPRETER

    def __init__(self) -> None:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise AotRuntimeError(
                "the CPU (interpreter) launcher needs TRITON_INTERPRET=1 set before triton and "
                "the kernel modules are imported (tests set it in tests/conftest.py)"
            )

    def load(self, entry: ObjectEntry, *, max_programs: int | None = None) -> InterpretedKernel:
        fn = import_source(entry.source, entry.name)
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(fn, InterpretedFunction):
            raise AotRuntimeError(
                f"kernel {entry.name!r}: {entry.source} was compiled for a GPU, not for the "
                f"interpreter: TRITON_INTERPRET=1 must be set before triton or {entry.source} "
                f"is first imported (set it at the very top of conftest.py or the script)"
            )
        return InterpretedKernel(entry, fn)


class InterpretedKernel(Kernel):
    def __init__(self, entry: ObjectEntry, fn: Any):
        self._bind(entry, INTERPRETER)
        self.fn = fn
        consts = {k: decode_constexpr(v) for k, v in entry.constexprs.items()}
        if EXACT_CAST in consts:
            consts[EXACT_CAST] = True
        if USE_GDC in consts:
            consts[USE_GDC] = False  # griddepcontrol is inline PTX: nothing to interpret
        self.constexprs = consts

    def _enqueue(self, gx: int, gy: int, gz: int, pdl: bool, args: tuple,
                 named: dict[str, Any]) -> None:
        # the argument checks were the GPU launchers' (Kernel.launch); the values go as given
        self.fn[(gx, gy, gz)](*args, **named, **self.constexprs, num_warps=self.entry.num_warps)
