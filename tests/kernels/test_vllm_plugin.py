from __future__ import annotations

from importlib.metadata import entry_points

import pytest

from kernels.vllm_plugin import UnsupportedVLLMVersion, check_vllm_version


def test_plugin_is_registered_for_every_vllm_process():
    plugins = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert plugins.get("loraplex") == "kernels.vllm_plugin:register"


@pytest.mark.parametrize("version", ["0.31.2", "0.33.0", "1.0.0", "0.3.2"])
def test_plugin_refuses_other_vllm_versions(version):
    with pytest.raises(UnsupportedVLLMVersion, match=version):
        check_vllm_version(version)


def test_plugin_accepts_the_pinned_series():
    import vllm

    check_vllm_version(vllm.__version__)
    check_vllm_version("0.32.5")
