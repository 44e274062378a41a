"""The AOT build: manifest schema, caching, --check, --list, failures, the wheel's contents, and
the committed code objects. Real compiles run in subprocesses without TRITON_INTERPRET."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from tests._aot_helpers import (
    ROOT,
    SMOKE,
    copy_smoke_artifacts,
    run_build,
    run_python,
    smoke_artifacts,
)
from vllm_moe_aot.cli import main as cli_main
from vllm_moe_aot.contract import SCHEMA
from vllm_moe_aot.runtime import CodeObject, Manifest
from vllm_moe_aot.runtime.elf import kernel_params

COMMITTED = ROOT / "vllm_moe_aot" / "artifacts"
SMOKE_ARGS = ("--kernels", ",".join(SMOKE), "--no-progress", "--jobs", "2")
OBJECT_KEYS = {"name", "target", "file", "symbol", "params", "num_warps", "threads_per_block",
               "shared", "global_scratch_size", "global_scratch_align", "profile_scratch_size",
               "profile_scratch_align", "num_ctas", "launch_pdl", "launch_cooperative_grid",
               "config", "constexprs", "family", "source", "sha256", "size", "cache_key",
               "compiler_version"}


def load_json(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text())


# ---- schema --------------------------------------------------------------------------------------
def test_manifest_schema():
    import triton

    d = smoke_artifacts()
    m = load_json(d)
    assert set(m) == {"schema", "package_version", "compiler", "objects", "variants"}
    assert m["schema"] == SCHEMA and m["package_version"]
    assert m["compiler"]["triton"] == triton.__version__
    assert m["compiler"]["ptxas"] and "LLD" in m["compiler"]["llvm"]
    assert isinstance(m["variants"], list)
    assert sorted((o["name"], o["target"]) for o in m["objects"]) == sorted(
        (n, t) for n in SMOKE for t in ("sm_90a", "gfx942", "gfx950"))
    warp = {"sm_90a": 32, "gfx942": 64, "gfx950": 64}
    for o in m["objects"]:
        assert set(o) == OBJECT_KEYS
        data = (d / o["file"]).read_bytes()
        suffix = "cubin" if o["target"] == "sm_90a" else "hsaco"
        assert o["file"] == f"{o['target']}/{o['name']}.{suffix}"
        assert o["sha256"] == hashlib.sha256(data).hexdigest() and o["size"] == len(data)
        assert o["threads_per_block"] == o["num_warps"] * warp[o["target"]]
        assert o["config"].startswith("smoke:") and o["family"] == "smoke"
        assert o["source"].startswith("kernels.smoke:")
        assert len(o["cache_key"]) == 64 and o["compiler_version"].startswith("triton ")
        # the parameter list comes from the artifact: user params then Triton's two pointers
        params = o["params"]
        assert [p["appended"] for p in params][-2:] == [True, True]
        assert [p["name"] for p in params if p["appended"]] == ["global_scratch",
                                                                "profile_scratch"]
        assert all(p["type"] == "*i8" for p in params if p["appended"])
        declared = kernel_params(data, o["symbol"])
        assert [(p["offset"], p["size"]) for p in params] == [(q.offset, q.size)
                                                               for q in declared]
        assert o["global_scratch_size"] == 0 and o["profile_scratch_size"] == 0
    gemm = {o["target"]: o for o in m["objects"] if o["name"] == "smoke_fp8_gemm"}
    # the *fp8 placeholder resolved per target
    assert gemm["sm_90a"]["params"][0]["type"] == "*fp8e4nv"
    assert gemm["gfx942"]["params"][0]["type"] == "*fp8e4b8"
    assert gemm["gfx950"]["params"][0]["type"] == "*fp8e4nv"
    assert gemm["sm_90a"]["constexprs"] == {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128}
    assert gemm["sm_90a"]["shared"] > 0
    Manifest.load(d)  # and the runtime reads it


def test_fp8_max_placeholder_resolves_per_target():
    from kernels.build import declaration
    from kernels.spec import FP8_MAX, FP8_PTR, TARGETS, KernelSpec

    s = KernelSpec("q", "kernels.smoke:axpy_kernel", "t", {"x": FP8_PTR}, {"MAX": FP8_MAX})
    assert declaration(s, TARGETS["gfx942"])["constexprs"] == {"MAX": 240.0}
    assert declaration(s, TARGETS["sm_90a"])["signature"] == {"x": "*fp8e4nv"}


# ---- list / check / caching ----------------------------------------------------------------------
def test_list_compiles_nothing(capsys, tmp_path):
    assert cli_main(["build", "--list", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "variants (" in out and "kernels (" in out and "targets:" in out
    assert "smoke_axpy" in out and "smoke:BLOCK=1024,w4,s1" in out
    for t in ("sm_90a", "gfx942", "gfx950"):
        assert t in out
    assert list(tmp_path.iterdir()) == []
    assert cli_main(["build", "--list", "--kernels", "smoke_axpy", "--target", "gfx950"]) == 0
    assert "\n1 code objects" in capsys.readouterr().out


def test_bad_selection_is_an_error(capsys):
    assert cli_main(["build", "--list", "--kernels", "nope"]) == 2
    assert "unknown kernel(s) ['nope']" in capsys.readouterr().err
    assert cli_main(["build", "--check", "--target", "sm_80"]) == 2


def test_check_passes_when_current(tmp_path, capsys):
    d = copy_smoke_artifacts(tmp_path / "a")
    assert cli_main(["build", "--check", "--out", str(d), "--family", "smoke"]) == 0
    assert "current" in capsys.readouterr().out


def test_unchanged_objects_are_not_recompiled(tmp_path):
    d = copy_smoke_artifacts(tmp_path / "a")
    before = {f: f.stat().st_mtime_ns for f in d.rglob("*.*") if f.name != "manifest.json"}
    r = run_build("--out", str(d), *SMOKE_ARGS)
    assert r.returncode == 0, r.stderr
    assert "0 compiled, 6 unchanged, 0 removed, 0 failed" in r.stdout
    assert {f: f.stat().st_mtime_ns for f in before} == before
    assert load_json(d) == load_json(smoke_artifacts())


def test_stale_missing_orphan_and_bad_files(tmp_path):
    d = copy_smoke_artifacts(tmp_path / "a")
    m = load_json(d)
    objs = {(o["name"], o["target"]): o for o in m["objects"]}
    objs[("smoke_axpy", "sm_90a")]["cache_key"] = "0" * 64  # sources changed since
    del objs[("smoke_axpy", "gfx950")]  # never built
    (d / objs[("smoke_fp8_gemm", "gfx942")]["file"]).write_bytes(b"tampered")
    orphan = dict(objs[("smoke_axpy", "gfx942")], name="removed_spec",
                  file="gfx942/removed_spec.hsaco")
    shutil.copy(d / "gfx942/smoke_axpy.hsaco", d / "gfx942/removed_spec.hsaco")
    m["objects"] = list(objs.values()) + [orphan]
    (d / "manifest.json").write_text(json.dumps(m))
    (d / "gfx950/smoke_axpy.hsaco").unlink()

    r = run_build("--check", "--out", str(d), "--family", "smoke")
    assert r.returncode == 1
    for line in ("stale: smoke_axpy [sm_90a]", "missing: smoke_axpy [gfx950]",
                 "bad file: smoke_fp8_gemm [gfx942]", "orphan: removed_spec [gfx942]"):
        assert line in r.stderr, r.stderr
    assert "smoke_fp8_gemm [sm_90a]" not in r.stderr

    r = run_build("--out", str(d), *SMOKE_ARGS)
    assert r.returncode == 0, r.stderr
    assert "3 compiled, 3 unchanged, 1 removed, 0 failed" in r.stdout
    assert not (d / "gfx942/removed_spec.hsaco").exists()
    assert run_build("--check", "--out", str(d), "--family", "smoke").returncode == 0
    fresh = {(o["name"], o["target"]): o["sha256"] for o in load_json(d)["objects"]}
    assert fresh == {(o["name"], o["target"]): o["sha256"]
                     for o in load_json(smoke_artifacts())["objects"]}  # reproducible


def test_failures_are_reported_and_the_rest_builds(tmp_path):
    (tmp_path / "badkern.py").write_text(textwrap.dedent("""
        import triton
        import triton.language as tl

        @triton.jit
        def bad(x_ptr, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            tl.store(x_ptr + offs, tl.load(x_ptr + offs) + undefined_name)
    """))
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        from kernels import registry, smoke
        from kernels.spec import KernelSpec
        axpy = [s for s in smoke.SPECS if s.name == "smoke_axpy"]
        bad = KernelSpec("bad_kernel", "badkern:bad", "test", {{"x_ptr": "*fp32"}},
                         {{"BLOCK": 64}}, targets=("sm_90a", "gfx942"))
        order = KernelSpec("bad_order", "kernels.smoke:axpy_kernel", "test",
                           {{"y_ptr": "*fp32", "x_ptr": "*fp32", "out_ptr": "*fp32",
                             "n": "i32", "alpha": "fp32"}}, {{"BLOCK": 64}}, targets=("gfx950",))
        registry.all_specs = lambda: axpy + [bad, order]
        registry.all_variants = lambda: []
        from vllm_moe_aot.cli import main
        print("RC", main(["build", "--out", {str(out)!r}, "--no-progress", "--jobs", "2"]))
    """)
    r = run_python(script)
    assert "RC 1" in r.stdout, r.stdout + r.stderr
    text = r.stdout + r.stderr
    assert "FAILED bad_kernel [sm_90a]" in text and "FAILED bad_kernel [gfx942]" in text
    assert "undefined_name" in text
    assert "FAILED bad_order [gfx950]" in text and "signature order" in text
    assert "3 compiled, 0 unchanged, 0 removed, 3 failed" in text
    built = {(o["name"], o["target"]) for o in load_json(out)["objects"]}
    assert built == {("smoke_axpy", t) for t in ("sm_90a", "gfx942", "gfx950")}


def test_interpreter_mode_refuses_to_build(tmp_path, capsys):
    # this process has TRITON_INTERPRET=1 (conftest)
    assert cli_main(["build", "--out", str(tmp_path), "--kernels", "smoke_axpy"]) == 2
    assert "TRITON_INTERPRET" in capsys.readouterr().err


def test_source_files_follow_kernel_imports():
    from kernels.build import source_files

    files = source_files("kernels.smoke:axpy_kernel")
    assert set(files) == {"kernels.smoke", "kernels.spec"}


def test_installed_package_without_sources_says_so(tmp_path):
    shutil.copytree(ROOT / "vllm_moe_aot", tmp_path / "vllm_moe_aot",
                    ignore=shutil.ignore_patterns("__pycache__", "artifacts"))
    r = subprocess.run([sys.executable, "-c",
                        "import sys; from vllm_moe_aot.cli import main; "
                        "sys.exit(main(['build', '--check']))"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "needs a source checkout" in r.stderr and "ship prebuilt" in r.stderr


# ---- what we commit and ship ---------------------------------------------------------------------
def committed() -> Manifest:
    if not (COMMITTED / "manifest.json").is_file():
        pytest.fail("vllm_moe_aot/artifacts/manifest.json is missing: run `vllm-moe-aot build`")
    return Manifest.load(COMMITTED)


def test_committed_code_objects_validate():
    m = committed()
    assert {"sm_90a", "gfx942", "gfx950"} <= set(m.targets())
    for e in m.objects:
        CodeObject.load(e, COMMITTED)


def test_committed_code_objects_are_current():
    from kernels.build import check

    problems = check(COMMITTED)
    assert not problems, ("committed code objects are out of date; run `vllm-moe-aot build` "
                          "and commit vllm_moe_aot/artifacts/:\n" + "\n".join(problems))


def test_wheel_ships_manifest_and_every_code_object(tmp_path):
    m = committed()
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(ROOT / "pyproject.toml", src)
    readme = ROOT / "README.md"
    if readme.exists():
        shutil.copy(readme, src)
    else:  # pyproject names it; the wheel's contents do not depend on it
        (src / "README.md").write_text("vllm-moe-aot\n")
    shutil.copytree(ROOT / "vllm_moe_aot", src / "vllm_moe_aot",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                        "--no-build-isolation", "--no-cache-dir", "-q", "-w",
                        str(tmp_path / "dist"), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = (tmp_path / "dist").glob("vllm_moe_aot-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "vllm_moe_aot/artifacts/manifest.json" in names
    missing = [e.file for e in m.objects if f"vllm_moe_aot/artifacts/{e.file}" not in names]
    assert not missing, f"code objects not in the wheel: {missing}"
    assert not any(n.startswith("kernels/") for n in names)  # sources stay in the checkout
    with zipfile.ZipFile(wheel) as z:
        assert json.loads(z.read("vllm_moe_aot/artifacts/manifest.json")) == \
            json.loads((COMMITTED / "manifest.json").read_text())
