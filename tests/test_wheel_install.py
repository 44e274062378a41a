"""The package as a user gets it: a wheel built from the repository, installed into a fresh
venv, run from a folder outside the checkout. ``vllm-moe-aot info`` and the CPU demo
(``bench --preset qwen3.5-397b-a17b`` without a GPU, the kernels' Triton sources in Triton's
interpreter) must work from the installed copy alone.

The fresh venv gets no pip and no downloads: the wheel goes in with ``--no-deps`` through this
interpreter's pip, and a ``.pth`` file puts this environment's site-packages (torch, triton, ...)
after the venv's own, so that ``vllm_moe_aot`` and ``kernels`` come from the wheel."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: not part of a source tree the wheel is built from
_NOT_SOURCE = {".git", ".venv", ".vllm_stock", ".whl", ".build_cache", "out", "build", "dist",
               "__pycache__", ".pytest_cache", ".ruff_cache"}


def _ignore(folder: str, names: list[str]) -> set[str]:
    return {n for n in names if n in _NOT_SOURCE or n.endswith(".egg-info")}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the tree (the build writes build/ and *.egg-info beside
    the sources; the checkout stays untouched)."""
    src = tmp_path_factory.mktemp("src") / "vllm-moe-aot"
    shutil.copytree(ROOT, src, ignore=_ignore, symlinks=True)
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "--no-index", "-q", "-w", str(out), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (whl,) = out.glob("vllm_moe_aot-*.whl")
    return whl


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv holding only the wheel, this environment's packages behind it."""
    env_dir = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True,
                   timeout=120)
    py = env_dir / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], capture_output=True, text=True, check=True).stdout
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(site.strip(), "zz_dev_env.pth").write_text("".join(f"{p}\n" for p in sorted(ours)))
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q",
                        "--no-deps", "--no-index", str(wheel)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return env_dir


def _run(cwd: Path, *argv: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``argv`` in ``cwd`` as a user would run it: no PYTHONPATH, no GPU."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "TRITON_INTERPRET", "VLLM_MOE_BACKEND", "PYTHONHOME")}
    env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU demo, also on a machine with a GPU
    return subprocess.run(list(argv), cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_wheel_ships_the_package_code_objects_and_kernel_sources(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    kernel_sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "kernels").rglob("*.py")
                      if "__pycache__" not in p.parts}
    assert "kernels/__init__.py" in kernel_sources
    assert kernel_sources <= names, sorted(kernel_sources - names)
    manifest = json.loads((ROOT / "vllm_moe_aot/artifacts/manifest.json").read_text())
    objects = manifest["objects"]
    objects = objects.values() if isinstance(objects, dict) else objects
    modules = {o["source"].partition(":")[0] for o in objects}
    assert modules and all(m.startswith("kernels.") for m in modules), modules
    for m in modules:  # every source the interpreter imports is in the wheel
        assert f"{m.replace('.', '/')}.py" in names, m
    code_objects = {p.relative_to(ROOT).as_posix()
                    for p in (ROOT / "vllm_moe_aot/artifacts").glob("*/*")
                    if p.suffix in (".cubin", ".hsaco")}
    assert code_objects and code_objects <= names, sorted(code_objects - names)[:5]
    assert "vllm_moe_aot/artifacts/manifest.json" in names
    assert any(re.fullmatch(r"vllm_moe_aot/configs/.*\.tuned\.csv", n) for n in names)
    assert not any(n.startswith(("tests/", "scripts/", "docs/")) for n in names)


def test_installed_wheel_runs_info_and_the_cpu_demo_outside_the_checkout(venv, tmp_path):
    bin_dir = venv / "bin"
    where = _run(tmp_path, str(bin_dir / "python"), "-c",
                 "import kernels, vllm_moe_aot; print(vllm_moe_aot.__file__); "
                 "print(kernels.__file__)")
    assert where.returncode == 0, where.stderr[-3000:]
    for f in where.stdout.split():
        path = Path(f).resolve()
        assert path.is_relative_to(venv.resolve()), f"{f}: not the installed copy"
        assert not path.is_relative_to(ROOT), f"{f}: imported from the checkout"

    info = _run(tmp_path, str(bin_dir / "vllm-moe-aot"), "info")
    assert info.returncode == 0, info.stdout[-3000:] + info.stderr[-3000:]
    assert "code objects" in info.stdout
    manifest = re.search(r"code objects \((.+manifest\.json)\)", info.stdout)
    assert manifest and Path(manifest.group(1)).resolve().is_relative_to(venv.resolve())

    demo = _run(tmp_path, str(bin_dir / "vllm-moe-aot"), "bench", "--preset",
                "qwen3.5-397b-a17b", "--tokens", "1", "5", "--json", str(tmp_path / "b.json"))
    out = demo.stdout
    assert demo.returncode == 0, out[-4000:] + demo.stderr[-4000:]
    assert "no GPU is present" in out and "Triton interpreter" in out
    assert "scaled-down shape" in out and "E 512->8" in out
    assert "SKIPPED (no GPU timing was done)" in out and "GPU timing" in out
    assert "passed the gate" in out
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["mode"] == "cpu-interpreter"
    assert {r["M"] for r in data["rows"]} == {1, 5}
    assert data["rows"] and all(r["gate"] == "pass" for r in data["rows"])


def test_constraints_pin_the_torch_that_the_test_extra_and_vllm_pin():
    """README's install command passes ``-c constraints.txt`` so that pip downloads torch once:
    the pin there must be the [test] extra's and the one vllm==0.33.0 itself requires."""
    tomllib = pytest.importorskip("tomllib")
    from importlib import metadata

    pins = [ln.strip() for ln in (ROOT / "constraints.txt").read_text().splitlines()
            if ln.strip() and not ln.lstrip().startswith("#")]
    torch_pins = [p for p in pins if re.match(r"torch\s*==", p)]
    assert len(torch_pins) == 1, pins
    test_extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["test"]
    assert torch_pins[0] in test_extra
    assert "-c constraints.txt" in (ROOT / ".ci" / "run").read_text()
    assert "-c constraints.txt" in (ROOT / "README.md").read_text()
    try:
        vllm_reqs = metadata.requires("vllm") or []
    except metadata.PackageNotFoundError:
        pytest.skip("vllm is not installed")
    assert torch_pins[0] in [r.split(";")[0].strip() for r in vllm_reqs]
