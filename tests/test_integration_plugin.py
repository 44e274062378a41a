"""The vLLM general plugin: discovery, the VLLM_MOE_BACKEND switch, idempotence, its log line,
and installing/uninstalling the backend-selection hook in every module that binds it."""

from __future__ import annotations

import importlib.metadata
import logging
import sys

import pytest

import vllm_moe_aot
from tests import integration_support as support
from vllm_moe_aot import BACKEND_NAME
from vllm_moe_aot.integration import ENV_VAR, _reset_log_once

pytestmark = [pytest.mark.vllm, support.requires_vllm()]
moe_logs = support.moe_logs  # fixture


@pytest.fixture
def clean_plugin(monkeypatch):
    """No plugin state before or after; VLLM_PLUGINS unset so vLLM loads every plugin."""
    from vllm_moe_aot.integration import plugin

    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    plugin._reset()
    _reset_log_once()
    yield plugin
    plugin._reset()
    _reset_log_once()


def _originals():
    from vllm.model_executor.layers.fused_moe.oracle import fp8 as oracle

    from vllm_moe_aot.integration import hook

    fn = getattr(oracle, hook.ATTR)
    return getattr(fn, "__vllm_moe_aot_original__", fn)


def test_entry_point_is_discoverable():
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    ours = [ep for ep in eps if ep.name == "vllm_moe_aot"]
    assert len(ours) == 1, "pip install -e . --no-deps registers the entry point"
    assert ours[0].value == "vllm_moe_aot:register"
    assert ours[0].load() is vllm_moe_aot.register


def test_vllm_loads_it_and_a_second_load_changes_nothing(monkeypatch, clean_plugin, moe_logs):
    import vllm.plugins

    from vllm_moe_aot.integration import hook

    monkeypatch.setenv(ENV_VAR, BACKEND_NAME)
    original = _originals()
    for _ in range(2):  # vLLM loads general plugins in every process, sometimes twice
        monkeypatch.setattr(vllm.plugins, "plugins_loaded", False)
        vllm.plugins.load_general_plugins()
    vllm_moe_aot.register()  # and a direct call on top
    assert hook.is_installed()
    for name in hook.BINDINGS:  # one wrapper per module, each around vLLM's own function
        fn = getattr(sys.modules[name], hook.ATTR)
        assert fn.__vllm_moe_aot_original__ is original
        assert fn.__wrapped__ is original
    lines = moe_logs.matching(f"vllm-moe-aot {vllm_moe_aot.__version__}")
    assert len(lines) == 1, moe_logs.messages
    line = lines[0]
    assert BACKEND_NAME in line and "code objects per target" in line
    assert "tuned configs in" in line
    assert "no GPU" in line  # this machine: the arch part says there is no GPU


def test_unset_does_nothing(monkeypatch, clean_plugin, moe_logs):
    from vllm_moe_aot.integration import hook

    monkeypatch.delenv(ENV_VAR, raising=False)
    hook.uninstall()
    clean_plugin.register()
    monkeypatch.setenv(ENV_VAR, "")
    clean_plugin.register()
    assert not hook.is_installed()
    assert moe_logs.messages == []


def test_unknown_value_warns_once_with_the_valid_values(monkeypatch, clean_plugin, moe_logs):
    from vllm_moe_aot.integration import hook

    hook.uninstall()
    monkeypatch.setenv(ENV_VAR, "triton_aot")
    clean_plugin.register()
    clean_plugin.register()
    assert not hook.is_installed()
    warnings = [r for r in moe_logs.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, moe_logs.messages
    assert "'triton_aot'" in warnings[0].getMessage()
    assert BACKEND_NAME in warnings[0].getMessage()


def test_install_twice_then_uninstall_restores_vllm(monkeypatch, clean_plugin):
    from vllm_moe_aot.integration import hook

    original = _originals()
    first = hook.install()
    assert sorted(first) == sorted(hook.BINDINGS)
    wrappers = {n: getattr(sys.modules[n], hook.ATTR) for n in hook.BINDINGS}
    assert hook.install() == []  # second install: nothing rewrapped
    assert {n: getattr(sys.modules[n], hook.ATTR) for n in hook.BINDINGS} == wrappers
    hook.uninstall()
    assert not hook.is_installed()
    for name in hook.BINDINGS:
        assert getattr(sys.modules[name], hook.ATTR) is original


def test_a_module_that_bound_a_wrapper_gets_its_own(monkeypatch, clean_plugin):
    """A binding that holds another module's wrapper (imported after a partial install) is
    rewrapped around vLLM's function, never around the wrapper."""
    from vllm.model_executor.layers.quantization import fp8 as fp8_method

    from vllm_moe_aot.integration import hook

    original = _originals()
    hook.install()
    oracle_wrapper = getattr(sys.modules[hook.ORACLE_MODULE], hook.ATTR)
    monkeypatch.setattr(fp8_method, hook.ATTR, oracle_wrapper)
    assert hook.install() == [fp8_method.__name__]
    fn = getattr(fp8_method, hook.ATTR)
    assert fn.__vllm_moe_aot_module__ == fp8_method.__name__
    assert fn.__vllm_moe_aot_original__ is original


def test_start_up_line_waits_for_vllm_logging(monkeypatch, clean_plugin, moe_logs):
    """Where vLLM configures its logging only after loading plugins, the line comes with the
    first backend selection instead (still once)."""
    monkeypatch.setenv(ENV_VAR, BACKEND_NAME)
    monkeypatch.setattr(clean_plugin.logger, "hasHandlers", lambda: False)
    clean_plugin.register()
    start = f"vllm-moe-aot {vllm_moe_aot.__version__}"
    assert moe_logs.matching(start) == []
    with support.cpu_vllm():
        for _ in range(2):
            support.make_layer("fp8_dynamic", 16, 128, 32, 2, load=False)
    assert len(moe_logs.matching(start)) == 1
