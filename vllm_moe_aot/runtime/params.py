"""Kernel parameter packing: one preallocated buffer per kernel, values overwritten per launch.

:class:`ParamPack` lays the parameters out as a ``ctypes.Structure`` with the C types the
kernel expects (natural alignment, the same layout the CUDA driver and HIP runtime copy from)
plus the ``void*`` array that ``cuLaunchKernel`` / ``hipModuleLaunchKernel`` take as
``kernelParams``, pointing at each field. Both are built once when the kernel is loaded; a
launch only stores new values into the structure (through a small function generated for the
kernel's signature) and passes the array's address to the driver. Nothing is allocated per
launch beyond what Python itself does for the call. The driver copies the values when the launch
call is made, so the buffer is free again on return; one kernel object must not be launched from
two threads at once (as with any PyTorch module, use one per thread or a lock).

Arguments are bound by name: the writer's parameters are the manifest's parameter names (the
compiled artifact's order, which is the kernel's ``@jit`` signature), so ``launch(grid,
x_ptr=x, ...)`` is checked against the artifact itself and two swapped pointers fail by name.
Positional arguments (in that order) are accepted too, for small tools. Appended parameters are
never passed by callers. Pointer parameters take a ``torch.Tensor`` (its ``data_ptr()``),
``None`` (null) or an ``int`` device address; integer parameters take ``int`` (range-checked for
their width); float parameters take ``float`` or ``int``.
"""

from __future__ import annotations

import ctypes
import keyword
import operator
from collections.abc import Callable, Sequence
from typing import Any

from vllm_moe_aot.runtime.errors import CodeObjectError, LaunchArgumentError

#: Triton scalar type -> ctypes type (pointers handled separately)
SCALAR_CTYPES: dict[str, type] = {
    "i1": ctypes.c_int8,
    "i8": ctypes.c_int8,
    "i16": ctypes.c_int16,
    "i32": ctypes.c_int32,
    "i64": ctypes.c_int64,
    "u1": ctypes.c_uint8,
    "u8": ctypes.c_uint8,
    "u16": ctypes.c_uint16,
    "u32": ctypes.c_uint32,
    "u64": ctypes.c_uint64,
    "fp32": ctypes.c_float,
    "f32": ctypes.c_float,
    "fp64": ctypes.c_double,
}
_INT_RANGE: dict[str, tuple[int, int]] = {
    "i1": (0, 1),
    "u1": (0, 1),
    "i8": (-(1 << 7), (1 << 7) - 1),
    "i16": (-(1 << 15), (1 << 15) - 1),
    "i32": (-(1 << 31), (1 << 31) - 1),
    "i64": (-(1 << 63), (1 << 63) - 1),
    "u8": (0, (1 << 8) - 1),
    "u16": (0, (1 << 16) - 1),
    "u32": (0, (1 << 32) - 1),
    "u64": (0, (1 << 64) - 1),
}
_FLOAT_TYPES = ("fp32", "f32", "fp64")
#: names ``Kernel.launch`` takes itself: no kernel parameter may use them
RESERVED_NAMES = frozenset({"grid", "pdl", "self"})


def is_pointer(ty: str) -> bool:
    return ty.startswith("*")


def ctype_of(ty: str) -> type:
    if is_pointer(ty):
        return ctypes.c_uint64
    try:
        return SCALAR_CTYPES[ty]
    except KeyError:
        raise CodeObjectError(
            f"parameter type {ty!r} is not supported by the launcher (supported: pointers, "
            f"{', '.join(sorted(SCALAR_CTYPES))}); change the kernel's signature"
        ) from None


def layout(types: Sequence[str]) -> list[tuple[int, int]]:
    """(offset, size) of each parameter in the C layout the launcher packs."""
    struct = _struct_type([ctype_of(t) for t in types])
    return [(getattr(struct, f"f{i}").offset, getattr(struct, f"f{i}").size)
            for i in range(len(types))]


def _struct_type(ctypes_list: list[type]) -> type:
    fields = [(f"f{i}", ct) for i, ct in enumerate(ctypes_list)]
    return type("KernelParams", (ctypes.Structure,), {"_fields_": fields})


class ParamPack:
    """The parameter buffer of one loaded kernel.

    ``names``/``types`` list every parameter in launch order; the last ``n_appended`` are the
    ones the compiler appended (set once with :meth:`set_appended`, never by callers).
    """

    def __init__(self, kernel: str, names: Sequence[str], types: Sequence[str], n_appended: int):
        if n_appended < 0 or n_appended > len(types):
            raise ValueError("bad n_appended")
        self.kernel = kernel
        self.names = list(names)
        self.types = list(types)
        self.n_user = len(types) - n_appended
        self.struct = _struct_type([ctype_of(t) for t in self.types])()
        n = len(self.types)
        self.pointers = (ctypes.c_void_p * max(n, 1))()
        base = ctypes.addressof(self.struct)
        cls = type(self.struct)
        for i in range(n):
            self.pointers[i] = base + getattr(cls, f"f{i}").offset
        #: address of the ``void*[]`` to pass as ``kernelParams``
        self.address: int = ctypes.addressof(self.pointers)
        self.write: Callable[..., None] = self._make_writer()

    # ---- introspection (tests, debugging) -------------------------------------------------
    def layout(self) -> list[tuple[int, int]]:
        cls = type(self.struct)
        return [(getattr(cls, f"f{i}").offset, getattr(cls, f"f{i}").size)
                for i in range(len(self.types))]

    def raw(self) -> bytes:
        """The packed parameter bytes exactly as the driver will copy them."""
        return ctypes.string_at(ctypes.addressof(self.struct), ctypes.sizeof(self.struct))

    def pointer_targets(self) -> list[int]:
        """The addresses the ``kernelParams`` array holds (one per parameter)."""
        return [int(self.pointers[i] or 0) for i in range(len(self.types))]

    def set_appended(self, values: Sequence[int]) -> None:
        if len(values) != len(self.types) - self.n_user:
            raise ValueError("wrong number of appended parameter values")
        for j, v in enumerate(values):
            setattr(self.struct, f"f{self.n_user + j}", int(v))

    # ---- the per-launch writer ---------------------------------------------------------------
    def _make_writer(self) -> Callable[..., None]:
        """Generate ``write(a0, a1, ...)`` that stores converted values into the structure."""
        import torch

        args = self.names[: self.n_user]
        bad = [a for a in args if not a.isidentifier() or keyword.iskeyword(a)
               or a.startswith("_") or a in RESERVED_NAMES]
        if bad or len(set(args)) != len(args):
            raise CodeObjectError(f"kernel {self.kernel!r}: parameter names {bad or args} cannot "
                                  f"be bound by name (reserved: {sorted(RESERVED_NAMES)})")
        lines = [f"def write({', '.join(args)}):", "    _st = _s"]
        for i in range(self.n_user):
            a, ty = args[i], self.types[i]
            if is_pointer(ty):
                lines.append(
                    f"    _st.f{i} = {a}.data_ptr() if isinstance({a}, _Tensor) else _ptr({a}, {i})"
                )
            elif ty in _INT_RANGE:
                lo, hi = _INT_RANGE[ty]
                lines.append(
                    f"    if {a}.__class__ is not int or not {lo} <= {a} <= {hi}: "
                    f"{a} = _int({a}, {i})"
                )
                lines.append(f"    _st.f{i} = {a}")
            elif ty in _FLOAT_TYPES:
                lines.append(
                    f"    _st.f{i} = {a} if {a}.__class__ is float else _float({a}, {i})"
                )
            else:  # pragma: no cover - ctype_of rejected it already
                raise CodeObjectError(f"unsupported parameter type {ty}")
        if self.n_user == 0:
            lines.append("    pass")
        namespace: dict[str, Any] = {
            "_s": self.struct,
            "_Tensor": torch.Tensor,
            "_ptr": self._ptr,
            "_int": self._int,
            "_float": self._float,
        }
        src = "\n".join(lines) + "\n"
        exec(compile(src, f"<params {self.kernel}>", "exec"), namespace)  # noqa: S102
        self.writer_source = src
        return namespace["write"]

    def _where(self, i: int) -> str:
        return f"kernel {self.kernel!r} parameter {i} {self.names[i]!r} ({self.types[i]})"

    def _ptr(self, v: object, i: int) -> int:
        if v is None:
            return 0
        if isinstance(v, bool) or not isinstance(v, int):
            raise LaunchArgumentError(
                f"{self._where(i)}: expected a torch.Tensor, None or an int address, "
                f"got {type(v).__name__}"
            )
        if not 0 <= v < (1 << 64):
            raise LaunchArgumentError(f"{self._where(i)}: address {v:#x} out of range")
        return v

    def _int(self, v: object, i: int) -> int:
        if isinstance(v, float) or not hasattr(v, "__index__"):
            raise LaunchArgumentError(
                f"{self._where(i)}: expected an int, got {type(v).__name__} ({v!r})"
            )
        iv = operator.index(v)  # bool, numpy and 0-d integer types
        lo, hi = _INT_RANGE[self.types[i]]
        if not lo <= iv <= hi:
            raise LaunchArgumentError(
                f"{self._where(i)}: value {iv} does not fit {self.types[i]} [{lo}, {hi}]; "
                f"the kernel needs a 64-bit parameter for this size"
            )
        return iv

    def _float(self, v: object, i: int) -> float:
        if isinstance(v, float):
            return v
        if isinstance(v, int) and not isinstance(v, bool):
            return float(v)
        if hasattr(v, "data_ptr"):
            raise LaunchArgumentError(
                f"{self._where(i)}: expected a Python float, got a tensor (reading it would "
                f"synchronise with the device; pass a float or make the kernel take a pointer)"
            )
        if isinstance(v, (bool, str, bytes)) or not hasattr(v, "__float__"):
            raise LaunchArgumentError(
                f"{self._where(i)}: expected a float, got {type(v).__name__} ({v!r})"
            )
        return float(v)  # numpy floating scalars

    def arity_error(self, got: int, named: Sequence[str] = ()) -> LaunchArgumentError:
        user = ", ".join(f"{n}: {t}" for n, t in zip(self.names[: self.n_user],
                                                     self.types[: self.n_user], strict=True))
        expected = self.names[: self.n_user]
        missing = [n for n in expected[got:] if n not in named]
        unknown = [n for n in named if n not in expected]
        detail = (f"; missing {missing}" if missing else "") + (
            f"; unknown {unknown}" if unknown else "")
        return LaunchArgumentError(
            f"kernel {self.kernel!r} takes {self.n_user} launch arguments ({user}), got "
            f"{got + len(named)}{detail}"
        )

    def binding_error(self, args: Sequence[Any], named: dict[str, Any]
                      ) -> LaunchArgumentError | None:
        """The error for arguments that do not bind to the parameter names, or None."""
        expected = self.names[: self.n_user]
        positional = expected[: len(args)]
        if (len(args) > self.n_user or any(n in named for n in positional)
                or set(positional) | set(named) != set(expected)):
            return self.arity_error(len(args), list(named))
        return None
