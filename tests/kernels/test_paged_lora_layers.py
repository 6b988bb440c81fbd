"""Which kernel a paged vLLM layer runs (kernels.paged_lora_layers.resolve_kernel)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed")

from kernels.paged_lora_layers import resolve_kernel

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def test_auto_is_triton_on_cuda_and_torch_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve_kernel("auto", CUDA) == "triton"
    assert resolve_kernel("triton", CUDA) == "triton"
    assert resolve_kernel("auto", CPU) == "torch"
    assert resolve_kernel("torch", CPU) == "torch"


def test_triton_on_cpu_only_under_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(NotImplementedError, match="TRITON_INTERPRET=1"):
        resolve_kernel("triton", CPU)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_kernel("triton", CPU) == "triton"
    assert resolve_kernel("auto", CPU) == "torch"  # the interpreter is never picked by itself


def test_refused_combinations_say_what_to_set():
    with pytest.raises(NotImplementedError, match="LORAPLEX_PAGED_KERNEL=auto"):
        resolve_kernel("torch", CUDA)
    with pytest.raises(NotImplementedError, match="not xpu"):
        resolve_kernel("auto", torch.device("xpu"))
