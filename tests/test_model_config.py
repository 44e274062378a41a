"""``tune --model``: the MoE fields of Hugging Face configs, the per-rank layer, the CLI path on
the CPU (writes the untuned CSV, then stops at the no-GPU error)."""

from __future__ import annotations

import json

import pytest
import torch

from vllm_moe_aot.dispatch.configs import read_untuned, untuned_name
from vllm_moe_aot.measure.model_config import (
    ModelConfigError,
    ModelMoE,
    config_stem,
    per_rank_shape,
    quant_hint,
    read_model,
)
from vllm_moe_aot.shapes import PRESETS, TUNED_TOKEN_COUNTS, MoEShape, Scheme

BLOCK_FP8 = {"quant_method": "fp8", "activation_scheme": "dynamic",
             "weight_block_size": [128, 128]}

# name -> (config.json, expected (E, K, I, topk)); values as the models' own configs give them
CONFIGS = {
    "qwen3-235b-a22b": ({
        "_name_or_path": "Qwen/Qwen3-235B-A22B", "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe", "hidden_size": 4096, "intermediate_size": 12288,
        "moe_intermediate_size": 1536, "num_experts": 128, "num_experts_per_tok": 8,
    }, (128, 4096, 1536, 8)),
    "qwen3.5-397b-a17b": ({
        "_name_or_path": "Qwen/Qwen3.5-397B-A17B",
        "architectures": ["Qwen3_5MoeForConditionalGeneration"], "model_type": "qwen3_5_moe",
        "text_config": {"model_type": "qwen3_5_moe_text", "hidden_size": 4096,
                        "moe_intermediate_size": 1024, "shared_expert_intermediate_size": 1024,
                        "num_experts": 512, "num_experts_per_tok": 10},
        "vision_config": {"hidden_size": 1152},
    }, (512, 4096, 1024, 10)),
    "deepseek-v3": ({
        "_name_or_path": "deepseek-ai/DeepSeek-V3", "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3", "hidden_size": 7168, "intermediate_size": 18432,
        "moe_intermediate_size": 2048, "n_routed_experts": 256, "n_shared_experts": 1,
        "num_experts_per_tok": 8, "first_k_dense_replace": 3,
        "quantization_config": BLOCK_FP8,
    }, (256, 7168, 2048, 8)),
    "mixtral-8x7b-v0.1": ({
        "_name_or_path": "mistralai/Mixtral-8x7B-v0.1", "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336,
        "num_local_experts": 8, "num_experts_per_tok": 2,
    }, (8, 4096, 14336, 2)),
    "glm-4.5": ({
        "_name_or_path": "zai-org/GLM-4.5", "architectures": ["Glm4MoeForCausalLM"],
        "model_type": "glm4_moe", "hidden_size": 5120, "intermediate_size": 12288,
        "moe_intermediate_size": 1536, "n_routed_experts": 160, "n_shared_experts": 1,
        "num_experts_per_tok": 8,
    }, (160, 5120, 1536, 8)),
    "minimax-m2": ({
        "_name_or_path": "MiniMaxAI/MiniMax-M2", "architectures": ["MiniMaxM2ForCausalLM"],
        "model_type": "minimax_m2", "hidden_size": 3072, "intermediate_size": 1536,
        "num_local_experts": 256, "num_experts_per_tok": 8, "quantization_config": BLOCK_FP8,
    }, (256, 3072, 1536, 8)),
    "hy3": ({
        "_name_or_path": "tencent/Hy3", "architectures": ["HunYuanMoEV1ForCausalLM"],
        "model_type": "hunyuan_v1_moe", "hidden_size": 4096, "num_hidden_layers": 4,
        "num_experts": 192, "moe_topk": [8, 8, 8, 8], "moe_intermediate_size": [1536] * 4,
        "num_shared_expert": [1] * 4,
        "quantization_config": {"quant_method": "fp8", "activation_scheme": "static"},
    }, (192, 4096, 1536, 8)),
}


def write_config(tmp_path, cfg, folder="ckpt"):
    d = tmp_path / folder
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    return d / "config.json"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_families(tmp_path, name):
    cfg, (E, K, inter, topk) = CONFIGS[name]
    moe = read_model(write_config(tmp_path, cfg))
    assert (moe.name, moe.experts, moe.hidden, moe.intermediate, moe.topk) == \
        (name, E, K, inter, topk)


def test_quantisation_hints(tmp_path):
    assert read_model(write_config(tmp_path, CONFIGS["hy3"][0])).scheme \
        is Scheme.FP8_PER_TENSOR_STATIC
    ds = read_model(write_config(tmp_path, CONFIGS["deepseek-v3"][0], "ds"))
    assert ds.scheme is Scheme.FP8_BLOCK and "block FP8" in ds.quant
    cfg64 = dict(CONFIGS["deepseek-v3"][0])
    cfg64["quantization_config"] = dict(cfg64["quantization_config"], weight_block_size=[64, 64])
    ds64 = read_model(write_config(tmp_path, cfg64, "ds64"))
    assert ds64.scheme is None and "other than 128x128 are not built" in ds64.quant
    assert read_model(write_config(tmp_path, CONFIGS["glm-4.5"][0], "glm")).scheme is None
    ct = {"quant_method": "compressed-tensors", "config_groups": {"group_0": {
        "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "token",
                              "dynamic": True}}}}
    assert quant_hint({"quantization_config": ct})[0] is Scheme.FP8_PTPC
    ct["config_groups"]["group_0"]["weights"]["strategy"] = "tensor"
    ct["config_groups"]["group_0"]["input_activations"]["strategy"] = "tensor"
    assert quant_hint({"quantization_config": ct})[0] is Scheme.FP8_PER_TENSOR_DYNAMIC
    assert quant_hint({"quantization_config": {"quant_method": "fp8"}})[0] \
        is Scheme.FP8_PER_TENSOR_DYNAMIC
    assert quant_hint({"quantization_config": {"quant_method": "awq"}})[0] is None


def test_folder_argument_and_name_fallback(tmp_path):
    cfg = dict(CONFIGS["qwen3-235b-a22b"][0])
    del cfg["_name_or_path"]
    path = write_config(tmp_path, cfg, "My Qwen3 FP8")
    assert read_model(path.parent).name == "my-qwen3-fp8"
    assert read_model(path.parent, name="q3").name == "q3"
    with pytest.raises(ModelConfigError, match="without a config.json"):
        read_model(tmp_path)
    with pytest.raises(ModelConfigError, match="does not exist"):
        read_model(tmp_path / "nope.json")


def test_missing_field_is_named(tmp_path):
    cfg = dict(CONFIGS["deepseek-v3"][0])
    del cfg["moe_intermediate_size"]
    with pytest.raises(ModelConfigError,
                       match=r"model_type 'deepseek_v3'.*missing field 'moe_intermediate_size'"):
        read_model(write_config(tmp_path, cfg))
    cfg = dict(CONFIGS["hy3"][0], model_type="hunyuan_v9")  # unknown type: matched by fields
    del cfg["moe_topk"]
    with pytest.raises(ModelConfigError, match="missing field 'moe_topk'"):
        read_model(write_config(tmp_path, cfg, "h"))
    dense = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336}
    with pytest.raises(ModelConfigError, match=r"'llama'.*no routed-expert count"):
        read_model(write_config(tmp_path, dense, "llama"))
    cfg = dict(CONFIGS["hy3"][0], moe_topk=[8, 8, 4, 8])
    with pytest.raises(ModelConfigError, match=r"moe_topk differs between layers \(\[4, 8\]\)"):
        read_model(write_config(tmp_path, cfg, "h2"))


def test_per_rank_shape():
    qwen = ModelMoE("q", "qwen3_moe", experts=128, hidden=4096, intermediate=1536, topk=8)
    assert per_rank_shape(qwen, 8) == MoEShape(E=128, K=4096, N=192, topk=8)
    assert per_rank_shape(qwen, 4) == MoEShape(E=128, K=4096, N=384, topk=8)
    assert per_rank_shape(qwen, 1, ep=8) == MoEShape(E=16, K=4096, N=1536, topk=8, ep=8)
    assert per_rank_shape(qwen, 8, ep=16) == MoEShape(E=8, K=4096, N=1536, topk=8, ep=16)
    with pytest.raises(ValueError, match="not divisible by tp=7"):
        per_rank_shape(qwen, 7)
    with pytest.raises(ValueError, match="do not divide evenly over ep=3"):
        per_rank_shape(qwen, 1, ep=3)
    with pytest.raises(ValueError, match="not a multiple of tp=4"):
        per_rank_shape(qwen, 4, ep=6)


def test_presets_agree_with_their_model_configs(tmp_path):
    """The shipped presets are these models at tp8."""
    for preset_name in ("qwen3.5-397b-a17b", "hy3"):
        moe = read_model(write_config(tmp_path, CONFIGS[preset_name][0], preset_name))
        preset = PRESETS[preset_name]
        assert per_rank_shape(moe, 8) == preset.shape
        assert config_stem(moe.name, preset.scheme, 8) + ".untuned.csv" == \
            untuned_name(preset, 8)


# ------------------------------------------------------------------------------- the CLI

def _tune(argv, monkeypatch, tmp_path):
    from vllm_moe_aot.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VLLM_MOE_AOT_CONFIG_DIR", raising=False)
    return main(["tune", *argv])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_cli_model_writes_untuned_then_needs_gpu(tmp_path, monkeypatch, capsys):
    path = write_config(tmp_path, CONFIGS["qwen3-235b-a22b"][0])
    rc = _tune(["--model", str(path.parent), "--tp", "8"], monkeypatch, tmp_path)
    cap = capsys.readouterr()
    assert rc == 2
    cdir = (tmp_path / "vllm-moe-aot-configs").resolve()
    untuned = cdir / "qwen3-235b-a22b_fp8_ptpc_tp8.untuned.csv"
    keys, issues = read_untuned(untuned)
    assert issues == [] and [k.tokens for k in keys] == list(TUNED_TOKEN_COUNTS)
    assert len(keys) == 18
    assert {k.shape for k in keys} == {MoEShape(E=128, K=4096, N=192, topk=8)}
    assert {k.scheme for k in keys} == {"fp8_ptpc"}
    assert "E=128,K=4096,N=192,topk=8" in cap.out and str(untuned) in cap.out
    assert "needs a CUDA or ROCm GPU" in cap.err and str(untuned) in cap.err
    assert f"VLLM_MOE_AOT_CONFIG_DIR={cdir}" in cap.err
    assert "unquantised" in cap.err  # the note on the default scheme
    assert not (cdir / "qwen3-235b-a22b_fp8_ptpc_tp8.tuned.csv").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_cli_model_scheme_from_checkpoint_env_dir_and_ep(tmp_path, monkeypatch, capsys):
    cfg = dict(CONFIGS["qwen3.5-397b-a17b"][0],
               quantization_config={"quant_method": "fp8", "activation_scheme": "static"})
    path = write_config(tmp_path, cfg)
    from vllm_moe_aot.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VLLM_MOE_AOT_CONFIG_DIR", str(tmp_path / "mine"))
    assert main(["tune", "--model", str(path), "--tp", "8", "--ep", "8"]) == 2
    keys, _ = read_untuned(tmp_path / "mine"
                           / "qwen3.5-397b-a17b_fp8_per_tensor_tp8_ep8.untuned.csv")
    assert {k.shape for k in keys} == {MoEShape(E=64, K=4096, N=1024, topk=10, ep=8)}
    assert {k.scheme for k in keys} == {"fp8_per_tensor"}
    assert "tp=8, ep=8: E=64,K=4096,N=1024,topk=10,ep=8" in capsys.readouterr().out
    rc = main(["tune", "--model", str(path), "--tp", "8", "--scheme", "fp8_ptpc",
               "--config-dir", str(tmp_path / "other"), "--name", "q35"])
    assert rc == 2 and (tmp_path / "other" / "q35_fp8_ptpc_tp8.untuned.csv").is_file()
    # Hy3's full intermediate size (1536) under EP8: the untuned rows are written (no GPU)
    hy3 = write_config(tmp_path, CONFIGS["hy3"][0], "hy3")
    assert main(["tune", "--model", str(hy3), "--tp", "1", "--ep", "8"]) == 2
    keys, _ = read_untuned(tmp_path / "mine" / "hy3_fp8_per_tensor_tp1_ep8.untuned.csv")
    assert {(k.shape.N, k.shape.ep) for k in keys} == {(1536, 8)}


def test_cli_model_errors(tmp_path, monkeypatch, capsys):
    mixtral = write_config(tmp_path, CONFIGS["mixtral-8x7b-v0.1"][0])
    huge = write_config(tmp_path, dict(CONFIGS["mixtral-8x7b-v0.1"][0],
                                       intermediate_size=65536), "huge")
    # N = 65536 / 2 = 32768 is past MAX_N: refused before anything is written
    assert _tune(["--model", str(huge), "--tp", "2"], monkeypatch, tmp_path) == 2
    err = capsys.readouterr().err
    assert "cannot serve this layer: intermediate size N=32768" in err
    assert "tp values that fit: 4, 8, 16, 32" in err
    assert not (tmp_path / "vllm-moe-aot-configs").exists()
    assert _tune(["--model", str(mixtral)], monkeypatch, tmp_path) == 2
    assert "--model needs --tp" in capsys.readouterr().err
    assert _tune(["--model", str(tmp_path / "x"), "--tp", "1"], monkeypatch, tmp_path) == 2
    assert "does not exist" in capsys.readouterr().err
    assert _tune(["-i", "a.csv"], monkeypatch, tmp_path) == 2
    assert "-i needs -o" in capsys.readouterr().err
    assert _tune(["-i", "a.csv", "-o", "b.csv", "--tp", "8"], monkeypatch, tmp_path) == 2
    assert "--tp only go with --model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _tune(["-i", "a.csv", "--model", str(mixtral)], monkeypatch, tmp_path)
