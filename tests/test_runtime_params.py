"""Parameter packing: the exact bytes a launch hands the driver."""

from __future__ import annotations

import ctypes
import struct

import numpy as np
import pytest
import torch

from vllm_moe_aot.runtime.errors import CodeObjectError, LaunchArgumentError
from vllm_moe_aot.runtime.params import ParamPack, layout

TYPES = ["*fp32", "i32", "i64", "fp32", "u32", "*bf16", "*i8", "*i8"]
NAMES = ["x", "n", "big", "alpha", "flags", "out", "global_scratch", "profile_scratch"]


def pack() -> ParamPack:
    return ParamPack("k", NAMES, TYPES, n_appended=2)


def test_layout_matches_the_c_abi_and_real_code_objects():
    # what Triton 3.8's CUBIN (.nv.info) and HSACO (.args) declare for a kernel with
    # (*fp32, i8, i16, fp32, i64, fp64, u8) + two appended pointers
    assert layout(["*fp32", "i8", "i16", "fp32", "i64", "fp64", "u8", "*i8", "*i8"]) == [
        (0, 8), (8, 1), (10, 2), (12, 4), (16, 8), (24, 8), (32, 1), (40, 8), (48, 8)]
    assert pack().layout() == [(0, 8), (8, 4), (16, 8), (24, 4), (28, 4), (32, 8), (40, 8),
                               (48, 8)]


def test_exact_bytes_pointers_ints_floats_and_appended():
    p = pack()
    x = torch.arange(4, dtype=torch.float32)
    out = torch.empty(3, dtype=torch.bfloat16)
    p.set_appended([0, 0])
    p.write(x, -7, 1 << 40, 0.5, 0xFFFFFFFF, out)
    want = struct.pack("<Qi4xqfIQQQ", x.data_ptr(), -7, 1 << 40, 0.5, 0xFFFFFFFF,
                       out.data_ptr(), 0, 0)
    assert p.raw() == want
    # the appended scratch pointers when a kernel has scratch
    p.set_appended([0x1000, 0x2000])
    assert p.raw()[40:56] == struct.pack("<QQ", 0x1000, 0x2000)
    # values are overwritten in place: same buffer, same void* array
    addr = ctypes.addressof(p.struct)
    p.write(None, 3, -1, 2, 0, 0xDEAD00)
    assert ctypes.addressof(p.struct) == addr
    assert p.raw()[:40] == struct.pack("<Qi4xqfIQ", 0, 3, -1, 2.0, 0, 0xDEAD00)


def test_void_pointer_array_points_at_each_field():
    p = pack()
    base = ctypes.addressof(p.struct)
    assert p.pointer_targets() == [base + off for off, _ in p.layout()]
    # the array itself is what the driver gets
    assert p.address == ctypes.addressof(p.pointers)
    first = ctypes.c_void_p.from_address(p.address).value
    assert first == base


def test_numpy_and_bool_scalars_are_accepted():
    p = pack()
    p.write(None, np.int32(5), np.int64(-3), np.float32(1.25), True, None)
    assert p.raw()[:32] == struct.pack("<Qi4xqfI", 0, 5, -3, 1.25, 1)


@pytest.mark.parametrize("args, match", [
    ((None, 2**31, 0, 1.0, 0, None), "does not fit i32"),
    ((None, 0, 2**63, 1.0, 0, None), "does not fit i64"),
    ((None, 0, 0, 1.0, -1, None), "does not fit u32"),
    ((None, 1.5, 0, 1.0, 0, None), "expected an int"),
    ((None, 0, 0, "1.0", 0, None), "expected a float"),
    ((None, 0, 0, True, 0, None), "expected a float"),
    ((None, 0, 0, torch.tensor(1.0), 0, None), "synchronise"),
    (("x", 0, 0, 1.0, 0, None), "expected a torch.Tensor, None or an int address"),
    ((None, 0, 0, 1.0, 0, -5), "out of range"),
])
def test_bad_values_name_the_kernel_and_parameter(args, match):
    with pytest.raises(LaunchArgumentError, match=match) as e:
        pack().write(*args)
    assert "kernel 'k'" in str(e.value)


def test_arity_error_lists_the_signature():
    p = pack()
    with pytest.raises(TypeError):
        p.write(None, 1)
    err = p.arity_error(2)
    assert "takes 6 launch arguments" in str(err) and "alpha: fp32" in str(err)


def test_unsupported_scalar_type():
    with pytest.raises(CodeObjectError, match="not supported"):
        ParamPack("k", ["h"], ["bf16"], 0)


def test_arguments_bind_by_name():
    """Launch arguments are bound to the manifest's parameter names: order does not matter,
    and a wrong or missing name is an error that names it (swapped pointers cannot pass)."""
    pack = ParamPack("k", ["x_ptr", "y_ptr", "n", "global_scratch"],
                     ["*fp32", "*fp32", "i32", "*i8"], 1)
    pack.write(y_ptr=16, x_ptr=32, n=3)
    assert (pack.struct.f0, pack.struct.f1, pack.struct.f2) == (32, 16, 3)
    pack.write(48, n=5, y_ptr=64)  # positional in the artifact's order, then by name
    assert (pack.struct.f0, pack.struct.f1, pack.struct.f2) == (48, 64, 5)
    with pytest.raises(TypeError):
        pack.write(x_ptr=1, z_ptr=2, n=3)
    err = pack.binding_error((), {"x_ptr": 1, "z_ptr": 2, "n": 3})
    assert "missing ['y_ptr']" in str(err) and "unknown ['z_ptr']" in str(err)
    assert pack.binding_error((1,), {"y_ptr": 2, "n": 3}) is None
