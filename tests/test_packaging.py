"""Our top-level `kernels` package must not be mistaken for the unrelated PyPI `kernels`."""

from __future__ import annotations

import subprocess
import sys


def test_transformers_does_not_take_our_kernels_for_hf_kernels():
    from transformers.utils import import_utils

    import_utils.is_kernels_available.cache_clear()
    assert import_utils.is_kernels_available() is False


def test_importing_transformers_and_vllm_does_not_import_our_kernels():
    code = (
        "import sys, transformers, vllm\n"
        "from transformers import LlamaForCausalLM\n"
        "from transformers.integrations import hub_kernels\n"
        "assert 'kernels' not in sys.modules, sys.modules['kernels']\n"
        "print(hub_kernels.is_kernels_available())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "False"


def test_our_kernels_package_is_cheap_to_import():
    code = "import sys, kernels; print('torch' in sys.modules, 'triton' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]
