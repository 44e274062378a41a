"""One call clears every process-wide cache of the package."""

from __future__ import annotations

import logging

import torch

from vllm_moe_aot import caches


def test_clear_all_forgets_every_process_wide_cache():
    from vllm_moe_aot import info, pipeline
    from vllm_moe_aot.integration import _once_seen, get_logger, log_once, metadata, plugin
    from vllm_moe_aot.pipeline import FusedMoE
    from vllm_moe_aot.runtime import Runtime
    from vllm_moe_aot.shapes import MoEShape, Scheme

    assert {"runtime.Runtime", "pipeline.FusedMoE.shared", "integration.metadata",
            "integration.log_once", "integration.plugin", "info.manifest_counts"} <= set(
                caches.names())
    log_once(get_logger("test"), logging.DEBUG, "once")
    FusedMoE.shared(MoEShape(E=4, K=128, N=32, topk=2), Scheme.FP8_PTPC, torch.device("cpu"),
                    max_tokens=2)
    info.read_code_objects()
    assert _once_seen and Runtime._instances and pipeline._shared
    assert info._manifest_counts.cache_info().currsize
    caches.clear_all()
    assert not _once_seen and not Runtime._instances and not pipeline._shared
    assert not info._manifest_counts.cache_info().currsize
    assert not metadata._tables and not plugin._registered
