"""``vllm-moe-aot info`` and the platform helpers it shares with the vLLM plugin. None of this
needs vLLM or a GPU; one test runs the command with vLLM made unimportable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from vllm_moe_aot import BACKEND_NAME, __version__, info
from vllm_moe_aot.contract import SCHEMA
from vllm_moe_aot.shapes import PRESETS, Scheme

ROOT = Path(__file__).resolve().parent.parent
H100 = ("NVIDIA H100 80GB HBM3", "sm_90a")


def _tuned_rows(directory: Path) -> Path:
    """hy3 on an H100: M <= 2 to two variants, M = 4 stock, M = 8 a variant."""
    from tests.integration_support import write_tuned

    preset = PRESETS["hy3"]
    return write_tuned(directory, preset.shape, preset.scheme,
                       {1: "gemv_a", 2: "gemv_b", 4: "stock", 8: "grouped_m16"},
                       gpu=H100[0], arch=H100[1], name="hy3_fp8_per_tensor_tp8.tuned.csv")


def _run_info(*args: str, env: dict | None = None, block_vllm: bool = True):
    code = textwrap.dedent(f"""
        import sys
        if {block_vllm!r}:
            sys.modules["vllm"] = None  # as if vLLM were not installed
        from vllm_moe_aot.cli import main
        rc = main(["info", *{list(args)!r}])
        print("VLLM_IMPORTED" if any(m == "vllm" or m.startswith("vllm.")
                                     for m in sys.modules if sys.modules[m] is not None)
              else "VLLM_NOT_IMPORTED")
        print("TRITON_IMPORTED" if "triton" in sys.modules else "TRITON_NOT_IMPORTED")
        sys.exit(rc)
    """)
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("VLLM_MOE_BACKEND", "VLLM_MOE_AOT_CONFIG_DIR", "TRITON_INTERPRET")}
    full_env["CUDA_VISIBLE_DEVICES"] = ""  # no GPU, even on a GPU machine
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=120)


def test_info_without_gpu_or_vllm(tmp_path):
    _tuned_rows(tmp_path)
    proc = _run_info("--config-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"vllm-moe-aot {__version__}" in out
    assert "GPU: no GPU: showing every GPU the tuned configs hold rows for" in out
    assert "code objects (" in out and "tuned configs (" in out
    assert "hy3_fp8_per_tensor_tp8.tuned.csv" in out
    assert f"VLLM_MOE_BACKEND= -> off (unset); set VLLM_MOE_BACKEND={BACKEND_NAME}" in out
    # the hy3 preset: rows of the one GPU the file has, bucket by bucket
    hy3 = out[out.index("preset hy3"):out.index("preset qwen3.5")]
    assert f"{H100[0]} ({H100[1]}):" in hy3
    assert "M <= 1" in hy3 and "aot    gemv_a" in hy3
    assert "M <= 4" in hy3 and "stock" in hy3
    assert "M <= 8 (and above)" in hy3 and "grouped_m16" in hy3
    assert "3 of 4 tuned M buckets go to the AOT pipeline" in hy3
    qwen = out[out.index("preset qwen3.5"):]
    assert "no tuned rows for any GPU: every M runs stock" in qwen
    assert "VLLM_NOT_IMPORTED" in out and "TRITON_NOT_IMPORTED" in out


def test_info_reports_backend_state_and_a_missing_manifest(tmp_path):
    proc = _run_info("--preset", "qwen3.5-397b-a17b", "--config-dir", str(tmp_path),
                     env={"VLLM_MOE_BACKEND": "nope",
                          "VLLM_MOE_AOT_ARTIFACTS": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert "off (unknown value 'nope')" in proc.stdout
    assert "none: no code-object manifest at" in proc.stdout
    assert "preset hy3" not in proc.stdout


def _manifest(path: Path, targets: list[str]) -> Path:
    objects = [{"name": f"k{i}", "target": t, "file": f"{t}/k{i}.bin", "symbol": f"k{i}",
                "params": [], "num_warps": 4, "threads_per_block": 128, "shared": 0,
                "sha256": "0" * 64} for i, t in enumerate(targets)]
    path.write_text(json.dumps({"schema": SCHEMA, "package_version": __version__, "compiler": {},
                                "objects": objects, "variants": []}))
    return path


def test_code_objects_per_target_reads_the_manifest(tmp_path):
    m = _manifest(tmp_path / "manifest.json", ["sm_90a", "sm_90a", "gfx942"])
    assert info.code_objects_per_target(m) == {"sm_90a": 2, "gfx942": 1}
    counts, problem = info.read_code_objects(tmp_path / "missing.json")
    assert counts == {} and "no code-object manifest" in problem


def test_platform_support_follows_the_manifest(tmp_path, monkeypatch):
    _manifest(tmp_path / "manifest.json", ["sm_90a"])
    monkeypatch.setenv("VLLM_MOE_AOT_ARTIFACTS", str(tmp_path))
    gpu = torch.device("cuda", 0)
    assert info.platform_info(gpu, *H100).supported
    a100 = info.platform_info(gpu, "NVIDIA A100", info.cuda_arch(8, 0))
    assert not a100.supported and "no code objects for sm_80" in a100.note
    assert info.cuda_arch(9, 0) == "sm_90a"
    cpu = info.platform_info(torch.device("cpu"), "cpu", info.INTERPRETER_ARCH)
    assert cpu.supported and not cpu.has_gpu
    line = info.summary_line(info.platform_info(gpu, *H100))
    assert f"vllm-moe-aot {__version__} ({BACKEND_NAME}) on: GPU {H100[0]} (sm_90a)" in line
    assert "code objects per target: sm_90a=1" in line and "tuned configs in" in line


def test_detect_platform_without_gpu(monkeypatch):
    if torch.cuda.is_available():  # pragma: no cover - the GPU machine
        return
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    p = info.detect_platform()
    assert (p.device, p.arch, p.supported) == (torch.device("cpu"), "interpreter", True)
    monkeypatch.delenv("TRITON_INTERPRET")
    p = info.detect_platform()
    assert p.device is None and not p.supported and p.note == "no GPU"


def test_devices_in_configs_filters_by_layer(tmp_path):
    path = _tuned_rows(tmp_path)
    hy3 = PRESETS["hy3"]
    assert info.devices_in_configs([path], hy3.shape, hy3.scheme) == [H100]
    qwen = PRESETS["qwen3.5-397b-a17b"]
    assert info.devices_in_configs([path], qwen.shape, qwen.scheme) == []
    assert info.devices_in_configs([path], hy3.shape, Scheme.FP8_PER_TENSOR_DYNAMIC) == [H100]


def test_info_lists_tuned_layers_that_are_not_presets_with_their_ep(tmp_path):
    """Rows tuned for an expert-parallel layer (hy3 at EP8: 24 of 192 experts per rank) are a
    layer of their own: listed with ",ep=8" in the shape and their buckets."""
    from tests.integration_support import write_tuned
    from vllm_moe_aot.shapes import MoEShape

    _tuned_rows(tmp_path)
    ep8 = MoEShape(E=24, K=4096, N=1536, topk=8, ep=8)
    write_tuned(tmp_path, ep8, Scheme.FP8_PER_TENSOR_STATIC, {1: "gemv_a", 64: "stock"},
                gpu=H100[0], arch=H100[1], name="hy3_fp8_per_tensor_tp1_ep8.tuned.csv")
    assert info.layers_in_configs(info.tuned_config_files(tmp_path)) == [
        (ep8, Scheme.FP8_PER_TENSOR_STATIC), (PRESETS["hy3"].shape, Scheme.FP8_PER_TENSOR_STATIC)]
    proc = _run_info("--config-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    hy3 = out[out.index("preset hy3"):out.index("preset qwen3.5")]
    assert "ep=" not in hy3 and "3 of 4 tuned M buckets" in hy3  # the preset: its own rows
    layer = out[out.index("layer E=24,K=4096,N=1536,topk=8,ep=8 fp8_per_tensor "
                          "(from the tuned configs)"):]
    assert f"{H100[0]} ({H100[1]}):" in layer and "aot    gemv_a" in layer
    assert "M <= 64 (and above)" in layer and "1 of 2 tuned M buckets" in layer
    assert out.count("\nlayer ") == 1  # the preset's layer is not listed twice
    only = _run_info("--preset", "hy3", "--config-dir", str(tmp_path))
    assert only.returncode == 0 and "ep=8" not in only.stdout  # --preset: the presets only


def test_info_says_which_layers_are_taken_and_shows_block_layers(tmp_path):
    """Block FP8 layers: listed among the layers taken, and a tuned block layer is shown like
    the others (family fp8_block)."""
    from tests.integration_support import write_tuned
    from vllm_moe_aot.shapes import MoEShape

    assert set(info.LAYERS_TAKEN) == set(Scheme)
    block = MoEShape(E=32, K=7168, N=256, topk=8)  # a DeepSeek-style 128x128 block layer
    write_tuned(tmp_path, block, Scheme.FP8_BLOCK, {1: "gemv_a", 16: "grouped_m16",
                                                    64: "stock"},
                gpu=H100[0], arch=H100[1], name="block_fp8_block_tp8.tuned.csv")
    assert info.layers_in_configs(info.tuned_config_files(tmp_path)) == [
        (block, Scheme.FP8_BLOCK)]
    proc = _run_info("--config-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    taken = out[out.index("layers taken"):out.index("code objects (")]
    assert "fp8_block" in taken and "weight_block_size [128, 128]" in taken
    assert "strategy block, 128x128" in taken
    assert "left to vLLM: other block sizes" in taken and "E8M0 block scales" in taken
    layer = out[out.index("layer E=32,K=7168,N=256,topk=8 fp8_block (from the tuned configs)"):]
    assert f"{H100[0]} ({H100[1]}):" in layer and "aot    gemv_a" in layer
    assert "M <= 64 (and above)" in layer and "2 of 3 tuned M buckets" in layer
    assert "VLLM_NOT_IMPORTED" in out
