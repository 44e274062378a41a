"""CodeObject validation (pyelftools), the ELF readers and the manifest reader."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import struct

import pytest

from tests._aot_helpers import copy_smoke_artifacts, smoke_artifacts
from vllm_moe_aot.contract import SCHEMA
from vllm_moe_aot.runtime import CodeObject, CodeObjectError, Manifest, ManifestError
from vllm_moe_aot.runtime.elf import (
    EM_AMDGPU,
    EM_CUDA,
    amdgpu_metadata,
    cuda_sm,
    kernel_params,
    msgpack_decode,
    read_info,
)


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    return Manifest.load(smoke_artifacts())


def entry(manifest: Manifest, name: str, target: str):
    return manifest.get(name, target)


def test_every_built_object_validates(manifest):
    assert len(manifest.objects) == 6
    for e in manifest.objects:
        co = CodeObject.load(e, manifest.directory)
        assert co.data[:4] == b"\x7fELF"


def test_elf_machine_arch_symbol_and_params(manifest):
    for e in manifest.objects:
        data = (manifest.directory / e.file).read_bytes()
        info = read_info(data)
        assert info.machine == (EM_CUDA if e.target == "sm_90a" else EM_AMDGPU)
        assert info.arch == {"sm_90a": "sm_90", "gfx942": "gfx942", "gfx950": "gfx950"}[e.target]
        assert e.symbol in info.functions
        declared = kernel_params(data, e.symbol)
        assert [(p.offset, p.size) for p in declared] == [(p.offset, p.size) for p in e.params]


def test_hsaco_metadata_note(manifest):
    e = entry(manifest, "smoke_axpy", "gfx942")
    meta = amdgpu_metadata((manifest.directory / e.file).read_bytes())
    assert meta["amdhsa.target"].endswith("gfx942")
    (k,) = meta["amdhsa.kernels"]
    assert k[".name"] == e.symbol and k[".wavefront_size"] == 64


def test_cuda_sm_from_flags():
    assert cuda_sm(0x5A0D5A, 7) == 90  # what ptxas 12.9 writes for sm_90a
    assert cuda_sm(0x6005A04, 8) == 90  # ELF ABI v8 (CUDA 13) keeps the SM in the 2nd byte


def test_msgpack_reader():
    blob = (b"\x83\xa1a\x01\xa1b\x92\xc3\xc0\xa1c\xde\x00\x01\xa1d\xcb"
            + struct.pack(">d", 1.5))
    assert msgpack_decode(blob)[0] == {"a": 1, "b": [True, None], "c": {"d": 1.5}}
    assert msgpack_decode(b"\xd1\xff\x00")[0] == -256
    assert msgpack_decode(b"\xd9\x03abc")[0] == "abc"


def test_missing_file(manifest, tmp_path):
    e = dataclasses.replace(entry(manifest, "smoke_axpy", "sm_90a"), file="sm_90a/nope.cubin")
    with pytest.raises(CodeObjectError, match=r"smoke_axpy.*nope\.cubin is missing"):
        CodeObject.load(e, manifest.directory)


def test_bad_hash(manifest, tmp_path):
    d = copy_smoke_artifacts(tmp_path / "a")
    e = entry(manifest, "smoke_axpy", "sm_90a")
    f = d / e.file
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CodeObjectError, match=r"smoke_axpy.*sha256 .* does not match"):
        CodeObject.load(e, d)


@pytest.mark.parametrize("claimed, actual", [("sm_90a", "gfx942"), ("gfx942", "gfx950"),
                                             ("gfx950", "sm_90a")])
def test_wrong_target(manifest, tmp_path, claimed, actual):
    d = copy_smoke_artifacts(tmp_path / "a")
    right, wrong = entry(manifest, "smoke_axpy", claimed), entry(manifest, "smoke_axpy", actual)
    shutil.copy(d / wrong.file, d / right.file)  # the file of another target under this name
    e = dataclasses.replace(right, sha256=hashlib.sha256((d / right.file).read_bytes())
                            .hexdigest())
    with pytest.raises(CodeObjectError, match=rf"wrong target.*{actual[:5]}.*manifest says "
                                              rf"{claimed}"):
        CodeObject.load(e, d)


def test_missing_symbol(manifest):
    e = dataclasses.replace(entry(manifest, "smoke_fp8_gemm", "gfx950"), symbol="not_there")
    with pytest.raises(CodeObjectError, match=r"symbol 'not_there' not found.*fp8_gemm_kernel"):
        CodeObject.load(e, manifest.directory)


def test_param_list_out_of_date(manifest):
    e = entry(manifest, "smoke_axpy", "sm_90a")
    e = dataclasses.replace(e, params=e.params[:-1])  # forgot one appended pointer
    with pytest.raises(CodeObjectError, match="out of date with the binary"):
        CodeObject.load(e, manifest.directory)


def test_not_an_elf(manifest, tmp_path):
    d = copy_smoke_artifacts(tmp_path / "a")
    e = entry(manifest, "smoke_axpy", "gfx942")
    (d / e.file).write_bytes(b"garbage")
    e = dataclasses.replace(e, sha256=hashlib.sha256(b"garbage").hexdigest())
    with pytest.raises(CodeObjectError, match="not an ELF"):
        CodeObject.load(e, d)


# ---- manifest ------------------------------------------------------------------------------------
def test_manifest_views_and_lookups(manifest):
    assert manifest.targets() == ["gfx942", "gfx950", "sm_90a"]
    view = manifest.for_target("gfx942")
    assert view.target == "gfx942" and {o.target for o in view.objects} == {"gfx942"}
    assert view.get("smoke_axpy").file == "gfx942/smoke_axpy.hsaco"
    assert view.constexprs("smoke_fp8_gemm") == {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128}
    with pytest.raises(ManifestError, match=r"'nope' is not in .*smoke_axpy"):
        view.get("nope")
    with pytest.raises(ManifestError, match="needs a target"):
        manifest.get("smoke_axpy")
    e = view.get("smoke_axpy")
    assert [p.name for p in e.user_params] == ["x_ptr", "y_ptr", "out_ptr", "n", "alpha"]


def test_manifest_errors(tmp_path):
    with pytest.raises(ManifestError, match="no code-object manifest"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="cannot read"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"schema": 99, "objects": []}))
    with pytest.raises(ManifestError, match="schema 99"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text(
        json.dumps({"schema": SCHEMA, "objects": [{"name": "x"}]}))
    with pytest.raises(ManifestError, match="lacks"):
        Manifest.load(tmp_path)


def test_manifest_round_trip(manifest):
    again = Manifest.from_json(json.loads(json.dumps(manifest.to_json())), manifest.path)
    assert again.objects == manifest.objects and again.variants == manifest.variants
