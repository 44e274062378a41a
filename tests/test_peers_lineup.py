"""Which peer plays stock (what vLLM itself would run), and how a peer that cannot run is
reported. CPU only; tests/gpu/test_vllm_cutlass_gpu.py runs the peers themselves."""

from __future__ import annotations

import pytest

from vllm_moe_aot.measure.peers import lineup, vllm_cutlass, vllm_triton
from vllm_moe_aot.shapes import Scheme


@pytest.fixture
def no_vllm(monkeypatch):
    """The GPU machine: vLLM is not installed."""
    monkeypatch.setattr(vllm_triton, "_real_vllm_importable", lambda: False)


def test_on_hopper_without_vllm_ptpc_is_cutlass_and_per_tensor_is_triton(no_vllm):
    assert lineup.vllm_would_run(Scheme.FP8_PTPC)[0] == "vllm_cutlass"
    name, why = lineup.vllm_would_run(Scheme.FP8_PER_TENSOR_STATIC)
    assert name == "vllm_triton" and "no FlashInfer" in why
    assert lineup.vllm_would_run(Scheme.FP8_PER_TENSOR_DYNAMIC)[0] == "vllm_triton"


def test_flashinfer_choice_is_named_and_triton_stands_in(monkeypatch):
    from vllm_moe_aot.integration import providers

    monkeypatch.setattr(vllm_triton, "_real_vllm_importable", lambda: True)
    monkeypatch.setattr(providers.PlatformFlags, "from_vllm", classmethod(
        lambda cls: cls(arch="sm_90a", flashinfer_cutlass_moe=True)))
    name, why = lineup.vllm_would_run(Scheme.FP8_PER_TENSOR_STATIC)
    assert name == "vllm_triton" and "flashinfer_cutlass" in why
    # ptpc online layers never go to FlashInfer's CUTLASS MoE on Hopper
    assert lineup.vllm_would_run(Scheme.FP8_PTPC)[0] == "vllm_cutlass"


def test_missing_cutlass_library_names_the_build_command(tmp_path, monkeypatch):
    monkeypatch.setenv(vllm_cutlass.ENV_LIB, str(tmp_path / "nope.so"))
    why = vllm_cutlass.unavailable_reason()
    assert why is not None and vllm_cutlass.BUILD_SCRIPT in why and "nope.so" in why


def test_unknown_peer_is_refused():
    import torch

    with pytest.raises(ValueError, match="unknown peer 'flashinfer'"):
        lineup.lineup(torch.device("cpu"), Scheme.FP8_PTPC, ("flashinfer",))


def test_best_peer_is_a_whole_layer():
    assert "gemm_bound" in lineup.PEER_NAMES and "gemm_bound" not in lineup.COMPLETE
    assert set(lineup.COMPLETE) < set(lineup.PEER_NAMES)


def test_built_library_picks_vllms_sm90_config():
    """The library's host-side config choice is vLLM's run_cutlass_moe_mm_sm90 order (m <= 4,
    m <= 64, n >= 8192, k >= 8192, default); needs no GPU, only the built library."""
    if vllm_cutlass.library_path().is_file() is False:
        pytest.skip(f"library not built here (python3 {vllm_cutlass.BUILD_SCRIPT})")
    lib = vllm_cutlass.load_library()
    assert lib.build_info["vllm"] == "0.33.0" and lib.build_info["arch"] == "sm_90a"
    cases = {(4, 256, 4096): "M4", (5, 256, 4096): "M64", (64, 8192, 8192): "M64",
             (65, 256, 4096): "default", (65, 8192, 8192): "N8192",
             (65, 4096, 8192): "K8192"}
    for (m, n, k), want in cases.items():
        assert lib.config_for(m, n, k)[0] == want, (m, n, k)


def test_tune_stock_falls_back_to_triton_when_vllms_choice_cannot_run(monkeypatch, capsys):
    """A ptpc row on a machine without the built CUTLASS library is still tuned against a
    stock peer (vLLM's Triton path), and the row will name that peer, not vllm_cutlass."""
    import argparse

    import torch

    from vllm_moe_aot.measure import tune_cli

    def fake_lineup(dev, scheme, names, triton_source=None):
        peers = {n: lineup.Peer(n, "fake", lambda p: (lambda: None))
                 for n in names if n == "vllm_triton"}
        return peers, [f"{n}: not built" for n in names if n not in peers]

    monkeypatch.setattr(lineup, "vllm_would_run", lambda s: ("vllm_cutlass", "rule"))
    monkeypatch.setattr(lineup, "lineup", fake_lineup)
    stock_for = tune_cli._stock_for(argparse.Namespace(stock="auto", triton_source="auto"),
                                    torch.device("cpu"))
    peer = stock_for(Scheme.FP8_PTPC)
    assert peer is not None and peer.name == "vllm_triton"
    assert "vllm_cutlass would be stock" in capsys.readouterr().err
    # asked for by name, no stand-in
    stock_for = tune_cli._stock_for(argparse.Namespace(stock="vllm_cutlass",
                                                       triton_source="auto"),
                                    torch.device("cpu"))
    assert stock_for(Scheme.FP8_PTPC) is None
